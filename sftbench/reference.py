"""The reference table we reproduce, as ds_configs/README.md maps it onto config files (torch-free).

One home for the rule that pairs a run with reference rows: the sweep uses it to choose precisions, the report to set
each run beside the rows it reproduces.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from sftbench.paths import REPO

CONFIG_README = REPO / "ds_configs" / "README.md"

@dataclass
class RefRow:
    row: int
    model: str
    gpus: str
    precision: str
    file: str | None  # config name (file stem) or None for --ds none


def read_reference_map(path: str | os.PathLike = CONFIG_README) -> list[RefRow]:
    """Parse the 'Reference rows -> files' table of ds_configs/README.md (columns found by header name)."""
    text = Path(path).read_text(encoding="utf-8")
    rows: list[RefRow] = []
    header: list[str] | None = None
    for line in text.splitlines():
        line = line.strip()
        if not line.startswith("|"):
            header = None if not rows and header is None else header
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            low = [c.lower() for c in cells]
            if "model" in low and "precision" in low and "file" in low:
                header = low
            continue
        if all(re.fullmatch(r":?-+:?", c) for c in cells if c):
            continue
        if len(cells) != len(header):
            continue
        rec = dict(zip(header, cells))
        num = rec.get("#", "")
        if not num.isdigit():
            continue
        f = rec["file"].strip("` ")
        f = None if f.lower() == "none" else Path(f).stem
        rows.append(RefRow(int(num), rec["model"].lower(), rec.get("reference gpus", ""), rec["precision"].lower(), f))
    if not rows:
        raise ValueError(f"{path}: no 'Reference rows -> files' table found (columns #, model, precision, file)")
    return rows


def reference_precisions(ref: list[RefRow], model: str, cfg: str) -> tuple[list[str], list[int]]:
    """Precisions (in table order) and row numbers the reference used for this model and config. A model or
    config the reference never combined falls back to the config's rows for any model (precisions only: no row
    numbers are returned then, since no reference row measured that combination)."""
    key = None if cfg == "none" else cfg
    rows = [r for r in ref if r.model == model.lower() and r.file == key]
    own = bool(rows)
    if not rows:
        rows = [r for r in ref if r.file == key]
    precs: list[str] = []
    for r in rows:
        if r.precision not in precs:
            precs.append(r.precision)
    return precs, [r.row for r in rows] if own else []


def gpu_count(r: RefRow) -> int | None:
    """The GPU count a reference row was measured on ('3 x V100' -> 3), None when the row names none."""
    m = re.match(r"\s*(\d+)", r.gpus)
    return int(m.group(1)) if m else None


def reference_rows(ref: list[RefRow], model: str, cfg: str, precision: str | None, num_gpus: int) -> list[int]:
    """The reference rows a run is compared with: same model, config and GPU count; of those, the ones with the
    same precision if any, else all of them (the reference's 3-GPU rows are fp16 on V100: a bf16 run on 3 GPUs is
    shown against them, and the table's fp16/bf16 columns say the precision differs). No row with the same GPU
    count: none (a 1-GPU run is not the reference's 3-GPU measurement)."""
    key = None if cfg == "none" else cfg
    rows = [r for r in ref if r.model == model.lower() and r.file == key and gpu_count(r) == num_gpus]
    same = [r for r in rows if r.precision == (precision or "").lower()]
    return [r.row for r in (same or rows)]
