"""The checks `gpu_check.sh` runs on a GPU machine, one group per call; each prints one line per item:
`PASS <item>: <detail>`, `FAIL <item>: <detail>` or `SKIP <item>: <why>` (items that need two GPUs,
on one).

    python benchmarks/gpu_check.py versions
    python benchmarks/gpu_check.py devices      # items 1-3: frozen roles, collectives, Ray's GPU env
    python benchmarks/gpu_check.py tied         # item 6: the NCCL sender's tied aliases
    python benchmarks/gpu_check.py gpu-tests OUT_DIR
    python benchmarks/gpu_check.py run ppo|remax|dpo OUT_DIR

Everything runs offline on the shipped tiny presets (no download). Nothing in the package imports this
file: the project builds and tests without a GPU.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MiB = 2**20


def report(ok: bool | None, item: str, detail: str) -> bool:
    """Print one result line (None: skipped); returns `ok` (a skip counts as passed)."""
    verdict = "SKIP" if ok is None else ("PASS" if ok else "FAIL")
    print(f"{verdict} {item}: {detail}", flush=True)
    return ok is not False


def guarded(item: str, check) -> bool:
    """`check()`'s own line, or a FAIL line naming the exception it raised."""
    try:
        return check()
    except Exception as err:  # a check that crashes is a failed check, with its reason on the line
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        return report(False, item, f"{type(err).__name__}: {first[:300]}")


# versions ------------------------------------------------------------------------------------------
def versions() -> bool:
    import deepspeed
    import ray
    import torch

    from rlhf_ray.workers.rollout.vllm.checks import installed_vllm, vllm_runtime_problem

    vllm = installed_vllm()
    gpus = torch.cuda.device_count()
    names = sorted({torch.cuda.get_device_name(i) for i in range(gpus)})
    detail = (f"torch {torch.__version__} (CUDA {torch.version.cuda}), {vllm[0] if vllm else 'no vllm'} "
              f"{vllm[1] if vllm else ''}, deepspeed {deepspeed.__version__}, ray {ray.__version__}; "
              f"{gpus} GPU(s) {', '.join(names)}")
    problem = vllm_runtime_problem(vllm, "cuda", torch.cuda.is_available())
    return report(gpus >= 1 and problem is None, "versions", detail + (f"; {problem}" if problem else ""))


# items 1-3 --------------------------------------------------------------------------------------------
def devices() -> bool:
    import ray
    import torch

    from rlhf_ray.runtime.role_groups import init_ray

    init_ray()
    ok = guarded("1 frozen roles on their GPU", _frozen_roles)
    ok &= guarded("2 collectives on a GPU rank (one rank)", lambda: _collectives(1))
    if torch.cuda.device_count() >= 2:
        ok &= guarded("2 collectives across two GPU ranks", lambda: _collectives(2))
    else:
        report(None, "2 collectives across two GPU ranks", "needs two GPUs (the ZeRO-0 skip flag and KTO's "
               "reference point over NCCL between ranks)")
    ok &= guarded("3 a rank without a GPU sees none", _zero_gpu_rank)
    ray.shutdown()
    return ok


def _tiny_job(*overrides: str):
    from rlhf_ray.config import load_config

    return load_config("tiny-ppo", ["reward.rule=", "reward.model.name_or_path=tiny-gpt2", "rollout.engine=hf",
                                    *overrides])


def _frozen_roles() -> bool:
    """Reference, reward model (ZeRO-0, the schema's default) and the HF engine, each given a share of the
    GPU: their modules must be on it, in bf16 ("auto" on a GPU)."""
    import ray

    from rlhf_ray.runtime.distributed import find_free_port
    from rlhf_ray.workers.reference import ReferenceWorker
    from rlhf_ray.workers.reward import RewardWorker
    from rlhf_ray.workers.rollout.hf import HFRolloutWorker

    job = _tiny_job()
    where = {}
    for name, cls, setup in (("reference", ReferenceWorker, lambda a: a.setup.remote(job, init_from="tiny-gpt2")),
                             ("reward", RewardWorker, lambda a: a.setup.remote(job, tokenizer_from="tiny-gpt2")),
                             ("hf rollout", HFRolloutWorker, lambda a: a.setup.remote(job, init_from="tiny-gpt2"))):
        actor = ray.remote(num_cpus=1, num_gpus=0.2)(cls).remote(0, 1, "127.0.0.1", find_free_port(), 1)
        try:
            ray.get(setup(actor))
            where[name] = ray.get(actor.__ray_call__.remote(_module_placement))
        finally:
            ray.kill(actor)
    ok = all(device.startswith("cuda") and dtype == "torch.bfloat16" for device, dtype in where.values())
    return report(ok, "1 frozen roles on their GPU", ", ".join(f"{k} {d} {t}" for k, (d, t) in where.items()))


