"""ActivationTracker: bytes of a small autograd graph worked by hand, gradient checkpointing,
and a DeepSpeed ZeRO-0 TrainEngine reporting `memory/<role>/activations_bytes`."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.telemetry.activations import ActivationTracker, batch_shape
from rlhf_ray.telemetry.memory import held_storage_keys


def measure_lm_step(name: str, checkpointing: bool, rows: int = 4, seq_len: int = 64):
    """One policy-style micro-step (sequence log-probs, mean loss, backward) of a tiny preset."""
    from rlhf_ray.models import forward as fw
    from rlhf_ray.models.loading import load_causal_lm

    model = load_causal_lm(name, gradient_checkpointing=checkpointing)
    model.train()
    ids = torch.randint(0, model.config.vocab_size, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with ActivationTracker() as tracker:
        loss = -fw.sequence_logps(model, ids, mask, mask)["logps"].mean()
        tracker.mark_backward()
        loss.backward()
    del loss
    return tracker.report(held_storage_keys(model), rows=rows, seq_len=seq_len), model


def test_linear_stack_by_hand():
    # x [5, 8] -> Linear(8, 16) -> ReLU -> Linear(16, 4) -> sum, fp32.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    x = torch.randn(5, 8)
    with ActivationTracker() as tracker:
        loss = model(x).sum()
        tracker.mark_backward()
        loss.backward()
    report = tracker.report(held_storage_keys(model))
    # Stored for backward: ReLU's output [5, 16] (ReLU's backward and the second Linear both use
    # it) = 320 bytes, and the scalar loss 4. The first Linear's output (ReLU's input) and the
    # second's (sum's input) are not saved: freed in forward. x existed before: not counted.
    assert report.after_forward_bytes == 324
    # Peak in backward: those 324, the loss's gradient 4, the second Linear's input gradient
    # [5, 16] 320 and ReLU's input gradient [5, 16] 320 = 968. The weight and bias gradients
    # (256 + 16 + 512 + 64 bytes) are held state afterwards and are left out.
    assert report.peak_bytes == 968


def test_held_state_created_in_the_step_is_left_out_and_views_are_free():
    weight = torch.nn.Parameter(torch.randn(64, 64))
    with ActivationTracker() as tracker:
        y = (torch.randn(3, 64) @ weight).t()  # a [3, 64] product (768 bytes) and a view of it
        y.sum().backward()  # weight.grad: 16 KiB, held afterwards
    report = tracker.report({(str(weight.grad.device), weight.grad.untyped_storage().data_ptr())})
    # Alive at once: the random input 768 (saved by mm for the weight's gradient), the product
    # 768, the sum 4, its gradient 4 (expanded as a view); the weight's gradient is held state.
    assert report.peak_bytes == 768 + 768 + 4 + 4
    with pytest.raises(RuntimeError, match="after the tracked block"):
        ActivationTracker().report()


def test_batch_shape_counts_rows_of_every_input_ids_tensor():
    pair = {"chosen_input_ids": torch.zeros(2, 7), "rejected_input_ids": torch.zeros(2, 7), "x": torch.zeros(9)}
    assert batch_shape(pair) == (4, 7)
    assert batch_shape({"input_ids": torch.zeros(2, 3, 5)}) == (6, 5)  # reward trainer [B, K, T]


def test_gradient_checkpointing_stores_less_than_keeping_every_layer():
    off, _ = measure_lm_step("tiny-gpt2", checkpointing=False)
    on, _ = measure_lm_step("tiny-gpt2", checkpointing=True)
    assert off.peak_bytes > on.peak_bytes and off.after_forward_bytes > 3 * on.after_forward_bytes
    assert on.peak_bytes > on.after_forward_bytes  # the recomputed layer comes on top in backward


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_engine_at_zero0_reports_the_activations_of_its_first_micro_step(world_of_one, checkpointing):
    from rlhf_ray.config.schema import RoleConfig
    from rlhf_ray.models import forward as fw
    from rlhf_ray.runtime.engine import TrainEngine

    plain, model = measure_lm_step("tiny-gpt2", checkpointing, rows=2, seq_len=32)
    model.zero_grad(set_to_none=True)
    engine = TrainEngine(model, RoleConfig(micro_batch_size=2), world_size=1, batch_per_rank=2,
                         total_optimizer_steps=2, dtype="float32")
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def loss_fn(module, mb):
        logps = fw.sequence_logps(module, mb["input_ids"], mb["attention_mask"], mb["attention_mask"])["logps"]
        return -logps.mean(), {}

    assert engine.memory().activations is None
    engine.train_batch(batch, loss_fn)
    metrics = engine.memory().to_metrics("policy")
    # The same graph as the plain module's; DeepSpeed adds at most small buffers of its own.
    assert metrics["memory/policy/activations_bytes"] == pytest.approx(plain.peak_bytes, rel=0.05)
    assert (metrics["memory/policy/activations_rows"], metrics["memory/policy/activations_seq_len"]) == (2, 32)
    engine.train_batch(batch, loss_fn)  # later steps run untracked and keep the first figure
    assert engine.memory().to_metrics("policy")["memory/policy/activations_bytes"] == \
        metrics["memory/policy/activations_bytes"]
