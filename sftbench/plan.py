"""Plan before running: for a model and the hardware you have, every DeepSpeed configuration with its predicted GPU
memory per rank and host RAM per node, whether it fits (and by how much), and the step time where a measured table
for that GPU exists.

    python -m sftbench.plan --model pangu-13b --gpus 8 --gpu-name H100-80GB --host-mem 512
    python -m sftbench.plan --model pangu-2.6b --gpus 3 --gpu-mem 15.8 --precision fp16 --gpu-name V100
    python -m sftbench.plan --model path/to/checkpoint           # the visible GPUs and this machine's RAM
    python -m sftbench.plan --model llama-3.1-8b --gpus 8 --gpu-mem 80 --host-mem 512 --seq-len 4096 \
        --grad-checkpointing                                      # any transformers causal LM: preset, folder, Hub

    ./run_all.sh --dry-run                                       # the sweep's own plan, with these predictions

Memory comes from ``sftbench/memory.py`` (DeepSpeed's model-state formulas plus buffers, activations, logits, CUDA
context; its docstring has every term). ``--gpu-mem`` and ``--host-mem`` are in GiB (2^30 bytes); ``--gpu-name`` of a
GPU whose capacity a committed table recorded (H100, H200: ``GPU_MIB``) gives the card's real capacity without
``--gpu-mem`` (an "80GB" H100 holds 81,559 MiB = 79.6 GiB, as nvidia-smi shows); the table prints MiB, as
nvidia-smi does. A fit needs the predicted GPU memory within the card
and the predicted host RAM of one node within ``--host-mem``. Predictions hold within about 15% of what nvidia-smi
shows on most measured rows (``results/*/results.csv`` sets each measurement beside its prediction), so a margin under
15% is marked tight.

The step time: a ``results/*/results.csv`` row of the same model, configuration, precision and sequence length on a
GPU whose name contains ``--gpu-name`` (default: the visible GPU's short name): ``measured`` when the GPU count is the
same; otherwise ``estimated`` from the nearest GPU count (at micro batch 1 a step costs about the same on 1, 2 or 3
GPUs, README), with the folder it came from, and ``eager`` where that run had CUDA graphs off while the plan
predicts them on. Nothing is shown where no table exists.

The recommendation (``recommend``): the fastest configuration that fits with margin (by the table's s/step where
one exists for that GPU, else by ``heuristic_order``, and says which), the one needing the least GPU memory, and,
when nothing fits, the smallest change that would: the host RAM a configuration needs, the GPUs, or the
configuration closest to fitting.

``--model`` takes what train.py takes: a preset, a folder of any transformers causal LM or Pangu-α, or a Hub name
(only its config.json is fetched, into transformers' cache); the shape comes from config.json alone
(``sftbench/models/shape.py``). Torch-free: reads configs, presets and CSVs only.
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from sftbench import memory
from sftbench.args import planned_prediction
from sftbench.levers import gpu_class_of
from sftbench.paths import REPO
from sftbench.dsconfig import DSConfigError, apply_precision, describe, load_ds_config
from sftbench.fmt import MIB
from sftbench.hardware import detect_gpus, gpu_slug, host_total_mib
from sftbench.nodes import per_node_prediction
from sftbench.models.resolve import model_shape, resolve as resolve_model

CONFIG_DIR = REPO / "ds_configs"
RESULTS_DIR = REPO / "results"
GB_MIB = 1e9 / MIB  # MiB in a GB
GIB_MIB = 1024.0  # MiB in a GiB: --gpu-mem and --host-mem are GiB
TIGHT = 0.15  # margins under this share of the limit are within the predictor's error
# The real capacity of the GPUs the committed tables ran on, as nvidia-smi reports it (their NOTES.md), by
# hardware.gpu_slug: --gpu-name H100 (or H100-80GB) then needs no --gpu-mem.
GPU_MIB = {"h100": 81_559.0,  # results/h100x1-eager/NOTES.md: NVIDIA H100 80GB HBM3
           "h200": 143_771.0}  # results/h200x1/NOTES.md: NVIDIA H200
MAX_GPUS_TRIED = 8  # "GPUs needed" looks at one node of up to this many GPUs


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
        graphed = _graphs_by_run(f.parent)
        with open(f, newline="", encoding="utf-8") as fh:
            for r in csv.DictReader(fh):
                if r.get("status") == "ok" and r.get("step_s_median"):
                    r["_source"] = str(f.parent.relative_to(REPO)) if f.is_relative_to(REPO) else str(f.parent)
                    r["_cuda_graphs"] = graphed.get(r.get("run"), False)
                    rows.append(r)
    return rows


def _graphs_by_run(folder: Path) -> dict[str, bool]:
    """run -> whether it ran CUDA graphs, from the folder's summaries.jsonl meta records (a run from before the
    lever existed has no such key: eager)."""
    out: dict[str, bool] = {}
    try:
        lines = (folder / "summaries.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and rec.get("type") == "meta" and rec.get("rank", 0) == 0:
            out[rec.get("run")] = bool((rec.get("optimizations") or {}).get("cuda_graphs"))
    return out


def step_time(rows: list[dict], model: str, config: str, precision: str, seq_len: int, gpus: int,
              gpu_name: str | None, cuda_graphs: bool | None = None) -> tuple[float | None, str | None, str | None]:
    """(s/step, 'measured' or 'estimated from N GPUs', source folder) of the closest measured row, or Nones. The
    kind ends in ', eager' where the row ran without CUDA graphs and ``cuda_graphs`` (what the plan predicts) is on."""
    if not gpu_name:
        return None, None, None
    want = gpu_slug(gpu_name)
    cands = [r for r in rows if r.get("model") == model and r.get("config") == config
             and r.get("precision") == precision and str(r.get("seq_len")) == str(seq_len)
             and gpu_slug(r.get("meta_device_name") or "") == want]
    if not cands:
        return None, None, None
    best = min(cands, key=lambda r: (abs(int(r["num_gpus"]) - gpus), r.get("_cuda_graphs") != cuda_graphs,
                                     float(r["step_s_median"])))
    n = int(best["num_gpus"])
    kind = "measured" if n == gpus else f"estimated from {n} GPU{'s' if n > 1 else ''}"
    if cuda_graphs and not best.get("_cuda_graphs"):
        kind += ", eager"  # the plan predicts the graphs on: the table's run did not have them
    return float(best["step_s_median"]), kind, best["_source"]


def plan(model: str, hw: Hardware, precision: str = "bf16", seq_len: int = 512, configs: list[str] | None = None,
         results: list[dict] | None = None, micro_batch: int | None = None,
         grad_checkpointing: bool = False) -> list[PlanRow]:
    """One row per configuration; ``micro_batch`` None takes each config's (1 for none), as train.py does."""
    shape_dict = model_shape(model)
    if seq_len > shape_dict["max_positions"]:
        raise ValueError(f"--seq-len {seq_len} is longer than {model}'s {shape_dict['max_positions']} positions")
    shape = memory.ModelShape.of(shape_dict)
    world = hw.gpus_per_node * hw.nodes
    out = []
    for name in configs or config_names():
        cfg = None if name == "none" else apply_precision(load_ds_config(CONFIG_DIR / f"{name}.json"), precision)
        micro = micro_batch or (cfg or {}).get("train_micro_batch_size_per_gpu", 1) or 1
        if cfg is None and world > 1 and hw.nodes > 1:
            continue  # --ds none is DDP on one node here
        # train.py's defaults on a GPU: CUDA graphs where --cuda-graphs auto turns them on, which it does not where
        # the graphed run is predicted over the GPU's memory
        pred = planned_prediction(shape, memory.RunShape(cfg, world, precision, seq_len=seq_len, micro_batch=micro,
                                                         grad_checkpointing=grad_checkpointing),
                                  memory.Limits(hw.gpu_mib, None), gpu=gpu_class_of(hw.gpu_name),
                                  family=resolve_model(model).family)
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
                                                               seq_len, world, hw.gpu_name, row.cuda_graphs)
        out.append(row)
    return out


