"""Re-predict committed results with today's memory predictor and set every prediction beside its measurement.

    python -m sftbench.repredict results/h100x1 results/h100x2 [...] [--json FILE] [--tolerance 15]

For every ok row of each folder's ``results.csv`` it takes the run's meta record from ``summaries.jsonl`` (model,
ds_config, world size, precision, seq_len, micro batch, dataset samples, optimizations), runs today's
:func:`sftbench.memory.predict` on those inputs (``cuda`` from the meta's device, flash attention unless
``optimizations.pad_mask``, ``cuda_graphs`` from the optimizations when logged) and compares:

* GPU: ``gpu_mem_used_mib_max_over_ranks`` (NVML / nvidia-smi peak of the busiest GPU) against ``gpu_mib``;
* host: ``host_rss_mib_sum_over_ranks`` against ``host_mib`` (the whole job).

A folder may hold ``corrections.json`` (written by hand, with the evidence in its NOTES.md) for a measurement error
found after the sweep: ``{"gpu_mem_used_mib": {"add_mib": -480, "runs": [...], "why": "..."}}``; those rows are
compared at the corrected value, marked ``*`` in the table, and the why is printed under it.

Error = (predicted - measured) / measured, in percent (negative: under-predicted). A row outside the tolerance is
marked with where the miss lies: for GPU memory, outside torch's pool (context, NCCL) or in it (torch's peak
reserved), and in the pool the allocator's reserve or a term the predictor knows it leaves out
(``memory.unmodelled_terms``), else the largest term of that prediction's breakdown. The summary gives, per folder
and overall, the share of rows within the tolerance for the prediction stored in the row (``predicted_gpu_mib`` /
``predicted_host_mib``, made by the predictor of that day) and for today's re-prediction. Reads only committed
files; no torch, no deepspeed.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from sftbench import memory, runlog
from sftbench.dsconfig import describe
from sftbench.models.resolve import model_shape

def _load_metas(path: Path) -> dict:
    """run name -> meta record of a summaries.jsonl (read as every log reader reads JSONL: a broken line is
    counted and named, not fatal)."""
    if not path.is_file():
        return {}
    records, bad = runlog.read_records(path)
    if bad:
        print(f"note: {path}: {bad} unparseable line(s) skipped", file=sys.stderr)
    return {r["run"]: r for r in records if r.get("type") == "meta" and r.get("run")}


def _shape(meta: dict) -> memory.ModelShape:
    """The preset's shape; a checkpoint model falls back to the dimensions its stored prediction recorded."""
    try:  # a preset name or a checkpoint folder that is still there
        return memory.ModelShape.of(model_shape(str(meta.get("model"))))
    except (ValueError, OSError, TypeError, KeyError):
        inp = (meta.get("predicted") or {}).get("inputs") or {}
        return memory.ModelShape.of({**inp, "n_params": int(meta.get("n_params") or inp["n_params"])})


def run_shape(meta: dict) -> memory.RunShape:
    """The RunShape train.py built for this run, from its meta record."""
    opt = meta.get("optimizations") or {}
    device = str(meta.get("device") or "cuda")
    return memory.RunShape(meta.get("ds_config"), int(meta.get("world_size") or 1), meta["precision"],
                           seq_len=int(meta.get("seq_len") or 512), micro_batch=int(meta.get("micro_batch") or 1),
                           cuda=device.startswith("cuda"), flash_attention=not bool(opt.get("pad_mask")),
                           dataset_samples=meta.get("dataset_samples"), cuda_graphs=bool(opt.get("cuda_graphs")),
                           coalesce_reduction=bool(opt.get("coalesce_reduction")))


