"""Every offline objective, wired to a real tiny model and real batches (the online policy loss is
checked against a hand-computed gradient in test_rl_wiring.py).

These run the roles' loss functions in-process (no Ray, no DeepSpeed) on the
shipped tiny model and synthetic data: the batch layout the drivers build
reaches each objective, the loss is finite, and its gradient reaches the model.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_ray.algorithms.batches import RankedRewardBatch
from rlhf_ray.algorithms.registry import OFFLINE_OBJECTIVES, get_offline_objective
from rlhf_ray.algorithms.steps import OfflineStep
from rlhf_ray.config.schema import DataConfig, JobConfig
from rlhf_ray.data.job_data import JobData, load_job_examples
from rlhf_ray.data.synthetic import SyntheticConfig
from rlhf_ray.models import forward as fw
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import load_causal_lm
from rlhf_ray.models.tokenizer import load_tokenizer
from rlhf_ray.offline_formats import data_format
from rlhf_ray.workers.reward_trainer import pairwise_accuracy, ranked_scores

DATA = DataConfig(max_prompt_length=48, max_length=96)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("tiny")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("synthetic")


def batch_of(kind, fmt, source, tokenizer, data_dir, n=4):
    examples, _ = load_job_examples(source, fmt, DATA, tokenizer, data_dir)
    return JobData(examples, kind, tokenizer, DATA).batch(list(range(n)))


def add_reference(objective, batch, ref_model):
    """What the reference role adds to a batch, computed with a separate frozen model."""
    with torch.no_grad():
        if data_format(objective.data_format).pairs:
            stats = fw.pair_logps(ref_model, batch, vocab=objective.needs_sequence_kl)
            batch["ref_chosen_logps"], batch["ref_rejected_logps"] = stats["chosen_logps"], stats["rejected_logps"]
            if objective.needs_sequence_kl:
                batch["ref_chosen_vocab_logps"] = stats["chosen_vocab_logps"]
                batch["ref_rejected_vocab_logps"] = stats["rejected_vocab_logps"]
        elif objective.data_format == "kto":
            main = fw.sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            kl = fw.sequence_logps(ref_model, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_loss_mask"])
            batch["ref_logps"], batch["ref_kl_logps"] = main["logps"], kl["logps"]
        else:
            stats = fw.sequence_logps(ref_model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"])
            batch["ref_token_logps"] = stats["token_logps"]


SOURCES = {"preference": ("preference", "synthetic:preference_train"), "sft": ("sft", "synthetic:sft"),
           "kto": ("kto", "synthetic:kto"), "multi_turn_preference": ("preference", "multi_turn.jsonl")}


def multi_turn_rows(n=4):
    """Conversations sharing two exchanges, then differing in the assistant's second reply."""
    def turn(role, content):
        return {"role": role, "content": content}

    rows = []
    for i in range(n):
        shared = [turn("user", f"add {i} and 1"), turn("assistant", f"{i + 1}"), turn("user", "and 2 more?")]
        rows.append({"chosen": shared + [turn("assistant", f"{i + 3}")],
                     "rejected": shared + [turn("assistant", f"{i + 4}")]})
    return rows


@pytest.mark.parametrize("name", [n for n, o in OFFLINE_OBJECTIVES.items() if o.trains == "policy"])
def test_each_policy_objective_gives_a_finite_loss_with_gradient(name, tokenizer, data_dir):
    objective = get_offline_objective(name)
    fmt, source = SOURCES[objective.data_format]
    if source.endswith(".jsonl"):
        source = str(data_dir / source)
        (data_dir / source).write_text("".join(json.dumps(row) + "\n" for row in multi_turn_rows()))
    batch = batch_of(objective.data_format, fmt, source, tokenizer, data_dir)
    policy = load_causal_lm("tiny-gpt2", seed=0)
    if objective.needs_reference:
        add_reference(objective, batch, load_causal_lm("tiny-gpt2", seed=0))
    loss_fn = data_format(objective.data_format).loss_fn(OfflineStep(objective))
    policy.train()
    loss, metrics = loss_fn(policy, batch)
    assert loss.dim() == 0 and math.isfinite(float(loss.detach()))
    loss.backward()
    grad = sum(float(p.grad.abs().sum()) for p in policy.parameters() if p.grad is not None)
    assert grad > 0
    if data_format(objective.data_format).pairs:  # the objective's own metrics carry the policy's log-probs
        assert math.isfinite(float(metrics["logps/chosen"])) and math.isfinite(float(metrics["logps/rejected"]))
    if data_format(objective.data_format).pairs and objective.needs_reference:
        # The policy equals the reference: every implicit reward is zero (TRL's step-one metrics).
        assert float(metrics["rewards/chosen"]) == pytest.approx(0.0, abs=1e-5)
        assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-5)
    if name == "dpo":
        assert float(loss) == pytest.approx(math.log(2), abs=1e-5)