def heuristic_order(row: PlanRow) -> tuple:
    """The a-priori speed order where no table was measured on the GPU: what a configuration moves between the
    GPU and the host, then how finely it shards (no offload, then optimizer offload, then parameter offload; a lower
    ZeRO stage first, the plain loop beside ZeRO-0). It is roughly the order the committed tables measured (their
    exceptions: results/*/results.md); a measured table replaces it wherever one exists."""
    return ("params" in row.offload, "optimizer" in row.offload, 0.5 if row.stage is None else row.stage,
            row.config)


@dataclass
class Recommendation:
    fastest: PlanRow | None
    fastest_basis: str  # how "fastest" was decided: the table it was measured in, or the heuristic order
    least_memory: PlanRow | None
    would_fit: list[str]  # when nothing fits: the smallest changes that would, one line each


def _gib(mib: float) -> str:
    return f"{mib / GIB_MIB:,.1f} GiB"


def recommend(rows: list[PlanRow], model: str, hw: Hardware, precision: str = "bf16", seq_len: int = 512,
              results: list[dict] | None = None) -> Recommendation:
    """The plan's advice (module doc): the fastest fitting configuration (one with a margin of at least TIGHT when
    there is one), the least-memory one, and, when nothing fits with that margin, what would."""
    fitting = [r for r in rows if r.fits]
    roomy = [r for r in fitting if not r.tight]
    pool = roomy or fitting
    fastest, basis = None, ""
    timed = [r for r in pool if r.step_s is not None]
    if timed:
        fastest = min(timed, key=lambda r: r.step_s)
        basis = (f"fastest by {fastest.step_kind} s/step in {fastest.step_source} ({fastest.step_s:.2f} s/step)"
                 + (f"; {len(pool) - len(timed)} fitting configuration(s) have no measurement there"
                    if len(timed) < len(pool) else ""))
    elif pool:
        fastest = min(pool, key=heuristic_order)
        basis = ("no table measured on this GPU: ordered by what each configuration moves (no offload, then "
                 "optimizer offload, then parameter offload; lower ZeRO stage first), not measured")
    if fastest is not None and fastest.tight:
        basis += f"; its margin is under {TIGHT:.0%} (within the predictor's error)"
    # a figure known to be low is no basis for "least memory" while another fitting one has none
    sure = [r for r in fitting if not r.known_low] or fitting
    least = min(sure, key=lambda r: (r.gpu_mib, r.host_node_mib)) if sure else None
    return Recommendation(fastest, basis, least,
                          [] if roomy else would_fit(rows, model, hw, precision, seq_len, results))


