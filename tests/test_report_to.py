"""sftbench.report_to: --report-to tensorboard writes the JSONL log's numbers under the same names."""
from __future__ import annotations

import sys

import pytest

from conftest import REPO, cpu_env, read_jsonl, run
from sftbench import report_to


def test_unknown_or_missing_targets_are_refused_before_any_work(monkeypatch):
    with pytest.raises(report_to.ReportToError, match="--report-to: unknown target 'mlflow'"):
        report_to.parse("tensorboard,mlflow")
    monkeypatch.setattr(report_to.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(report_to.ReportToError, match="--report-to wandb: the wandb package is not installed"):
        report_to.parse("wandb")
    assert report_to.parse("none") == [] and report_to.parse(None) == []


def test_numbers_keep_the_logs_names_and_leave_out_flags_and_nulls():
    rec = {"type": "step", "step": 3, "time": 1.0, "loss": 2.5, "warmup": True, "gpu_mem_used_mib": None,
           "lr": 1e-5, "tflops": float("nan")}
    assert report_to.numbers(rec) == {"loss": 2.5, "lr": 1e-5}


@pytest.mark.slow
def test_a_tensorboard_event_file_holds_the_jsonl_values(tmp_path):
    """A real 4-step run with an eval split and --report-to tensorboard: every number of every step, eval and
    summary record of rank 0's JSONL is in the event file, under <type>/<key>, at its step (float32, as TensorBoard
    stores scalars)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    p = run([sys.executable, str(REPO / "train.py"), "--ds", "none", "--model", "pangu-tiny", "--seq-len", "32",
             "--precision", "fp32", "--max-steps", "4", "--grad-accum", "1", "--eval-split", "0.1", "--eval-every",
             "2", "--report-to", "tensorboard", "--run-dir", str(run_dir), "--cache-dir", str(tmp_path / "cache")],
            cpu_env())
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read_jsonl(run_dir / "rank0.jsonl")
    acc = EventAccumulator(str(run_dir / report_to.TB_DIR), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    expected: dict[str, dict[int, float]] = {}
    for r in recs:
        if r["type"] in ("step", "eval", "summary"):
            at = r["step"] if r["type"] != "summary" else 4
            for key, value in report_to.numbers(r).items():
                expected.setdefault(f"{r['type']}/{key}", {})[at] = value
    assert {"step/loss", "step/lr", "step/step_s", "eval/eval_loss", "summary/step_s_median",
            "summary/final_loss"} <= set(expected)
    assert tags == set(expected)
    for tag, by_step in expected.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6), tag
    assert sorted(expected["eval/eval_loss"]) == [2, 4]
