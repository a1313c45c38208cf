"""YAML loading, dotted overrides and type checking for `JobConfig`.

`load_config("tiny-dpo", ["algorithm.params.beta=0.2"])` reads a shipped preset (or
a YAML path), applies overrides, fills in the named online algorithm's own
defaults for the `algorithm.*` keys neither gives, checks every key and type
against the dataclasses of `schema.py`, and returns a frozen `JobConfig`. Unknown keys
are errors that suggest the nearest known key; a wrong type names the key,
the expected type and the value given.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from rlhf_ray.config.schema import MOVED_KEYS, ConfigError, JobConfig

PRESET_DIR = Path(__file__).parent / "presets"


def list_config_presets() -> list[str]:
    """Names of the job presets shipped in the package (`rlhf-ray presets`)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def resolve_config_path(name_or_path: str) -> Path:
    """A YAML path as given, or the shipped preset of that name."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (give a YAML path or one of the presets: "
                              f"{', '.join(list_config_presets())})")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if preset.is_file():
        return preset
    near = difflib.get_close_matches(name_or_path, list_config_presets(), n=1)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"{name_or_path!r} is neither a YAML file nor a shipped preset.{hint} "
                      f"Presets: {', '.join(list_config_presets())}")


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (algorithm:, policy:, run: ...), "
                          f"got a {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[str, Any]:
    """`"a.b=1"` -> `("a.b", 1)`; the value is read as a YAML scalar or list."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. run.total_steps=20)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {key}: {part!r} holds a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = (),
                base: dict | None = None) -> JobConfig:
    """Build a validated `JobConfig` from a preset or YAML file plus overrides."""
    data: dict = dict(base or {})
    source = "config"
    if name_or_path:
        path = resolve_config_path(name_or_path)
        source = str(path)
        data = read_yaml(path)
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
    return build(JobConfig, with_algorithm_defaults(data), prefix="", source=source)


def with_algorithm_defaults(data: dict) -> dict:
    """`data` with the named online algorithm's own starting values (`OnlineAlgorithm.defaults`: DAPO's clip
    range, absent KL and dynamic sampling, Dr. GRPO's loss aggregation, ...) under `algorithm:` for each key
    the file and the overrides leave out; a key they give is kept as given."""
    section = data.get("algorithm")
    if not isinstance(section, dict) or not section.get("name"):
        return data
    from rlhf_ray.algorithms.registry import online_defaults  # the registry imports torch: only when named

    missing = {key: value for key, value in online_defaults(str(section["name"])).items() if key not in section}
    return {**data, "algorithm": {**missing, **section}} if missing else data


def build(cls, data: Any, prefix: str, source: str = "config", base: Any = None):
    """Recursively build dataclass `cls` from a dict, checking keys and types.

    Keys not given keep the value of `base` (default: `cls()`), so a nested
    section starts from its parent's default for it (the reference's model
    path is empty, not the class default)."""
    where = prefix.rstrip(".") or "the top level"
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where} must be a mapping, got {data!r}")
    known = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in known:
            full = prefix + str(key)
            if full in MOVED_KEYS:
                moved = MOVED_KEYS[full]
                raise ConfigError(f"{source}: {full} is no longer a key; " + (
                    f"write {moved}" if moved else "it follows from the algorithm (a critic exists when the "
                    "algorithm learns a value model, as PPO does); remove it"))
            candidates = [prefix + k for k in known]
            near = difflib.get_close_matches(full, candidates, n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys here: {', '.join(sorted(known))}"
            raise ConfigError(f"{source}: unknown key {full!r}{hint}")
    kwargs = {}
    base = cls() if base is None else base
    for name, value in data.items():
        if dataclasses.is_dataclass(hints[name]):
            nested = getattr(base, name)
            kwargs[name] = build(hints[name], value if value is not None else {}, prefix + name + ".", source,
                                 base=nested)
        else:
            kwargs[name] = _coerce(hints[name], value, prefix + name, source)
    try:
        return dataclasses.replace(base, **kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {prefix}{err}") from None


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(tp, value, key: str, source: str):
    if dataclasses.is_dataclass(tp):
        return build(tp, value if value is not None else {}, key + ".", source)
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key, source)
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: {key} expects a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key, source) for v in value)
        if len(args) != len(value):
            raise ConfigError(f"{source}: {key} expects {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key, source) for a, v in zip(args, value))
    if tp is dict or origin is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key} expects a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: {key} expects true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{source}: {key} expects an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: {key} expects a number, got {value!r}")
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{source}: {key} expects a string, got {value!r}")
    raise ConfigError(f"{source}: {key} has an unsupported type {_type_name(tp)}")


def to_dict(cfg) -> dict:
    """A plain, YAML-ready dict of a config (tuples become lists)."""

    def plain(value):
        if dataclasses.is_dataclass(value):
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, (list, tuple)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(cfg)


def dump_yaml(cfg) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
