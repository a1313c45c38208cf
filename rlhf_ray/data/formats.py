"""The data formats rlhf-ray reads, as TRL users know them, and the checks
that turn one raw row into one normalised example.

A prompt or a response is either a plain string or a chat list
``[{"role": ..., "content": ...}, ...]``. Five formats:

============  =====================================================  ==================
format        columns (after ``column_map``)                         example type
============  =====================================================  ==================
prompt        ``prompt``, or ``messages``                            :class:`PromptExample`
sft           ``prompt`` + ``completion``, or ``messages``           :class:`SFTExample`
preference    ``prompt`` + ``chosen`` + ``rejected``, or implicit    :class:`PreferenceExample`
              prompt: ``chosen`` + ``rejected`` only
kto           ``prompt`` + ``completion`` + boolean ``label``        :class:`KTOExample`
ranked        ``prompt`` + ``responses`` (list) + ``ranking``        :class:`RankedExample`
============  =====================================================  ==================

Conversations are split the way TRL splits them:

- ``messages`` for prompts: a final assistant turn, if any, is dropped, so a
  whole conversation can serve as a prompt for its last answer.
- ``messages`` for SFT: the conversation must end with an assistant turn;
  that turn is the completion, everything before it the prompt.
- implicit-prompt preferences: when there is no ``prompt`` column, ``chosen``
  and ``rejected`` hold whole conversations and the prompt is their shared
  beginning. For Anthropic-HH strings (``"\\n\\nHuman: ... \\n\\nAssistant: ..."``)
  it is the shared prefix up to and including the last ``"\\n\\nAssistant:"``;
  for chat lists it is the longest run of identical leading messages, after
  which both must continue with an assistant turn.

Row checks raise :class:`RowProblem` with a ``reason`` key (one of
:data:`SKIP_REASONS`); the loader adds the file and row and either raises
:class:`DataError` or counts the row as skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

Message = dict[str, str]
"""One chat turn: ``{"role": "user" | "assistant" | "system" | ..., "content": str}``."""

Text = str | list[Message]
"""A prompt or a response: a plain string or a chat list."""

FORMATS: tuple[str, ...] = ("prompt", "sft", "preference", "kto", "ranked")

HH_ASSISTANT = "\n\nAssistant:"

SKIP_REASONS: tuple[str, ...] = (
    "missing_value",
    "wrong_type",
    "empty",
    "bad_messages",
    "no_shared_prompt",
    "chosen_equals_rejected",
    "bad_label",
    "too_few_responses",
    "bad_ranking",
    "prompt_too_long",
)


class DataError(ValueError):
    """Bad input data or data settings; the message names the file, the row and the fix."""


class RowProblem(Exception):
    """One row failed a check. ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class PromptExample:
    """A prompt for online jobs (the policy generates the response)."""

    prompt: Text


@dataclass(frozen=True)
class SFTExample:
    """A demonstration: the loss is taken on ``completion`` only."""

    prompt: Text
    completion: Text


@dataclass(frozen=True)
class PreferenceExample:
    """A preference pair for reward-model training and the DPO family."""

    prompt: Text
    chosen: Text
    rejected: Text
    score_chosen: float | None = None
    """Optional scores of the two responses (UltraFeedback-style `score_chosen`/`score_rejected`): ODPO's offsets."""
    score_rejected: float | None = None


@dataclass(frozen=True)
class KTOExample:
    """An unpaired completion with a thumbs-up (``label=True``) or thumbs-down."""

    prompt: Text
    completion: Text
    label: bool


@dataclass(frozen=True)
class RankedExample:
    """K responses to one prompt; ``ranking`` lists response indices, best first."""

    prompt: Text
    responses: list[Text]
    ranking: list[int]


Example = PromptExample | SFTExample | PreferenceExample | KTOExample | RankedExample

# For each format, the column layouts it accepts, tried in order: a layout is
# (name, required columns, optional columns).
LAYOUTS: dict[str, tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "prompt": (("prompt", ("prompt",), ()), ("messages", ("messages",), ())),
    "sft": (("prompt_completion", ("prompt", "completion"), ()), ("messages", ("messages",), ())),
    "preference": (("explicit", ("chosen", "rejected"), ("prompt", "score_chosen", "score_rejected")),),
    "kto": (("prompt_completion_label", ("prompt", "completion", "label"), ()),),
    "ranked": (("prompt_responses_ranking", ("prompt", "responses", "ranking"), ()),),
}


def check_format(fmt: str) -> None:
    """Raise :class:`DataError` unless ``fmt`` is one of :data:`FORMATS`."""
    if fmt not in FORMATS:
        raise DataError(f"unknown data format {fmt!r}; the known formats are {', '.join(FORMATS)}")


