"""Gradient clipping at ZeRO-0 in float32, where the engine clips with the norm it takes for its finite
check and its `grad_norm` metric instead of letting DeepSpeed take a second one: the optimizer sees the
gradients scaled by DeepSpeed's factor when the norm is above `grad_clip`, untouched below it, and the
metric is the norm before clipping, equal to a float64 sum over the plain module's gradients."""

from __future__ import annotations

import pytest
import torch


def _engine_and_batch(grad_clip: float):
    from rlhf_ray.config.schema import OptimConfig, RoleConfig
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.runtime.engine import TrainEngine

    torch.manual_seed(0)
    model = load_causal_lm("tiny-gpt2")
    role = RoleConfig(micro_batch_size=2, optim=OptimConfig(lr=1e-3, grad_clip=grad_clip))
    engine = TrainEngine(model, role, world_size=1, batch_per_rank=4, total_optimizer_steps=2, dtype="float32",
                         measure_activations=False, threads="reserved")
    ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=torch.Generator().manual_seed(1))
    return engine, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _loss_fn(module, mb):
    from rlhf_ray.models import forward as fw

    logps = fw.sequence_logps(module, mb["input_ids"], mb["attention_mask"], mb["attention_mask"])["logps"]
    return -logps.mean(), {}


def _reference_norm(batch) -> float:
    """The same step's gradient norm from a plain module: two micro-batches of two rows, each loss halved
    (DeepSpeed divides by the accumulation steps), squares summed in float64."""
    from rlhf_ray.models.loading import load_causal_lm

    torch.manual_seed(0)
    model = load_causal_lm("tiny-gpt2")
    for start in (0, 2):
        mb = {k: v[start:start + 2] for k, v in batch.items()}
        (_loss_fn(model, mb)[0] / 2).backward()
    return float(sum(p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None).sqrt())


def _norm_the_optimizer_sees(engine, batch) -> tuple[dict, float]:
    seen = []
    step = engine.optimizer.step

    def recording_step(*args, **kwargs):
        grads = [p.grad for group in engine.optimizer.param_groups for p in group["params"] if p.grad is not None]
        seen.append(float(sum(g.double().pow(2).sum() for g in grads).sqrt()))
        return step(*args, **kwargs)

    engine.optimizer.step = recording_step
    metrics = engine.train_batch(batch, _loss_fn)
    assert len(seen) == 1
    return metrics, seen[0]


@pytest.mark.parametrize("clipped", [True, False])
def test_the_engine_clips_with_its_own_norm_and_reports_the_norm_before_clipping(world_of_one, clipped):
    _, batch = _engine_and_batch(1.0)
    expected = _reference_norm(batch)
    grad_clip = expected / 4 if clipped else expected * 4
    engine, batch = _engine_and_batch(grad_clip)
    assert engine.clips_itself and engine.engine.gradient_clipping() == 0.0  # DeepSpeed takes no norm of its own

    metrics, seen = _norm_the_optimizer_sees(engine, batch)
    assert metrics["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert metrics["grad_clipped"] == float(clipped)
    # DeepSpeed's factor, clip / (norm + 1e-6), when clipped; the gradients as they were otherwise.
    assert seen == pytest.approx(grad_clip * expected / (expected + 1e-6) if clipped else expected, rel=1e-5)


@pytest.mark.parametrize("numel", [1, 3, 16384, 16384 * 3 + 7, 49152 * 576])
def test_squared_l2_equals_the_float64_sum_to_float32_rounding(numel):
    from rlhf_ray.runtime.engine import squared_l2

    # The last size is a real model's embedding, where torch's float32 norm of the whole tensor is 1e-3 off.
    tensor = torch.randn(numel, generator=torch.Generator().manual_seed(numel)) * 1e-3
    value = squared_l2(tensor)
    assert value.dtype == torch.float64
    assert float(value) == pytest.approx(float(tensor.double().square().sum()), rel=1e-6)
    assert float(squared_l2(tensor.view(-1, 1) if numel > 1 else tensor)) == float(value)  # the shape does not matter


def test_the_engines_norm_is_the_float64_norm_to_float32_rounding(world_of_one):
    engine, batch = _engine_and_batch(0.0)
    for param in engine.module.parameters():
        param.grad = torch.randn(param.shape, generator=torch.Generator().manual_seed(param.numel())) * 1e-3
    exact = float(sum(p.grad.double().pow(2).sum() for p in engine.module.parameters()).sqrt())
    assert engine._unpartitioned_grad_norm() == pytest.approx(exact, rel=1e-6)


def test_bfloat16_and_sharded_stages_leave_clipping_to_deepspeed(world_of_one):
    from rlhf_ray.config.schema import OptimConfig, RoleConfig
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.runtime.engine import TrainEngine

    model = load_causal_lm("tiny-gpt2").to(torch.bfloat16)
    role = RoleConfig(micro_batch_size=2, optim=OptimConfig(grad_clip=0.5))
    engine = TrainEngine(model, role, world_size=1, batch_per_rank=2, total_optimizer_steps=1, dtype="bfloat16",
                         measure_activations=False, threads="reserved")
    assert not engine.clips_itself and engine.engine.gradient_clipping() == 0.5