def test_reward_model_objective_on_ranked_and_pair_batches(tokenizer, data_dir):
    objective = get_offline_objective("rm")
    model = load_scalar_head_model("tiny-gpt2", seed=0)
    for fmt, source in (("preference", "synthetic:preference_train"), ("ranked", "synthetic:ranked")):
        batch = batch_of("ranked", fmt, source, tokenizer, data_dir)
        scores = ranked_scores(model, batch)
        assert scores.shape == batch["ranking"].shape
        loss, _ = objective.loss(RankedRewardBatch(scores, batch["ranking"]))
        loss.backward()
        assert math.isfinite(float(loss))


def test_pairwise_accuracy_counts_ordered_pairs():
    # Prompt 0: ranks [0, 1, 2] (response 0 best); scores 3 > 2 > 1 -> all 3 pairs right.
    # Prompt 1: ranks [1, 0, 2]; scores [1, 2, 3]: pairs (1>0) right, (1>2) wrong, (0>2) wrong -> 1 of 3.
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    ranking = torch.tensor([[0, 1, 2], [1, 0, 2]])
    assert float(pairwise_accuracy(scores, ranking)) == pytest.approx(4 / 6)


def test_kto_batch_pairs_each_prompt_with_the_next_completion(tokenizer, data_dir):
    batch = batch_of("kto", "kto", "synthetic:kto", tokenizer, data_dir, n=3)
    examples, _ = load_job_examples("synthetic:kto", "kto", DATA, tokenizer, data_dir)
    # Row 0's mismatched sequence ends with example 1's completion (plus EOS).
    ids = batch["kl_input_ids"][0][batch["kl_loss_mask"][0].bool()].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == examples[1].completion.strip()
    assert batch["label"].dtype == torch.bool


def test_synthetic_default_sizes_are_the_studys():
    cfg = SyntheticConfig()
    assert (cfg.n_pref_train, cfg.n_pref_eval) == (1300, 125)


def test_a_kto_step_runs_the_mismatched_forward_pass_once_with_the_same_loss(tokenizer, data_dir):
    # The step's reference point z0 comes from one forward pass over the mismatched pairs (every micro-batch);
    # the loss's own micro-batches then forward only the examples, and the loss is KTO's with that z0.
    from rlhf_ray.algorithms.preference import kto_loss
    from rlhf_ray.workers.policy import PolicyWorker

    objective = get_offline_objective("kto")
    batch = batch_of("kto", "kto", "synthetic:kto", tokenizer, data_dir, n=4)
    add_reference(objective, batch, load_causal_lm("tiny-gpt2", seed=1))
    policy = load_causal_lm("tiny-gpt2", seed=0)
    rows_forwarded = []
    policy.register_forward_hook(lambda module, args, kwargs, out: rows_forwarded.append(
        (kwargs.get("input_ids", args[0] if args else None)).shape[0]), with_kwargs=True)

    def micro_batches(b):
        return [{k: v[i:i + 2] for k, v in b.items()} for i in range(0, 4, 2)]

    class Engine:  # two micro-batches of two rows, one rank
        device = torch.device("cpu")

        def forward_eval(self, b, fn):
            with torch.no_grad():
                outs = [fn(policy, mb) for mb in micro_batches(b)]
            return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}

        def train_batch(self, b, loss_fn):
            losses = [loss_fn(policy, mb)[0] for mb in micro_batches(b)]
            return {"loss": float(sum(losses) / len(losses))}

    worker = PolicyWorker.__new__(PolicyWorker)
    worker.world_size, worker.engine = 1, Engine()
    worker.job = JobConfig()  # the policy's settings (shared_prefix; KTO's rows share no prompt)
    params = objective.resolve_params({})
    result = worker.train_offline(batch, OfflineStep(objective, params))
    assert rows_forwarded == [2, 2, 2, 2]  # z0: the 4 mismatched rows once; the loss: the 4 examples once

    with torch.no_grad():
        kl = fw.sequence_logps(policy, batch["kl_input_ids"], batch["kl_attention_mask"], batch["kl_loss_mask"])
        z0 = max(0.0, float((kl["logps"] - batch["ref_kl_logps"]).mean()))
        expected = []
        for mb in micro_batches(batch):
            logps = fw.sequence_logps(policy, mb["input_ids"], mb["attention_mask"], mb["loss_mask"])["logps"]
            expected.append(kto_loss(logps, mb["ref_logps"], mb["label"], torch.tensor(z0), beta=params["beta"],
                                     lambda_d=params["lambda_d"], lambda_u=params["lambda_u"])[0])
    assert result["loss"] == pytest.approx(float(sum(expected) / 2), abs=1e-6)
