"""`rlhf-ray run PIPELINE.yaml`: several jobs on one Ray cluster from one driver.

    jobs:
      sft:   {config: tiny-sft, overrides: [run.total_steps=20]}
      dpo:   {config: tiny-dpo, after: [sft], overrides: ["policy.model.name_or_path=${sft}/final"]}
      grpo:  {config: tiny-grpo, overrides: [run.total_steps=4]}
    fail_fast: false

A job starts as soon as the jobs it comes `after` have finished; jobs whose
dependencies are done run at the same time, each in its own placement group,
as threads of this driver. `${name}` in an override is job `name`'s run
directory (`<out>/<name>`). Frozen roles that hold the same weights are
shared between jobs that can run at the same time (one reference group, one
reward-model group), unless the pipeline says `share_frozen: false` or a job
sets `share_with` itself.

Everything that can be checked is checked before any model loads: the file's
shape, unknown job names in `after` or `${...}`, cycles, every job's config
(the error names the job and the key), and whether the jobs that may run at
the same time fit the cluster together. When a job fails, the jobs that need
it are skipped and the others run on, unless `fail_fast: true` stops them at
their next step; the summary and the exit status say which failed.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from rlhf_ray.config.loader import load_config
from rlhf_ray.config.schema import ConfigError, JobConfig

PIPELINE_KEYS = ("jobs", "fail_fast", "share_frozen")
SHIPPED = Path(__file__).resolve().parents[1] / "config" / "pipelines"
JOB_KEYS = ("config", "overrides", "after")
_REF = re.compile(r"\$\{([^}]*)\}")


@dataclass(frozen=True)
class PipelineJob:
    """One job of a pipeline as its file declares it."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()
    after: tuple[str, ...] = ()


@dataclass
class Pipeline:
    """A pipeline file, checked: jobs in file order, each with its resolved config."""

    source: str
    out: Path
    jobs: dict[str, PipelineJob]
    configs: dict[str, JobConfig] = field(default_factory=dict)
    fail_fast: bool = False
    share_frozen: bool = True

    def ancestors(self, name: str) -> set[str]:
        """Every job `name` waits for, directly or through others."""
        seen: set[str] = set()
        stack = list(self.jobs[name].after)
        while stack:
            job = stack.pop()
            if job not in seen:
                seen.add(job)
                stack.extend(self.jobs[job].after)
        return seen

    def may_overlap(self, a: str, b: str) -> bool:
        """Whether jobs `a` and `b` can run at the same time (neither waits for the other)."""
        return a != b and a not in self.ancestors(b) and b not in self.ancestors(a)


def _error(source: str, where: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: {where}: {message}")


def _strings(value: Any, source: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, (str, int, float, bool)) for v in value):
        raise _error(source, where, f"expects a list of strings, got {value!r}")
    return tuple(str(v) for v in value)


