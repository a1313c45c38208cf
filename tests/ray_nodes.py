"""Real Ray nodes for tests: `ray start --block` in its own process group and temp dir.

Stopped by signalling that process (then, to be sure, the processes it had
started, found from it down, that outlive it). `ray stop` is not used: it
would stop every Ray session on the machine.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

VENV_BIN = Path(sys.executable).parent
START_LIMIT_S = 600  # a guard against a hung start, not a timing assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(**extra: str) -> dict:
    """The environment `ray start` and the drivers run with: the venv first on PATH, no inherited address."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **extra}
    for key in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        env.pop(key, None)
    return env


def start_node(args: list[str], env: dict, temp_dir: Path, log: Path) -> subprocess.Popen:
    """`ray start --block <args>` with its own session (so it can be stopped as a group)."""
    command = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}", *args]
    with open(log, "w") as log_file:
        return subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=temp_dir,
                                start_new_session=True)


def wait_until(ready, proc: subprocess.Popen, log: Path, what: str) -> None:
    """Poll `ready()` until true; fail with the node's log if it exits or takes too long."""
    deadline = time.monotonic() + START_LIMIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if ready():
                return
        except Exception:
            pass
        time.sleep(1)
    pytest.fail(f"{what} not ready within {START_LIMIT_S} s:\n{log.read_text()[-3000:]}")


def _descendants(proc: subprocess.Popen) -> list:
    """The processes the node started (raylet, GCS, workers), found from its own process down; none of
    the machine's other processes is ever a candidate."""
    import psutil

    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def stop_node(proc: subprocess.Popen, temp_dir: Path) -> None:
    import psutil

    started = _descendants(proc)  # before the stop: the ones that outlive it are reparented away from it
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)  # `ray start --block` drains, then stops the processes it started
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its own process group (start_new_session)
            proc.wait()
    for child in started:  # psutil checks each is still the process it saw (not a reused pid)
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    shutil.rmtree(temp_dir, ignore_errors=True)