def _module_placement(worker) -> tuple[str, str]:
    module = worker.model if hasattr(worker, "model") else worker.engine.module
    param = next(module.parameters())
    return str(param.device), str(param.dtype)


def _collectives(ranks: int) -> bool:
    """Ranks with a GPU each: their group's backend, and an all-reduce of a CPU and of a GPU tensor."""
    from rlhf_ray.runtime.actor_group import ActorGroup
    from rlhf_ray.runtime.distributed import DistributedWorker

    class Probe(DistributedWorker):
        def reduce(self) -> dict:
            import torch
            import torch.distributed as dist

            cpu, gpu = torch.ones(1), torch.ones(1, device=self.device)
            dist.all_reduce(cpu)
            dist.all_reduce(gpu)
            return {"backend": str(dist.get_backend()), "device": str(self.device), "sums": (float(cpu), float(gpu))}

    group = ActorGroup(Probe, role="probe", num_ranks=ranks, num_cpus_per_rank=1,
                       num_gpus_per_rank=1 if ranks > 1 else 0.5)
    try:
        results = group.call(lambda actor: actor.reduce.remote())
    finally:
        group.shutdown()
    ok = all(r["backend"] == "cpu:gloo,cuda:nccl" and r["device"] == "cuda:0" and r["sums"] == (ranks, ranks)
             for r in results)
    item = "2 collectives on a GPU rank (one rank)" if ranks == 1 else "2 collectives across two GPU ranks"
    return report(ok, item, "; ".join(f"rank {i}: {r}" for i, r in enumerate(results)))


def _zero_gpu_rank() -> bool:
    """A rank that reserved no GPU on this GPU node: Ray empties CUDA_VISIBLE_DEVICES (the driver's
    runtime env sets RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO), and the rank runs on the CPU over gloo."""
    from rlhf_ray.runtime.actor_group import ActorGroup
    from rlhf_ray.runtime.distributed import DistributedWorker

    class Probe(DistributedWorker):
        def where(self) -> dict:
            import torch

            return {"visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": torch.cuda.is_available(),
                    **{k: self.rank_info()[k] for k in ("device", "backend")}}

    group = ActorGroup(Probe, role="probe", num_ranks=1, num_cpus_per_rank=1)
    try:
        (seen,) = group.call(lambda actor: actor.where.remote())
    finally:
        group.shutdown()
    ok = seen["device"] == "cpu" and seen["backend"] == "gloo" and not seen["cuda"]
    return report(ok, "3 a rank without a GPU sees none", str(seen))


# item 6 --------------------------------------------------------------------------------------------------
def tied() -> bool:
    return guarded("6 tied aliases on the NCCL path", _tied)


def _tied() -> bool:
    """What the NCCL sender declares and sends for GPT-2 (tied lm_head), checked by vLLM's own engine."""
    import torch

    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.workers.rollout.vllm.sender import gathered_module_source, sent_weight_layout

    model = load_causal_lm("tiny-gpt2", dtype="bfloat16", device="cuda")
    names = [name for name, _, _ in sent_weight_layout(model)]
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerWeightTransferEngine

    source = gathered_module_source(model)
    checked = [name for name, _ in NCCLTrainerWeightTransferEngine._checked_iter(source, source.metadata)]
    ok = "lm_head.weight" in names and checked == names
    two = " (the broadcast itself is the gpu test with two GPUs)" if torch.cuda.device_count() < 2 else ""
    return report(ok, "6 tied aliases on the NCCL path", f"{len(names)} tensors, lm_head.weight sent: "
                  f"{'lm_head.weight' in names}, vLLM's check of the stream: {checked == names}{two}")


# the gpu-marked tests ---------------------------------------------------------------------------------------
GPU_TEST_FILES = ("tests/telemetry/test_memory.py", "tests/telemetry/test_hardware.py",
                  "tests/workers/test_vllm_rollout.py")


def gpu_tests(out_dir: str) -> bool:
    """pytest's `gpu` tests, as one line (its log beside the runs)."""
    import subprocess

    import torch

    log = Path(out_dir) / "gpu_tests.pytest.log"
    with open(log, "w") as sink:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
                              *GPU_TEST_FILES], stdout=sink, stderr=subprocess.STDOUT)
    lines = log.read_text().strip().splitlines()
    ok = report(rc == 0, "gpu tests", f"{lines[-1] if lines else 'no output'} (log: {log})")
    if torch.cuda.device_count() < 2:
        report(None, "gpu tests: NCCL weight transfer from a policy actor", "needs two GPUs (a sender and an "
               "engine; NCCL cannot join two ranks on one GPU)")
    return ok


