"""Jobs on a Ray cluster through the Ray Jobs API: submit, status, logs, stop, list.

`rlhf-ray submit CONFIG [key=value ...] --address http://HEAD:8265` resolves
the config here (so a typo fails on this machine, not on the cluster), writes
it into a temporary folder shipped as the job's `working_dir`, ships the
`rlhf_ray` package itself as a `py_modules` entry (the cluster runs exactly
this code; `--no-package` leaves it out for clusters with the package
installed), and starts

    python -m rlhf_ray.cli.main train <config>.yaml [key=value ...]    (package shipped)
    rlhf-ray train <config>.yaml [key=value ...]                        (--no-package)

on the head node. Inside a Ray job, `RAY_ADDRESS` names the cluster, so the
training driver joins it instead of starting its own.

The address is the head's dashboard (`http://HEAD:8265`, where the Jobs API
is served), from `--address` or else `RAY_ADDRESS`. An explicit `--address`
wins over the environment (the Ray SDK alone would let `RAY_ADDRESS` win).
Every failure to reach the cluster or of a request is a `SubmitError` naming
the address and what to check.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rlhf_ray.cli.errors import PROG, one_line


class SubmitError(RuntimeError):
    """A job-submission failure the user can act on (unreachable head, unknown job id, ...)."""


PACKAGE_DIR = Path(__file__).resolve().parents[1]
"""The `rlhf_ray` package directory shipped to the cluster as a `py_modules` entry."""
TERMINAL_STATUSES = ("SUCCEEDED", "FAILED", "STOPPED")
PACKAGE_EXCLUDES = ["__pycache__/", "*.pyc"]
ADDRESS_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
LOG_TAIL_LINES = 40


def dashboard_url(address: str | None) -> str:
    """The Jobs API URL from `--address` or `RAY_ADDRESS`; `HOST:PORT` gets `http://`."""
    address = (address or os.environ.get("RAY_ADDRESS", "")).strip()
    if not address:
        raise SubmitError("no Ray cluster address: pass --address http://HEAD:8265 (the head node's dashboard) "
                       "or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def unreachable_message(url: str, reason: str = "") -> str:
    port = url.rsplit(":", 1)[-1] if url.count(":") > 1 else "8265"
    why = f" ({reason})" if reason else ""
    return (f"cannot reach the Ray Jobs API at {url}{why}: check that the Ray head is running (`ray status` on the "
            f"head node), that {port} is its dashboard port (ray start --dashboard-port, default 8265), and that "
            "the dashboard listens on an address this machine can reach (ray start --dashboard-host, or a "
            "port-forward / SSH tunnel for a remote cluster)")


@contextlib.contextmanager
def _address_env_cleared() -> Iterator[None]:
    saved = {key: os.environ.pop(key) for key in ADDRESS_ENV if key in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def _status_name(status: Any) -> str:
    return str(getattr(status, "value", status))


def short_message(message: str | None) -> str:
    """A job's status message without the log excerpt Ray appends to failures."""
    first = next((line.strip() for line in (message or "").splitlines() if line.strip()), "")
    return first.split(", last available logs")[0].rstrip(":")


