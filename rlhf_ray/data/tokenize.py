"""Rendering prompts and responses to text, and text to token ids.

Rendering. A string is used as is. A chat list goes through the tokenizer's
chat template when it has one (the prompt with ``add_generation_prompt=True``;
a response as the text the template adds after that prompt), and otherwise
through a plain ``"role: content"`` join::

    prompt   [user: "Hi"]          ->  "user: Hi\\nassistant:"
    response [assistant: "Hello"]  ->  " Hello"

Special tokens. A prompt rendered by a chat template already carries the
template's special tokens, so it is tokenised with ``add_special_tokens=False``;
any other prompt with ``add_special_tokens=True`` (a BOS for tokenizers that
add one). Responses never get added special tokens; an EOS is appended
instead, unless the response already ends with EOS, or (a chat response
rendered by a template) the template already wrote an EOS to close the turn:
whatever the template puts after it, such as ``"<|im_end|>\n"``'s newline, is
kept as the template wrote it.

Truncation policy:

1. A prompt longer than ``max_prompt_length`` tokens keeps its LAST
   ``max_prompt_length`` tokens here (left truncation: the end of a prompt,
   next to the answer, matters most). Jobs never get that far: their loader
   rejects or skips such rows up front (``load_examples(...,
   max_prompt_length=...)``, called by ``job_data.load_job_examples``).
2. If prompt + response (with its EOS) is still longer than ``max_length``,
   the response is cut on the right. Its EOS is then gone, so the sample
   counts as unfinished (``EncodedSequence.truncated``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rlhf_ray.data.formats import DataError, Text


@dataclass(frozen=True)
class EncodedSequence:
    """One prompt + response as token ids.

    ``input_ids`` and ``loss_mask`` have the same length T; ``loss_mask`` is 1
    on response tokens (EOS included) and 0 on the ``prompt_length`` prompt
    tokens. ``truncated`` is True when ``max_length`` cut the response (so it
    has no EOS)."""

    input_ids: list[int]
    loss_mask: list[int]
    prompt_length: int
    truncated: bool = False


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer: Any, prompt: Text) -> str:
    """The text the model sees before it answers; see the module docstring."""
    if isinstance(prompt, str):
        return prompt
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    return _plain_join(prompt) + "\nassistant:"


def render_response(tokenizer: Any, response: Text, prompt: Text | None = None) -> str:
    """The text of a response as it follows its rendered prompt.

    A chat-list response with a chat template needs its chat-list ``prompt``:
    the response is what the template renders for prompt + response beyond
    what it renders for the prompt alone."""
    if isinstance(response, str):
        return response
    if not has_chat_template(tokenizer):
        first, rest = response[0], response[1:]
        return " " + first["content"] + "".join(f"\n{m['role']}: {m['content']}" for m in rest)
    if not isinstance(prompt, list):
        raise DataError(
            "a chat-list response is rendered by the tokenizer's chat template together with its prompt, "
            "which must then be a chat list too; pass prompt=<chat list>"
        )
    head = render_prompt(tokenizer, prompt)
    full = tokenizer.apply_chat_template(prompt + response, add_generation_prompt=False, tokenize=False)
    if not full.startswith(head):
        raise DataError(
            "the tokenizer's chat template renders prompt + response so that it does not start with the rendered "
            f"prompt ({head[-60:]!r} is not a prefix of the conversation), so the response tokens cannot be told "
            "apart from the prompt's; use string prompts/responses or a template that renders turns in order"
        )
    return full[len(head) :]


def count_prompt_tokens(tokenizer: Any, prompt: Text) -> int:
    """Length in tokens of the rendered prompt, before any truncation."""
    return len(_encode_prompt_text(tokenizer, prompt))


def encode_prompt(tokenizer: Any, prompt: Text, max_prompt_length: int | None) -> list[int]:
    """Token ids of the rendered prompt, keeping its last ``max_prompt_length``
    tokens (``None``: no limit)."""
    ids = _encode_prompt_text(tokenizer, prompt)
    if max_prompt_length is not None:
        if max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be at least 1; got {max_prompt_length}")
        ids = ids[-max_prompt_length:]
    return ids


def encode_prompt_response(
    tokenizer: Any,
    prompt: Text,
    response: Text,
    *,
    max_length: int,
    max_prompt_length: int,
    add_eos: bool = True,
) -> EncodedSequence:
    """Encode prompt + response for training, with the module's truncation policy.

    The prompt and the response are tokenised separately and concatenated,
    so the loss mask boundary is exact whatever the tokenizer merges."""
    if not 1 <= max_prompt_length < max_length:
        raise ValueError(
            f"need 1 <= max_prompt_length < max_length so every response keeps at least one token; got "
            f"max_prompt_length={max_prompt_length}, max_length={max_length}"
        )
    prompt_ids = encode_prompt(tokenizer, prompt, max_prompt_length)
    response_ids = list(tokenizer.encode(render_response(tokenizer, response, prompt), add_special_tokens=False))
    if add_eos:
        eos_id = tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError(
                "the tokenizer has no eos_token; set one (tokenizer.eos_token = ...) or pass add_eos=False"
            )
        templated = isinstance(response, list) and has_chat_template(tokenizer)
        closed = bool(response_ids) and (response_ids[-1] == eos_id or (templated and eos_id in response_ids))
        if not closed:
            response_ids.append(eos_id)
    budget = max_length - len(prompt_ids)
    truncated = len(response_ids) > budget
    response_ids = response_ids[:budget]
    return EncodedSequence(
        input_ids=prompt_ids + response_ids,
        loss_mask=[0] * len(prompt_ids) + [1] * len(response_ids),
        prompt_length=len(prompt_ids),
        truncated=truncated,
    )


def _encode_prompt_text(tokenizer: Any, prompt: Text) -> list[int]:
    templated = isinstance(prompt, list) and has_chat_template(tokenizer)
    return list(tokenizer.encode(render_prompt(tokenizer, prompt), add_special_tokens=not templated))


def _plain_join(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)
