"""build_deepspeed_config: the dict for each ZeRO stage, its validation, the LR
schedule it asks DeepSpeed for, and proof that DeepSpeed runs it on this CPU."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_ray.runtime.deepspeed_config import DeepSpeedConfigError, build_deepspeed_config, scheduled_lr

COMMON = dict(micro_batch_size_per_rank=2, grad_accum_steps=3, world_size=4, lr=1e-3, weight_decay=0.01,
              betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0, warmup_steps=0, total_steps=10, scheduler="constant")


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_training_config_for_each_stage_on_cpu(stage):
    config = build_deepspeed_config(zero_stage=stage, on_cuda=False, **COMMON)
    # 2 sequences per micro-batch x 3 accumulation steps x 4 ranks = 24 per optimizer step.
    assert config["train_batch_size"] == 24
    assert config["train_micro_batch_size_per_gpu"] == 2
    assert config["gradient_accumulation_steps"] == 3
    assert config["gradient_clipping"] == 1.0
    assert config["zero_optimization"]["stage"] == stage
    assert config["optimizer"] == {"type": "AdamW", "params": {
        "lr": 1e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.01, "torch_adam": True}}
    assert "scheduler" not in config  # constant without warm-up needs none
    assert "bf16" not in config and "fp16" not in config
    assert ("stage3_gather_16bit_weights_on_model_save" in config["zero_optimization"]) == (stage == 3)


def test_offload_bf16_and_gpu_choices():
    config = build_deepspeed_config(zero_stage=3, dtype="bfloat16", offload_optimizer=True, offload_params=True,
                                    on_cuda=True, **COMMON)
    zero = config["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert config["bf16"] == {"enabled": True}
    assert config["data_types"] == {"grad_accum_dtype": "fp32"}
    # On CUDA DeepSpeed's own Adam (DeepSpeedCPUAdam for the offloaded states) is used.
    assert config["optimizer"]["params"]["torch_adam"] is False
    assert "zero_force_ds_cpu_optimizer" not in config

    cpu = build_deepspeed_config(zero_stage=2, offload_optimizer=True, on_cuda=False, **COMMON)
    assert cpu["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert cpu["zero_force_ds_cpu_optimizer"] is False

    fp16 = build_deepspeed_config(zero_stage=2, dtype="float16", on_cuda=True, **COMMON)
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    # DeepSpeed refuses bf16 weights with fp32 gradient accumulation at stage 0.
    assert "data_types" not in build_deepspeed_config(zero_stage=0, dtype="bfloat16", on_cuda=False, **COMMON)


def test_frozen_role_config_has_no_optimizer():
    config = build_deepspeed_config(zero_stage=3, micro_batch_size_per_rank=4, world_size=2, offload_params=True,
                                    train=False, on_cuda=False)
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_batch_size"] == 8
    for key in ("optimizer", "scheduler", "gradient_clipping"):
        assert key not in config


@pytest.mark.parametrize("overrides, message", [
    (dict(zero_stage=4), "zero_stage must be 0, 1, 2 or 3, got 4"),
    (dict(zero_stage=2, offload_params=True), "offload_params needs ZeRO stage 3"),
    (dict(zero_stage=0, offload_optimizer=True), "offload_optimizer needs ZeRO stage 1, 2 or 3"),
    (dict(zero_stage=2, dtype="fp32"), "dtype 'fp32' is not one of float32, bfloat16, float16"),
    (dict(zero_stage=2, scheduler="step"), "scheduler 'step' is not one of constant, linear, cosine"),
    (dict(zero_stage=2, scheduler="cosine", warmup_steps=0), "'cosine' with warmup_steps=0"),
    (dict(zero_stage=2, warmup_steps=1), "warmup_steps=1: DeepSpeed's schedulers warm up over at least 2"),
    (dict(zero_stage=2, scheduler="linear", warmup_steps=10, total_steps=10), "total_steps=10 is not above"),
    (dict(zero_stage=2, grad_clip=-1.0), "grad_clip must be >= 0"),
    (dict(zero_stage=2, lr=0.0), "lr must be > 0"),
    (dict(zero_stage=1, train=False), "zero_stage 1 partitions optimizer state"),
    (dict(zero_stage=3, offload_optimizer=True, train=False), "offload_optimizer is set for a frozen role"),
])
def test_invalid_settings_are_named(overrides, message):
    kwargs = {**COMMON, **overrides}
    with pytest.raises(DeepSpeedConfigError, match=message):
        build_deepspeed_config(on_cuda=False, **kwargs)


@pytest.mark.parametrize("cpu_fp16", [False, True], ids=["cpu-without-fp16", "cpu-with-amx-fp16"])
def test_float16_on_cpu_follows_what_the_cpu_supports(monkeypatch, cpu_fp16):
    # Decided by the CPU (oneDNN fp16 kernels), so both answers are checked on any machine.
    from rlhf_ray.runtime import deepspeed_config

    monkeypatch.setattr(deepspeed_config, "_cpu_has_fp16", lambda: cpu_fp16)
    kwargs = {**COMMON, "zero_stage": 2, "dtype": "float16"}
    if cpu_fp16:
        assert build_deepspeed_config(on_cuda=False, **kwargs)["fp16"]["enabled"]
    else:
        with pytest.raises(DeepSpeedConfigError, match="dtype float16 needs CUDA here"):
            build_deepspeed_config(on_cuda=False, **kwargs)


def test_scheduled_lr_by_hand():
    # DeepSpeed runs optimizer step k at the schedule's value for i = k - 1 (step 0 at 0).
    # linear, lr 0.1, W=2, T=5: k=1 -> i=0 -> 0; k=2 -> 0.1*1/2; k=3 -> i=2 -> 0.1*(5-2)/(5-2); k=4 -> 0.1*2/3.
    linear = [scheduled_lr(k, lr=0.1, scheduler="linear", warmup_steps=2, total_steps=5) for k in range(5)]
    assert linear == pytest.approx([0.0, 0.0, 0.05, 0.1, 0.1 * 2 / 3])
    # cosine, W=2, T=6: k=3 -> progress (2-2+1)/4 = 1/4 -> (1 + cos(pi/4))/2 = 0.85355.
    cosine = [scheduled_lr(k, lr=1.0, scheduler="cosine", warmup_steps=2, total_steps=6) for k in range(6)]
    assert cosine == pytest.approx([0.0, 0.0, 0.5, (1 + math.cos(math.pi / 4)) / 2, 0.5,
                                    (1 + math.cos(3 * math.pi / 4)) / 2])
    assert scheduled_lr(7, lr=0.1, scheduler="constant", warmup_steps=0, total_steps=10) == 0.1


# DeepSpeed in this process -----------------------------------------------------------

def _tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))


def _train(config: dict, steps: int) -> tuple[torch.Tensor, list[float], object]:
    """Run `steps` optimizer steps on fixed data; return the output on a probe
    batch, the lr of each step and the engine."""
    import deepspeed

    model = _tiny_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    data = torch.Generator().manual_seed(1)
    lrs = []
    for _ in range(steps):
        for _ in range(config["gradient_accumulation_steps"]):
            x = torch.randn(config["train_micro_batch_size_per_gpu"], 4, generator=data)
            loss = (engine(x) - x.sum(dim=1, keepdim=True)).pow(2).mean()
            engine.backward(loss)
            if engine.is_gradient_accumulation_boundary():
                lrs.append(engine.get_lr()[0])
            engine.step()
    with torch.no_grad():
        probe = engine(torch.linspace(-1, 1, 8).reshape(2, 4))
    return probe, lrs, engine


def test_deepspeed_runs_stages_0_2_3_on_cpu_and_they_agree(world_of_one):
    torch.set_num_threads(1)
    settings = dict(micro_batch_size_per_rank=2, grad_accum_steps=2, world_size=1, lr=0.05, grad_clip=1.0,
                    on_cuda=False)
    before = _tiny_model()(torch.linspace(-1, 1, 8).reshape(2, 4)).detach()
    probes = {}
    for stage, offload in ((0, False), (2, False), (3, False), (3, True)):
        config = build_deepspeed_config(zero_stage=stage, offload_optimizer=offload, offload_params=offload,
                                        **settings)
        probes[(stage, offload)], _, engine = _train(config, steps=2)
        assert engine.zero_optimization_stage() == stage
    # ZeRO changes where state lives, not the math: every stage ends at the same weights.
    for key, probe in probes.items():
        assert torch.allclose(probe, probes[(0, False)], atol=1e-6), key
    assert not torch.allclose(probes[(0, False)], before, atol=1e-3)  # and training moved them


def test_deepspeed_follows_the_documented_schedule(world_of_one):
    torch.set_num_threads(1)
    config = build_deepspeed_config(zero_stage=2, micro_batch_size_per_rank=2, grad_accum_steps=2, world_size=1,
                                    lr=0.1, scheduler="linear", warmup_steps=2, total_steps=5, on_cuda=False)
    _, lrs, _ = _train(config, steps=5)
    assert lrs == pytest.approx([scheduled_lr(k, lr=0.1, scheduler="linear", warmup_steps=2, total_steps=5)
                                 for k in range(5)])


def test_zero3_inference_matches_the_plain_module(world_of_one):
    import deepspeed

    torch.set_num_threads(1)
    probe = torch.linspace(-1, 1, 12).reshape(3, 4)
    expected = _tiny_model()(probe)
    config = build_deepspeed_config(zero_stage=3, micro_batch_size_per_rank=3, world_size=1, train=False,
                                    on_cuda=False)
    engine, *_ = deepspeed.initialize(model=_tiny_model(), config=config)
    with torch.no_grad():
        assert torch.allclose(engine(probe), expected, atol=1e-6)