def choose_layout(fmt: str, columns: list[str]) -> tuple[str, tuple[str, ...]]:
    """Pick the first layout of ``fmt`` whose required columns are all present.

    Returns ``(layout_name, columns_to_read)``; raises :class:`RowProblem`
    with reason ``"missing_column"`` describing what was expected otherwise
    (the loader turns it into a :class:`DataError` with the file name)."""
    check_format(fmt)
    for name, required, optional in LAYOUTS[fmt]:
        if all(column in columns for column in required):
            return name, required + tuple(column for column in optional if column in columns)
    expected = " or ".join(" + ".join(repr(c) for c in required) for _, required, _ in LAYOUTS[fmt])
    raise RowProblem("missing_column", f"the {fmt!r} format needs the columns {expected}")


def row_to_example(fmt: str, layout: str, row: dict[str, Any]) -> Example:
    """Check one row (already renamed by ``column_map``) and normalise it."""
    return _PARSERS[fmt](layout, row)


def _prompt_row(layout: str, row: dict[str, Any]) -> PromptExample:
    if layout == "prompt":
        return PromptExample(_text(row, "prompt"))
    messages = _chat(row, "messages")
    if messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    if not messages:
        raise RowProblem("bad_messages", "'messages' holds only an assistant turn; there is no prompt")
    return PromptExample(messages)


def _sft_row(layout: str, row: dict[str, Any]) -> SFTExample:
    if layout == "prompt_completion":
        prompt = _text(row, "prompt")
        return SFTExample(prompt, _response(row, "completion", prompt))
    messages = _chat(row, "messages")
    if messages[-1]["role"] != "assistant":
        raise RowProblem(
            "bad_messages",
            f"'messages' must end with an assistant turn (the completion); it ends with role {messages[-1]['role']!r}",
        )
    if len(messages) < 2:
        raise RowProblem("bad_messages", "'messages' holds only an assistant turn; there is no prompt")
    return SFTExample(messages[:-1], messages[-1:])


def _preference_row(layout: str, row: dict[str, Any]) -> PreferenceExample:
    if "prompt" in row:
        prompt = _text(row, "prompt")
        chosen, rejected = _response(row, "chosen", prompt), _response(row, "rejected", prompt)
    else:
        prompt, chosen, rejected = split_implicit_prompt(_text(row, "chosen"), _text(row, "rejected"))
    if chosen == rejected:
        raise RowProblem("chosen_equals_rejected", _IDENTICAL)
    if ("score_chosen" in row) != ("score_rejected" in row):
        raise RowProblem("missing_value", "give both 'score_chosen' and 'score_rejected', or neither")
    scores = [_score(row, key) for key in ("score_chosen", "score_rejected") if key in row]
    return PreferenceExample(prompt, chosen, rejected, *scores)


