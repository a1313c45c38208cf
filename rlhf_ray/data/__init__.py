"""Data: loading prompts, demonstrations and preferences into checked,
normalised examples; rendering and tokenising them; padding them into
batches; and deterministic, resumable, rank-sharded sampling.

Typical use::

    data = load_examples("prefs.jsonl", "preference", max_prompt_length=512, tokenizer=tok)
    chosen = [encode_prompt_response(tok, ex.prompt, ex.chosen, max_length=1024, max_prompt_length=512)
              for ex in data.examples]
"""

from rlhf_ray.data.collate import collate_prompts, collate_sequences
from rlhf_ray.data.formats import (
    FORMATS,
    SKIP_REASONS,
    DataError,
    Example,
    KTOExample,
    Message,
    PreferenceExample,
    PromptExample,
    RankedExample,
    SFTExample,
    Text,
)
from rlhf_ray.data.loading import LoadedData, load_examples
from rlhf_ray.data.sampler import EpochSampler, shard_for_rank
from rlhf_ray.data.tokenize import (
    EncodedSequence,
    count_prompt_tokens,
    encode_prompt,
    encode_prompt_response,
    has_chat_template,
    render_prompt,
    render_response,
)

__all__ = [
    "FORMATS",
    "SKIP_REASONS",
    "DataError",
    "EncodedSequence",
    "EpochSampler",
    "Example",
    "KTOExample",
    "LoadedData",
    "Message",
    "PreferenceExample",
    "PromptExample",
    "RankedExample",
    "SFTExample",
    "Text",
    "collate_prompts",
    "collate_sequences",
    "count_prompt_tokens",
    "encode_prompt",
    "encode_prompt_response",
    "has_chat_template",
    "load_examples",
    "render_prompt",
    "render_response",
    "shard_for_rank",
]
