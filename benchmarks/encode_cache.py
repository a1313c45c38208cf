"""The driver's memory for a large preference set: every pair encoded once and kept for the next epochs.

    python benchmarks/encode_cache.py [--pairs 200000] [--words 20]

Builds `--pairs` preference pairs in memory (prompt, chosen and rejected of `--words` words each), reads
them all as DPO batches through `JobData` with the tiny tokenizer (the first epoch: every pair encoded and
kept), then reads them all again (the second epoch: every pair from the cache), and prints the driver's
peak RSS (VmHWM) after each stage, the tokens kept and what the cache costs per token (tracemalloc's count
of the bytes it holds, beside the RSS growth).
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

from rlhf_ray.config import load_config
from rlhf_ray.data.formats import PreferenceExample
from rlhf_ray.data.job_data import JobData
from rlhf_ray.models.loading import load_tokenizer_for
from rlhf_ray.telemetry.memory import peak_rss_bytes

MiB = 2**20


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=200_000, help="preference pairs")
    parser.add_argument("--words", type=int, default=20, help="words in each prompt, chosen and rejected text")
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    cfg = load_config("tiny-dpo", ["data.max_length=1024", "data.max_prompt_length=512"])
    tokenizer = load_tokenizer_for("tiny-gpt2")
    examples = [PreferenceExample(prompt=f"q{i} " + " ".join(f"w{(i * 7 + j) % 997}" for j in range(args.words)),
                                  chosen=" ".join(f"yes{(i + j) % 991}" for j in range(args.words)),
                                  rejected=" ".join(f"no{(i * 3 + j) % 983}" for j in range(args.words)))
                 for i in range(args.pairs)]
    data = JobData(examples, "preference", tokenizer, cfg.data)
    data.batch([0])
    loaded = peak_rss_bytes()
    print(f"{args.pairs} pairs in memory: peak RSS {loaded / MiB:.0f} MiB", flush=True)
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    tokens, start = 0, time.perf_counter()
    for first in range(0, args.pairs, args.batch_size):
        batch = data.batch(list(range(first, min(first + args.batch_size, args.pairs))))
        tokens += int(batch["chosen_attention_mask"].sum() + batch["rejected_attention_mask"].sum())
    kept, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    encoded = peak_rss_bytes()
    print(f"epoch 1 (encode and keep {tokens} tokens, {time.perf_counter() - start:.0f} s): peak RSS "
          f"{encoded / MiB:.0f} MiB; the cache holds {(kept - before) / MiB:.0f} MiB, "
          f"{(kept - before) / tokens:.1f} bytes a token (RSS grew {(encoded - loaded) / tokens:.1f} bytes a token)",
          flush=True)
    start = time.perf_counter()
    for first in range(0, args.pairs, args.batch_size):
        data.batch(list(range(first, min(first + args.batch_size, args.pairs))))
    print(f"epoch 2 (from the cache, {time.perf_counter() - start:.0f} s): peak RSS {peak_rss_bytes() / MiB:.0f} MiB",
          flush=True)
    return {"pairs": args.pairs, "tokens": tokens, "peak_rss_bytes": peak_rss_bytes(),
            "cache_bytes_per_token": (kept - before) / tokens}


if __name__ == "__main__":
    main()
