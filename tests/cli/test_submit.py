"""`rlhf-ray submit | status | logs | stop | list` against a real Ray head.

The head is started here with the venv's `ray start --head --block` on
127.0.0.1 and free ports, in its own process group and temp dir, and stopped
at the end by signalling that process (then, to be sure, only the processes
whose command line names this head's temp dir). `ray stop` is not used: it
would stop every Ray session on the machine.

`test_jobs_api_round_trip` uses a plain Python entrypoint (seconds);
`test_submit_tiny_sft_end_to_end` trains the tiny SFT job on the cluster,
which takes minutes on a busy two-core machine, so it is marked slow.
"""

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlhf_ray.cli.submit import (
    PACKAGE_DIR,
    Cluster,
    SubmitError,
    check_cluster_address,
    config_file_name,
    dashboard_url,
    failure,
    job_runtime_env,
    short_message,
    train_entrypoint,
)

from cli_helpers import run
from ray_nodes import START_LIMIT_S, free_port, node_env, start_node, stop_node, wait_until

HEAD_START_LIMIT_S = START_LIMIT_S


# without a cluster ----------------------------------------------------------------

def test_entrypoint_runs_train_on_the_shipped_config():
    overrides = ["run.total_steps=2", "data.eval=", "run.output_dir=/runs/my run"]
    assert train_entrypoint("tiny-sft.yaml", overrides) == \
        "python -m rlhf_ray.cli.main train tiny-sft.yaml run.total_steps=2 data.eval= 'run.output_dir=/runs/my run'"
    assert train_entrypoint("tiny-sft.yaml", [], package=False) == "rlhf-ray train tiny-sft.yaml"


def test_runtime_env_ships_the_config_and_this_package(tmp_path):
    env = job_runtime_env(tmp_path)
    assert env["working_dir"] == str(tmp_path)
    assert env["py_modules"] == [str(PACKAGE_DIR)]
    assert PACKAGE_DIR.name == "rlhf_ray" and (PACKAGE_DIR / "cli" / "submit.py").is_file()
    assert "env_vars" not in env  # the driver's ray.init sets them; Ray refuses overlapping keys
    assert "py_modules" not in job_runtime_env(tmp_path, package=False)


def test_config_file_names_and_addresses(monkeypatch):
    assert config_file_name("tiny-sft") == "tiny-sft.yaml"
    assert config_file_name("/a/b/my job.yml") == "my_job.yml"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert dashboard_url("head:8265/") == "http://head:8265"
    assert dashboard_url("https://head:443") == "https://head:443"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:8265")
    assert dashboard_url(None) == "http://10.0.0.1:8265"
    assert dashboard_url("other:8265") == "http://other:8265"
    monkeypatch.delenv("RAY_ADDRESS")
    with pytest.raises(SubmitError, match="no Ray cluster address"):
        dashboard_url(None)


def test_short_message_drops_the_log_excerpt():
    message = ("Job entrypoint command failed with exit code 1, last available logs (truncated to 20,000 chars):\n"
               "Traceback ...\nValueError: boom")
    assert short_message(message) == "Job entrypoint command failed with exit code 1"
    assert short_message("Job finished successfully.") == "Job finished successfully."
    assert short_message(None) == ""


def test_train_address_is_checked_before_any_work():
    check_cluster_address("auto")
    with pytest.raises(SubmitError, match="expected HOST:PORT"):
        check_cluster_address("head-without-port")
    with pytest.raises(SubmitError, match="is a dashboard"):
        check_cluster_address("http://head:8265")


# a real head ------------------------------------------------------------------------

@dataclass
class Head:
    url: str
    temp_dir: Path


def _wait_until_serving(proc, url: str, log: Path) -> None:
    import requests

    wait_until(lambda: requests.get(f"{url}/api/version", timeout=5).status_code == 200, proc, log,
               f"the Ray head's dashboard at {url}")


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # Ray's socket paths live under --temp-dir and must stay short: a fresh /tmp/rrXXXX.
    temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))
    log = tmp_path_factory.mktemp("head") / "ray-start.log"
    port = {name: free_port() for name in ("gcs", "dashboard", "client", "agent", "agent_grpc", "runtime_env",
                                           "metrics")}
    # a throw-away head on 127.0.0.1: no token, so the test needs none of the user's
    env = node_env(RAY_AUTH_MODE="disabled")
    proc = start_node(["--head", "--node-ip-address=127.0.0.1", f"--port={port['gcs']}", "--dashboard-host=127.0.0.1",
                       f"--dashboard-port={port['dashboard']}", f"--ray-client-server-port={port['client']}",
                       f"--dashboard-agent-listen-port={port['agent']}",
                       f"--dashboard-agent-grpc-port={port['agent_grpc']}",
                       f"--runtime-env-agent-port={port['runtime_env']}", f"--metrics-export-port={port['metrics']}",
                       "--num-cpus=4", "--include-dashboard=true"], env, temp_dir, log)
    url = f"http://127.0.0.1:{port['dashboard']}"
    try:
        _wait_until_serving(proc, url, log)
        yield Head(url=url, temp_dir=temp_dir)
    finally:
        stop_node(proc, temp_dir)