# runs ------------------------------------------------------------------------------------------------------
# Every role on the one GPU (a share each), ZeRO-3, bf16, vLLM at 0.3 of the GPU, two steps.
GPU_ROLE = ["num_gpus_per_rank=1", "zero_stage=3", "model.dtype=bfloat16"]
RUNS = {
    "ppo": ("tiny-ppo", ["policy", "critic", "reference", "reward"],
            ["reward.rule=", "reward.model.name_or_path=tiny-gpt2", "rollout.sleep_between_steps=true",
             "placement.colocate=[[policy,rollout,reference,reward,critic]]"]),
    "remax": ("tiny-remax", ["policy", "reference", "reward"],
              ["reward.rule=", "reward.model.name_or_path=tiny-gpt2",
               "placement.colocate=[[policy,rollout,reference,reward]]"]),
    "dpo": ("tiny-dpo", ["policy", "reference"],
            ["placement.colocate=[[policy,reference]]", "policy.optim.warmup_steps=0"]),
}
ONLINE = ("ppo", "remax")


def run(name: str, out_dir: str) -> bool:
    item = f"{name} on the GPU"
    return guarded(item, lambda: _run(name, Path(out_dir) / name, item))


def _run(name: str, out: Path, item: str) -> bool:
    import torch

    from rlhf_ray.config import load_config
    from rlhf_ray.jobs import run_job
    from rlhf_ray.telemetry.metrics import read_metrics

    preset, roles, extra = RUNS[name]
    overrides = [f"run.output_dir={out}", "run.total_steps=2", "run.batch_size=8", "run.save_every=0",
                 "run.eval_every=0", "run.progress=false", "data.max_examples=64", "data.eval=", *extra]
    overrides += [f"{role}.{setting}" for role in roles for setting in GPU_ROLE]
    if name in ONLINE:  # one pass over one minibatch: the policy's training forward measures logprob_diff
        overrides += ["rollout.engine=vllm", "rollout.num_gpus_per_engine=1", "rollout.gpu_memory_utilization=0.3",
                      "rollout.max_new_tokens=16", "algorithm.ppo_epochs=1", "algorithm.num_minibatches=1"]
    cfg = load_config(preset, overrides)
    start = time.perf_counter()
    summary = run_job(cfg)
    seconds = time.perf_counter() - start
    last = read_metrics(out)[-1]
    detail = f"{seconds:.0f} s, step {last['step']}"
    ok = last["step"] == 2 and all(v == v for k, v in last.items() if isinstance(v, float) and "loss" in k)
    if name in ONLINE:
        diff, sent = last.get("rollout/logprob_diff", float("nan")), last.get("sync/bytes", 0.0)
        detail += f", rollout/logprob_diff {diff:.4f} (bf16), sync/bytes {sent:.0f}"
        ok = ok and diff < 0.05 and sent > 0
    else:
        detail += f", loss {last.get('loss', last.get('policy/loss', float('nan'))):.4f}"
    report(ok, item, detail)
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return ok & _memory_against_plan(name, cfg, summary, roles, gpu_gib)


def _memory_against_plan(name: str, cfg, summary: dict, roles: list[str], gpu_gib: float) -> bool:
    """Each role's max_memory_allocated (its `memory/<role>/peak_bytes` on a GPU) against the planner's peak
    for the same shapes: the planner may round up, but it must not miss most of what a role takes."""
    from rlhf_ray.planner.from_config import plan_from_config

    plan = plan_from_config(cfg, gpu_mem_gib=gpu_gib)
    seen = summary.get("max", {})
    parts, ok = [], True
    for role in roles:
        measured = seen.get(f"memory/{role}/peak_bytes")
        planned = plan.role(role).peak_bytes
        if measured is None:
            parts.append(f"{role}: not measured")
            ok = False
            continue
        fits = measured <= 2 * planned + 64 * MiB
        ok &= fits
        parts.append(f"{role} {measured / MiB:.0f} MiB measured / {planned / MiB:.0f} MiB planned")
    return report(ok, f"{name} memory per role vs planner", "; ".join(parts))


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    group, *args = argv
    checks = {"versions": versions, "devices": devices, "tied": tied, "gpu-tests": lambda: gpu_tests(*args),
              "run": lambda: run(*args)}
    if group not in checks:
        print(f"unknown group {group!r}; expected one of {', '.join(checks)}", file=sys.stderr)
        return 2
    return 0 if checks[group]() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
