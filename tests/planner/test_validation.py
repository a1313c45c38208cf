"""The planner against `bench memory`: for the tiny presets, every role's planned
parameter, gradient and optimizer bytes equal the measured ones exactly, and the
totals agree within 20%.

What is compared (see `planner/from_config.py` and `planner/zero.py`): measured
`memory/<role>/{params,grads,optimizer}_bytes` of rank 0 after the second update
(`telemetry.memory.measure_memory`) against `held_bytes(cfg)` for rank 0. Worked
figures for tiny-gpt2 (560,640 parameters in 28 tensors, fp32, one rank, torch
AdamW): params 4 * 560,640 = 2,242,560 bytes; grads the same; optimizer
8 * 560,640 (exp_avg, exp_avg_sq) + 28 * 4 (one `step` tensor per tensor) =
4,485,232. The scalar-head copies (critic, reward) hold 560,769 parameters in
30 tensors: the LM head is tied, the score head adds 128 + 1.
"""

from __future__ import annotations

import pytest

from rlhf_ray.planner.from_config import held_bytes
from rlhf_ray.reports.bench import run_memory, with_algorithm
from rlhf_ray.reports.bench_markdown import write_result

from job_helpers import tiny_config

SMALL = ["run.batch_size=2", "rollout.max_new_tokens=4", "algorithm.num_minibatches=1", "algorithm.ppo_epochs=1",
         "reward.rule=", "reward.model.name_or_path=tiny-gpt2"]
CLASSES = ("params", "grads", "optimizer")


def assert_planner_matches(result: dict) -> None:
    for name, run in result["runs"].items():
        planned_total = measured_total = 0
        for role, planned in run["planned"].items():
            measured = {c: int(run["roles"][role][c]) for c in CLASSES}
            assert measured == planned, f"{name} {role}: measured {measured}, planned {planned}"
            planned_total += sum(planned.values())
            measured_total += run["roles"][role]["held"]
        assert set(run["planned"]) == {r for r in run["roles"] if run["roles"][r]["held"] > 0}
        assert abs(planned_total - run["totals"]["peak"]) <= 0.2 * run["totals"]["peak"], name
        assert measured_total == run["totals"]["held"]


def test_zero0_one_rank_ppo_and_remax_match_the_plan_exactly(ray_cluster, tmp_path):
    cfg = tiny_config("tiny-ppo", tmp_path / "unused", *SMALL)
    result = run_memory(cfg, ["ppo", "remax"], tmp_path)
    assert_planner_matches(result)
    ppo, remax = result["runs"]["ppo"], result["runs"]["remax"]
    assert ppo["planned"]["policy"] == {"params": 2_242_560, "grads": 2_242_560, "optimizer": 4_485_232}
    assert ppo["planned"]["critic"] == {"params": 2_243_076, "grads": 2_243_076, "optimizer": 4_486_272}
    assert "critic" not in remax["roles"]
    # ReMax holds what PPO holds minus the critic (all other roles are the same models).
    assert remax["totals"]["held"] == ppo["totals"]["held"] - ppo["roles"]["critic"]["held"]
    saving = 100 * ppo["roles"]["critic"]["held"] / ppo["totals"]["held"]
    assert remax["saving_percent"]["held"] == pytest.approx(saving)
    # Trained roles: measured activations of their first micro-step beside the planner's, and the
    # saving with them; frozen roles report none.
    for role in ("policy", "critic"):
        m = ppo["roles"][role]
        assert m["activations_bytes"] > 0 and m["planned_activations_bytes"] > 0
        assert m["activations_rows"] >= 1 and m["activations_seq_len"] >= 1
    assert "activations_bytes" not in ppo["roles"]["reference"]
    assert ppo["totals"]["held_with_activations"] == ppo["totals"]["held"] + ppo["totals"]["activations"]
    assert "held_with_activations" in remax["saving_percent"]
    paths = write_result(result, tmp_path / "results", "memory")
    text = paths["md"].read_text()
    assert paths["png"].stat().st_size > 0 and "planned held" in text and "held + activations" in text


def test_zero2_and_zero3_on_two_ranks_match_the_plan_exactly(ray_cluster, tmp_path):
    # Policy ZeRO-2 (rank 0 keeps the gradients of every tensor overlapping its half),
    # critic, reference and reward ZeRO-3 (each tensor halved; tensors of at most 560
    # elements also whole, the critic's after each step in a buffer of ceil(n/2)*2).
    two_ranks = [f"{role}.num_ranks=2" for role in ("policy", "critic", "reference", "reward")]
    two_ranks += [f"{role}.num_cpus_per_rank=1" for role in ("policy", "critic", "reference", "reward")]
    stages = ["policy.zero_stage=2", "critic.zero_stage=3", "reference.zero_stage=3", "reward.zero_stage=3"]
    cfg = tiny_config("tiny-ppo", tmp_path / "unused", *SMALL, *two_ranks, *stages, "rollout.num_engines=2",
                      "rollout.num_cpus_per_engine=1", "policy.micro_batch_size=1", "critic.micro_batch_size=1")
    result = run_memory(cfg, ["ppo"], tmp_path)
    assert_planner_matches(result)
    planned = held_bytes(with_algorithm(cfg, "ppo"))
    # ZeRO-3 halves the frozen reference's 560,640 parameters: 280,320 per rank, plus the
    # 3,584 elements of its 18 tensors of at most 560 (biases, norms), whole: 4 * 283,904.
    assert planned["reference"]["params"] == 4 * 283_904
    assert planned["policy"]["params"] == 2_242_560  # ZeRO-2 keeps the weights whole