def _wait_for(cluster: Cluster, job_id: str, wanted: str) -> str:
    deadline = time.monotonic() + HEAD_START_LIMIT_S
    while time.monotonic() < deadline:
        status = cluster.status(job_id)
        if status == wanted or status in ("SUCCEEDED", "FAILED", "STOPPED"):
            return status
        time.sleep(1)
    return cluster.status(job_id)


def test_jobs_api_round_trip(ray_head, tmp_path, capsys, monkeypatch):
    url = ray_head.url
    # an explicit --address wins over RAY_ADDRESS (the Ray SDK alone would let the environment win)
    monkeypatch.setenv("RAY_ADDRESS", f"http://127.0.0.1:{free_port()}")
    cluster = Cluster(url)
    shipped = cluster.submit('python -c "import rlhf_ray; print(\'shipped from\', rlhf_ray.__file__)"',
                             job_runtime_env(tmp_path))
    assert cluster.wait(shipped, poll_s=1) == "SUCCEEDED"

    code, out, _ = run(["status", shipped, "--address", url], capsys)
    assert code == 0 and out.startswith(f"{shipped} SUCCEEDED")
    code, out, _ = run(["logs", shipped, "--address", url], capsys)
    line = next(line for line in out.splitlines() if line.startswith("shipped from"))
    shipped_file = Path(line.split(" ", 2)[2])
    assert shipped_file.name == "__init__.py" and shipped_file.parent.name == "rlhf_ray"
    assert not shipped_file.is_relative_to(PACKAGE_DIR.parent)  # the cluster ran the shipped copy
    code, followed, _ = run(["logs", shipped, "--follow", "--address", url], capsys)
    assert code == 0 and line in followed

    sleeper = cluster.submit('python -c "import time; time.sleep(600)"', job_runtime_env(tmp_path, package=False))
    assert _wait_for(cluster, sleeper, "RUNNING") == "RUNNING"
    code, out, _ = run(["stop", sleeper, "--wait", "--address", url], capsys)
    assert code == 0 and f"job {sleeper}: STOPPED" in out
    code, out, _ = run(["status", sleeper, "--address", url], capsys)
    assert out.startswith(f"{sleeper} STOPPED")
    code, out, _ = run(["stop", sleeper, "--address", url], capsys)
    assert code == 0 and "was not running (STOPPED)" in out

    code, out, _ = run(["list", "--address", url], capsys)
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()[1:]}
    assert rows[shipped] == "SUCCEEDED" and rows[sleeper] == "STOPPED"

    # --wait's pieces: the job's own output streamed, its driver's exit status, a retry-safe id, and one
    # line saying what to do when the cluster's Python lacks a module
    streamed = []
    failing = cluster.submit('python -c "print(\'step 1\'); print(\'step 2\'); import sys; sys.exit(3)"',
                             job_runtime_env(tmp_path, package=False), submission_id="rlhf-ray-test-exit-3",
                             resources={"entrypoint_num_cpus": 0.5})
    assert failing == "rlhf-ray-test-exit-3"
    assert cluster.follow_until_done(failing, streamed.append) == "FAILED"
    assert "step 1\nstep 2" in "".join(streamed) and cluster.exit_code(failing) == 3
    assert failure(cluster, failing, "FAILED")[1] == 3
    again = cluster.submit("python -c 'print(1)'", job_runtime_env(tmp_path, package=False),
                           submission_id="rlhf-ray-test-exit-3")
    assert again == failing and "not submitted again" in capsys.readouterr().err
    lacking = cluster.submit('python -c "import no_such_module_here"', job_runtime_env(tmp_path, package=False))
    assert cluster.follow_until_done(lacking, lambda chunk: None) == "FAILED"
    message, _ = failure(cluster, lacking, "FAILED")
    assert "the cluster's Python has no module 'no_such_module_here'" in message and "ray start" in message
    capsys.readouterr()  # the Jobs SDK's own log lines

    for command in ("status", "logs", "stop"):
        code, _, err = run([command, "raysubmit_nosuchjob", "--address", url], capsys)
        expected = (f"rlhf-ray: error: no job raysubmit_nosuchjob on the cluster at {url}; "
                    f"`rlhf-ray list --address {url}` shows its jobs")
        assert code == 1 and err.strip().splitlines() == [expected]


