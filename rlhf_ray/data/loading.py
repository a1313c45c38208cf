"""Load a data set into checked, normalised examples before any model exists.

``source`` is one of:

- a local ``.json`` / ``.jsonl`` / ``.parquet`` / ``.csv`` file (``split`` is
  not used: the file is the data). CSV cells are read as text, and a KTO
  ``label`` cell as a boolean when it says ``true`` or ``false``;
- a local folder of such files, searched recursively. Files whose path names
  the split as a word (``train.jsonl``, ``data/train-00000.parquet``; ``test``
  also matches ``eval``/``evaluation``, ``validation`` also ``valid``/``val``/``dev``)
  are used; if no file names any split, all files make up the ``train`` split;
- a Hugging Face Hub name such as ``Anthropic/hh-rlhf`` (on a machine that may
  download; nothing here downloads at run time in tests).

Each file is read with Hugging Face ``datasets`` on its own, so every problem
is reported with its file and its 0-based row index within that file. The
checks per format are in :mod:`rlhf_ray.data.formats`; ``max_prompt_length``
adds a check of the rendered prompt's length in tokens.
"""

from __future__ import annotations

import csv
import json
import re
import string
import threading
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from rlhf_ray.data.formats import (
    LAYOUTS,
    DataError,
    Example,
    RowProblem,
    check_format,
    choose_layout,
    row_to_example,
)
from rlhf_ray.data.tokenize import count_prompt_tokens

BUILDERS: dict[str, str] = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
"""File extension -> the ``datasets`` builder that reads it."""

_SPLIT_WORDS: dict[str, tuple[str, ...]] = {
    "train": ("train", "training"),
    "test": ("test", "testing", "eval", "evaluation"),
    "validation": ("validation", "valid", "val", "dev"),
}

# Common names of the canonical columns, for the column_map hint.
_COLUMN_ALIASES: dict[str, tuple[str, ...]] = {
    "prompt": ("question", "instruction", "query", "input", "context", "text"),
    "completion": ("response", "answer", "output", "target"),
    "chosen": ("response_j", "chosen_response", "preferred", "better"),
    "rejected": ("response_k", "rejected_response", "dispreferred", "worse"),
    "messages": ("conversation", "conversations", "dialogue", "chat"),
    "label": ("labels", "is_good", "desirable"),
    "responses": ("completions", "answers", "outputs", "candidates"),
    "ranking": ("ranks", "order", "preference_order"),
}


@dataclass
class LoadedData:
    """Examples that passed every check, and what was dropped.

    ``skipped`` maps a reason (see ``formats.SKIP_REASONS``) to the number of
    rows dropped for it; it is empty unless ``skip_bad_rows=True``."""

    examples: list[Example]
    skipped: dict[str, int] = field(default_factory=dict)
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)


def load_examples(
    source: str | Path,
    fmt: str,
    *,
    split: str = "train",
    column_map: dict[str, str] | None = None,
    prompt_template: str | None = None,
    skip_bad_rows: bool = False,
    max_prompt_length: int | None = None,
    tokenizer: Any = None,
    check_row: Callable[[Example], None] | None = None,
) -> LoadedData:
    """Read ``source`` as format ``fmt`` (one of ``FORMATS``) and check every row.

    ``column_map`` renames the data set's own columns first, e.g.
    ``{"question": "prompt", "response_j": "chosen", "response_k": "rejected"}``.
    ``prompt_template`` wraps every string prompt, e.g.
    ``"Question: {prompt}\\n\\nAnswer: "``. ``max_prompt_length`` (needs
    ``tokenizer``) rejects prompts whose rendered form is longer in tokens.
    A bad row raises :class:`DataError` naming the file, the row and the
    problem (``check_row(example)`` may refuse a row too, raising
    :class:`RowProblem`: what a training data format needs beyond the
    on-disk format); with ``skip_bad_rows=True`` it is dropped and counted instead,
    and loading fails only if no row is left."""
    check_format(fmt)
    if prompt_template is not None:
        _check_template(prompt_template)
    if max_prompt_length is not None and tokenizer is None:
        raise DataError("max_prompt_length is set, so load_examples needs the tokenizer to count prompt tokens")
    examples: list[Example] = []
    skipped: Counter[str] = Counter()
    for where, dataset in _read_source(source, split):
        dataset = _rename_columns(dataset, column_map or {}, where)
        try:
            layout, columns = choose_layout(fmt, list(dataset.column_names))
        except RowProblem as problem:
            raise DataError(_missing_column_message(where, fmt, problem, list(dataset.column_names))) from None
        from_csv = where.lower().endswith(".csv")
        for row_index, row in enumerate(dataset.select_columns(list(columns))):
            if from_csv and "label" in row:
                row["label"] = _csv_label(row["label"])
            try:
                example = row_to_example(fmt, layout, row)
                if check_row is not None:
                    check_row(example)
                example = _apply_template(example, prompt_template, where, row_index)
                if max_prompt_length is not None:
                    _check_prompt_length(example, tokenizer, max_prompt_length)
            except RowProblem as problem:
                if not skip_bad_rows:
                    raise DataError(
                        f"{where}, row {row_index} (0-based): {problem}. Fix the row, or set skip_bad_rows=True "
                        "to drop bad rows and count them"
                    ) from None
                skipped[problem.reason] += 1
                continue
            examples.append(example)
    if not examples:
        why = ", ".join(f"{count} {reason}" for reason, count in sorted(skipped.items())) or "the data set is empty"
        raise DataError(f"{source}: no usable {fmt!r} examples are left ({why})")
    return LoadedData(examples=examples, skipped=dict(skipped), source=str(source))