def _score(row: dict[str, Any], column: str) -> float:
    value = row[column]
    if value is None:
        raise RowProblem("missing_value", f"{column!r} is empty; give a number")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RowProblem("wrong_type", f"{column!r} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def _kto_row(layout: str, row: dict[str, Any]) -> KTOExample:
    prompt = _text(row, "prompt")
    completion = _response(row, "completion", prompt)
    label = _value(row, "label")
    if not isinstance(label, bool):
        raise RowProblem("bad_label", f"'label' must be true or false; got {label!r} ({type(label).__name__})")
    return KTOExample(prompt, completion, label)


def _ranked_row(layout: str, row: dict[str, Any]) -> RankedExample:
    prompt = _text(row, "prompt")
    responses = _list(row, "responses")
    if len(responses) < 2:
        raise RowProblem("too_few_responses", f"'responses' must hold at least 2 responses; it holds {len(responses)}")
    checked = [_response({f"responses[{i}]": r}, f"responses[{i}]", prompt) for i, r in enumerate(responses)]
    ranking = _list(row, "ranking")
    all_ints = all(isinstance(i, int) and not isinstance(i, bool) for i in ranking)
    if not all_ints or sorted(ranking) != list(range(len(responses))):
        raise RowProblem(
            "bad_ranking",
            f"'ranking' must list each response index 0..{len(responses) - 1} exactly once, best first; "
            f"got {ranking!r}",
        )
    return RankedExample(prompt, checked, list(ranking))


_PARSERS = {
    "prompt": _prompt_row,
    "sft": _sft_row,
    "preference": _preference_row,
    "kto": _kto_row,
    "ranked": _ranked_row,
}

_IDENTICAL = "'chosen' and 'rejected' are identical; the pair teaches nothing"


def split_implicit_prompt(chosen: Text, rejected: Text) -> tuple[Text, Text, Text]:
    """Split two whole conversations into ``(prompt, chosen, rejected)``.

    Strings (Anthropic HH): the prompt is the shared prefix up to and
    including its last ``"\\n\\nAssistant:"``; each response is the rest, so it
    keeps its leading space. Chat lists: the prompt is the longest run of
    identical leading messages; both remainders must start with an assistant
    turn."""
    if isinstance(chosen, str) != isinstance(rejected, str):
        raise RowProblem("wrong_type", "'chosen' and 'rejected' must both be strings or both be chat lists")
    if isinstance(chosen, str):
        shared = _shared_prefix_length(chosen, rejected)
        cut = chosen.rfind(HH_ASSISTANT, 0, shared)
        if cut < 0:
            if chosen == rejected:
                raise RowProblem("chosen_equals_rejected", _IDENTICAL)
            raise RowProblem(
                "no_shared_prompt",
                "there is no 'prompt' column, so 'chosen' and 'rejected' must be whole HH conversations sharing a "
                f"prefix that ends with {HH_ASSISTANT!r}; they do not. Add a 'prompt' column or map one with "
                "column_map",
            )
        end = cut + len(HH_ASSISTANT)
        for column, whole in (("chosen", chosen), ("rejected", rejected)):
            if not whole[end:].strip():
                raise RowProblem("empty", f"{column!r} has no answer after its last {HH_ASSISTANT!r}")
        return chosen[:end], chosen[end:], rejected[end:]
    shared = _shared_prefix_length(chosen, rejected)
    if chosen == rejected:
        raise RowProblem("chosen_equals_rejected", _IDENTICAL)
    if shared == 0:
        raise RowProblem(
            "no_shared_prompt",
            "there is no 'prompt' column and the 'chosen' and 'rejected' conversations share no leading message; "
            "add a 'prompt' column or map one with column_map",
        )
    continues_with_answers = all(
        shared < len(conversation) and conversation[shared]["role"] == "assistant"
        for conversation in (chosen, rejected)
    )
    if not continues_with_answers:
        raise RowProblem(
            "no_shared_prompt",
            f"'chosen' and 'rejected' share their first {shared} messages, but both must then continue with an "
            "assistant turn (the responses being compared)",
        )
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _shared_prefix_length(first: str | list, second: str | list) -> int:
    """How many leading characters (or messages) ``first`` and ``second`` share."""
    shared = 0
    while shared < min(len(first), len(second)) and first[shared] == second[shared]:
        shared += 1
    return shared


def _value(row: dict[str, Any], column: str) -> Any:
    value = row[column]
    if value is None:
        raise RowProblem("missing_value", f"{column!r} is missing (null)")
    return value


def _text(row: dict[str, Any], column: str) -> Text:
    """A string or a chat list, not empty."""
    value = _value(row, column)
    if isinstance(value, str):
        if not value.strip():
            raise RowProblem("empty", f"{column!r} is empty")
        return value
    if isinstance(value, list):
        return _chat(row, column)
    raise RowProblem(
        "wrong_type", f"{column!r} must be a string or a chat list of {{'role', 'content'}}; got {type(value).__name__}"
    )


def _response(row: dict[str, Any], column: str, prompt: Text) -> Text:
    """A response: a string, or a chat list starting with an assistant turn
    (then the prompt must be a chat list too, so the chat template renders both)."""
    value = _text(row, column)
    if isinstance(value, list):
        if isinstance(prompt, str):
            raise RowProblem(
                "wrong_type", f"{column!r} is a chat list but the prompt is a string; make both chat lists"
            )
        if value[0]["role"] != "assistant":
            raise RowProblem(
                "bad_messages",
                f"{column!r} must start with an assistant turn; it starts with role {value[0]['role']!r}",
            )
    return value


def _chat(row: dict[str, Any], column: str) -> list[Message]:
    """A non-empty chat list with string roles and contents, not all empty.
    Keys that Arrow filled with null (absent in this turn) are dropped."""
    value = _value(row, column)
    if not isinstance(value, list):
        raise RowProblem("wrong_type", f"{column!r} must be a chat list; got {type(value).__name__}")
    if not value:
        raise RowProblem("empty", f"{column!r} is an empty chat list")
    messages = []
    for turn, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise RowProblem("bad_messages", f"{column!r} turn {turn} must be a dict with a non-empty string 'role'")
        if not isinstance(message.get("content"), str):
            raise RowProblem(
                "bad_messages", f"{column!r} turn {turn} (role {message['role']!r}) must have a string 'content'"
            )
        messages.append({key: item for key, item in message.items() if item is not None})
    if not any(message["content"].strip() for message in messages):
        raise RowProblem("empty", f"{column!r} has no non-empty message content")
    return messages


def _list(row: dict[str, Any], column: str) -> list[Any]:
    value = _value(row, column)
    if not isinstance(value, list):
        raise RowProblem("wrong_type", f"{column!r} must be a list; got {type(value).__name__}")
    return value