class Cluster:
    """A connection to one cluster's Jobs API; every call fails as a `SubmitError`."""

    def __init__(self, address: str | None):
        from rlhf_ray.runtime.auth import use_auth_token

        use_auth_token()  # before Ray is imported: it reads the mode then
        from ray.exceptions import AuthenticationError
        from ray.job_submission import JobSubmissionClient

        self.url = dashboard_url(address)
        try:
            with _address_env_cleared():
                self.client = JobSubmissionClient(self.url)
        except OSError as err:  # ConnectionError, and requests' errors (IOError)
            raise SubmitError(unreachable_message(self.url)) from err
        except AuthenticationError as err:
            raise SubmitError(f"the Ray cluster at {self.url} requires its authentication token: set "
                              "RAY_AUTH_MODE=token and give the cluster's token in RAY_AUTH_TOKEN or "
                              "~/.ray/auth_token (on the head node: `ray get-auth-token`)") from err
        except RuntimeError as err:
            raise SubmitError(f"{self.url} answered, but not as a Ray Jobs API ({one_line(str(err))}); give the head "
                           "node's dashboard address, e.g. http://HEAD:8265") from err

    def _call(self, what: str, fn: Callable, *args, job_id: str | None = None, **kwargs):
        try:
            return fn(*args, **kwargs)
        except OSError as err:
            raise SubmitError(unreachable_message(self.url, one_line(str(err)))) from err
        except RuntimeError as err:
            if job_id is not None and "status code 404" in str(err):
                raise SubmitError(f"no job {job_id} on the cluster at {self.url}; `{PROG} list --address {self.url}` "
                               "shows its jobs") from err
            raise SubmitError(f"{what} at {self.url}: {one_line(str(err))}") from err

    def submit(self, entrypoint: str, runtime_env: dict, metadata: dict | None = None, *,
               submission_id: str | None = None, resources: dict | None = None) -> str:
        """Start `entrypoint` as a job; returns its submission id.

        With `submission_id`, submitting again is harmless: when a job of that id exists, its id is returned
        and nothing new starts (a retried CI step or a resubmission after a dropped connection).
        `resources`: what the entrypoint itself reserves (`entrypoint_num_cpus`, `entrypoint_num_gpus`,
        `entrypoint_memory`)."""
        if submission_id:
            try:
                self.client.get_job_info(submission_id)
                print(f"{PROG}: note: job {submission_id} exists on the cluster; not submitted again",
                      file=sys.stderr)
                return submission_id
            except Exception:  # none of that id: submit it
                pass
        extra = {k: v for k, v in (resources or {}).items() if v is not None}
        return self._call("submitting the job", self.client.submit_job, entrypoint=entrypoint,
                          runtime_env=runtime_env, metadata=metadata or {}, submission_id=submission_id, **extra)

    def exit_code(self, job_id: str) -> int | None:
        """The entrypoint's exit status, once the job has ended (None where the cluster does not say)."""
        code = getattr(self.info(job_id), "driver_exit_code", None)
        return int(code) if code is not None else None

    def follow_until_done(self, job_id: str, write: Callable[[str], Any], *, retry_s: float = 600.0) -> str:
        """Stream the job's own output to `write` until it ends, and return its final status.

        A dropped connection (a dashboard restart, a network blip) is retried with backoff for up to
        `retry_s` seconds in a row; output already written is not written again."""
        written = 0
        delay, failing_since = 1.0, None

        async def tail() -> None:
            nonlocal written
            seen = 0
            async for chunk in self.client.tail_job_logs(job_id):
                fresh = chunk[max(0, written - seen):]
                seen += len(chunk)
                if fresh:
                    write(fresh)
                    written += len(fresh)

        self.info(job_id)  # an unknown id fails here, readably
        while True:
            try:
                asyncio.run(tail())
                status = self.status(job_id)
                if status in TERMINAL_STATUSES:
                    return status
                failing_since = None  # the stream ended early: the job runs on, follow it again
            except (OSError, RuntimeError, SubmitError) as err:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > retry_s:
                    raise SubmitError(f"lost the cluster at {self.url} for {retry_s:g} s while following job {job_id} "
                                      f"({one_line(str(err))}); the job may still run: `{PROG} status {job_id} "
                                      f"--address {self.url}`") from err
                _stderr(f"{PROG}: connection to {self.url} lost ({one_line(str(err))[:120]}); retrying in {delay:g} s")
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def info(self, job_id: str):
        """The job's `JobDetails` (status, message, entrypoint, times)."""
        return self._call(f"job {job_id}", self.client.get_job_info, job_id, job_id=job_id)

    def status(self, job_id: str) -> str:
        return _status_name(self.info(job_id).status)

    def logs(self, job_id: str) -> str:
        return self._call(f"logs of job {job_id}", self.client.get_job_logs, job_id, job_id=job_id)

    def follow(self, job_id: str, write: Callable[[str], Any]) -> None:
        """Stream the job's logs to `write` until the job ends."""
        self.info(job_id)  # an unknown id fails here, readably

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        self._call(f"following logs of job {job_id}", asyncio.run, tail())

    def stop(self, job_id: str) -> bool:
        """Ask the job to stop; True when it was running."""
        return bool(self._call(f"stopping job {job_id}", self.client.stop_job, job_id, job_id=job_id))

    def jobs(self) -> list:
        return list(self._call("listing jobs", self.client.list_jobs))

    def wait(self, job_id: str, *, on_change: Callable[[str], Any] | None = None, poll_s: float = 2.0) -> str:
        """Poll until the job reaches a terminal status; returns it."""
        last = None
        while True:
            status = self.status(job_id)
            if status != last and on_change is not None:
                on_change(status)
            last = status
            if status in TERMINAL_STATUSES:
                return status
            time.sleep(poll_s)