def would_fit(rows: list[PlanRow], model: str, hw: Hardware, precision: str, seq_len: int,
              results: list[dict] | None = None) -> list[str]:
    """When no configuration fits with a TIGHT margin: the host RAM that would give one that margin (its GPU figure
    has it already), the GPUs per node that would (ZeRO shards the states over them), and the configuration
    closest to fitting."""
    out = []
    need = 1.0 / (1.0 - TIGHT)  # a limit this many times the prediction leaves a TIGHT margin
    gpu_ok = [r for r in rows if not hw.gpu_mib or r.gpu_mib * need <= hw.gpu_mib]
    if gpu_ok and hw.host_mib:
        r = min(gpu_ok, key=lambda r: (r.host_node_mib, heuristic_order(r)))
        out.append(f"more host RAM: {r.config} has a {TIGHT:.0%} margin on this GPU and needs "
                   f"{_gib(r.host_node_mib)} of host RAM per node (predicted), {_gib(r.host_node_mib * need)} for a "
                   f"{TIGHT:.0%} margin; this machine has {_gib(hw.host_mib)}")
    names = [r.config for r in rows]
    found = False
    for n in range(hw.gpus_per_node + 1, MAX_GPUS_TRIED + 1) if hw.nodes == 1 else ():
        more = Hardware(n, 1, hw.gpu_mib, hw.host_mib, hw.gpu_name)
        fit = [r for r in plan(model, more, precision, seq_len, names, results) if r.fits and not r.tight]
        if fit:
            best = min(fit, key=heuristic_order)
            out.append(f"more GPUs: {n} GPUs of {_gib(hw.gpu_mib)} on this node fit {len(fit)} configuration(s) with "
                       f"margin, e.g. {best.config} ({best.gpu_mib:,.0f} MiB per GPU, {_gib(best.host_node_mib)} host "
                       "RAM)")
            found = True
            break
    if not found and hw.nodes == 1:
        out.append(f"more GPUs: up to {MAX_GPUS_TRIED} GPUs of {_gib(hw.gpu_mib)} on this node with "
                   f"{_gib(hw.host_mib)} of host RAM fit nothing with margin")

    def shortfall(r: PlanRow) -> float:
        return max(-(m or 0.0) / lim for m, lim in ((r.gpu_margin_mib, hw.gpu_mib), (r.host_margin_mib, hw.host_mib))
                   if lim)

    unfit = [r for r in rows if r.fits is False]
    if unfit:
        c = min(unfit, key=shortfall)
        over = ([f"GPU by {-c.gpu_margin_mib:,.0f} MiB"] if (c.gpu_margin_mib or 0) < 0 else []) + \
               ([f"host RAM by {_gib(-c.host_margin_mib)}"] if (c.host_margin_mib or 0) < 0 else [])
        out.append(f"closest to fitting: {c.config}, over {' and '.join(over)} ({shortfall(c):.0%} of the limit)")
    return out


def render_recommendation(rec: Recommendation) -> list[str]:
    lines = []
    if rec.fastest is not None:
        lines.append(f"recommended (fastest that fits): {rec.fastest.config}: {rec.fastest_basis}")
    if rec.least_memory is not None:
        lm = rec.least_memory
        lines.append(f"least GPU memory: {lm.config}: {lm.gpu_mib:,.0f} MiB per GPU ({_gib(lm.gpu_mib)}), "
                     f"{_gib(lm.host_node_mib)} host RAM per node")
    if rec.would_fit:
        lines.append("nothing fits with a margin; what would:" if rec.fastest is not None
                     else "nothing fits; what would:")
        lines += [f"  - {line}" for line in rec.would_fit]
    return lines