def parse_pipeline(data: Any, source: str = "pipeline", out: str | Path | None = None) -> Pipeline:
    """Check a pipeline's shape (keys, job names, `after`, `${...}`, cycles) and build it; configs come later."""
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), dict) or not data["jobs"]:
        raise ConfigError(f"{source}: a pipeline is a mapping with a non-empty `jobs:` mapping from job names to "
                          "{config, overrides, after}")
    unknown = sorted(set(data) - set(PIPELINE_KEYS))
    if unknown:
        raise _error(source, unknown[0], f"unknown key; a pipeline has {', '.join(PIPELINE_KEYS)}")
    for key in ("fail_fast", "share_frozen"):
        if key in data and not isinstance(data[key], bool):
            raise _error(source, key, f"expects true or false, got {data[key]!r}")
    jobs: dict[str, PipelineJob] = {}
    for name, spec in data["jobs"].items():
        name = str(name)
        where = f"jobs.{name}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
            raise _error(source, where, "a job name is letters, digits, '_', '.' and '-' (it names a directory)")
        if not isinstance(spec, dict):
            raise _error(source, where, f"expects a mapping with {', '.join(JOB_KEYS)}, got {spec!r}")
        extra = sorted(set(spec) - set(JOB_KEYS))
        if extra:
            raise _error(source, f"{where}.{extra[0]}", f"unknown key; a job has {', '.join(JOB_KEYS)}")
        if not isinstance(spec.get("config"), str) or not spec["config"]:
            raise _error(source, f"{where}.config", "give a shipped preset (rlhf-ray presets) or a YAML path")
        jobs[name] = PipelineJob(name, spec["config"], _strings(spec.get("overrides"), source, f"{where}.overrides"),
                                 _strings(spec.get("after"), source, f"{where}.after"))
    for job in jobs.values():
        for dep in job.after:
            if dep not in jobs:
                raise _error(source, f"jobs.{job.name}.after", f"no job named {dep!r}; jobs: {', '.join(jobs)}")
    _check_acyclic(jobs, source)
    pipeline = Pipeline(source, Path(out or "runs/pipeline").expanduser().resolve(), jobs,
                        fail_fast=data.get("fail_fast", False), share_frozen=data.get("share_frozen", True))
    for job in jobs.values():
        for override in job.overrides:
            for ref in _REF.findall(override):
                if ref not in jobs:
                    raise _error(source, f"jobs.{job.name}.overrides", f"${{{ref}}} names no job; jobs: "
                                 f"{', '.join(jobs)}")
                if ref not in pipeline.ancestors(job.name):
                    raise _error(source, f"jobs.{job.name}.overrides", f"${{{ref}}} is {ref!r}'s output, which "
                                 f"exists only once {ref!r} has finished: add {ref!r} to jobs.{job.name}.after")
    return pipeline


def _check_acyclic(jobs: dict[str, PipelineJob], source: str) -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            raise _error(source, f"jobs.{name}.after", f"the jobs wait for each other in a cycle: "
                         f"{' -> '.join(cycle)}; remove one of these dependencies")
        state[name] = 1
        for dep in jobs[name].after:
            visit(dep, path + [name])
        state[name] = 2

    for name in jobs:
        visit(name, [])


def load_pipeline(path: str | Path, out: str | Path | None = None) -> Pipeline:
    """Read, check and configure a pipeline file; nothing loads or starts."""
    path = Path(path)
    if not path.is_file():
        shipped = SHIPPED / f"{path.name}.yaml"
        if path.suffix or not shipped.is_file():
            known = ", ".join(sorted(p.stem for p in SHIPPED.glob("*.yaml")))
            raise ConfigError(f"{path}: neither a pipeline file nor a shipped pipeline (shipped: {known})")
        path = shipped
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}: YAML syntax error{at}: {getattr(err, 'problem', err)}") from None
    pipeline = parse_pipeline(data, str(path), out or Path("runs") / path.stem)
    configure(pipeline)
    return pipeline


def configure(pipeline: Pipeline) -> None:
    """Build and validate every job's config (`${name}` resolved to run directories), then share frozen roles."""
    from rlhf_ray.jobs.validate import validate

    for job in pipeline.jobs.values():
        overrides = [_REF.sub(lambda m: str(pipeline.out / m.group(1)), o) for o in job.overrides]
        overrides += [f"run.output_dir={pipeline.out / job.name}", f"name={job.name}"]
        try:
            cfg = load_config(job.config, overrides)
            validate(cfg, produced=tuple(str(pipeline.out / dep) for dep in pipeline.ancestors(job.name)))
        except ConfigError as err:
            raise ConfigError(f"{pipeline.source}: job {job.name!r}: {err}") from None
        pipeline.configs[job.name] = cfg
    check_shared_roles(pipeline)
    if pipeline.share_frozen:
        share_frozen_roles(pipeline)


# --- shared frozen roles ----------------------------------------------------------------------------

def _frozen_key(cfg: JobConfig, role: str) -> tuple | None:
    """What a frozen role group of this job holds and computes with (`frozen_identity`), or None when it has
    none of its own to lend (`JobPlan.lendable`): it borrows one, does not need one, moves or frees it
    during the run, or (a LoRA policy's reference, its own base with the adapter off) answers the role's
    calls with its policy."""
    from rlhf_ray.job_plan import plan_job
    from rlhf_ray.runtime.role_groups import frozen_identity

    if role not in plan_job(cfg).lendable:
        return None
    return tuple(frozen_identity(cfg, role).items())


