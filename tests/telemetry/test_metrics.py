"""MetricsWriter, read_metrics, summarise, write_summary, and the progress bar."""

import io
import json
import logging
import sys

import numpy as np
import pytest
import torch

from rlhf_ray.config.schema import METRIC_SINKS
from rlhf_ray.telemetry.metrics import SINKS, MetricsWriter, read_metrics, summarise, to_scalar, write_summary
from rlhf_ray.telemetry.progress import Progress, format_metrics


def test_rows_are_written_flushed_and_converted(tmp_path):
    writer = MetricsWriter(tmp_path, sinks=("jsonl",))
    row = writer.write(1, {"loss": torch.tensor(0.5), "rewards/accuracies": np.float32(0.75),
                           "memory/policy/params_bytes": np.int64(1024), "tokens": torch.tensor([12]),
                           "note": "warm-up", "kl": None})
    # read before close: each line is flushed as it is written
    text = (tmp_path / "metrics.jsonl").read_text()
    assert text == json.dumps(row) + "\n"
    assert json.loads(text) == {"step": 1, "loss": 0.5, "rewards/accuracies": 0.75,
                                "memory/policy/params_bytes": 1024, "tokens": 12, "note": "warm-up", "kl": None}
    assert isinstance(row["memory/policy/params_bytes"], int) and isinstance(row["loss"], float)
    assert list(row)[0] == "step"
    writer.close()
    writer.close()  # twice is fine


def test_bad_values_and_steps_are_errors_a_user_can_act_on(tmp_path):
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        with pytest.raises(ValueError, match=r"'adv' is an array of shape \(3,\)"):
            writer.write(1, {"adv": torch.ones(3)})
        with pytest.raises(ValueError, match=r"'adv' is an array of shape \(2,\)"):
            writer.write(1, {"adv": np.ones(2)})
        with pytest.raises(TypeError, match="'cfg' has a value of type dict"):
            writer.write(1, {"cfg": {"a": 1}})
        with pytest.raises(ValueError, match="'step' key"):
            writer.write(1, {"step": 1})
        writer.write(2, {"loss": 1.0})
        with pytest.raises(ValueError, match="step 2 come after step 2"):
            writer.write(2, {"loss": 1.0})
    with pytest.raises(ValueError, match="unknown metric sink"):
        MetricsWriter(tmp_path, sinks=("csv",))
    assert to_scalar("flag", True) is True