TINY_SFT = ["run.total_steps=2", "run.batch_size=4", "policy.micro_batch_size=2", "run.eval_every=0", "data.eval=",
            "run.progress=false", "run.save_every=2",
            # the preset warms up for 5 steps then decays (cosine): two steps need a constant schedule
            "policy.optim.scheduler=constant", "policy.optim.warmup_steps=0"]


@pytest.mark.slow
def test_submit_tiny_sft_end_to_end(ray_head, tmp_path, capsys):
    url = ray_head.url
    cluster = Cluster(url)

    # a second, long job is stopped while it runs
    code, out, _ = run(["submit", "tiny-sft", *TINY_SFT, "run.total_steps=1000", f"run.output_dir={tmp_path}/long",
                        "--address", url], capsys)
    long_job = out.splitlines()[0]
    assert code == 0 and _wait_for(cluster, long_job, "RUNNING") == "RUNNING"
    assert run(["stop", long_job, "--wait", "--address", url], capsys)[0] == 0
    assert cluster.status(long_job) == "STOPPED"

    # a job that fails on the cluster: non-zero exit, the log tail, and the driver's own one-line error
    code, out, err = run(["submit", "tiny-sft", *TINY_SFT, f"data.train={tmp_path}/missing.jsonl",
                          f"run.output_dir={tmp_path}/failed", "--address", url, "--wait"], capsys)
    failed_job = out.splitlines()[0]
    assert code == 1 and cluster.status(failed_job) == "FAILED"  # the driver's exit status, passed on
    assert "rlhf-ray: error:" in out and "missing.jsonl" in out  # the job's own output, streamed
    assert err.strip().splitlines()[-1].startswith(f"rlhf-ray: job {failed_job} ended FAILED")

    # the tiny SFT job succeeds and leaves metrics and a checkpoint in its run directory
    run_dir = tmp_path / "run"
    code, out, err = run(["submit", "tiny-sft", *TINY_SFT, f"run.output_dir={run_dir}", "--address", url, "--wait"],
                         capsys)
    job_id = out.splitlines()[0]
    assert code == 0, err
    assert cluster.status(job_id) == "SUCCEEDED"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert (run_dir / "checkpoints" / "step_2" / "trainer_state.json").is_file()
    logs = run(["logs", job_id, "--address", url], capsys)[1]
    assert f"run directory: {run_dir}" in logs and "train/loss" in logs


def test_a_pipeline_is_submitted_as_one_run_job_with_each_config_shipped(tmp_path):
    import yaml

    from rlhf_ray.cli.submit import is_pipeline_file, submit_pipeline

    pipeline = tmp_path / "two.yaml"
    pipeline.write_text("jobs:\n  sft: {config: tiny-sft, overrides: [run.total_steps=20]}\n"
                        "  dpo: {config: tiny-dpo, after: [sft], "
                        "overrides: ['policy.model.name_or_path=${sft}/final']}\n")
    assert is_pipeline_file(str(pipeline)) and not is_pipeline_file("tiny-sft")

    class Recorder:  # stands in for the Jobs API client: records what would be submitted
        def submit(self, entrypoint, runtime_env, metadata, **options):
            folder = Path(runtime_env["working_dir"])
            self.files = {p.name: p.read_text() for p in folder.iterdir()}
            self.entrypoint, self.metadata = entrypoint, metadata
            return "raysubmit_1"

    cluster = Recorder()
    assert submit_pipeline(cluster, str(pipeline), "/shared/runs/two") == "raysubmit_1"
    assert cluster.entrypoint == "python -m rlhf_ray.cli.main run pipeline.yaml --out /shared/runs/two"
    shipped = yaml.safe_load(cluster.files["pipeline.yaml"])
    assert shipped["jobs"]["dpo"] == {"config": "dpo.tiny-dpo.yaml", "after": ["sft"],
                                      "overrides": ["policy.model.name_or_path=${sft}/final"]}
    assert yaml.safe_load(cluster.files["sft.tiny-sft.yaml"])["algorithm"]["name"] == "sft"
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  a: {config: tiny-sft, after: [b]}\n")
    with pytest.raises(Exception, match=r"jobs.a.after: no job named 'b'"):
        submit_pipeline(cluster, str(bad), None)