def check_shared_roles(pipeline: Pipeline) -> None:
    """Refuse a `<role>.share_with` a job's config sets itself that names a job of the pipeline with no such
    group to lend, or with one that holds other weights, dtype, tokenizer or temperature than the borrower's
    own would (`check_same_frozen`): the borrower would score with it without a word."""
    from rlhf_ray.runtime.role_groups import check_same_frozen, frozen_identity

    for name, cfg in pipeline.configs.items():
        for role in ("reference", "reward"):
            owner = getattr(cfg, role).share_with
            if not owner or owner not in pipeline.configs:
                continue  # a job outside the pipeline is checked when it offers the group
            where = f"{pipeline.source}: job {name!r}: {role}.share_with"
            if not pipeline.may_overlap(owner, name):
                raise ConfigError(f"{where}: job {owner!r} cannot run at the same time as {name!r} (one comes "
                                  f"after the other), so it cannot lend its {role}; remove {role}.share_with")
            if _frozen_key(pipeline.configs[owner], role) is None:
                raise ConfigError(f"{where}: job {owner!r} has no {role} group of its own to lend (it does not "
                                  f"need one, borrows one, or frees it during the run); remove {role}.share_with")
            try:
                check_same_frozen(role, owner, frozen_identity(pipeline.configs[owner], role), name,
                                  frozen_identity(cfg, role))
            except ConfigError as err:
                raise ConfigError(f"{pipeline.source}: {err}") from None


def share_frozen_roles(pipeline: Pipeline) -> dict[str, dict[str, str]]:
    """Let jobs that may run at the same time borrow one frozen group of equal weights: the first such job
    in file order owns it, the others get `<role>.share_with: <owner>`. Returns {role: {borrower: owner}}.
    A LoRA job whose reference is its own base neither lends nor borrows a reference."""
    shared: dict[str, dict[str, str]] = {}
    for role in ("reference", "reward"):
        owners: list[tuple[str, tuple]] = []
        for name, cfg in pipeline.configs.items():
            key = _frozen_key(cfg, role)
            if key is None:
                continue
            owner = next((o for o, k in owners if k == key and pipeline.may_overlap(o, name)), None)
            if owner is None:
                owners.append((name, key))
                continue
            pipeline.configs[name] = dataclasses.replace(
                cfg, **{role: dataclasses.replace(getattr(cfg, role), share_with=owner)})
            shared.setdefault(role, {})[name] = owner
    return shared


# --- placement ----------------------------------------------------------------------------------

def job_bundles(cfg: JobConfig) -> dict[str, float]:
    """CPUs and GPUs the job's own placement group reserves (borrowed groups excluded)."""
    from rlhf_ray.jobs.common import role_specs
    from rlhf_ray.runtime.role_groups import plan_for

    plan = plan_for(cfg, role_specs(cfg))
    return {res: sum(b.get(res, 0.0) for b in plan.bundles) for res in ("CPU", "GPU")}


def _overlapping_groups(pipeline: Pipeline) -> list[tuple[str, ...]]:
    """Every set of jobs that may all run at the same time (each single job included); past 16 jobs, the
    single jobs only (the check then looks at each job alone)."""
    names = list(pipeline.jobs)
    if len(names) > 16:
        return [(n,) for n in names]
    return [group for size in range(1, len(names) + 1) for group in itertools.combinations(names, size)
            if all(pipeline.may_overlap(a, b) for a, b in itertools.combinations(group, 2))]


