"""Plan before running: for a model and the hardware you have, every DeepSpeed configuration with its predicted GPU
memory per rank and host RAM per node, whether it fits (and by how much), and the step time where a measured table
for that GPU exists.

    python -m sftbench.plan --model pangu-13b --gpus 8 --gpu-mem 80 --host-mem 512
    python -m sftbench.plan --model pangu-2.6b --gpus 3 --gpu-mem 16 --precision fp16 --gpu-name V100
    python -m sftbench.plan --model path/to/checkpoint           # the visible GPUs and this machine's RAM
    ./run_all.sh --dry-run                                       # the sweep's own plan, with these predictions

Memory comes from ``sftbench/memory.py`` (DeepSpeed's model-state formulas plus buffers, activations, logits, CUDA
context; its docstring has every term). ``--gpu-mem`` and ``--host-mem`` are in GB (10^9 bytes), as cards and
machines are sold; the table prints MiB, as nvidia-smi does. A fit needs the predicted GPU memory within the card
and the predicted host RAM of one node within ``--host-mem``. Predictions hold within about 15% of what nvidia-smi
shows on most measured rows (``results/*/results.csv`` sets each measurement beside its prediction), so a margin under
15% is marked tight.

The step time: a ``results/*/results.csv`` row of the same model, configuration, precision and sequence length on a
GPU whose name contains ``--gpu-name`` (default: the visible GPU's short name): ``measured`` when the GPU count is the
same; otherwise ``estimated`` from the nearest GPU count (at micro batch 1 a step costs about the same on 1, 2 or 3
GPUs, README), with the folder it came from. Nothing is shown where no table exists.

Torch-free: reads configs, presets and CSVs only.
"""
from __future__ import annotations

import argparse
import csv
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sftbench import memory
from sftbench.args import planned_prediction
from sftbench.paths import REPO
from sftbench.dsconfig import DSConfigError, apply_precision, describe, load_ds_config
from sftbench.fmt import MIB
from sftbench.hardware import detect_gpus, gpu_slug, host_total_mib
from sftbench.nodes import per_node_prediction
from sftbench.presets import check_seq_len, model_shape

CONFIG_DIR = REPO / "ds_configs"
RESULTS_DIR = REPO / "results"
GB_MIB = 1e9 / MIB  # MiB in a GB
TIGHT = 0.15  # margins under this share of the limit are within the predictor's error


@dataclass
class Hardware:
    gpus_per_node: int
    nodes: int
    gpu_mib: float | None
    host_mib: float | None  # one node
    gpu_name: str | None


@dataclass
class PlanRow:
    config: str
    stage: int | None
    offload: str
    gpu_mib: float
    host_node_mib: float
    gpu_margin_mib: float | None
    host_margin_mib: float | None
    fits: bool | None
    tight: bool  # fits, with a margin under TIGHT of a limit
    step_s: float | None = None
    step_kind: str | None = None  # "measured" / "estimated from N GPUs"
    step_source: str | None = None
    cuda_graphs: bool = False  # what train.py's --cuda-graphs auto runs, and the prediction counts
    known_low: list = field(default_factory=list)  # memory.unmodelled_terms: (name, evidence) the GPU figure leaves out


def config_names(config_dir: Path = CONFIG_DIR) -> list[str]:
    return ["none"] + sorted(p.stem for p in config_dir.glob("*.json"))


def _offload(cfg: dict | None) -> str:
    if cfg is None:
        return "-"
    d = describe(cfg)
    parts = [k for k, v in (("optimizer", d["offload_optimizer"]), ("params", d["offload_param"])) if v]
    return "+".join(parts) or "-"