def _fmt_margin(m: float | None, lim: float | None) -> str:
    if m is None or not lim:
        return "?"
    return f"{m:+,.0f} ({100 * m / lim:+.0f}%)"


def describe_model(shape: dict) -> str:
    """One line on the model the plan is for: parameters and the shape terms the predictor reads."""
    kind = shape.get("model_type") or "pangu"
    kv = shape.get("n_kv_heads") or shape["n_heads"]
    return (f"model: {kind}, {shape['n_params'] / 1e9:.3f}B parameters, {shape['n_layers']} layers, hidden "
            f"{shape['hidden']}, {shape['n_heads']} heads ({kv} key/value), MLP {shape['intermediate'] or '4h'}"
            f"{' gated' if shape.get('gated_mlp') else ''}, vocab {shape['vocab']}, "
            f"{'untied' if shape.get('tied') is False else 'tied'} head, {shape['max_positions']} positions"
            + (f" ({shape['rule']})" if str(shape.get("rule", "")).startswith("generic") else ""))


def render(rows: list[PlanRow], model: str, hw: Hardware, precision: str, seq_len: int,
           rec: Recommendation | None = None, micro_batch: int | None = None,
           grad_checkpointing: bool = False) -> str:
    gpu = f"{hw.gpu_mib:,.0f} MiB = {_gib(hw.gpu_mib)}" if hw.gpu_mib else "unknown"
    host = f"{hw.host_mib:,.0f} MiB = {_gib(hw.host_mib)}" if hw.host_mib else "unknown"
    micro = f"micro batch {micro_batch}" if micro_batch else "micro batch from each config"
    lines = [f"plan: {model}, {precision}, seq {seq_len}, {micro}"
             f"{', activation checkpointing' if grad_checkpointing else ''}; {hw.nodes} node(s) x "
             f"{hw.gpus_per_node} GPU(s){' ' + hw.gpu_name if hw.gpu_name else ''}; GPU {gpu} each, host {host} "
             "per node", describe_model(model_shape(model)), "",
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
    if rec is not None:
        lines += [""] + render_recommendation(rec)
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sftbench.plan", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--model", required=True, help="a preset (pangu-350m, pangu-2.6b, pangu-13b, pangu-tiny, "
                                                  "llama-3.2-1b, llama-3.1-8b, qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b, "
                                                  "mistral-7b, ...), a model folder with config.json, or a Hub name")
    p.add_argument("--gpus", type=int, default=None, help="GPUs per node (default: the visible GPUs)")
    p.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    p.add_argument("--gpu-mem", type=float, default=None,
                   help="GiB (2^30 bytes) per GPU, as nvidia-smi's MiB / 1024 (default: --gpu-name's capacity for "
                        "H100 and H200, else the visible GPU's memory)")
    p.add_argument("--host-mem", type=float, default=None, help="GiB of RAM per node (default: this machine's)")
    p.add_argument("--gpu-name", default=None,
                   help="GPU name (H100, H100-80GB, H200, V100, ...): the measured step times of that GPU's table, "
                        "and for H100 (81,559 MiB) and H200 (143,771 MiB) its real capacity (default: the visible "
                        "GPU's)")
    p.add_argument("--precision", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=None, help="micro batch per rank (default: each config's)")
    p.add_argument("--grad-checkpointing", action="store_true", help="activation checkpointing, as train.py's flag")
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
    name = args.gpu_name or (gpu_slug(visible[0].name).upper() if visible else None)
    if args.gpu_mem is not None:
        gpu_mib = args.gpu_mem * GIB_MIB
    elif args.gpu_name:
        gpu_mib = GPU_MIB.get(gpu_slug(args.gpu_name))
        if gpu_mib is None:
            raise SystemExit(f"plan: --gpu-name {args.gpu_name}: its capacity is not known here (known: "
                             f"{', '.join(k.upper() for k in GPU_MIB)}); give it with --gpu-mem in GiB")
    else:
        gpu_mib = visible[0].memory_mib if visible else None
    host_mib = args.host_mem * GIB_MIB if args.host_mem is not None else host_total_mib()
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
        results = measured_steps()
        rows = plan(args.model, hw, args.precision, args.seq_len, configs, results, args.micro_batch,
                    args.grad_checkpointing)
        rec = recommend(rows, args.model, hw, args.precision, args.seq_len, results)
    except (ValueError, DSConfigError) as e:
        raise SystemExit(f"plan: {e}") from None
    print(render(rows, args.model, hw, args.precision, args.seq_len, rec, args.micro_batch, args.grad_checkpointing))
    return 0


if __name__ == "__main__":
    sys.exit(main())
