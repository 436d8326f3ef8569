"""``--report-to``: the log's records also written where users already look (TensorBoard, Weights & Biases).

The JSONL log (``sftbench/runlog.py``) stays the source of truth; a sink receives every record rank 0 writes, after
it is written, and keeps its numbers under the log's own key names: ``step/<key>`` for the step records (x axis:
the step), ``eval/<key>`` for the evaluations (the step they followed), ``summary/<key>`` for the summary (the last
step). Only numbers are written (``null`` and flags are left out). TensorBoard's files go into ``<run>/tensorboard/``
(``tensorboard --logdir runs/``); W&B's run takes the run's name and the meta record's harness settings as its config.

Imported only when ``--report-to`` asks for it: runlog stays torch-free and the monitor never loads these packages.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

TARGETS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to value -> the package it needs
TB_DIR = "tensorboard"
SKIP = ("type", "schema", "step", "time", "rank", "local_rank", "pid", "node_rank", "gpu_index")


class ReportToError(ValueError):
    """A --report-to value that is unknown or whose package is not installed."""


def parse(value: str | None) -> list[str]:
    """The --report-to targets (comma-separated; 'none' or empty = none); ReportToError for an unknown one or one
    whose package is missing, so the run stops before any work."""
    targets = [t.strip().lower() for t in (value or "").split(",") if t.strip() and t.strip().lower() != "none"]
    for t in targets:
        if t not in TARGETS:
            raise ReportToError(f"--report-to: unknown target {t!r} (known: {', '.join(TARGETS)}, none)")
        if importlib.util.find_spec(TARGETS[t]) is None:
            raise ReportToError(f"--report-to {t}: the {TARGETS[t]} package is not installed (pip install "
                                f"{TARGETS[t]})")
    return targets


def numbers(rec: dict) -> dict[str, float]:
    """The record's finite numbers by key (bools, strings, nulls and nested values left out)."""
    return {k: float(v) for k, v in rec.items() if k not in SKIP and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class TensorBoardSink:
    def __init__(self, run_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter
        self.dir = Path(run_dir) / TB_DIR
        self.writer = SummaryWriter(log_dir=str(self.dir))

    def write(self, rtype: str, rec: dict, step: int) -> None:
        if rtype == "meta":  # settings, not metrics: the JSONL meta record holds them
            return
        for key, value in numbers(rec).items():
            self.writer.add_scalar(f"{rtype}/{key}", value, global_step=step)
        if rtype == "summary":
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, run_dir: str | Path):
        import wandb
        self.wandb, self.run_dir, self.run = wandb, Path(run_dir), None

    def write(self, rtype: str, rec: dict, step: int) -> None:
        if rtype == "meta":  # the run starts with the settings it ran with
            self.run = self.wandb.init(project="sftbench", name=rec.get("run"), dir=str(self.run_dir),
                                       config={"harness": rec.get("harness"), "ds_config": rec.get("ds_config"),
                                               "model": rec.get("model"), "world_size": rec.get("world_size")})
            return
        if self.run is not None:
            self.run.log({f"{rtype}/{k}": v for k, v in numbers(rec).items()}, step=step)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


class Sinks:
    """What RunLog calls after each record (``RunLog(..., sinks=...)``): the step of each record for the x axis."""

    def __init__(self, targets: list[str], run_dir: str | Path):
        self.sinks = [TensorBoardSink(run_dir) if t == "tensorboard" else WandbSink(run_dir) for t in targets]
        self.last_step = 0

    def __call__(self, rtype: str, rec: dict) -> None:
        if rtype in ("step", "eval") and isinstance(rec.get("step"), int):
            self.last_step = max(self.last_step, rec["step"])
        for s in self.sinks:
            s.write(rtype, rec, rec["step"] if rtype in ("step", "eval") else self.last_step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def open_sinks(value: str | None, run_dir: str | Path, rank: int) -> Sinks | None:
    """train.py's one call: rank 0's sinks for --report-to (None without targets, and on every other rank)."""
    targets = parse(value)
    return Sinks(targets, run_dir) if targets and rank == 0 else None