def _read_source(source: str | Path, split: str) -> list[tuple[str, Any]]:
    """``(label, datasets.Dataset)`` per file of a local source, or one for a hub data set."""
    path = Path(source).expanduser()
    if path.is_file():
        return [(str(path), _read_file(path))]
    if path.is_dir():
        return [(str(file), _read_file(file)) for file in _split_files(path, split)]
    text = str(source)
    has_file_suffix = path.suffix[1:].isalpha() and len(path.suffix) > 2
    looks_local = has_file_suffix or text.startswith(("/", ".", "~")) or not _looks_like_hub_name(text)
    if looks_local:
        raise DataError(
            f"{text}: no such file or folder (looked for {path.resolve()}); give a .json, .jsonl, .parquet or .csv "
            "file, a folder of them, or a Hugging Face Hub data set name"
        )
    return [(f"{text} (split {split!r})", _read_hub(text, split))]


_DATASETS_LOCK = threading.Lock()


def _read_file(path: Path) -> Any:
    builder = BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise DataError(
            f"{path}: unknown file type {path.suffix or '(no extension)'!r}; the loader reads "
            f"{', '.join(sorted(BUILDERS))} files"
        )
    import datasets

    try:
        with _DATASETS_LOCK:  # jobs of a pipeline load data from threads; `datasets` is not thread-safe
            if builder == "csv":
                dataset = datasets.load_dataset(builder, data_files=str(path), split="train", **_csv_as_text(path))
            else:
                dataset = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # datasets wraps parser errors in several types
        why = (_json_problem(path) if builder == "json" else None) or _causes(error)
        raise DataError(f"{path}: could not read it as {builder}: {why}") from error
    if dataset.num_rows == 0:
        raise DataError(f"{path}: the file holds no rows")
    return dataset


def _csv_as_text(path: Path) -> dict[str, Any]:
    """Read every CSV cell as the text it is: no guessing that "2" is a
    number or "NA" a missing value (a completion may be either)."""
    import datasets

    with path.open(newline="", encoding="utf-8-sig") as handle:
        header = next(csv.reader(handle), [])
    features = datasets.Features({column: datasets.Value("string") for column in header})
    return {"features": features, "keep_default_na": False}


