"""Pipelines: several jobs on one cluster from one driver, checked before anything loads.

The shape checks (names, `after`, `${...}`, cycles, per-job configs, whether
overlapping jobs fit) run without Ray; two small pipelines then run for real:
the shipped two-job example, whose jobs overlap in time and share one frozen
reference, and one with a failing job, whose dependent is skipped while the
independent job finishes."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from rlhf_ray.config import ConfigError
from rlhf_ray.pipeline.runner import (
    check_pipeline_fits,
    configure,
    load_pipeline,
    parse_pipeline,
    run_pipeline,
    scale_to_fit,
)

QUIET = ["run.progress=false", "data.eval=", "run.eval_every=0", "policy.optim.scheduler=constant",
         "policy.optim.warmup_steps=0"]


def job(config, *overrides, after=()):
    return {"config": config, "overrides": list(overrides), "after": list(after)}


@pytest.mark.parametrize("data, message", [
    ({"jobs": {}}, r"a non-empty `jobs:` mapping"),
    ({"jobs": {"a": job("tiny-sft")}, "parallel": True}, r"parallel: unknown key; a pipeline has jobs"),
    ({"jobs": {"a": {"config": "tiny-sft", "after": [], "steps": 3}}}, r"jobs.a.steps: unknown key"),
    ({"jobs": {"a": {"overrides": []}}}, r"jobs.a.config: give a shipped preset"),
    ({"jobs": {"a": job("tiny-sft", after=["b"])}}, r"jobs.a.after: no job named 'b'; jobs: a"),
    ({"jobs": {"a": job("tiny-sft", after=["b"]), "b": job("tiny-sft", after=["a"])}},
     r"the jobs wait for each other in a cycle: a -> b -> a"),
    ({"jobs": {"a": job("tiny-sft"), "b": job("tiny-dpo", "policy.model.name_or_path=${c}/final")}},
     r"jobs.b.overrides: \$\{c\} names no job"),
    ({"jobs": {"a": job("tiny-sft"), "b": job("tiny-dpo", "policy.model.name_or_path=${a}/final")}},
     r"\$\{a\} is 'a''s output, which exists only once 'a' has finished: add 'a' to jobs.b.after"),
    ({"jobs": {"a b": job("tiny-sft")}}, r"jobs.a b: a job name is letters"),
])
def test_bad_pipeline_shapes_fail_in_one_line(data, message):
    with pytest.raises(ConfigError, match=message) as err:
        parse_pipeline(data, "p.yaml")
    assert "\n" not in str(err.value)


def test_a_bad_job_config_names_the_job_and_the_key(tmp_path):
    pipeline = parse_pipeline({"jobs": {"sft": job("tiny-sft"), "dpo": job("tiny-dpo", "algorithm.params.bta=1")}},
                              "p.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"p.yaml: job 'dpo': algorithm.params: dpo has no parameter 'bta'"):
        configure(pipeline)
    pipeline = parse_pipeline({"jobs": {"x": job("no-such-preset")}}, "p.yaml", tmp_path)
    with pytest.raises(ConfigError, match=r"job 'x': .*no-such-preset"):
        configure(pipeline)


def test_dependencies_resolve_to_run_directories_and_frozen_roles_are_shared(tmp_path):
    pipeline = parse_pipeline({"jobs": {
        "sft": job("tiny-sft"),
        "rm": job("tiny-rm", "reward.model.name_or_path=${sft}/final", after=["sft"]),
        "dpo": job("tiny-dpo", "policy.model.name_or_path=${sft}/final", after=["sft", "rm"]),
        "ppo": job("tiny-ppo", "policy.model.name_or_path=${sft}/final", "reward.rule=",
                   "reward.model.name_or_path=${rm}/final", after=["sft", "rm"]),
        "remax": job("tiny-remax", "policy.model.name_or_path=${sft}/final", "reward.rule=",
                     "reward.model.name_or_path=${rm}/final", after=["sft", "rm"]),
        "kl": job("tiny-kl-sft", "algorithm.precompute_reference=true"),  # frees its reference: never shared
    }}, "p.yaml", tmp_path)
    configure(pipeline)
    cfgs = pipeline.configs
    assert cfgs["dpo"].policy.model.name_or_path == str(tmp_path / "sft" / "final")
    assert cfgs["dpo"].run.output_dir == str(tmp_path / "dpo") and cfgs["dpo"].name == "dpo"
    # DPO, PPO and ReMax start from the SFT weights and run together: one reference (DPO's), one reward
    # model (PPO's). The reward model's trainer in `rm` is a trained role, never shared.
    assert cfgs["dpo"].reference.share_with == ""
    assert cfgs["ppo"].reference.share_with == "dpo" and cfgs["remax"].reference.share_with == "dpo"
    assert cfgs["ppo"].reward.share_with == "" and cfgs["remax"].reward.share_with == "ppo"
    assert cfgs["rm"].reward.share_with == "" and cfgs["kl"].reference.share_with == ""
    assert not pipeline.may_overlap("sft", "dpo") and pipeline.may_overlap("dpo", "remax")
    off = parse_pipeline({"jobs": {"a": job("tiny-dpo"), "b": job("tiny-ipo")}, "share_frozen": False},
                         "p.yaml", tmp_path)
    configure(off)
    assert off.configs["b"].reference.share_with == ""


def test_a_lora_job_whose_reference_is_its_own_base_neither_lends_nor_borrows_one(tmp_path):
    pipeline = parse_pipeline({"jobs": {"lora": job("tiny-dpo", "policy.lora.rank=8"),
                                        "lora2": job("tiny-dpo", "policy.lora.rank=8"),
                                        "full": job("tiny-dpo"), "full2": job("tiny-ipo")}}, "p.yaml", tmp_path)
    configure(pipeline)
    shares = {name: cfg.reference.share_with for name, cfg in pipeline.configs.items()}
    assert shares == {"lora": "", "lora2": "", "full": "", "full2": "full"}


@pytest.mark.parametrize("borrower, message", [
    (job("tiny-grpo", "policy.model.name_or_path=tiny-llama", "rollout.temperature=0.7", "reference.share_with=dpo"),
     r"p.yaml: reference.share_with: job 'grpo' borrows job 'dpo''s reference, which is not the reference it "
     r"would create itself \(weights 'tiny-gpt2' there, 'tiny-llama' here; tokenizer 'tiny-gpt2' there, "
     r"'tiny-llama' here; temperature 1.0 there, 0.7 here\); .* or remove reference.share_with from 'grpo'"),
    (job("tiny-grpo", "reference.model.dtype=bfloat16", "reference.share_with=dpo"),
     r"job 'grpo' borrows job 'dpo''s reference, .*\(dtype 'auto' there, 'bfloat16' here\)"),
    (job("tiny-grpo", "reference.share_with=dpo", after=["dpo"]),
     r"job 'grpo': reference.share_with: job 'dpo' cannot run at the same time as 'grpo'"),
    (job("tiny-grpo", "reference.share_with=kl"),
     r"job 'grpo': reference.share_with: job 'kl' has no reference group of its own to lend"),
])
def test_a_share_with_set_by_hand_is_checked_like_automatic_sharing(tmp_path, borrower, message):
    jobs = {"dpo": job("tiny-dpo"), "kl": job("tiny-kl-sft", "algorithm.precompute_reference=true"), "grpo": borrower}
    pipeline = parse_pipeline({"jobs": jobs}, "p.yaml", tmp_path)
    with pytest.raises(ConfigError, match=message) as err:
        configure(pipeline)
    assert "\n" not in str(err.value)


def test_a_borrower_outside_a_pipeline_is_refused_a_group_that_differs_from_its_own():
    from rlhf_ray.config import load_config
    from rlhf_ray.runtime.role_groups import SharedGroups, frozen_identity

    owner = load_config("tiny-dpo", ["name=dpo"])
    borrower = load_config("tiny-grpo", ["name=grpo", "rollout.temperature=0.7", "reference.share_with=dpo"])
    shared = SharedGroups()
    shared.publish("dpo/reference", "the group", frozen_identity(owner, "reference"))
    with pytest.raises(ConfigError, match=r"reference.share_with: job 'grpo' borrows job 'dpo''s reference, .*"
                                          r"\(temperature 1.0 there, 0.7 here\)"):
        shared.wait("dpo/reference", timeout_s=1, identity=frozen_identity(borrower, "reference"), borrower="grpo")
    same = load_config("tiny-grpo", ["name=grpo2", "reference.share_with=dpo"])
    assert shared.wait("dpo/reference", timeout_s=1, identity=frozen_identity(same, "reference"),
                       borrower="grpo2") == "the group"


def test_jobs_that_may_overlap_must_fit_together(tmp_path):
    pipeline = parse_pipeline({"jobs": {
        "a": job("tiny-sft"), "b": job("tiny-sft"), "c": job("tiny-sft", after=["a", "b"])}}, "p.yaml", tmp_path)
    configure(pipeline)
    check_pipeline_fits(pipeline, {"CPU": 4.0})  # a and b take 2 CPUs each; c runs after both
    with pytest.raises(ConfigError, match=r"a \+ b may run at the same time and ask for 4 CPUs \(a: 2, b: 2\); "
                                          r"the cluster has 3, 1 short"):
        check_pipeline_fits(pipeline, {"CPU": 3.0})


def test_shipped_presets_are_scaled_to_fit_a_laptop_that_rlhf_ray_starts_itself(tmp_path):
    # tiny-dpo and tiny-grpo reserve 2 CPUs each; c comes after both and alone fits.
    pipeline = parse_pipeline({"jobs": {"dpo": job("tiny-dpo"), "grpo": job("tiny-grpo"),
                                        "sft": job("tiny-sft", after=["dpo", "grpo"])}}, "p.yaml", tmp_path)
    configure(pipeline)
    with pytest.raises(ConfigError, match=r"dpo \+ grpo may run at the same time and ask for 4 CPUs"):
        check_pipeline_fits(pipeline, {"CPU": 2.0})
    assert scale_to_fit(pipeline, 2.0) == ["dpo 2 -> 1 CPUs", "grpo 2 -> 1 CPUs"]
    check_pipeline_fits(pipeline, {"CPU": 2.0})
    assert pipeline.configs["dpo"].policy.num_cpus_per_rank == 1.0
    assert pipeline.configs["grpo"].rollout.num_cpus_per_engine == 1.0
    assert pipeline.configs["sft"].policy.num_cpus_per_rank == 2.0  # runs alone: left as it is
    assert scale_to_fit(pipeline, 2.0) == []  # nothing left to scale


def test_the_smol_pipeline_fits_two_cores_once_scaled(tmp_path):
    pipeline = load_pipeline("smol-pipeline", tmp_path)
    configure(pipeline)
    assert pipeline.configs["grpo"].reference.share_with == "dpo"  # one frozen reference for the three
    assert pipeline.configs["remax"].reference.share_with == "dpo"
    scaled = scale_to_fit(pipeline, 2.0)
    assert [line.split()[0] for line in scaled] == ["dpo", "grpo", "remax"]
    check_pipeline_fits(pipeline, {"CPU": 2.0})


def test_a_cluster_rlhf_ray_starts_runs_its_workers_at_normal_priority():
    import subprocess
    import sys

    code = ("import os, ray\n"
            "from rlhf_ray.runtime.role_groups import init_ray\n"
            "init_ray()\n"
            "nice = ray.get(ray.remote(num_cpus=0)(lambda: os.nice(0)).remote())\n"
            "print('nice', nice)\n"
            "ray.shutdown()\n")
    env = {**__import__("os").environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert "nice 0" in out.stdout, out.stdout + out.stderr[-2000:]


def _interval(summary):
    return datetime.fromisoformat(summary["started_at"]), datetime.fromisoformat(summary["finished_at"])


def test_shipped_example_runs_both_jobs_at_once_sharing_the_reference(ray_cluster, tmp_path):
    pipeline = load_pipeline("tiny-alongside", tmp_path)
    outcomes = run_pipeline(pipeline, on_event=lambda line: None)
    assert {name: o.status for name, o in outcomes.items()} == {"dpo": "finished", "grpo": "finished"}
    dpo, grpo = (json.loads((tmp_path / name / "summary.json").read_text()) for name in ("dpo", "grpo"))
    (a0, a1), (b0, b1) = _interval(dpo), _interval(grpo)
    assert a0 < b1 and b0 < a1  # the two jobs overlapped in time
    assert grpo["shared_roles"] == {"reference": "dpo"} and grpo["layout"]["reference"]["owner"] == "dpo"
    assert dpo["layout"]["reference"]["owner"] is None and len(dpo["layout"]["reference"]["nodes"]) == 1
    for name in ("dpo", "grpo"):
        phases = {json.loads(line)["phase"] for line in (tmp_path / name / "timeline.jsonl").read_text().splitlines()}
        assert {"update"} <= phases
    report = json.loads((tmp_path / "pipeline.json").read_text())
    assert report["failed"] == [] and report["jobs"]["grpo"]["shares"] == {"reference": "dpo"}

    from rlhf_ray.reports.pipeline_report import write_pipeline_report

    paths = write_pipeline_report(tmp_path, {"dpo": tmp_path / "dpo", "grpo": tmp_path / "grpo"})
    assert paths["layout"].stat().st_size > 10_000 and paths["timeline"].stat().st_size > 10_000
    cost = paths["cost"].read_text()
    assert "| dpo | reference |" in cost and "dpo, grpo" in cost  # the shared group is costed once, to its owner
    assert "| grpo | reference |" not in cost


def test_a_failed_job_skips_its_dependents_and_the_others_finish(ray_cluster, tmp_path):
    from rlhf_ray.cli.main import main

    missing = tmp_path / "nowhere.jsonl"
    spec = {"jobs": {
        "bad": job("tiny-sft", f"data.train={missing}", "run.total_steps=2", *QUIET),
        "after_bad": job("tiny-dpo", "policy.model.name_or_path=${bad}/final", "run.total_steps=2", *QUIET,
                         after=["bad"]),
        "good": job("tiny-sft", "run.total_steps=2", "run.batch_size=8", *QUIET),
    }}
    path = tmp_path / "p.yaml"
    path.write_text(json.dumps(spec))  # JSON is YAML
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) != 0
    report = json.loads((tmp_path / "out" / "pipeline.json").read_text())
    status = {name: row["status"] for name, row in report["jobs"].items()}
    assert status == {"bad": "failed", "after_bad": "skipped", "good": "finished"}
    assert sorted(report["failed"]) == ["after_bad", "bad"]
    assert str(missing) in report["jobs"]["bad"]["error"]


def test_reward_at_matched_kl_interpolates_along_each_run():
    from rlhf_ray.evaluation.frontier import reward_at_kl

    points = [{"method": "sft", "step": 0, "kl": 0.0, "reward": -10.0},
              {"method": "ppo", "step": 10, "kl": 4.0, "reward": -2.0},
              {"method": "ppo", "step": 20, "kl": 8.0, "reward": 2.0},
              {"method": "dpo", "step": 10, "kl": 20.0, "reward": 1.0},
              {"method": "remax", "step": 10, "kl": 1.0, "reward": -5.0}]
    at = reward_at_kl(points, 6.0)
    assert at["ppo"] == pytest.approx(0.0)  # halfway between (4, -2) and (8, 2)
    assert at["dpo"] == pytest.approx(-10.0 + 0.3 * 11.0)  # on the way from the SFT start to its first point
    assert at["remax"] is None  # never got that far


def test_the_cost_table_prices_gpu_time_only_where_gpus_were_reserved():
    from rlhf_ray.reports.pipeline_report import cost_markdown

    row = {"job": "ppo", "role": "policy", "ranks": 8, "cpus": 8, "gpus": 8, "cpu_core_s": 100.0, "gpu_s": 7200.0,
           "busy_share": 0.5, "used_by": ["ppo"], "held_bytes": 2**30, "peak_rss_bytes": None}
    table = "\n".join(cost_markdown([row], price_per_gpu_hour=2.5))
    assert "$ at 2.50/GPU-h" in table and "| 7200 | 5.00 | 50% |" in table  # 2 GPU-hours at 2.50
    assert "$ at" not in "\n".join(cost_markdown([{**row, "gpus": 0, "gpu_s": 0.0}]))