def test_resume_truncates_rows_after_the_resume_step(tmp_path, caplog):
    # uninterrupted run: steps 1..4
    full_dir, part_dir = tmp_path / "full", tmp_path / "part"
    with MetricsWriter(full_dir, sinks=("jsonl",)) as writer:
        for step in range(1, 5):
            writer.write(step, {"loss": 1.0 / step})
    # interrupted run: wrote steps 1..3 but its checkpoint is at step 2, then a half-written line
    with MetricsWriter(part_dir, sinks=("jsonl",)) as writer:
        for step in range(1, 4):
            writer.write(step, {"loss": 1.0 / step})
    with open(part_dir / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "lo')
    with MetricsWriter(part_dir, sinks=("jsonl",), resume_step=2) as writer:
        assert writer.last_step == 2
        for step in range(3, 5):
            writer.write(step, {"loss": 1.0 / step})
    assert (part_dir / "metrics.jsonl").read_text() == (full_dir / "metrics.jsonl").read_text()
    # a fresh (non-resumed) writer starts an empty file, and says so
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.telemetry.metrics"):
        MetricsWriter(part_dir, sinks=("jsonl",)).close()
    assert "pass resume_step" in caplog.text
    assert read_metrics(part_dir) == []


def test_read_metrics_errors_name_file_and_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl: line 2 is not valid JSON"):
        read_metrics(path)
    path.write_text('{"loss": 1}\n')
    with pytest.raises(ValueError, match="line 1 is not a metrics row"):
        read_metrics(path)
    with pytest.raises(FileNotFoundError, match="no metrics file"):
        read_metrics(tmp_path / "nowhere")


def test_summarise_by_hand():
    rows = [
        {"step": 1, "loss": 2.0, "time/step_s": 1.0, "perf/tokens_per_s": 100.0, "memory/policy/peak_bytes": 10},
        {"step": 2, "loss": 1.0, "time/step_s": 3.0, "perf/tokens_per_s": 300.0, "eval/acc": 0.5},
        {"step": 3, "loss": None, "time/step_s": 8.0, "perf/tokens_per_s": 200.0, "memory/policy/peak_bytes": 30},
    ]
    summary = summarise(rows)
    assert summary["num_steps"] == 3 and summary["last_step"] == 3
    # last non-null value of each key: loss 1.0 (step 3 logged None), eval/acc from step 2
    assert summary["last"] == {"loss": 1.0, "time/step_s": 8.0, "perf/tokens_per_s": 200.0,
                               "memory/policy/peak_bytes": 30, "eval/acc": 0.5}
    # mean time (1+3+8)/3 = 4, tokens (100+300+200)/3 = 200; median time 3; max memory 30
    assert summary["mean"] == {"time/step_s": 4.0, "perf/tokens_per_s": 200.0}
    assert summary["median"] == {"time/step_s": 3.0}
    assert summary["max"] == {"memory/policy/peak_bytes": 30}
    assert summarise([])["last_step"] is None


def test_write_summary_is_atomic_and_reads_the_whole_file(tmp_path):
    with MetricsWriter(tmp_path, sinks=("jsonl",)) as writer:
        writer.write(1, {"time/step_s": 2.0})
        writer.write(2, {"time/step_s": 4.0})
        summary = write_summary(tmp_path, writer, extra={"algorithm": "dpo", "accuracy": np.float64(0.9)})
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["mean"] == {"time/step_s": 3.0} and summary["algorithm"] == "dpo" and summary["accuracy"] == 0.9
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    assert write_summary(tmp_path)["num_steps"] == 2


def test_missing_sink_package_warns_once_and_never_crashes(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with caplog.at_level(logging.WARNING, logger="rlhf_ray.telemetry.metrics"):
        with MetricsWriter(tmp_path, sinks=("jsonl", "wandb"), config={"lr": 1e-3}) as writer:
            writer.write(1, {"loss": 1.0})
            writer.write(2, {"loss": 0.5})
    warnings = [r for r in caplog.records if "wandb" in r.getMessage()]
    assert len(warnings) == 1 and "not installed" in warnings[0].getMessage()
    assert [row["loss"] for row in read_metrics(tmp_path)] == [1.0, 0.5]


def test_every_sink_the_config_accepts_has_a_writer():
    assert tuple(SINKS) == METRIC_SINKS


def test_tensorboard_sink_writes_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    with MetricsWriter(tmp_path, sinks=("tensorboard",), config={"lr": 1e-3}) as writer:
        writer.write(1, {"loss": 1.0, "note": "text is skipped"})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert not (tmp_path / "metrics.jsonl").exists()


def test_progress_off_a_terminal_prints_lines_instead_of_a_bar():
    import re

    stream = io.StringIO()  # not a TTY: a log file, `submit --wait`, CI
    with Progress(total=4, desc="dpo", stream=stream, log_every=2) as progress:
        assert not progress.shows_bar
        for step in range(1, 5):
            progress.update(step, {"loss": 0.5 / step, "time/step_s": 1.0})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\[dpo\] step 2/4 loss=0.25 time/step_s=1 \| [0-9.e+]+ step/s, \d+ s left", lines[0])
    assert re.fullmatch(r"\[dpo\] step 4/4 loss=0.125 time/step_s=1 \| [0-9.e+]+ step/s", lines[1])


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_and_off_when_asked(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("RLHF_RAY_NO_PROGRESS", raising=False)
    stream = FakeTTY()
    with Progress(total=3, initial=1, desc="sft", stream=stream) as progress:
        assert progress.shows_bar
        progress.update(2, {"loss": 0.75})
    assert "sft" in stream.getvalue() and "2/3" in stream.getvalue() and "loss=0.75" in stream.getvalue()

    monkeypatch.setenv("CI", "true")
    assert not Progress(total=3, stream=FakeTTY()).shows_bar
    monkeypatch.delenv("CI")
    for quiet in (FakeTTY(), io.StringIO()):
        with Progress(total=3, enabled=False, stream=quiet, log_every=1) as progress:
            progress.update(1, {"loss": 1.0})
        assert quiet.getvalue() == ""


def test_format_metrics_picks_known_keys_in_order():
    metrics = {"time/step_s": 2.0, "rewards/accuracies": 0.875, "loss": float("nan"), "flag": True}
    assert format_metrics(metrics) == "loss=nan rewards/accuracies=0.875 time/step_s=2"
    assert format_metrics(metrics, max_keys=1) == "loss=nan"


def test_format_metrics_shows_each_roles_gradient_norm():
    metrics = {"policy/pg_loss": 0.5, "critic/value_loss": 0.25, "policy/grad_norm": 1.5, "critic/grad_norm": 3.0}
    assert format_metrics(metrics) == ("policy/pg_loss=0.5 critic/value_loss=0.25 policy/grad_norm=1.5 "
                                       "critic/grad_norm=3")
    assert "train/grad_norm=0.75" in format_metrics({"train/loss": 0.7, "train/grad_norm": 0.75})
