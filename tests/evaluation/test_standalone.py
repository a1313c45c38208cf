"""The standalone evaluation job: exact properties of its metrics on tiny models.

The models are random tiny GPT-2s (two seeds) and a random scalar-head reward
model, saved with their tokenizer as the drivers export them. Their outputs are
gibberish; what is checked is that the metrics are exactly what the written
samples say, and the symmetries a win rate must have.
"""

import json

import pytest
import torch

from rlhf_ray.data.collate import collate_sequences
from rlhf_ray.data.synthetic import SyntheticConfig, build_synthetic
from rlhf_ray.data.tokenize import encode_prompt_response
from rlhf_ray.evaluation.standalone import pairwise_outcomes, run_eval
from rlhf_ray.models.heads import load_scalar_head_model
from rlhf_ray.models.loading import load_causal_lm, load_tokenizer_for

N = 6  # held-out prompts per evaluation
GEN = {"limit": N, "max_new_tokens": 6}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two different tiny policies and a reward model, each saved with its tokenizer."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = load_tokenizer_for("tiny-gpt2")
    paths = {}
    for name, seed in (("a", 0), ("b", 1)):
        paths[name] = str(root / name)
        load_causal_lm("tiny-gpt2", seed=seed).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    paths["rm"] = str(root / "rm")
    load_scalar_head_model("tiny-gpt2", seed=2).save_pretrained(paths["rm"])
    tokenizer.save_pretrained(paths["rm"])
    return paths