def job_runtime_env(working_dir: str | os.PathLike, *, package: bool = True) -> dict:
    """The runtime environment of a submitted job: `working_dir` (the config) and the
    package as `py_modules` unless `package=False`. No `env_vars`: the driver's
    `ray.init` sets its own (`RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO` among them, so
    an actor without a GPU sees none), and Ray refuses a job whose keys overlap them."""
    env: dict[str, Any] = {"working_dir": str(working_dir), "excludes": list(PACKAGE_EXCLUDES)}
    if package:
        env["py_modules"] = [str(PACKAGE_DIR)]
    return env


def train_entrypoint(config_file: str, overrides: Sequence[str], *, package: bool = True) -> str:
    """The shell command a submitted job runs (see the module docstring)."""
    command = ["python", "-m", "rlhf_ray.cli.main"] if package else [PROG]
    return shlex.join([*command, "train", config_file, *overrides])


def config_file_name(config: str) -> str:
    """`tiny-sft` -> `tiny-sft.yaml`; `/a/b/my job.yml` -> `my_job.yml`."""
    name = Path(config).name
    if not name.endswith((".yaml", ".yml")):
        name += ".yaml"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _relative_paths(cfg) -> list[str]:
    """The config's local file paths that are relative (run directory, data, models), as `key=value`."""
    from rlhf_ray.data.tasks import task_of

    keys = {"run.output_dir": cfg.run.output_dir, "data.train": cfg.data.train, "data.eval": cfg.data.eval,
            "data.ptx": cfg.data.ptx}
    for role in ("policy", "reference", "reward", "critic"):
        keys[f"{role}.model.name_or_path"] = getattr(cfg, role).model.name_or_path
    return [f"{key}={value}" for key, value in keys.items()
            if value and not Path(value).is_absolute() and ("/" in value or Path(value).exists())
            and not value.startswith("hf:") and task_of(value) is None]


def submit_config(cluster: Cluster, config: str, cfg, overrides: Sequence[str], *, package: bool = True,
                  submission_id: str | None = None, resources: dict | None = None) -> str:
    """Ship the resolved `cfg` (loaded from `config` with `overrides`), and the package
    unless `package=False`, and start `train` on the cluster; returns the job id."""
    from rlhf_ray.config import dump_yaml

    relative = _relative_paths(cfg)
    if relative:
        print(f"{PROG}: note: {', '.join(relative)} {'is' if len(relative) == 1 else 'are'} relative, so on the "
              "cluster they resolve in the job's temporary working directory; give absolute paths on storage the "
              "nodes share", file=sys.stderr)
    name = config_file_name(config)
    with tempfile.TemporaryDirectory(prefix="rlhf-ray-submit-") as folder:
        Path(folder, name).write_text(dump_yaml(cfg))
        return cluster.submit(train_entrypoint(name, overrides, package=package),
                              job_runtime_env(folder, package=package),
                              metadata={"rlhf_ray_config": config, "rlhf_ray_job": cfg.name,
                                        "rlhf_ray_output_dir": cfg.run.output_dir},
                              submission_id=submission_id, resources=resources)


