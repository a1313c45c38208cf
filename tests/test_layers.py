"""The layer table of docs/ARCHITECTURE.md holds: a package's module-level imports of rlhf_ray reach only
packages above it in the table (imports inside functions, the table's "lazily", are the exceptions it names)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layers() -> list[str]:
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    table = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    return [re.match(r"\| `([^`]+)`", line).group(1).rstrip("/").removesuffix(".py")
            for line in table.splitlines() if line.startswith("| `")]


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "rlhf_ray" else None


def _module_level_imports(path: Path) -> list[str]:
    names = []
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_ray"):
            names += [node.module] if node.module != "rlhf_ray" else [f"rlhf_ray.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names if a.name.startswith("rlhf_ray")]
    return names


def test_every_package_is_in_the_layer_table():
    layers = set(_layers())
    packages = {p.stem if p.is_file() else p.name for p in (ROOT / "rlhf_ray").iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert packages - {"__main__"} <= layers, sorted(packages - layers)


def test_no_module_imports_a_package_below_its_own():
    rank = {name: i for i, name in enumerate(_layers())}
    upward = []
    for path in sorted((ROOT / "rlhf_ray").rglob("*.py")):
        own = _package(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for name in _module_level_imports(path):
            other = _package(name)
            if own in rank and other in rank and other != own and rank[other] > rank[own]:
                upward.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not upward, upward
