"""The results table: the reference's columns, our measurements, failures with their reasons, a plot.

    python -m sftbench.report runs/<sweep> --out results/<sweep>/
    python -m sftbench.report runs/<sweep> --node-dir node1-runs/<sweep>   # a multi-node sweep without a shared disk

Reads only what the runs wrote: ``rank<k>.jsonl`` (schema: docs/log_schema.md), the sweep's ``summary.json``
(synthesized for runs that died), ``plan.json`` / ``plan_entry.json``, ``predicted.json`` and ``sweep_info.json``.
It never reads console output. Writes into the output folder:

* ``results.md`` / ``results.html``: the reference table's columns in its order (Chinese headers as the reference
  had them, English beside them in the Markdown), rows grouped by model and GPU, epoch time marked ``~`` when
  estimated, failures as ``OOM`` / ``CUDA Error`` / ``Timeout`` / ``Error`` cells in the GPU-memory column with the
  reason in a numbered footnote, then our columns (tokens/s per GPU, TFLOPS, MFU, predicted vs measured memory),
  a preamble (hardware, versions, command) and a recommendation per model and GPU count.
* ``results.csv``: every summary field, the plan entry and the config columns, one row per run.
* ``results.png``: per model, step time against GPU memory per rank (CPU runs: host RSS), Pareto front marked,
  failures apart on a labelled band.
* ``summaries.jsonl``: every run's plan entry (a ``plan_entry`` record), rank 0's meta (minus bulky fields) and
  every rank's summary record, each with ``run`` (and ``rank``) added, so the results folder stands on its own.
* ``sweep_info.json``: the sweep's machines and commands (GPU serial numbers left out). With ``summaries.jsonl`` it
  lets ``python -m sftbench.sweep restore`` rebuild the run folders where ``runs/`` is gone, so a sweep cut into
  batches resumes in another checkout.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Iterable

from sftbench import runlog
from sftbench.paths import REPO
from sftbench.report.runs import collect
from sftbench.report.plot import write_png
from sftbench.report.tables import build_table, epoch_checks, hardware_lines, recommendations
from sftbench.report.writers import write_csv, write_html, write_md, write_summaries, write_sweep_info_copy


def make_report(runs_dir: str | os.PathLike, out_dir: str | os.PathLike, title: str | None = None,
                node_dirs: Iterable[str | os.PathLike] = ()) -> dict:
    rows, plan, info = collect(runs_dir, node_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = plan.get("sweep") or Path(runs_dir).resolve().name
    title = title or f"sftbench results: {name}"
    if rows and all(r.accelerator == "cpu" for r in rows):
        title += " (CPU run)"
    table = build_table(rows)
    hw = hardware_lines(rows, info)
    hw.append(f"Report written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(rows)} run directories.")
    have = {r.run for r in rows}
    not_run = [e for e in plan.get("entries", []) if isinstance(e, dict) and e.get("run") not in have]
    missing = [e.get("run") for e in not_run]
    if missing:  # a sweep cut into batches: say what the table does not have yet, by name
        hw.append(f"Planned but not run yet ({len(missing)}): " + ", ".join(f"`{m}`" for m in missing) + ".")
    recs = recommendations(rows)
    checks = epoch_checks(rows)
    write_md(out / "results.md", title, table, hw, recs, len(rows), checks)
    write_html(out / "results.html", title, table, hw, recs, len(rows), checks)
    write_csv(out / "results.csv", rows)
    write_summaries(out / runlog.RESULTS_SUMMARIES_FILE, rows, not_run)
    if info:  # the preamble's machines and commands, kept beside the rows (``python -m sftbench.sweep restore``)
        write_sweep_info_copy(out / runlog.SWEEP_INFO_FILE, info)
    write_png(out / "results.png", [r for r in rows if r.epoch_twin_of is None])  # no twin points
    return {"rows": len(rows), "failures": len(table.footnotes), "out": str(out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftbench.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("runs_dir", help="a sweep's run folder (runs/<sweep>) or any folder holding run directories")
    ap.add_argument("--out", default=None, help="output folder (default results/<name of runs_dir>)")
    ap.add_argument("--title", default=None)
    ap.add_argument("--node-dir", action="append", default=[], metavar="DIR",
                    help="the same sweep folder as another node wrote it (a multi-node sweep without a shared file "
                         "system, copied back); repeat per node")
    a = ap.parse_args(argv)
    for d in [a.runs_dir, *a.node_dir]:
        if not Path(d).exists():
            print(f"report: error: {d} does not exist", file=sys.stderr)
            return 2
        if not Path(d).is_dir():
            print(f"report: error: {d} is not a directory", file=sys.stderr)
            return 2
        try:
            os.listdir(d)
        except OSError as e:
            print(f"report: error: cannot read {d}: {e.strerror}", file=sys.stderr)
            return 2
    if next(runlog.iter_run_dirs(a.runs_dir), None) is None:
        print(f"report: error: {a.runs_dir} holds no run directories (no rank<k>.jsonl or summary.json beneath it); "
              "nothing written", file=sys.stderr)
        return 2
    out = a.out or str(REPO / "results" / Path(a.runs_dir).resolve().name)
    res = make_report(a.runs_dir, out, a.title, a.node_dir)
    print(f"report: {res['rows']} runs ({res['failures']} failed) -> {res['out']}/results.md")
    return 0