def _csv_label(value: Any) -> Any:
    """CSV has no booleans: read "true"/"false" (any case) as KTO labels."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return value


def _read_hub(name: str, split: str) -> Any:
    import datasets

    try:
        with _DATASETS_LOCK:
            return datasets.load_dataset(name, split=split)
    except Exception as error:
        raise DataError(
            f"{name}: could not load split {split!r} from the Hugging Face Hub: {_causes(error)}. If you meant "
            "a local file or folder, it does not exist"
        ) from error


def _split_files(folder: Path, split: str) -> list[Path]:
    files = sorted(
        file
        for file in folder.rglob("*")
        if file.is_file()
        and file.suffix.lower() in BUILDERS
        and not any(part.startswith(".") for part in file.relative_to(folder).parts)
    )
    if not files:
        raise DataError(f"{folder}: the folder holds no {', '.join(sorted(BUILDERS))} files")
    words = {file: set(re.split(r"[^a-z0-9]+", str(file.relative_to(folder)).lower())) for file in files}
    wanted = set(_SPLIT_WORDS.get(split, (split.lower(),)))
    chosen = [file for file in files if words[file] & wanted]
    if chosen:
        return chosen
    any_split = set().union(*_SPLIT_WORDS.values())
    if split == "train" and not any(words[file] & any_split for file in files):
        return files
    names = ", ".join(str(file.relative_to(folder)) for file in files)
    raise DataError(f"{folder}: no file names the split {split!r} (files: {names}); name one e.g. {split}.jsonl")


def _rename_columns(dataset: Any, column_map: dict[str, str], label: str) -> Any:
    if not column_map:
        return dataset
    columns = list(dataset.column_names)
    absent = [name for name in column_map if name not in columns]
    if absent:
        raise DataError(f"{label}: column_map renames {absent}, which the data set lacks; its columns are {columns}")
    clashes = [new for old, new in column_map.items() if new in columns and new not in column_map and new != old]
    if clashes:
        raise DataError(
            f"{label}: column_map renames columns to {clashes}, but the data set already has columns by those "
            f"names ({columns}); map the existing ones elsewhere too, or drop them from the mapping"
        )
    return dataset.rename_columns({old: new for old, new in column_map.items() if old != new})


def _missing_column_message(label: str, fmt: str, problem: RowProblem, columns: list[str]) -> str:
    wanted = {column for _, required, optional in LAYOUTS[fmt] for column in required + optional}
    hint = {}
    for canonical, aliases in _COLUMN_ALIASES.items():
        for column in columns:
            if canonical in wanted and canonical not in columns and column.lower() in aliases:
                hint.setdefault(column, canonical)
    first_missing = next(column for column in LAYOUTS[fmt][0][1] if column not in columns)
    example = hint or {"<your column>": first_missing}
    return f"{label}: {problem}; the data set has columns {columns}. Rename yours with column_map, e.g. {example}"


def _check_template(template: str) -> None:
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise DataError(f"prompt_template {template!r} is not a valid format string: {error}") from None
    if fields != {"prompt"}:
        raise DataError(
            f"prompt_template {template!r} must contain the field {{prompt}} and no other field (found "
            f"{sorted(fields) or 'none'}); write literal braces as {{{{ and }}}}"
        )


def _apply_template(example: Example, template: str | None, label: str, row_index: int) -> Example:
    if template is None:
        return example
    if not isinstance(example.prompt, str):
        raise DataError(
            f"{label}, row {row_index} (0-based): prompt_template wraps string prompts, but this prompt is a chat "
            "list (chat lists are rendered by the tokenizer's chat template); drop prompt_template"
        )
    return replace(example, prompt=template.format(prompt=example.prompt))


def _check_prompt_length(example: Example, tokenizer: Any, max_prompt_length: int) -> None:
    length = count_prompt_tokens(tokenizer, example.prompt)
    if length > max_prompt_length:
        raise RowProblem(
            "prompt_too_long",
            f"the prompt is {length} tokens, longer than max_prompt_length={max_prompt_length}; raise the limit, "
            "shorten the prompt, or skip such rows with skip_bad_rows=True",
        )


def _looks_like_hub_name(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?", text) is not None


def _json_problem(path: Path) -> str | None:
    """Where a JSON / JSON-lines file stops parsing, when Python's parser can tell."""
    try:
        if path.suffix.lower() == ".json":
            json.loads(path.read_text(encoding="utf-8"))
            return None
        with path.open(encoding="utf-8") as handle:
            row = 0
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    value = json.loads(line)
                except json.JSONDecodeError as error:
                    where = f"row {row} (0-based; line {line_number})"
                    return f"{where} is not valid JSON: {error.msg} at column {error.colno}"
                if not isinstance(value, dict):
                    return f"row {row} (0-based; line {line_number}) is a JSON {type(value).__name__}, not an object"
                row += 1
    except json.JSONDecodeError as error:
        return f"not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}"
    except (OSError, UnicodeDecodeError) as error:
        return f"{type(error).__name__}: {error}"
    return None


def _causes(error: BaseException) -> str:
    """The messages of the errors under ``error``: ``datasets`` wraps the
    parser's own (which often name the row) in a generic one."""
    chain: list[BaseException] = [error]
    while len(chain) < 6:
        last = chain[-1]
        inner = last.__cause__ or (None if last.__suppress_context__ else last.__context__)
        if inner is None:
            break
        chain.append(inner)
    inner_errors = chain[1:4] or chain
    return "; ".join(f"{type(e).__name__}: {str(e).strip()[:300]}" for e in inner_errors)


__all__ = ["BUILDERS", "LoadedData", "load_examples"]
