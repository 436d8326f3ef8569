"""sftbench.schedule: --lr-schedule as DeepSpeed's own schedulers (and the plain loop's torch one), over the run's
length, reaching 0 at the last step."""
from __future__ import annotations

import json
import math
import sys

import pytest

from conftest import REPO, cpu_env, read_jsonl, run
from sftbench import schedule

Z1 = json.loads((REPO / "ds_configs" / "z1.json").read_text())


def test_cosine_replaces_the_constant_warmup_lr_and_says_what_changed():
    cfg, changes = schedule.apply(Z1, "auto", 40, "z1.json")
    assert cfg["scheduler"] == {"type": "WarmupCosineLR", "params": {
        "warmup_num_steps": 100, "warmup_type": "linear", "total_num_steps": 101, "warmup_min_ratio": 0.0,
        "cos_min_ratio": 0.0}}  # 40 steps inside a 100-step warm-up: the decay starts after it
    assert "scheduler.type: 'WarmupLR' -> 'WarmupCosineLR' (--lr-schedule cosine)" in changes
    lin, _ = schedule.apply(dict(Z1, scheduler={"type": "WarmupLR", "params": {"warmup_num_steps": 2,
                                                                              "warmup_max_lr": 1e-5}}), "linear", 10)
    assert lin["scheduler"] == {"type": "WarmupDecayLR", "params": {
        "warmup_num_steps": 2, "warmup_type": "linear", "warmup_min_lr": 0.0, "warmup_max_lr": 1e-5,
        "total_num_steps": 9}}
    same, none = schedule.apply(Z1, "config", 40)
    assert same == Z1 and none == []


def test_auto_keeps_a_schedule_that_already_decays():
    decaying = dict(Z1, scheduler={"type": "WarmupDecayLR", "params": {"total_num_steps": 500}})
    assert schedule.resolve("auto", decaying) == "config"
    assert schedule.resolve("auto", Z1) == "cosine"
    assert schedule.resolve("auto", {k: v for k, v in Z1.items() if k != "scheduler"}) == "cosine"
    with pytest.raises(schedule.ScheduleError, match="--lr-schedule must be one of"):
        schedule.resolve("step", Z1)


def test_the_plain_loops_factor_reaches_zero_at_the_last_step():
    assert [schedule.lr_factor("constant", s, 3, 8) for s in range(5)] == [1 / 3, 2 / 3, 1.0, 1.0, 1.0]
    cos = [schedule.lr_factor("cosine", s, 3, 8) for s in range(9)]
    assert cos[:3] == [1 / 3, 2 / 3, 1.0] and cos[8] == 0.0
    assert cos[5] == pytest.approx(0.5 * (1 + math.cos(math.pi * 3 / 6)))
    assert [schedule.lr_factor("linear", s, 1, 4) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]


@pytest.mark.slow
@pytest.mark.parametrize("ds, kind", [("z1", "cosine"), ("z1", "linear"), ("none", "cosine")])
def test_a_run_reaches_the_schedules_floor_at_its_last_step(tmp_path, ds, kind):
    """A real 5-step run (one process, DeepSpeed's engine or the plain loop) with a 2-step warm-up (DeepSpeed's
    schedulers warm up over 2 steps at least): after its highest value the logged LR falls every step, and the one
    logged with the last step is 0; the config change is printed and logged in the meta record."""
    p = run([sys.executable, str(REPO / "train.py"), "--ds", ds, "--model", "pangu-tiny", "--seq-len", "32",
             "--precision", "fp32", "--max-steps", "5", "--grad-accum", "1", "--lr", "1e-3", "--lr-warmup-steps", "2",
             "--lr-schedule", kind, "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")],
            cpu_env())
    assert p.returncode == 0, p.stderr[-3000:]
    recs = read_jsonl(tmp_path / "run" / "rank0.jsonl")
    lrs = [r["lr"] for r in recs if r["type"] == "step"]
    # the LR logged with step k is the one step k+1 trains with (after the scheduler's step), as the Trainer logs it
    want = {("z1", "cosine"): [0.0, 0.5, 0.75, 0.25, 0.0], ("z1", "linear"): [0.0, 0.5, 1.0, 0.5, 0.0],
            ("none", "cosine"): [1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)),
                                 0.0]}[ds, kind]
    assert lrs == pytest.approx([1e-3 * f for f in want], abs=1e-12)
    meta = recs[0]
    if ds == "z1":
        want = {"cosine": "WarmupCosineLR", "linear": "WarmupDecayLR"}[kind]
        assert meta["ds_config"]["scheduler"]["type"] == want
        assert f"scheduler.type: 'WarmupLR' -> '{want}' (--lr-schedule {kind})" in meta["overrides"]
        assert f"lr schedule: {want} to 0 at step 5 (--lr-schedule {kind})" in p.stdout
    else:
        assert "lr schedule: cosine to 0 at step 5 (--lr-schedule cosine)" in p.stdout


def test_a_one_step_warmup_is_said_to_run_as_two_under_deepspeed():
    """DeepSpeed's Warmup* schedulers warm up over max(2, warmup_num_steps) steps: the run says so in its overrides
    rather than silently training step 1 at the start value."""
    from sftbench.schedule import for_run

    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                        "warmup_num_steps": 1}}}
    _, _, changes, _ = for_run(cfg, "config", max_steps=8, epochs=None, n_train=16, world_size=1, micro_batch=None,
                               grad_accum=None, source="x.json")
    assert changes == ["scheduler.params.warmup_num_steps: 1 runs as 2 (DeepSpeed's WarmupLR warms up over at least "
                       "2 steps; step 1 trains at the warm-up's start value)"]
    cfg["scheduler"]["params"]["warmup_num_steps"] = 5
    assert for_run(cfg, "config", max_steps=8, epochs=None, n_train=16, world_size=1, micro_batch=None,
                   grad_accum=None, source="x.json")[2] == []
