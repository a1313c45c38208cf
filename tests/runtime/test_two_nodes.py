"""A PPO job whose policy and critic ranks are spread over two Ray nodes, on a cluster with token auth.

A head and a second node are started on this machine (`ray start --head`,
then `ray start --address`), each with two CPUs, in a home folder holding a
Ray token (`~/.ray/auth_token`), so the cluster runs with token
authentication. `rlhf-ray train --address` joins it from a separate process
(this test process already drives the tests' own local cluster) with two
ZeRO-2 ranks each for the policy and the critic, colocated in two bundles
that Ray spreads over the nodes; the summary's layout then names both nodes,
and `layout.png` draws them.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ray_nodes import free_port, node_env, start_node, stop_node, wait_until

pytestmark = pytest.mark.timeout(1800)


def _nodes_alive(address: str, env: dict) -> int:
    code = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
            "print(sum(1 for n in ray.nodes() if n['Alive']))")
    out = subprocess.run([sys.executable, "-c", code, address], env=env, capture_output=True, text=True,
                         timeout=120, check=False)
    return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(16))
    env = node_env(HOME=str(home))
    env.pop("RAY_AUTH_MODE", None)
    logs = tmp_path_factory.mktemp("nodes")
    gcs = free_port()
    address = f"127.0.0.1:{gcs}"
    started = []
    try:
        for index in range(2):
            temp_dir = Path(tempfile.mkdtemp(prefix="rr", dir="/tmp"))  # Ray's socket paths must stay short
            ports = [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                     f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                     f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                     f"--min-worker-port={20000 + 1000 * index}", f"--max-worker-port={20999 + 1000 * index}"]
            role = ["--head", f"--port={gcs}", "--include-dashboard=false",
                    f"--ray-client-server-port={free_port()}"] if index == 0 else [f"--address={address}"]
            log = logs / f"node{index}.log"
            # The head turns token authentication on from ~/.ray/auth_token; a joining node (a client of the
            # head) must be told to use it.
            node = env if index == 0 else {**env, "RAY_AUTH_MODE": "token"}
            proc = start_node([*role, "--node-ip-address=127.0.0.1", "--num-cpus=2", *ports], node, temp_dir, log)
            started.append((proc, temp_dir))
            wait_until(lambda n=index + 1: _nodes_alive(address, {**env, "RAY_AUTH_MODE": "token"}) >= n,
                       proc, log, f"node {index + 1} of the cluster")
        yield address, env
    finally:
        for proc, temp_dir in reversed(started):
            stop_node(proc, temp_dir)


def test_ppo_ranks_spread_over_two_nodes_with_token_auth(two_nodes, tmp_path):
    address, env = two_nodes
    out = tmp_path / "ppo"
    overrides = [f"run.output_dir={out}", "run.total_steps=2", "run.batch_size=4", "run.progress=false",
                 "data.eval=", "run.eval_every=0", "rollout.max_new_tokens=8",
                 "policy.num_ranks=2", "critic.num_ranks=2", "policy.zero_stage=2", "critic.zero_stage=2",
                 "policy.micro_batch_size=2", "critic.micro_batch_size=2", "reference.micro_batch_size=4",
                 "reward.micro_batch_size=4", "policy.num_cpus_per_rank=1", "critic.num_cpus_per_rank=1",
                 "reference.num_cpus_per_rank=1", "reward.num_cpus_per_rank=1", "rollout.num_cpus_per_engine=1",
                 "placement.colocate=[[policy, critic], [rollout, reference, reward]]", "placement.strategy=SPREAD",
                 "policy.optim.scheduler=constant", "policy.optim.warmup_steps=0",
                 "critic.optim.scheduler=constant", "critic.optim.warmup_steps=0"]
    # RAY_AUTH_MODE is not set: `train --address` finds the token in ~/.ray/auth_token and uses it.
    result = subprocess.run([sys.executable, "-m", "rlhf_ray.cli.main", "train", "tiny-ppo", *overrides,
                             "--address", address], env=env, capture_output=True, text=True, timeout=1500,
                            check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    layout = summary["layout"]
    assert len(set(layout["policy"]["nodes"])) == 2 and len(set(layout["critic"]["nodes"])) == 2
    assert set(summary["nodes"]) >= set(layout["policy"]["nodes"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["policy/grad_norm"] > 0 for r in rows)

    from rlhf_ray.reports.pipeline_report import draw_layout, job_records

    picture = draw_layout(job_records({"ppo": out}), tmp_path / "layout.png")
    assert picture.stat().st_size > 10_000
