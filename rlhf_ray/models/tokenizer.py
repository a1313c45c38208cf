"""Load a tokenizer: the shipped tiny one, a local folder, or a hub name.

The tiny tokenizer (``TINY_TOKENIZER_PATH``) is a byte-level BPE of 1,024
tokens trained on the synthetic task by ``rlhf_ray/models/build_tokenizer.py``:
pad/bos/eos are ``<|pad|>`` (id 0), ``<|bos|>`` (1), ``<|eos|>`` (2), and its
chat template renders ``<|bos|>User: ...\\nAssistant: ...<|eos|>\\n``.
"""

from __future__ import annotations

import logging
from pathlib import Path

TINY_TOKENIZER_PATH = Path(__file__).resolve().parent / "tiny_tokenizer"
TINY_NAME = "tiny"
PADDING_SIDES = ("left", "right")

logger = logging.getLogger(__name__)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")
"""Files one of which a folder written by `save_pretrained` holds when it has a tokenizer."""


def _looks_like_path(name_or_path: str) -> bool:
    # Hub names are "name" or "org/name"; anything else that names the file
    # system (./x, ../x, /x, ~/x, C:\x, a/b/c) is meant as a local folder.
    return (
        name_or_path.startswith((".", "/", "~"))
        or "\\" in name_or_path
        or name_or_path.count("/") > 1
        or Path(name_or_path).expanduser().exists()
    )


def load_tokenizer(
    name_or_path: str = TINY_NAME,
    *,
    trust_remote_code: bool = False,
    padding_side: str = "right",
):
    """Load a tokenizer with ``AutoTokenizer`` and make sure it can pad.

    Args:
        name_or_path: ``"tiny"`` for the shipped tokenizer, a local folder
            holding a saved tokenizer, or a hub name (a hub name is read from
            the local Hugging Face cache; nothing here forces a download, but
            ``from_pretrained`` may fetch it when the user is online).
        trust_remote_code: run tokenizer code shipped with the checkpoint;
            off unless the config says so.
        padding_side: ``"right"`` for training batches, ``"left"`` for
            generation prompts.

    Returns:
        A ``transformers`` tokenizer whose ``pad_token_id`` is set. A tokenizer
        without a pad token (GPT-2, Llama) pads with its eos token; that is
        logged, since padded positions must then be masked by attention mask,
        never found by searching for eos.
    """
    from transformers import AutoTokenizer

    if padding_side not in PADDING_SIDES:
        raise ValueError(f"load_tokenizer: padding_side={padding_side!r}; expected 'left' or 'right'")
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ValueError(
            f"load_tokenizer: name_or_path={name_or_path!r}; expected 'tiny', a local folder or a hub name"
        )
    source: str | Path = TINY_TOKENIZER_PATH if name_or_path == TINY_NAME else name_or_path
    if source is TINY_TOKENIZER_PATH and not (TINY_TOKENIZER_PATH / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"load_tokenizer: the shipped tiny tokenizer is missing from {TINY_TOKENIZER_PATH}; the package is "
            "installed without its data files. Reinstall rlhf-ray, or regenerate it with "
            "`python -m rlhf_ray.models.build_tokenizer`"
        )
    if source is not TINY_TOKENIZER_PATH and _looks_like_path(name_or_path):
        folder = Path(name_or_path).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"load_tokenizer: tokenizer folder {folder} does not exist (or is not a folder); pass a folder "
                "written by save_pretrained, a hub name, or 'tiny' for the shipped tokenizer"
            )
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            raise FileNotFoundError(
                f"load_tokenizer: model folder {folder} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)}); "
                "save the tokenizer into it (tokenizer.save_pretrained), or name one with model.tokenizer"
            )
        source = folder
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            str(source), trust_remote_code=trust_remote_code, padding_side=padding_side
        )
    except OSError as err:
        raise OSError(
            f"load_tokenizer: could not load a tokenizer from {str(source)!r}: {str(err).rstrip('.')}. Check the "
            "name or path; a hub name must already be in the local Hugging Face cache when running offline"
        ) from err
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"load_tokenizer: tokenizer {str(source)!r} has neither a pad nor an eos token, so batches "
                "cannot be padded; add a pad token to it (tokenizer.add_special_tokens) and save it again"
            )
        logger.info("tokenizer %s has no pad token; padding with its eos token %r", source, tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