def measured_steps(results_dir: Path = RESULTS_DIR) -> list[dict]:
    """Every ok row of the committed result tables, with the folder it came from."""
    rows = []
    for f in sorted(results_dir.glob("*/results.csv")):
        with open(f, newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if r.get("status") == "ok" and r.get("step_s_median"):
                    r["_source"] = str(f.parent.relative_to(REPO)) if f.is_relative_to(REPO) else str(f.parent)
                    rows.append(r)
    return rows


def step_time(rows: list[dict], model: str, config: str, precision: str, seq_len: int, gpus: int,
              gpu_name: str | None) -> tuple[float | None, str | None, str | None]:
    """(s/step, 'measured' or 'estimated from N GPUs', source folder) of the closest measured row, or Nones."""
    if not gpu_name:
        return None, None, None
    want = gpu_name.lower()
    cands = [r for r in rows if r.get("model") == model and r.get("config") == config
             and r.get("precision") == precision and str(r.get("seq_len")) == str(seq_len)
             and want in (r.get("meta_device_name") or "").lower()]
    if not cands:
        return None, None, None
    best = min(cands, key=lambda r: (abs(int(r["num_gpus"]) - gpus), float(r["step_s_median"])))
    n = int(best["num_gpus"])
    kind = "measured" if n == gpus else f"estimated from {n} GPU{'s' if n > 1 else ''}"
    return float(best["step_s_median"]), kind, best["_source"]


def plan(model: str, hw: Hardware, precision: str = "bf16", seq_len: int = 512, configs: list[str] | None = None,
         results: list[dict] | None = None) -> list[PlanRow]:
    shape = memory.ModelShape.of(model_shape(model))
    world = hw.gpus_per_node * hw.nodes
    out = []
    for name in configs or config_names():
        cfg = None if name == "none" else apply_precision(load_ds_config(CONFIG_DIR / f"{name}.json"), precision)
        micro = (cfg or {}).get("train_micro_batch_size_per_gpu", 1) or 1
        if cfg is None and world > 1 and hw.nodes > 1:
            continue  # --ds none is DDP on one node here
        # train.py's defaults on a GPU: CUDA graphs where --cuda-graphs auto turns them on, which it does not where
        # the graphed run is predicted over the GPU's memory
        pred = planned_prediction(shape, memory.RunShape(cfg, world, precision, seq_len=seq_len, micro_batch=micro),
                                  memory.Limits(hw.gpu_mib, None))
        host_node = per_node_prediction(pred.to_json(), hw.nodes, hw.gpus_per_node, None)["host_mib_per_node"]
        gpu_margin = hw.gpu_mib - pred.gpu_mib if hw.gpu_mib else None
        host_margin = hw.host_mib - host_node if hw.host_mib else None
        checks = [m >= 0 for m in (gpu_margin, host_margin) if m is not None]
        fits = all(checks) if checks else None
        tight = bool(fits) and any(m is not None and m < TIGHT * lim for m, lim in ((gpu_margin, hw.gpu_mib),
                                                                                  (host_margin, hw.host_mib)))
        row = PlanRow(name, pred.stage, _offload(cfg), pred.gpu_mib, round(host_node, 1), gpu_margin, host_margin,
                      fits, tight, cuda_graphs=pred.run.cuda_graphs, known_low=memory.unmodelled_terms(cfg))
        row.step_s, row.step_kind, row.step_source = step_time(results or [], Path(model).name, name, precision,
                                                               seq_len, world, hw.gpu_name)
        out.append(row)
    return out


def _fmt_margin(m: float | None, lim: float | None) -> str:
    if m is None or not lim:
        return "?"
    return f"{m:+,.0f} ({100 * m / lim:+.0f}%)"


def render(rows: list[PlanRow], model: str, hw: Hardware, precision: str, seq_len: int) -> str:
    gpu = f"{hw.gpu_mib:,.0f} MiB" if hw.gpu_mib else "unknown"
    host = f"{hw.host_mib:,.0f} MiB" if hw.host_mib else "unknown"
    lines = [f"plan: {model}, {precision}, seq {seq_len}, micro batch from each config; {hw.nodes} node(s) x "
             f"{hw.gpus_per_node} GPU(s){' ' + hw.gpu_name if hw.gpu_name else ''}; GPU {gpu} each, host {host} "
             "per node", "",
             "| config | ZeRO | offload | CUDA graphs | GPU MiB/rank | margin | host MiB/node | margin | fits | "
             "s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        fit = {True: "yes (tight)" if r.tight else "yes", False: "**no**", None: "?"}[r.fits]
        if r.known_low and r.fits:
            fit += " (low¹)"  # a figure known to be low: the footnote says by what
        step = f"{r.step_s:.2f} ({r.step_kind}, {r.step_source})" if r.step_s is not None else ""
        lines.append(f"| {r.config} | {'-' if r.stage is None else r.stage} | {r.offload} | "
                     f"{'on' if r.cuda_graphs else 'off'} | {r.gpu_mib:,.0f} | "
                     f"{_fmt_margin(r.gpu_margin_mib, hw.gpu_mib)} | {r.host_node_mib:,.0f} | "
                     f"{_fmt_margin(r.host_margin_mib, hw.host_mib)} | {fit} | {step} |")
    n_fit = sum(1 for r in rows if r.fits)
    low = next((f"{name}: {evidence}" for r in rows if r.fits for name, evidence in r.known_low), None)
    lines += ["", f"{n_fit} of {len(rows)} configurations fit. Predictions, not measurements (sftbench/memory.py); "
              f"'tight' = under {TIGHT:.0%} margin, within the predictor's error. CUDA graphs: what train.py's "
              "--cuda-graphs auto runs there, counted in the GPU figure (off where the graphed run is predicted over "
              "the GPU's memory)."]
    if low:
        lines.append(f"¹ The GPU figure is known to be low: {low}.")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftbench.plan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="a preset (pangu-350m, pangu-2.6b, pangu-13b, pangu-tiny) or a "
                                                  "checkpoint folder with config.json")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: the visible GPUs)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=float, default=None, help="GB per GPU (default: the visible GPU's memory)")
    p.add_argument("--host-mem", type=float, default=None, help="GB of RAM per node (default: this machine's)")
    p.add_argument("--gpu-name", default=None, help="GPU name to look up measured step times (e.g. H200; default: "
                                                    "the visible GPU's)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--configs", default=None, help="comma-separated config names (default: none + every "
                                                   "ds_configs/ file)")
    return p


def resolve_hardware(args: argparse.Namespace) -> Hardware:
    visible = detect_gpus() if args.gpus is None or args.gpu_mem is None or args.gpu_name is None else []
    gpus = args.gpus if args.gpus is not None else len(visible)
    if gpus < 1:
        raise SystemExit("plan: no GPU visible here; say how many with --gpus (and --gpu-mem)")
    if args.nodes < 1:
        raise SystemExit(f"plan: --nodes must be >= 1, got {args.nodes}")
    gpu_mib = args.gpu_mem * GB_MIB if args.gpu_mem is not None else (visible[0].memory_mib if visible else None)
    host_mib = args.host_mem * GB_MIB if args.host_mem is not None else host_total_mib()
    name = args.gpu_name or (gpu_slug(visible[0].name).upper() if visible else None)
    return Hardware(gpus, args.nodes, gpu_mib, host_mib, name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hw = resolve_hardware(args)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    known = config_names()
    for c in configs or []:
        if c not in known:
            raise SystemExit(f"plan: --configs: unknown config {c!r} (known: {', '.join(known)})")
    try:
        check_seq_len(args.model, args.seq_len)
        rows = plan(args.model, hw, args.precision, args.seq_len, configs, measured_steps())
    except (ValueError, DSConfigError) as e:
        raise SystemExit(f"plan: {e}") from None
    print(render(rows, args.model, hw, args.precision, args.seq_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