def as_number(v) -> float | None:
    """A CSV cell or JSON value as a float (None when empty or not a number)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return x if x == x and abs(x) != float("inf") else None


def _err(pred, meas) -> float | None:
    e = memory.error_pct(as_number(pred), as_number(meas))
    return None if e is None else round(e, 1)


def _config_class(cfg: dict | None) -> dict:
    """The knobs the misses are studied by: ZeRO stage, offload devices, overlap_comm, bucket sizes (the report's
    reading of the config, ``dsconfig.describe``, plus ZeRO-3's prefetch bucket)."""
    if cfg is None:
        return {"stage": None}
    d = describe(cfg)
    return {"stage": int(d["zero_stage"] or 0), "offload_optimizer": d["offload_optimizer"],
            "offload_param": d["offload_param"], "overlap_comm": d["overlap_comm"],
            "reduce_bucket_size": d["reduce_bucket_size"],
            "stage3_prefetch_bucket_size": (cfg.get("zero_optimization") or {}).get("stage3_prefetch_bucket_size"),
            "stage3_max_live_parameters": d["stage3_max_live_parameters"]}


def load_corrections(folder: Path) -> dict:
    """``folder/corrections.json`` checked: {column: {"add_mib": float, "runs": [names], "why": str}}; {} without one.
    Only the GPU-memory column can be corrected; a malformed file is an error naming the file and the key."""
    path = folder / runlog.RESULTS_CORRECTIONS_FILE
    if not path.is_file():
        return {}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SystemExit(f"{path}: not JSON ({e})") from e
    for key, c in doc.items():
        if key != "gpu_mem_used_mib":
            raise SystemExit(f"{path}: {key!r}: only 'gpu_mem_used_mib' can be corrected")
        if (not isinstance(c, dict) or not isinstance(c.get("add_mib"), (int, float))
                or not isinstance(c.get("runs"), list) or not c.get("why")):
            raise SystemExit(f"{path}: {key!r} needs 'add_mib' (a number), 'runs' (a list) and 'why'")
    return doc


def folder_rows(folder: str | os.PathLike, tolerance: float = memory.TOLERANCE_PCT) -> list[dict]:
    """One dict per ok row of ``folder/results.csv``: measured, stored and re-predicted GPU and host MiB."""
    folder = Path(folder)
    metas = _load_metas(folder / runlog.RESULTS_SUMMARIES_FILE)
    fix = load_corrections(folder).get("gpu_mem_used_mib")
    out = []
    with open(folder / "results.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        if r.get("status") != "ok":
            continue
        meta = metas.get(r["run"])
        row = {"folder": folder.name, "run": r["run"], "config": r.get("config") or None,
               "gpu_measured_mib": as_number(r.get("gpu_mem_used_mib_max_over_ranks")),
               "host_measured_mib": as_number(r.get("host_rss_mib_sum_over_ranks")),
               "gpu_stored_mib": as_number(r.get("predicted_gpu_mib")),
               "host_stored_mib": as_number(r.get("predicted_host_mib"))}
        if fix and r["run"] in fix["runs"] and row["gpu_measured_mib"] is not None:
            row["gpu_measured_mib"] += fix["add_mib"]
            row["gpu_corrected"] = f"{fix['add_mib']:+.0f} MiB: {fix['why']}"
        if meta is None:
            row["error"] = "no meta record in summaries.jsonl"
            out.append(row)
            continue
        row.update(model=meta.get("model"), world_size=meta.get("world_size"), precision=meta.get("precision"),
                   **_config_class(meta.get("ds_config")))
        pred = memory.predict(_shape(meta), run_shape(meta)).to_json()
        row["gpu_predicted_mib"], row["host_predicted_mib"] = pred["gpu_mib"], pred["host_mib"]
        row["gpu_breakdown_mib"], row["host_breakdown_mib"] = pred["gpu_breakdown_mib"], pred["host_breakdown_mib"]
        for kind in ("gpu", "host"):
            meas = row[f"{kind}_measured_mib"]
            row[f"{kind}_stored_err_pct"] = _err(row[f"{kind}_stored_mib"], meas)
            row[f"{kind}_err_pct"] = e = _err(row[f"{kind}_predicted_mib"], meas)
            row[f"{kind}_stored_ok"] = (None if row[f"{kind}_stored_err_pct"] is None
                                        else abs(row[f"{kind}_stored_err_pct"]) <= tolerance)
            row[f"{kind}_ok"] = None if e is None else abs(e) <= tolerance
            row[f"{kind}_miss_term"] = (None if row[f"{kind}_ok"] in (True, None)
                                        else memory.largest_term(pred[f"{kind}_breakdown_mib"]))
        if row["gpu_ok"] is False:
            row["gpu_miss_where"] = _gpu_miss_where(row, pred, meta, as_number(r.get("torch_peak_reserved_mib")),
                                                    as_number(r.get("torch_peak_alloc_mib")))
        out.append(row)
    return out


def _gpu_miss_where(row: dict, pred: dict, meta: dict, reserved: float | None, alloc: float | None) -> str:
    """Where a GPU miss lies (``memory.locate_gpu_miss``), in a few words for the table's last column."""
    miss = memory.locate_gpu_miss(pred["gpu_breakdown_mib"], pred["gpu_mib"], row["gpu_measured_mib"], reserved,
                                  alloc, meta.get("ds_config"))
    if miss is None:
        return f"largest: {row['gpu_miss_term']}"
    (po, mo), (pp, mp) = miss["outside"], miss["pool"]
    if miss["where"] == "outside":
        return f"outside the pool: {mo:.0f} measured, {po:.0f} predicted"
    if miss["cause"] == "reserve":
        return f"pool: allocator reserve {miss['reserve_mib']:.0f} MiB beyond the allocated peak"
    if miss["cause"] == "unmodelled":
        return "pool: not modelled: " + miss["unmodelled"][0][0]
    return f"pool: {mp:.0f} measured, {pp:.0f} predicted; largest: {row['gpu_miss_term']}"


def _share(rows: list[dict], key: str) -> dict:
    vals = [r.get(key) for r in rows if r.get(key) is not None]
    n_ok = sum(1 for v in vals if v)
    return {"within": n_ok, "rows": len(vals), "share_pct": round(100.0 * n_ok / len(vals), 1) if vals else None}


def shares(rows: list[dict]) -> dict:
    return {"rows": len(rows), "gpu_stored": _share(rows, "gpu_stored_ok"), "gpu": _share(rows, "gpu_ok"),
            "host_stored": _share(rows, "host_stored_ok"), "host": _share(rows, "host_ok")}


def repredict(folders: list[str | os.PathLike], tolerance: float = memory.TOLERANCE_PCT) -> dict:
    rows = [r for f in folders for r in folder_rows(f, tolerance)]
    names = list(dict.fromkeys(Path(f).name for f in folders))
    per = {n: shares([r for r in rows if r["folder"] == n]) for n in names}
    return {"tolerance_pct": tolerance, "rows": rows, "folders": per, "overall": shares(rows)}


def _n(v) -> str:
    return "" if v is None else f"{v:.0f}"


def _pct(v) -> str:
    return "" if v is None else f"{v:+.1f}"


def _mark(r: dict) -> str:
    marks = []
    if r.get("gpu_ok") is False:
        marks.append(f"GPU {'under' if r['gpu_err_pct'] < 0 else 'over'} "
                     f"({r.get('gpu_miss_where') or 'largest: ' + str(r['gpu_miss_term'])})")
    if r.get("host_ok") is False:
        marks.append(f"host {'under' if r['host_err_pct'] < 0 else 'over'} (largest: {r['host_miss_term']})")
    if r.get("error"):
        marks.append(r["error"])
    return "; ".join(marks)


def _fmt_share(s: dict) -> str:
    return "" if s["share_pct"] is None else f"{s['within']}/{s['rows']} ({s['share_pct']:.0f}%)"


def to_markdown(res: dict) -> str:
    tol = res["tolerance_pct"]
    lines = [f"| folder | run | GPU measured MiB | GPU stored MiB | stored err % | GPU predicted MiB | err % | "
             f"host RSS MiB | host stored MiB | stored err % | host predicted MiB | err % | outside ±{tol:g}% |",
             "|---|---|" + "---:|" * 10 + "---|"]
    notes = {}
    for r in res["rows"]:
        if r.get("gpu_corrected"):
            notes[r["folder"]] = r["gpu_corrected"]
        lines.append("| " + " | ".join([
            r["folder"], r["run"], _n(r["gpu_measured_mib"]) + ("*" if r.get("gpu_corrected") else ""),
            _n(r["gpu_stored_mib"]),
            _pct(r.get("gpu_stored_err_pct")),
            _n(r.get("gpu_predicted_mib")), _pct(r.get("gpu_err_pct")), _n(r["host_measured_mib"]),
            _n(r["host_stored_mib"]), _pct(r.get("host_stored_err_pct")), _n(r.get("host_predicted_mib")),
            _pct(r.get("host_err_pct")), _mark(r)]) + " |")
    lines += [f"\n\\* {name}: GPU measured corrected {why}" for name, why in notes.items()]
    lines += ["", f"Rows within ±{tol:g}% (stored: the prediction kept in the row; re-predicted: today's predictor)",
              "",
              "| folder | rows | GPU stored | GPU re-predicted | host stored | host re-predicted |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, s in [*res["folders"].items(), ("overall", res["overall"])]:
        lines.append(f"| {name} | {s['rows']} | {_fmt_share(s['gpu_stored'])} | {_fmt_share(s['gpu'])} | "
                     f"{_fmt_share(s['host_stored'])} | {_fmt_share(s['host'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sftbench.repredict", description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", help="results folders, each with results.csv and summaries.jsonl")
    ap.add_argument("--json", metavar="FILE", help="also write the rows and shares as JSON")
    ap.add_argument("--tolerance", type=float, default=memory.TOLERANCE_PCT, help="percent (default 15)")
    args = ap.parse_args(argv)
    for f in args.folders:
        if not (Path(f) / "results.csv").is_file():
            ap.error(f"{f}: no results.csv")
    res = repredict(args.folders, args.tolerance)
    sys.stdout.write(to_markdown(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
