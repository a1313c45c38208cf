"""Multi-turn preference pairs whose loss covers one segment of turns (Segment-Level DPO's data).

A row is a TRL conversational preference row: ``chosen`` and ``rejected`` are chat lists, optionally after
a shared ``prompt`` list. The two conversations share their turns up to the first one where they differ,
which must be an assistant turn on both sides: the segment starts there and runs for
``segment_turns`` turns (the objective's parameter; 0: to the end of each conversation). Each side is
encoded as the shared turns, then its own segment (turns after the segment cannot change the log-probs
of the segment's tokens in a causal model, so they are left out), and its loss mask covers the
assistant tokens of the segment's turns only: what the chat template writes for each assistant reply,
its closing tokens included, and none of the user turns inside the segment nor the role headers.

Everything else (the reference's log-probs, the loss over the masked tokens) is the preference format's.
"""

from __future__ import annotations

import hashlib

from rlhf_ray.data.formats import RowProblem
from rlhf_ray.data.tokenize import EncodedSequence, has_chat_template
from rlhf_ray.offline_formats.builtin import PreferenceFormat, collate_pairs

_FIX = "give 'chosen' and 'rejected' as whole conversations that share their turns up to one assistant reply"


def first_difference(chosen: list, rejected: list) -> int:
    """The index of the first turn where the two conversations differ (the shorter's length if one is the
    other's beginning)."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def split_segment(example, segment_turns: int) -> tuple[list, list, list]:
    """`(shared turns, chosen segment, rejected segment)` of a checked row."""
    start = first_difference(example.chosen, example.rejected)
    end = (lambda side: side[start:start + segment_turns]) if segment_turns else (lambda side: side[start:])
    return list(example.prompt) + list(example.chosen[:start]), end(example.chosen), end(example.rejected)


def encode_segment(tokenizer, shared: list, segment: list, max_length: int) -> EncodedSequence:
    """Token ids of `shared + segment` through the chat template, the loss mask on the segment's assistant
    replies. Each piece the template adds per turn is tokenised on its own, so the mask's edges are exact
    whatever the tokenizer would merge across them."""
    def render(messages, generation_prompt=False):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False) \
            if messages else ""

    ids, mask, rendered = [], [], render(shared)
    pieces = [(rendered, 0)]
    for index in range(len(shared), len(shared) + len(segment)):
        turns = shared + segment[:index - len(shared) + 1]
        if turns[-1]["role"] == "assistant":
            header = render(turns[:-1], generation_prompt=True)
            pieces.append((_after(rendered, header, tokenizer), 0))
            rendered = header
            whole = render(turns)
            pieces.append((_after(rendered, whole, tokenizer), 1))
        else:
            whole = render(turns)
            pieces.append((_after(rendered, whole, tokenizer), 0))
        rendered = whole
    for text, in_loss in pieces:
        piece = list(tokenizer.encode(text, add_special_tokens=False)) if text else []
        ids += piece
        mask += [in_loss] * len(piece)
    truncated = len(ids) > max_length
    ids, mask = ids[:max_length], mask[:max_length]
    return EncodedSequence(input_ids=ids, loss_mask=mask, prompt_length=mask.index(1) if 1 in mask else len(ids),
                           truncated=truncated)


def _after(before: str, text: str, tokenizer) -> str:
    if not text.startswith(before):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"the chat template of {name} renders a conversation so that it does not start with the "
                         "rendering of its earlier turns; multi-turn segments need a template that only appends "
                         "(as ChatML does)")
    return text[len(before):]


class MultiTurnPreferenceFormat(PreferenceFormat):
    """Multi-turn chat pairs sharing their earlier turns; the loss mask covers the assistant replies of the
    segment from the first differing turn (`segment_turns` turns, or to the end)."""

    name = "multi_turn_preference"
    disk_format = "preference"
    schedules = False  # SPIN's pairs are single-turn, and a segment has no stage split yet

    def check_row(self, example) -> None:
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(getattr(example, key), list):
                raise RowProblem("wrong_type", f"key {key!r} is not a chat list; multi-turn pairs take chat-message "
                                               f"rows ({{'role': ..., 'content': ...}} turns): {_FIX}")
        chosen, rejected = example.chosen, example.rejected
        start = first_difference(chosen, rejected)
        if start == len(chosen) == len(rejected):
            raise RowProblem("chosen_equals_rejected", "keys 'chosen' and 'rejected' never differ; give a rejected "
                                                       "conversation that differs from the chosen one, or drop the row")
        turn = f"turn {len(example.prompt) + start} (0-based, the prompt's turns counted)"
        for key, side in (("chosen", chosen), ("rejected", rejected)):
            if start == len(side):
                raise RowProblem("empty", f"key {key!r} has no assistant turn in the segment: it ends at {turn}, "
                                          f"where the other conversation goes on; {_FIX}")
            if side[start].get("role") != "assistant":
                raise RowProblem("no_shared_prompt", f"key {key!r} differs from the other conversation first at "
                                                     f"{turn}, a {side[start].get('role')!r} turn: the shared turns "
                                                     f"do not match; {_FIX}")

    def batch(self, data, rows) -> dict:
        segment_turns = int(data.params.get("segment_turns") or 0)
        if not has_chat_template(data.tokenizer):
            raise ValueError("multi-turn pairs are rendered by the tokenizer's chat template; this tokenizer has none")
        chosen, rejected = [], []
        for row in rows:
            shared, chosen_segment, rejected_segment = split_segment(row, segment_turns)
            chosen.append(self._encode(data, shared, chosen_segment))
            rejected.append(self._encode(data, shared, rejected_segment))
        for sequences in (chosen, rejected):
            if any(1 not in s.loss_mask for s in sequences):
                raise ValueError(f"a multi-turn pair's segment starts past data.max_length={data.config.max_length} "
                                 "tokens; raise data.max_length or shorten the shared turns")
        return collate_pairs(data, chosen, rejected)

    @staticmethod
    def _encode(data, shared: list, segment: list) -> EncodedSequence:
        key = hashlib.blake2b(repr(("segment", shared, segment)).encode(), digest_size=16).digest()
        cache = data.__dict__.setdefault("_segments", {})
        if key not in cache:
            cache[key] = encode_segment(data.tokenizer, shared, segment, data.config.max_length)
        return cache[key]