def check_cluster_address(address: str) -> None:
    """Fail fast and readably when `train --address` names nothing that listens.

    `train` joins a running cluster by its GCS address (`HEAD:6379`) or a Ray
    Client address (`ray://HEAD:10001`); the dashboard URL belongs to `submit`."""
    if address in ("auto", "local"):
        return
    if address.startswith(("http://", "https://")):
        raise SubmitError(f"--address {address} is a dashboard (Jobs API) address: `train` joins a cluster by its GCS "
                       f"address (HEAD:6379) or ray://HEAD:10001; to run on the cluster as a job, use "
                       f"`{PROG} submit CONFIG --address {address}`")
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise SubmitError(f"--address {address!r}: expected HOST:PORT (the head's GCS address, e.g. 10.0.0.1:6379), "
                       "ray://HOST:10001 or auto")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as err:
        raise SubmitError(f"cannot reach the Ray cluster at {address} ({err.strerror or err}): check that a Ray head "
                       f"is running there (`ray status`), that {port} is its GCS port (ray start --port, default "
                       "6379) and that this machine can reach it") from None


# command handlers ---------------------------------------------------------------

def _stderr(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _log_tail(cluster: Cluster, job_id: str, lines: int = LOG_TAIL_LINES) -> str:
    return "\n".join(cluster.logs(job_id).rstrip("\n").splitlines()[-lines:])


def is_pipeline_file(path: str) -> bool:
    """Whether `path` is a pipeline file (a YAML mapping with `jobs:`) rather than a job config."""
    import yaml

    file = Path(path)
    if file.suffix not in (".yaml", ".yml") or not file.is_file():
        return False
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError:
        return False
    return isinstance(data, dict) and "jobs" in data


def submit_pipeline(cluster: Cluster, path: str, out: str | None, *, package: bool = True,
                    submission_id: str | None = None, resources: dict | None = None) -> str:
    """Ship a pipeline file with every job's config resolved to a YAML of its own, and start `run` on the
    cluster; returns the job id. The pipeline is checked here first, so a bad job fails before any call."""
    import yaml

    from rlhf_ray.config import dump_yaml, load_config
    from rlhf_ray.pipeline.runner import load_pipeline

    pipeline = load_pipeline(path, out)
    out_dir = out or str(Path("runs") / Path(path).stem)
    if not Path(out_dir).is_absolute():
        print(f"{PROG}: note: --out {out_dir!r} is relative, so on the cluster it lands in the job's temporary "
              "working directory; give an absolute path on storage the nodes share", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="rlhf-ray-submit-") as folder:
        jobs = {}
        for name, job in pipeline.jobs.items():
            config_name = f"{name}.{config_file_name(job.config)}"
            Path(folder, config_name).write_text(dump_yaml(load_config(job.config)))
            jobs[name] = {"config": config_name, "overrides": list(job.overrides), "after": list(job.after)}
        Path(folder, "pipeline.yaml").write_text(yaml.safe_dump(
            {"jobs": jobs, "fail_fast": pipeline.fail_fast, "share_frozen": pipeline.share_frozen}, sort_keys=False))
        command = ["python", "-m", "rlhf_ray.cli.main"] if package else [PROG]
        return cluster.submit(shlex.join([*command, "run", "pipeline.yaml", "--out", out_dir]),
                              job_runtime_env(folder, package=package),
                              metadata={"rlhf_ray_pipeline": str(path), "rlhf_ray_output_dir": out_dir},
                              submission_id=submission_id, resources=resources)


def cmd_submit(args) -> int:
    from rlhf_ray.config import load_config

    options = {"submission_id": getattr(args, "submission_id", None),
               "resources": {"entrypoint_num_cpus": getattr(args, "entrypoint_num_cpus", None),
                             "entrypoint_num_gpus": getattr(args, "entrypoint_num_gpus", None),
                             "entrypoint_memory": getattr(args, "entrypoint_memory", None)}}
    if is_pipeline_file(args.config):
        if args.overrides:
            raise SubmitError(f"{args.config} is a pipeline: give each job's overrides in the file, not on the "
                              "command line")
        cluster = Cluster(args.address)
        job_id = submit_pipeline(cluster, args.config, getattr(args, "out", None), package=not args.no_package,
                                 **options)
    else:
        cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any cluster call
        cluster = Cluster(args.address)
        job_id = submit_config(cluster, args.config, cfg, args.overrides, package=not args.no_package, **options)
    print(job_id, flush=True)
    if not args.wait:
        _stderr(f"follow it with: {PROG} logs {job_id} --follow --address {cluster.url}")
        return 0
    # The job's own output, as `ray job submit` shows it; the exit status is the training driver's.
    status = cluster.follow_until_done(job_id, lambda chunk: print(chunk, end="", flush=True))
    if status == "SUCCEEDED":
        return 0
    message, code = failure(cluster, job_id, status)
    _stderr(f"{PROG}: {message}")
    return code


def failure(cluster: Cluster, job_id: str, status: str) -> tuple[str, int]:
    """What to tell the user about a job that did not succeed, and the exit status to pass on (its
    driver's, or 1)."""
    missing = re.search(r"ModuleNotFoundError: No module named '([^']+)'", _log_tail(cluster, job_id))
    code = cluster.exit_code(job_id)
    code = code if code not in (None, 0) else 1
    if missing:
        return (f"job {job_id} ended {status}: the cluster's Python has no module {missing.group(1)!r}; the Ray "
                "head runs jobs with the Python it was started from: start `ray start` from the environment that "
                "has rlhf-ray's dependencies (its bin/ first on PATH), or install them there", code)
    message = short_message(cluster.info(job_id).message)
    return (f"job {job_id} ended {status}{': ' + message if message else ''}; full logs: {PROG} logs {job_id} "
            f"--address {cluster.url}", code)


def cmd_status(args) -> int:
    info = Cluster(args.address).info(args.job_id)
    status = _status_name(info.status)
    message = short_message(info.message)
    print(f"{args.job_id} {status}" + (f"  {message}" if message else ""))
    return 0


def cmd_logs(args) -> int:
    cluster = Cluster(args.address)
    if args.follow:
        cluster.follow(args.job_id, lambda chunk: print(chunk, end="", flush=True))
    else:
        print(cluster.logs(args.job_id), end="")
    return 0


def cmd_stop(args) -> int:
    cluster = Cluster(args.address)
    if not cluster.stop(args.job_id):
        print(f"job {args.job_id} was not running ({cluster.status(args.job_id)})")
        return 0
    print(f"stop requested for job {args.job_id}")
    if args.wait:
        print(f"job {args.job_id}: {cluster.wait(args.job_id)}")
    return 0


def _when(millis: int | None) -> str:
    return datetime.fromtimestamp(millis / 1000).strftime("%Y-%m-%d %H:%M:%S") if millis else "-"


def cmd_list(args) -> int:
    jobs = sorted(Cluster(args.address).jobs(), key=lambda job: job.start_time or 0)
    if not jobs:
        print("no jobs")
        return 0
    print(f"{'JOB':<32} {'STATUS':<10} {'STARTED':<19}  ENTRYPOINT")
    for job in jobs:
        job_id = job.submission_id or job.job_id or "-"
        print(f"{job_id:<32} {_status_name(job.status):<10} {_when(job.start_time):<19}  {job.entrypoint or ''}")
    return 0
