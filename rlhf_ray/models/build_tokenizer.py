"""Train the tiny tokenizer shipped in ``rlhf_ray/models/tiny_tokenizer/``.

A byte-level BPE (the GPT-2 scheme: any UTF-8 text encodes, nothing maps to an
unknown token) trained with the ``tokenizers`` library on the synthetic task's
corpus plus the chat template's words, with about 1,000 tokens so the tiny
models' embedding tables stay small. The result is wrapped as a Hugging Face
fast tokenizer and saved with ``save_pretrained``, so
``AutoTokenizer.from_pretrained(path)`` loads it with pad/bos/eos set and the
chat template below.

Regenerate the shipped files (deterministic for a given ``tokenizers`` version)::

    python -m rlhf_ray.models.build_tokenizer [--out DIR] [--vocab-size N]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Iterable, Iterator

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # ids 0, 1, 2
DEFAULT_VOCAB_SIZE = 1024
MODEL_MAX_LENGTH = 1024
DEFAULT_OUT = Path(__file__).resolve().parent / "tiny_tokenizer"

# Turns render as "User: ...\n", "System: ...\n", "Assistant: ...<|eos|>\n",
# after one <|bos|>. With add_generation_prompt the text ends in "Assistant:",
# and the reply's tokens start with " " (byte-level BPE keeps the space on the
# word), so render(messages[:-1], add_generation_prompt=True) is a prefix of
# render(messages) in text and in tokens: the response mask is that prefix.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ 'System: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}"
    "{% else %}{{ raise_exception('chat message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ "
    "'; this template knows system, user and assistant') }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

_CHAT_WORDS = ("System: You are a helpful assistant.\n", "User: hello\n", "Assistant: hello\n", "Assistant:")


def training_texts() -> Iterator[str]:
    """The tokenizer's training corpus: the synthetic task and the chat template's words."""
    from rlhf_ray.data.synthetic import SyntheticConfig, build_synthetic, corpus_texts

    for _ in range(500):  # often enough that the role names become single tokens
        yield from _CHAT_WORDS
    yield from corpus_texts(SyntheticConfig())
    # The demonstrations as the chat template renders them, so a reply's first
    # word is learned with its leading space (" Sure") as it appears after "Assistant:".
    for row in build_synthetic(SyntheticConfig())["sft"]:
        yield f"User: {row['prompt']}\nAssistant: {row['completion']}\n"


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE):
    """Train a byte-level BPE on ``texts``; returns a ``tokenizers.Tokenizer``.

    No normaliser and no prefix space, so ``decode(encode(x)) == x`` for any
    string ``x``; the special tokens take ids 0 (pad), 1 (bos), 2 (eos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def wrap_tokenizer(tokenizer):
    """Wrap a trained ``tokenizers.Tokenizer`` as a transformers fast tokenizer
    with the special tokens, chat template and decoding settings of the tiny default."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,  # keep " ." as is: exact round trip
    )


def build_tokenizer(out_dir: str | Path = DEFAULT_OUT, vocab_size: int = DEFAULT_VOCAB_SIZE) -> Path:
    """Train on :func:`training_texts`, wrap and ``save_pretrained`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = wrap_tokenizer(train_tokenizer(training_texts(), vocab_size))
    # The template goes inside tokenizer_config.json (package data is *.json).
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(out, save_jinja_files=False)
    # Name the class every transformers version knows (v5 maps it to its
    # tokenizers backend) and write the special-tokens map older versions read.
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    special = {"pad_token": PAD_TOKEN, "bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train and save rlhf-ray's tiny byte-level BPE tokenizer.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE, help="target vocabulary size")
    args = parser.parse_args(argv)
    out = build_tokenizer(args.out, args.vocab_size)
    print(f"wrote the tiny tokenizer to {out}")


if __name__ == "__main__":
    main()