def check_pipeline_fits(pipeline: Pipeline, available: dict[str, float]) -> None:
    """Refuse a pipeline whose jobs that may run at the same time do not fit the cluster together,
    naming those jobs, what each asks for, and what is missing."""
    need = {name: job_bundles(cfg) for name, cfg in pipeline.configs.items()}
    groups = _overlapping_groups(pipeline)
    for resource in ("GPU", "CPU"):
        have = float(available.get(resource, 0.0))
        total, group = max((sum(need[n][resource] for n in g), g) for g in groups)
        if total > have + 1e-9:
            asks = ", ".join(f"{n}: {need[n][resource]:g}" for n in group)
            together = "runs" if len(group) == 1 else "may run at the same time and ask"
            raise ConfigError(f"{pipeline.source}: {' + '.join(group)} {together} for {total:g} {resource}s "
                              f"({asks}); the cluster has {have:g}, {total - have:g} short: lower those jobs' "
                              f"num_{resource.lower()}s_per_rank, let them share bundles (placement.colocate), "
                              "order them with `after`, or add resources")


def scale_to_fit(pipeline: Pipeline, cpus: float) -> list[str]:
    """On a cluster rlhf-ray started itself (one machine), shrink the CPU reservations of jobs that may run at
    the same time and ask for more than its `cpus`, so that they fit together; returns one line per scaled
    job. Roles on CPUs that share cores take turns anyway; a role's torch threads follow its reservation
    (at least one). Each job is scaled by `cpus` over the largest demand of any set of jobs it may overlap
    with, so every such set fits; GPUs are never scaled."""
    if cpus <= 0:  # nothing free to scale to: the fit check says what is short
        return []
    need = {name: job_bundles(cfg)["CPU"] for name, cfg in pipeline.configs.items()}
    groups = _overlapping_groups(pipeline)
    lines = []
    for name, cfg in pipeline.configs.items():
        worst = max(sum(need[n] for n in g) for g in groups if name in g)
        if worst <= cpus + 1e-9 or need[name] == 0:
            continue
        factor = cpus / worst
        pipeline.configs[name] = scaled = scale_cpus(cfg, factor)
        lines.append(f"{name} {need[name]:g} -> {job_bundles(scaled)['CPU']:g} CPUs")
    return lines


def scale_cpus(cfg: JobConfig, factor: float) -> JobConfig:
    """`cfg` with every role's CPU reservation times `factor`, rounded down to a hundredth (at least 0.01)."""
    def scaled(value: float) -> float:
        return max(0.01, int(value * factor * 100) / 100)

    roles = {role: dataclasses.replace(getattr(cfg, role),
                                       num_cpus_per_rank=scaled(getattr(cfg, role).num_cpus_per_rank))
             for role in ("policy", "reference", "reward", "critic")}
    rollout = dataclasses.replace(cfg.rollout, num_cpus_per_engine=scaled(cfg.rollout.num_cpus_per_engine))
    return dataclasses.replace(cfg, rollout=rollout, **roles)


# --- running ------------------------------------------------------------------------------------

@dataclass
class JobOutcome:
    name: str
    status: str = "pending"  # pending, running, finished, failed, skipped, stopped
    summary: dict = field(default_factory=dict)
    error: str = ""
    started: float = 0.0
    finished: float = 0.0