def test_lora_ppo_and_remax_match_the_plan_exactly_with_no_reference_group(ray_cluster, tmp_path):
    # Rank-8 adapters on c_attn, c_proj, c_fc of 2 layers: 2 * 8 * ((128 + 384) + (128 + 128) + (128 + 512)
    # + (512 + 128)) = 32,768 trained parameters; the critic's value head (129) trains whole too.
    lora = ["policy.lora.rank=8", "critic.lora.rank=8"]
    cfg = tiny_config("tiny-ppo", tmp_path / "unused", *SMALL, *lora)
    result = run_memory(cfg, ["ppo", "remax"], tmp_path)
    assert_planner_matches(result)
    ppo = result["runs"]["ppo"]
    assert "reference" not in ppo["roles"]  # the policy's base, adapter off
    assert ppo["planned"]["policy"] == {"params": 4 * (560_640 + 32_768), "grads": 4 * 32_768,
                                        "optimizer": 8 * 32_768 + 16 * 4}
    assert result["runs"]["remax"]["saving_percent"]["held"] > 0

    # ZeRO-3 over two ranks: the frozen base and the adapters partitioned alike.
    two = ["policy.num_ranks=2", "policy.num_cpus_per_rank=1", "policy.zero_stage=3", "policy.micro_batch_size=1",
           "placement.colocate=[]", "rollout.num_cpus_per_engine=1", "reward.num_cpus_per_rank=1"]
    cfg3 = tiny_config("tiny-ppo", tmp_path / "unused", *SMALL, *lora, *two)
    run = run_memory(cfg3, ["remax"], tmp_path / "z3")["runs"]["remax"]
    measured, planned = run["roles"]["policy"], run["planned"]["policy"]
    assert int(measured["optimizer"]) == planned["optimizer"]
    # Parameters within 1%: the planner counts only the frozen base's partitions, where ZeRO-3 may keep a
    # few of its small tensors (norms, biases) whole as well, depending on the order its trace saw them.
    # Gradients within 6%: ZeRO-3's partitioned adapter gradients and its reduce bucket (DeepSpeed pads
    # the adapters' gradient partitions in a way the planner does not model for frozen-base models).
    assert measured["params"] == pytest.approx(planned["params"], rel=0.01)
    assert measured["grads"] == pytest.approx(planned["grads"], rel=0.06)


# reading a job config (no runs) ---------------------------------------------------

def test_a_dpo_config_plans_pairs_in_one_pass_beside_a_frozen_reference():
    from rlhf_ray.config import load_config
    from rlhf_ray.planner.from_config import plan_from_config

    plan = plan_from_config(load_config("tiny-dpo", []))
    assert [r.role for r in plan.roles] == ["policy", "reference"]
    # 16 pairs in micro-batches of 8: chosen and rejected stacked, 16 rows of max_length 96.
    assert "micro-batch 16 x 96 tokens" in plan.role("policy").notes[0]
    assert plan.role("reference").gpu.get("grads", 0) == 0 and plan.role("policy").gpu["grads"] > 0


def test_ranks_sharing_a_gpu_add_up_on_it():
    from rlhf_ray.config import load_config
    from rlhf_ray.planner.from_config import plan_from_config, planned_roles
    from rlhf_ray.planner.memory import plan_frozen_role

    cfg = load_config("llama-7b-ppo-vllm", [])
    plan = plan_from_config(cfg, model="llama-7b")
    # Four reference ranks of 0.5 GPU each: ZeRO-3 over 4 ranks, two ranks on each of 2 GPUs.
    spec = next(s for s in planned_roles(cfg, model="llama-7b") if s.role == "reference")
    assert (spec.ranks, spec.devices, spec.ranks_per_device) == (4, 2, 2)
    one_rank = plan_frozen_role("reference", spec.shape, "lm", spec.settings, 4)
    assert plan.role("reference").resident == 2 * one_rank.resident
    group = next(g for g in plan.groups if "reference" in g.roles)
    assert group.roles == ("reference", "reward") and group.num_gpus == 2


def test_an_online_policy_is_planned_with_its_lm_head_on_the_response_only():
    from rlhf_ray.config import load_config
    from rlhf_ray.planner.from_config import planned_roles

    online = {s.role: s.settings for s in planned_roles(load_config("tiny-ppo", ["rollout.max_new_tokens=20"]))}
    assert online["policy"].logits_len == 21 and online["critic"].logits_len is None  # a value head scores all
    offline = {s.role: s.settings for s in planned_roles(load_config("tiny-dpo", []))}
    assert offline["policy"].logits_len is None