@pytest.fixture
def judge_module(tmp_path, monkeypatch):
    """A judge that accepts about half of any texts: even character count."""
    (tmp_path / "evaljudge.py").write_text("def even_length(text):\n    return len(text) % 2 == 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return "evaljudge:even_length"


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_pairwise_outcomes_by_hand():
    # identical texts tie whatever the rewards; equal rewards tie; otherwise the higher reward wins
    outcomes = pairwise_outcomes(["a", "b", "c", "d"], [1.0, 0.0, 2.0, 5.0],
                                 ["a", "x", "y", "z"], [3.0, 0.0, 1.0, 6.0])
    assert outcomes == [0.5, 0.5, 1.0, 0.0]


def test_a_model_against_itself_ties_exactly(models, tmp_path):
    m = run_eval(models["a"], baseline=models["a"], reward_model=models["rm"], out_dir=tmp_path, **GEN)
    assert m["eval/win_rate"] == 0.5
    assert (m["eval/wins"], m["eval/ties"], m["eval/losses"]) == (0, N, 0)
    assert m["eval/reward_mean"] == m["baseline/reward_mean"]
    assert m["eval/alignment_accuracy"] == m["baseline/alignment_accuracy"]
    assert m["eval/response_length"] == m["baseline/response_length"]


def test_metrics_are_a_recount_of_the_written_samples(models, tmp_path, judge_module):
    from evaljudge import even_length

    m = run_eval(models["a"], baseline=models["b"], reward_model=models["rm"], judge=judge_module,
                 out_dir=tmp_path, **GEN)
    rows = read_samples(tmp_path)
    assert len(rows) == N == m["eval/num_prompts"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == m
    for row in rows:
        assert row["judge"] == even_length(row["response"])
        assert row["baseline_judge"] == even_length(row["baseline_response"])
        assert 1 <= row["response_tokens"] <= GEN["max_new_tokens"]
    assert m["eval/alignment_accuracy"] == sum(r["judge"] for r in rows) / N
    assert m["baseline/alignment_accuracy"] == sum(r["baseline_judge"] for r in rows) / N
    assert m["eval/response_length"] == sum(r["response_tokens"] for r in rows) / N
    assert m["eval/reward_mean"] == pytest.approx(sum(r["reward"] for r in rows) / N, abs=1e-12)
    assert m["baseline/reward_mean"] == pytest.approx(sum(r["baseline_reward"] for r in rows) / N, abs=1e-12)
    recount = [0.5 if r["response"] == r["baseline_response"] or r["reward"] == r["baseline_reward"]
               else float(r["reward"] > r["baseline_reward"]) for r in rows]
    assert [r["outcome"] for r in rows] == recount
    assert m["eval/win_rate"] == pytest.approx(sum(recount) / N, abs=1e-12)
    assert m["eval/wins"] + m["eval/ties"] + m["eval/losses"] == N


def test_swapping_model_and_baseline_mirrors_the_outcome(models, tmp_path):
    ab = run_eval(models["a"], baseline=models["b"], reward_model=models["rm"], judge="", out_dir=tmp_path / "ab",
                  **GEN)
    ba = run_eval(models["b"], baseline=models["a"], reward_model=models["rm"], judge="", out_dir=tmp_path / "ba",
                  **GEN)
    assert (ab["eval/wins"], ab["eval/ties"], ab["eval/losses"]) == (ba["eval/losses"], ba["eval/ties"],
                                                                      ba["eval/wins"])
    assert ab["eval/win_rate"] + ba["eval/win_rate"] == pytest.approx(1.0, abs=1e-12)
    assert ab["eval/reward_mean"] == ba["baseline/reward_mean"]
    assert "eval/alignment_accuracy" not in ab  # judge "" turns accuracy off


def test_responses_do_not_depend_on_batching(models, tmp_path):
    # batches of 4 left-pad prompts of different lengths; batches of 1 do not pad at all
    run_eval(models["a"], out_dir=tmp_path / "one", batch_size=1, **GEN)
    run_eval(models["a"], out_dir=tmp_path / "four", batch_size=4, **GEN)
    assert read_samples(tmp_path / "one") == read_samples(tmp_path / "four")


def test_reward_is_the_reward_models_score_of_prompt_and_response(models, tmp_path):
    run_eval(models["a"], reward_model=models["rm"], out_dir=tmp_path, **GEN)
    rows = read_samples(tmp_path)
    tokenizer = load_tokenizer_for(models["rm"])
    rm = load_scalar_head_model(models["rm"])
    for row in rows[:2]:
        encoded = encode_prompt_response(tokenizer, row["prompt"], row["response"], max_length=256,
                                         max_prompt_length=64)
        batch = collate_sequences([encoded], tokenizer.pad_token_id)
        with torch.no_grad():
            alone = float(rm.score(batch["input_ids"], batch["attention_mask"])[0])
        assert row["reward"] == pytest.approx(alone, abs=1e-5)


def test_default_prompts_are_the_held_out_synthetic_prompts(models, tmp_path):
    m = run_eval(models["a"], out_dir=tmp_path, limit=3, max_new_tokens=2)
    held_out = [row["prompt"] for row in build_synthetic(SyntheticConfig())["prompts_eval"][:3]]
    assert [row["prompt"] for row in read_samples(tmp_path)] == held_out
    assert (tmp_path / "data" / "synthetic" / "prompts_eval.jsonl").is_file()
    assert m["prompts"] == "synthetic:prompts_eval" and m["judge"] == "rlhf_ray.data.synthetic:mention_judge"
    train_prompts = {row["prompt"] for row in build_synthetic(SyntheticConfig())["prompts_train"]}
    assert not train_prompts & set(held_out)


def test_prompts_from_a_user_file(models, tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"prompt": "Any tips for baking bread?"}\n{"prompt": "How do I start running?"}\n')
    m = run_eval(models["a"], prompts=str(data), out_dir=tmp_path / "out", max_new_tokens=2)
    assert m["eval/num_prompts"] == 2
    assert [r["prompt"] for r in read_samples(tmp_path / "out")] == ["Any tips for baking bread?",
                                                                    "How do I start running?"]


@pytest.mark.parametrize("judge, error, message", [
    ("no_such_module_xyz:judge", ImportError, r"cannot import module 'no_such_module_xyz'"),
    ("rlhf_ray.data.synthetic:no_such_fn", ImportError, r"has no function 'no_such_fn'"),
    ("mentions_target", ValueError, r"expected 'package.module:function'"),
])
def test_a_bad_judge_fails_before_any_model_loads(tmp_path, judge, error, message):
    with pytest.raises(error, match=message):
        run_eval(str(tmp_path / "no-model-here"), judge=judge, out_dir=tmp_path)


def test_a_missing_model_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-model-here"):
        run_eval(str(tmp_path / "no-model-here"), out_dir=tmp_path, limit=1)
