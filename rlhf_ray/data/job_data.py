"""A job's data: resolve the source, load and check it, and collate batches.

Loading happens on the driver before any model is built, so bad input fails
first. `JobData.batch(indices)` returns the dict of tensors the workers take
(see `models/forward.py` for the layouts); encoding is done per batch, which
keeps start-up fast and lets KTO pair each prompt with a mismatched
completion from the same batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from rlhf_ray.config.schema import DataConfig
from rlhf_ray.data.collate import collate_sequences
from rlhf_ray.data.formats import DataError, Example
from rlhf_ray.data.loading import load_examples
from rlhf_ray.data.tasks import resolve_task_source
from rlhf_ray.data.tokenize import (
    EncodedSequence,
    encode_prompt_response,
    has_chat_template,
)


def resolve_source(spec: str, data_dir: Path) -> str:
    """A data source as `load_examples` takes it; a shipped task's `<task>:<split>` (`synthetic:prompts_train`,
    `arithmetic:prompts_eval`) is written into `data_dir` once (`data/tasks.py`)."""
    return resolve_task_source(spec, data_dir)


def load_job_examples(spec: str, fmt: str, data: DataConfig, tokenizer: Any, data_dir: Path,
                      kind: str | None = None) -> tuple[list, dict]:
    """Checked examples of `spec` in format `fmt` and the count of skipped rows by reason; with `kind`, each
    row also passes that data format's own check (`OfflineDataFormat.check_row`).

    A prompt longer than `data.max_prompt_length` tokens (rendered by this tokenizer, its chat template
    included) is a bad row, and chat-message rows need a tokenizer with a chat template: both fail here,
    on the driver before any model loads, naming the file."""
    from rlhf_ray.offline_formats import data_format

    source = resolve_source(spec, data_dir)
    loaded = load_examples(source, fmt, column_map=data.column_map or None,
                           prompt_template=data.prompt_template or None, skip_bad_rows=data.skip_bad_rows,
                           max_prompt_length=data.max_prompt_length, tokenizer=tokenizer,
                           check_row=data_format(kind).check_row if kind else None)
    examples = loaded.examples[:data.max_examples] if data.max_examples else loaded.examples
    if not has_chat_template(tokenizer) and any(_is_chat(example) for example in examples):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise DataError(f"{source} holds chat messages (lists of role/content turns), but the tokenizer {name} has "
                        "no chat template to render them: use the tokenizer of a chat model (policy.model.tokenizer), "
                        "or data with plain-string prompts and responses")
    return examples, loaded.skipped


def _is_chat(example) -> bool:
    texts = [getattr(example, key, None) for key in ("prompt", "completion", "chosen", "rejected")]
    texts += list(getattr(example, "responses", ()))
    return any(isinstance(text, list) for text in texts)


@dataclass
class JobData:
    """Examples of one split, and how to turn a list of indices into a batch."""

    examples: list[Example]
    kind: str
    """The name of its data format (`offline_formats.DATA_FORMATS`): sft, preference, kto, ranked (reward-model
    training), prompt (online), ..."""
    tokenizer: Any
    config: DataConfig
    skipped: dict = field(default_factory=dict)
    params: Mapping[str, Any] = field(default_factory=dict)
    """The objective's resolved parameters, for a format whose batches depend on them (a segment's length)."""

    def __len__(self) -> int:
        return len(self.examples)

    def _encode(self, prompt, response) -> EncodedSequence:
        """Token ids of a prompt and response, encoded once per pair of texts (every epoch after the first,
        and evaluation's repeated batches, reuse them).

        The driver keeps every pair it has encoded, so compactly: keyed by a 16-byte digest of the texts,
        the ids in one int32 array with the prompt's length (the loss mask is 0 over the prompt, 1 after),
        about 4 bytes a token. Python lists of ints keyed by the texts' repr took about 52 (10 GB for 100k
        pairs of 2k tokens); `benchmarks/encode_cache.py` measures it."""
        key = hashlib.blake2b(repr((prompt, response)).encode(), digest_size=16).digest()
        cache = self.__dict__.setdefault("_encoded", {})
        kept = cache.get(key)
        if kept is None:
            encoded = encode_prompt_response(self.tokenizer, prompt, response, max_length=self.config.max_length,
                                             max_prompt_length=self.config.max_prompt_length)
            cache[key] = (np.asarray(encoded.input_ids, dtype=np.int32), encoded.prompt_length, encoded.truncated)
            return encoded
        ids, prompt_length, truncated = kept
        return EncodedSequence(input_ids=ids.tolist(), loss_mask=[0] * prompt_length + [1] * (len(ids) - prompt_length),
                               prompt_length=prompt_length, truncated=truncated)

    def _collate(self, sequences, prefix: str = "") -> dict[str, torch.Tensor]:
        batch = collate_sequences(sequences, self.tokenizer.pad_token_id)
        return {prefix + k: v for k, v in batch.items()}

    def batch(self, indices: list[int]) -> dict:
        """The tensors of these examples, in the layout of `self.kind` (its format object's `batch`)."""
        from rlhf_ray.offline_formats import data_format

        return data_format(self.kind).batch(self, [self.examples[i] for i in indices])

    def prompts(self, indices: list[int] | None = None) -> dict:
        """Left-padded prompts of these examples (any format has a prompt): for generation."""
        from rlhf_ray.offline_formats import data_format

        rows = self.examples if indices is None else [self.examples[i] for i in indices]
        return data_format("prompt").batch(self, rows)