def run_pipeline(pipeline: Pipeline, address: str | None = None,
                 on_event: Callable[[str], None] = print) -> dict[str, JobOutcome]:
    """Run the pipeline's jobs as their dependencies finish; returns each job's outcome.

    Writes `<out>/pipeline.json` (every job's status, times, run directory and error) when done."""
    import ray

    from rlhf_ray.jobs import StopRequested, run_job
    from rlhf_ray.runtime.role_groups import SHARED, init_ray

    init_ray(address)
    if address is None:  # this machine alone: jobs that may overlap share its CPUs
        scaled = scale_to_fit(pipeline, ray.available_resources().get("CPU", 0.0))
        if scaled:
            on_event(f"[pipeline] scaled to fit this machine's {ray.available_resources().get('CPU', 0):g} CPUs "
                     f"(jobs that may overlap take turns on them): {'; '.join(scaled)}")
    check_pipeline_fits(pipeline, ray.available_resources())
    pipeline.out.mkdir(parents=True, exist_ok=True)
    outcomes = {name: JobOutcome(name) for name in pipeline.jobs}
    stop = threading.Event()
    lock = threading.Condition()
    threads: dict[str, threading.Thread] = {}

    # Every borrower is announced before any job starts, so an owner never tears a shared group down
    # before a job that will borrow it has had its turn.
    for name in pipeline.configs:
        SHARED.forget(name)
    for name, cfg in pipeline.configs.items():
        for role in ("reference", "reward"):
            owner = getattr(cfg, role).share_with
            if owner:
                SHARED.reserve(f"{owner}/{role}", name)

    def work(name: str) -> None:
        outcome = outcomes[name]
        try:
            outcome.summary = run_job(pipeline.configs[name], address, stop=stop)
            status, error = "finished", ""
        except StopRequested:
            status, error = "stopped", "stopped after another job failed (fail_fast: true)"
        except BaseException as err:  # a failed job is reported, the others go on
            status, error = "failed", f"{type(err).__name__}: {err}"
            (pipeline.out / f"{name}.error.txt").write_text(traceback.format_exc())
        finally:
            SHARED.abandon(name)
            SHARED.give_back_all(name)
        with lock:
            outcome.status, outcome.error, outcome.finished = status, error, time.time()
            if status == "failed" and pipeline.fail_fast:
                stop.set()
            lock.notify_all()
        on_event(f"[pipeline] {name}: {status}" + (f": {error}" if error else ""))

    with lock:
        while True:
            for name, job in pipeline.jobs.items():
                outcome = outcomes[name]
                if outcome.status != "pending":
                    continue
                deps = [outcomes[d].status for d in job.after]
                if any(s in ("failed", "skipped", "stopped") for s in deps) or (stop.is_set()):
                    outcome.status = "skipped"
                    SHARED.abandon(name)
                    SHARED.give_back_all(name)
                    outcome.error = ("a job it comes after did not finish" if not stop.is_set()
                                     else "not started: another job failed (fail_fast: true)")
                    on_event(f"[pipeline] {name}: skipped ({outcome.error})")
                elif all(s == "finished" for s in deps):
                    outcome.status, outcome.started = "running", time.time()
                    on_event(f"[pipeline] {name}: started ({job.config})")
                    threads[name] = threading.Thread(target=work, args=(name,), name=f"job-{name}", daemon=True)
                    threads[name].start()
            if all(o.status not in ("pending", "running") for o in outcomes.values()):
                break
            lock.wait(timeout=1.0)
    for thread in threads.values():
        thread.join()
    write_pipeline_summary(pipeline, outcomes)
    return outcomes


def write_pipeline_summary(pipeline: Pipeline, outcomes: dict[str, JobOutcome]) -> Path:
    from rlhf_ray.files import write_json_atomic

    rows = {name: {"status": o.status, "run_dir": str(pipeline.out / name), "config": pipeline.jobs[name].config,
                   "after": list(pipeline.jobs[name].after), "error": o.error,
                   "started_at": o.summary.get("started_at"), "finished_at": o.summary.get("finished_at"),
                   "shares": {role: getattr(pipeline.configs[name], role).share_with
                              for role in ("reference", "reward")
                              if getattr(pipeline.configs[name], role).share_with}}
            for name, o in outcomes.items()}
    path = pipeline.out / "pipeline.json"
    write_json_atomic(path, {"source": pipeline.source, "jobs": rows,
                             "failed": [n for n, o in outcomes.items() if o.status != "finished"]})
    return path


def pipeline_table(outcomes: dict[str, JobOutcome]) -> str:
    """One line per job: name, status, seconds, and the error of a failed one."""
    lines = []
    for name, o in outcomes.items():
        seconds = f"{o.finished - o.started:7.1f} s" if o.started and o.finished else "      - "
        lines.append(f"{name:<12} {o.status:<9} {seconds}" + (f"  {o.error}" if o.error else ""))
    return "\n".join(lines)


__all__ = ["Pipeline", "PipelineJob", "JobOutcome", "parse_pipeline", "load_pipeline", "configure",
           "share_frozen_roles", "check_shared_roles", "check_pipeline_fits", "scale_to_fit", "run_pipeline",
           "pipeline_table"]
