#!/usr/bin/env python
"""Ours against the peers, one after another, on the same model, batches and DeepSpeed configs; a ratio table.

    python bench/compare.py --models pangu-350m,pangu-2.6b --configs z1,z2_offload_5e8 --steps 20 \\
        --warmup-steps 5 --out results/compare.md
    python bench/compare.py --models pangu-tiny --configs z1 --seq-len 64 --steps 3 --warmup-steps 1   # on CPU

For every model: ``bench/peer_torch.py`` (the plain PyTorch loop a typical user writes) and, as ``peer_compiled``,
the same script with ``COMPILED_FLAGS`` (the loop a performance engineer writes: ``torch.compile`` with inductor's
CUDA graphs, no attention mask, batches on the GPU, gradients pre-allocated); neither depends on the DeepSpeed
config, so each runs once per model. For every (model, config), one after another, each through
``deepspeed --num_gpus 1``:

* ours: ``train.py --ds <cfg> --model <m> --max-steps S --warmup-steps W --run-dir <dir>``; its rank-0 summary
  (``sftbench.runlog.load_run``) gives ``step_s_median`` and ``tokens_per_s``;
* bare: ``bench/bare_engine.py``, the same engine and batches without the harness (harness overhead = ours'
  median step time over the bare loop's, minus one);
* peer_trainer: ``bench/peer_trainer.py``, the transformers Trainer with the same JSON.

``--tokenizer``, ``--data``, ``--seq-len``, ``--seed`` and ``--precision`` go to all of them. MFU =
``flops_per_token(config, seq_len)`` x tokens/s per GPU / ``peak_tflops(device, precision)``. The table (markdown)
is printed and written to ``--out`` (``X.md`` and ``X.json``); every command's console output is kept in the work
directory (``--work-dir``, default ``runs/compare-<time>/``). ``--dry-run`` prints the commands and runs nothing.
Without a GPU the children get ``DS_ACCELERATOR=cpu`` (use ``--models pangu-tiny --seq-len 64``).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for sftbench

from sftbench.paths import REPO  # noqa: E402
from sftbench.args import repo_relative as rel  # noqa: E402
from sftbench.sweep import REFERENCE_LAYOUT, launcher_command  # noqa: E402  (no torch import: the children do the real work)

TOOLS = ("ours", "bare", "peer_torch", "peer_compiled", "peer_trainer")
# peer_compiled: bench/peer_torch.py as a performance engineer runs it (its module doc says why each flag)
COMPILED_FLAGS = ("--compile", "reduce-overhead", "--no-attention-mask", "--batches-on-device", "--grads-preallocated")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=None, help="comma-separated presets or checkpoint folders "
                                                  "(default: pangu-350m on GPU, pangu-tiny on CPU)")
    p.add_argument("--configs", default="z1", help="comma-separated ds_configs/ names (z1) or JSON paths")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=3, help="first steps left out of the statistics")
    p.add_argument("--seq-len", type=int, default=None, help="default: 512 on GPU, 64 on CPU")
    p.add_argument("--data", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default=None,
                   help="override the configs' precision (default: theirs; bf16 for peer_torch)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--cache-dir", default=None, help="pre-tokenised data cache for all (default: theirs, .cache/data)")
    p.add_argument("--ours-args", default="", help="more train.py arguments for ours and the bare loop, one "
                                                   "shell-quoted string (e.g. --ours-args='--compile')")
    p.add_argument("--tools", default=",".join(TOOLS), help=f"which to run, of {','.join(TOOLS)}")
    p.add_argument("--compiled-backend", default="inductor",
                   help="peer_compiled's torch.compile backend (aot_eager: its loop without code generation, a "
                        "check on CPU; the timings then are not a compiled loop's)")
    p.add_argument("--work-dir", default=None, help="run logs and result JSONs (default: runs/compare-<time>)")
    p.add_argument("--out", default=None, help="write the table here: X.md and X.json (default: "
                                               "<work-dir>/compare.md)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per command before it is killed")
    p.add_argument("--cpu", action="store_true", help="run on CPU (DS_ACCELERATOR=cpu) even if a GPU is visible")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    a = p.parse_args(argv)
    a.tools = [t.strip() for t in a.tools.split(",") if t.strip()]
    bad = [t for t in a.tools if t not in TOOLS]
    if bad:
        p.error(f"--tools: unknown {bad}; choose from {','.join(TOOLS)}")
    if a.steps < 1 or a.warmup_steps < 0 or a.warmup_steps >= a.steps:
        p.error("need --steps >= 1 and 0 <= --warmup-steps < --steps")
    try:
        caller_paths(a, must_exist=("tokenizer", "data"), others=("cache_dir", "work_dir", "out"))
    except FileNotFoundError as e:
        p.error(str(e))
    return a


def caller_paths(a: argparse.Namespace, must_exist: tuple[str, ...], others: tuple[str, ...]) -> None:
    """Paths of the command line resolved against the caller's directory, then written relative to the checkout
    where they lie in it (the runs start in the checkout's root, so a path typed from elsewhere would name another
    file there; commands and results name no machine's folders). The inputs must exist, checked here rather than
    after every run has started and failed on them."""
    for name in (*must_exist, *others):
        v = getattr(a, name, None)
        if v is None:
            continue
        path = Path(v).expanduser().absolute()
        if name in must_exist and not path.exists():
            raise FileNotFoundError(f"--{name.replace('_', '-')}: not found: {v}")
        setattr(a, name, rel(path))


def cuda_visible() -> bool:
    """Whether a CUDA GPU is usable, without importing torch in this process (children do the real work)."""
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().endswith("True")
    except (OSError, subprocess.SubprocessError):
        return False


def table_paths(out: str | Path) -> tuple[Path, Path]:
    """--out X writes X.md and X.json. The suffix is added, not swapped: "levers_2.6b" must not become "levers_2.md"
    (Path.with_suffix would take ".6b" for a suffix); an explicit .md or .json ending is dropped first."""
    out = Path(out)
    if out.suffix in (".md", ".json"):
        out = out.with_suffix("")
    return out.parent / (out.name + ".md"), out.parent / (out.name + ".json")


def config_path(name: str) -> str:
    p = Path(name)
    if p.suffix == ".json" or p.exists():
        return rel(p)
    return rel(REPO / "ds_configs" / f"{name}.json")


def config_label(name: str) -> str:
    return Path(name).stem


def launcher(gpu: bool) -> list[str]:
    """The deepspeed launcher for one rank (on the first visible GPU)."""
    return launcher_command(1, gpu, os.environ)


def plan(args, gpu: bool, work: Path) -> list[dict]:
    """Every command to run, in order: [{tool, model, config, cmd, out, log}]."""
    models = [m.strip() for m in (args.models or ("pangu-350m" if gpu else "pangu-tiny")).split(",") if m.strip()]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    common = ["--seq-len", str(args.seq_len), "--seed", str(args.seed)]
    if args.data:
        common += ["--data", args.data]
    if args.tokenizer:
        common += ["--tokenizer", args.tokenizer]
    if args.cache_dir:
        common += ["--cache-dir", args.cache_dir]
    prec = ["--precision", args.precision] if args.precision else []
    steps = ["--warmup-steps", str(args.warmup_steps)]
    jobs = []
    for m in models:
        mtag = Path(m).name
        for tool, flags in (("peer_torch", ()), ("peer_compiled", (*COMPILED_FLAGS, "--compile-backend",
                                                                   args.compiled_backend))):
            if tool not in args.tools:
                continue
            out = work / f"{mtag}__{tool}.json"
            cmd = [sys.executable, "-u", "bench/peer_torch.py", "--model", m, "--steps", str(args.steps), *steps,
                   *common, *prec, *flags, "--out", rel(out)]
            jobs.append({"tool": tool, "model": m, "config": None, "cmd": cmd, "out": out,
                         "log": work / f"{mtag}__{tool}.log"})
        for c in configs:
            cpath, ctag = config_path(c), config_label(c)
            base = work / f"{mtag}__{ctag}"
            if "ours" in args.tools:
                run_dir = Path(f"{base}__ours")
                cmd = [*launcher(gpu), "train.py", "--ds", cpath, "--model", m, "--max-steps", str(args.steps),
                       *steps, "--run-dir", rel(run_dir), *common, *prec, *REFERENCE_LAYOUT,
                       *shlex.split(args.ours_args)]
                jobs.append({"tool": "ours", "model": m, "config": ctag, "cmd": cmd, "out": run_dir,
                             "log": Path(f"{base}__ours.log")})
            if "bare" in args.tools:
                out = Path(f"{base}__bare.json")
                cmd = [*launcher(gpu), "bench/bare_engine.py", "--ds", cpath, "--model", m, "--steps",
                       str(args.steps), *steps, *common, *prec, *shlex.split(args.ours_args), "--out", rel(out)]
                jobs.append({"tool": "bare", "model": m, "config": ctag, "cmd": cmd, "out": out,
                             "log": Path(f"{base}__bare.log")})
            if "peer_trainer" in args.tools:
                out = Path(f"{base}__peer_trainer.json")
                cmd = [*launcher(gpu), "bench/peer_trainer.py", "--ds", cpath, "--model", m, "--steps",
                       str(args.steps), *steps, *common, *prec, "--output-dir", rel(f"{base}__peer_trainer_out"),
                       "--out", rel(out)]
                jobs.append({"tool": "peer_trainer", "model": m, "config": ctag, "cmd": cmd, "out": out,
                             "log": Path(f"{base}__peer_trainer.log")})
    return jobs


def shown(cmd: list[str]) -> str:
    """A command as a user would type it (the interpreter shown as `python`)."""
    return shlex.join(["python" if cmd[0] == sys.executable else cmd[0], *cmd[1:]])


def child_env(gpu: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # ninja for op builds
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    if not gpu:
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_job(job: dict, env: dict, timeout: float) -> tuple[int, str]:
    """Run one command in its own process group (killed whole on timeout); console output to job['log']."""
    job["log"].parent.mkdir(parents=True, exist_ok=True)
    with open(job["log"], "w", encoding="utf-8") as log:
        log.write("$ " + shown(job["cmd"]) + "\n")
        log.flush()
        proc = subprocess.Popen(job["cmd"], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=30)
                    break
                except subprocess.TimeoutExpired:
                    continue
            return 124, f"timed out after {timeout:.0f}s"
    if rc == 0:
        return 0, ""
    lines = [ln.strip() for ln in job["log"].read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return rc, (errs[-1] if errs else (lines[-1] if lines else f"exit code {rc}"))[:300]


def read_ours(run_dir: Path) -> dict:
    from sftbench.runlog import load_run

    rr = load_run(run_dir)
    s = rr.final_summary()
    if s is None:
        return {"status": "error", "error": "no summary record"}
    meta = rr.meta.get(0, {})
    all_steps = rr.steps.get(0, [])
    steps = [r for r in all_steps if not r.get("warmup")]
    el = [r["elapsed_s"] for r in all_steps]
    periods = [b - a for a, b in zip(el, el[1:])][max(0, len(el) - 1 - len(steps)):]
    tokens_per_step = (meta.get("micro_batch") or 1) * (meta.get("grad_accum") or 1) * (meta.get("seq_len") or 0) \
        * (meta.get("world_size") or 1)
    return {"status": s.get("status"), "error": s.get("error"), "step_s_median": s.get("step_s_median"),
            "tokens_per_s": s.get("tokens_per_s"), "tokens_per_s_per_gpu": s.get("tokens_per_s_per_gpu"),
            "mfu_pct_logged": s.get("mfu_pct"), "torch_peak_alloc_mib": s.get("torch_peak_alloc_mib"),
            "torch_peak_reserved_mib": s.get("torch_peak_reserved_mib"),
            "host_rss_mib_peak": s.get("host_rss_mib_peak"),
            "gpu_mem_used_mib_peak": s.get("gpu_mem_used_mib_peak"), "first_loss": s.get("first_loss"),
            "final_loss": s.get("final_loss"), "device_name": meta.get("device_name"),
            "precision": meta.get("precision"), "world_size": meta.get("world_size"),
            "period_s_median": statistics.median(periods) if periods else None,
            "tokens_per_step": tokens_per_step, "seq_len": meta.get("seq_len"), "run_dir": rel(run_dir),
            # the same two keys as the peers' JSON, so every tool's measured steps are read alike (measured_steps)
            "step_times_s": [r.get("step_s") for r in all_steps], "warmup_steps": len(all_steps) - len(steps)}


def flops_per_token(model: str, seq_len: int) -> float:
    """The model's training FLOPs per token (the model seam's count, from its config; torch-free)."""
    from sftbench.metrics import flops_per_token as pangu_flops, linear_flops_per_token
    from sftbench.models.resolve import resolve
    from sftbench.presets import MODEL_TYPES, PRESETS

    folder = Path(model)
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8")) if folder.is_dir() else None
    if model in PRESETS or (cfg is not None and cfg.get("model_type", MODEL_TYPES[0]) in MODEL_TYPES):
        return pangu_flops(_pangu_config(model), seq_len)  # Pangu-α (a folder without model_type is one)
    return linear_flops_per_token(resolve(model).shape(), seq_len)  # each linear layer x6, attention scores+context


def _pangu_config(model: str):
    from types import SimpleNamespace

    folder = Path(model)
    if folder.is_dir():
        return SimpleNamespace(**json.loads((folder / "config.json").read_text(encoding="utf-8")))
    from sftbench.presets import PRESETS  # torch-free, like the rest of this process (pangu.py would load torch)
    return SimpleNamespace(**PRESETS[model])


def mfu(res: dict | None, flops_tok: float | None, default_precision: str | None) -> float | None:
    from sftbench.metrics import peak_tflops

    if not res or res.get("status") != "ok" or not flops_tok:
        return None
    per_gpu = res.get("tokens_per_s_per_gpu") or res.get("tokens_per_s")
    peak = peak_tflops(res.get("device_name"), res.get("precision") or default_precision or "bf16")
    if not per_gpu or not peak:
        return None
    return 100.0 * flops_tok * per_gpu / (peak * 1e12)


def _ok(res: dict | None, key: str):
    return res.get(key) if res and res.get("status") == "ok" else None


def measured_steps(res: dict | None) -> list[float]:
    """The step times of a tool's measured (non-warm-up) steps; [] where the run failed or kept none."""
    if not res or res.get("status") != "ok":
        return []
    times = res.get("step_times_s") or []
    return [t for t in times[res.get("warmup_steps") or 0:] if isinstance(t, (int, float))]


def resolved(a: dict | None, b: dict | None) -> bool | None:
    """Whether two runs' measured step times do not overlap, so a ratio of their medians is decided by these steps.

    None where either run has no step times. A few measured steps on a shared host spread by 10-50%
    (docs/performance.md), so a median ratio whose ranges overlap can flip on the next call."""
    ta, tb = measured_steps(a), measured_steps(b)
    if not ta or not tb:
        return None
    return max(ta) < min(tb) or max(tb) < min(ta)


def build_rows(args, jobs: list[dict], results: dict) -> list[dict]:

    rows = []
    pairs = []
    for j in jobs:
        if j["config"] is not None and (j["model"], j["config"]) not in pairs:
            pairs.append((j["model"], j["config"]))
    if not pairs:  # only the plain PyTorch loops were run
        pairs = [(j["model"], None) for j in jobs]
    for m, c in pairs:
        try:
            flops_tok = flops_per_token(m, args.seq_len)
        except Exception:  # noqa: BLE001  (an unreadable folder: the table shows MFU as n/a)
            flops_tok = None
        ours, bare = results.get(("ours", m, c)), results.get(("bare", m, c))
        pt, tr = results.get(("peer_torch", m, None)), results.get(("peer_trainer", m, c))
        pc = results.get(("peer_compiled", m, None))
        for r in (ours, bare, pt, pc, tr):
            if r and r.get("status") == "ok":
                r["mfu_pct"] = mfu(r, flops_tok, args.precision)
        o_tok, o_step = _ok(ours, "tokens_per_s"), _ok(ours, "step_s_median")
        b_step = _ok(bare, "step_s_median")

        def ratio(peer):
            t = _ok(peer, "tokens_per_s")
            return o_tok / t if o_tok and t else None

        rows.append({
            "model": m, "config": c, "flops_per_token": flops_tok,
            "ours_step_s": o_step, "ours_tokens_per_s": o_tok, "ours_mfu_pct": _ok(ours, "mfu_pct"),
            "bare_step_s": b_step, "bare_tokens_per_s": _ok(bare, "tokens_per_s"),
            "harness_overhead_pct": 100.0 * (o_step / b_step - 1.0) if o_step and b_step else None,
            "peer_torch_tokens_per_s": _ok(pt, "tokens_per_s"),
            "peer_compiled_tokens_per_s": _ok(pc, "tokens_per_s"), "peer_compiled_compile_s": _ok(pc, "compile_s"),
            "peer_trainer_tokens_per_s": _ok(tr, "tokens_per_s"),
            "ours_over_peer_torch": ratio(pt), "ours_over_peer_compiled": ratio(pc),
            "ours_over_peer_trainer": ratio(tr),
            "overhead_resolved": resolved(ours, bare), "peer_torch_resolved": resolved(ours, pt),
            "peer_compiled_resolved": resolved(ours, pc), "peer_trainer_resolved": resolved(ours, tr),
            "results": {"ours": ours, "bare": bare, "peer_torch": pt, "peer_compiled": pc, "peer_trainer": tr},
        })
    return rows


def _f(v, fmt: str, na: str = "n/a") -> str:
    return na if v is None else format(v, fmt)


def _cell(res: dict | None, v, fmt: str) -> str:
    if res is None:
        return "—"
    if res.get("status") != "ok":
        return res.get("status") or "failed"
    return _f(v, fmt)


def _range(res: dict | None) -> str:
    t = measured_steps(res)
    return f" ({min(t):.3f}-{max(t):.3f})" if len(t) > 1 else ""


def _approx(ok: bool | None) -> str:
    return "~" if ok is False else ""


def _ratio_cell(row: dict, peer: str) -> str:
    """ours / peer as the table shows it: "2.32x", "~" in front where the steps do not decide it, n/a without one."""
    ratio = row[f"ours_over_{peer}"]
    return _approx(row.get(f"{peer}_resolved")) + _f(ratio, ".2f") + ("x" if ratio is not None else "")


def markdown(args, rows: list[dict], device: str) -> str:
    head = ["model", "config", "ours s/step", "ours tok/s", "ours MFU", "bare tok/s", "harness overhead",
            "peer_torch tok/s", "peer_compiled tok/s (compile s)", "peer_trainer tok/s", "ours / peer_torch",
            "ours / peer_compiled", "ours / peer_trainer"]
    lines = [f"# train.py against its peers ({device})", "",
             f"{args.steps} steps ({args.warmup_steps} warm-up, left out), micro batch 1 x grad accum 8, "
             f"seq {args.seq_len}, precision {args.precision or 'of the config (peer_torch: bf16 autocast)'}; "
             f"medians over the measured steps, (fastest-slowest) measured step beside ours; tok/s counts padded "
             f"tokens; ratios > 1 mean ours is faster; ~ marks a ratio or overhead whose two runs' measured steps "
             f"overlap in time: these steps do not decide it, and the next call may reverse it.",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        res = r["results"]
        lines.append("| " + " | ".join([
            Path(r["model"]).name, r["config"] or "—",
            _cell(res["ours"], r["ours_step_s"], ".3f") + _range(res["ours"]),
            _cell(res["ours"], r["ours_tokens_per_s"], ",.0f"),
            _cell(res["ours"], r["ours_mfu_pct"], ".1f") + ("%" if r["ours_mfu_pct"] is not None else ""),
            _cell(res["bare"], r["bare_tokens_per_s"], ",.0f"),
            _approx(r.get("overhead_resolved")) + _f(r["harness_overhead_pct"], "+.1f")
            + ("%" if r["harness_overhead_pct"] is not None else ""),
            _cell(res["peer_torch"], r["peer_torch_tokens_per_s"], ",.0f"),
            _cell(res["peer_compiled"], r["peer_compiled_tokens_per_s"], ",.0f")
            + (f" ({r['peer_compiled_compile_s']:.0f})" if r["peer_compiled_compile_s"] is not None else ""),
            _cell(res["peer_trainer"], r["peer_trainer_tokens_per_s"], ",.0f"),
            _ratio_cell(r, "peer_torch"), _ratio_cell(r, "peer_compiled"), _ratio_cell(r, "peer_trainer"),
        ]) + " |")
    fails = [(t, r["model"], r["config"], v.get("error")) for r in rows for t, v in r["results"].items()
             if v and v.get("status") != "ok"]
    if fails:
        lines += ["", "Failed runs:"] + [f"- {t} {Path(m).name} {c or ''}: {e}" for t, m, c, e in fails]
    lines += ["", "harness overhead = ours' median step time / the bare loop's (same engine and batches, no "
                  "logging, probes or per-step synchronisation) - 1. peer_torch: plain PyTorch loop (fp32 weights, "
                  "bf16 autocast, fused AdamW, attention mask passed); peer_compiled: that loop as a performance "
                  "engineer writes it (torch.compile mode reduce-overhead: inductor's CUDA graphs; no attention "
                  "mask; batches on the GPU; gradients pre-allocated), its compile time (the warm-up steps' time "
                  "beyond as many measured steps) in brackets; peer_trainer: transformers Trainer with the "
                  "same DeepSpeed JSON. peer_torch and peer_compiled do not use the DeepSpeed config: the same run "
                  "is shown on every row of a model."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.cpu or os.environ.get("DS_ACCELERATOR") == "cpu":
        gpu = False
    else:
        gpu = _has_nvidia() if args.dry_run else cuda_visible()
    if args.seq_len is None:
        args.seq_len = 512 if gpu else 64
    work = Path(args.work_dir) if args.work_dir else REPO / "runs" / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    jobs = plan(args, gpu, work)
    env = child_env(gpu)
    if args.dry_run:
        if not gpu:
            print("# environment: DS_ACCELERATOR=cpu")
        for j in jobs:
            print(shown(j["cmd"]))
        return 0

    work.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    t_all = time.time()
    for i, j in enumerate(jobs, 1):
        tag = f"[{i}/{len(jobs)}] {j['tool']} {Path(j['model']).name} {j['config'] or ''}".rstrip()
        print(f"{tag}: {shown(j['cmd'])}", flush=True)
        t0 = time.time()
        rc, err = run_job(j, env, args.timeout)
        key = (j["tool"], j["model"], j["config"])
        if j["tool"] == "ours":
            res = read_ours(j["out"]) if j["out"].is_dir() else {"status": "error", "error": err or "no run dir"}
            if rc != 0 and res.get("status") == "ok":
                res = {"status": "error", "error": err}
        elif rc == 0 and j["out"].is_file():
            res = json.loads(j["out"].read_text(encoding="utf-8"))
        else:
            res = {"status": "timeout" if rc == 124 else "error", "error": err or f"exit code {rc}, no result"}
        res["log"] = rel(j["log"])
        results[key] = res
        st = (f"{res['step_s_median']:.4f} s/step, {res['tokens_per_s']:.0f} tok/s" if res.get("status") == "ok"
              and res.get("step_s_median") else f"{res.get('status')}: {res.get('error')}")
        print(f"{tag}: {st} ({time.time() - t0:.0f}s)", flush=True)

    rows = build_rows(args, jobs, results)
    devices = {v.get("device_name") for v in results.values() if v.get("status") == "ok" and v.get("device_name")}
    device = ", ".join(sorted(devices)) or ("GPU" if gpu else "CPU")
    md = markdown(args, rows, device)
    print()
    print(md, end="")
    out_md, out_json = table_paths(args.out or work / "compare")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md, encoding="utf-8")
    settings = {k: getattr(args, k) for k in ("steps", "warmup_steps", "seq_len", "data", "tokenizer", "precision",
                                              "seed", "tools", "cache_dir", "ours_args")}
    out_json.write_text(json.dumps({"created": time.time(), "device": device, "accelerator": "cuda" if gpu else "cpu",
                                    "wall_s": time.time() - t_all, "settings": settings, "rows": rows},
                                   indent=1, default=str) + "\n", encoding="utf-8")
    print(f"\nwritten: {rel(out_md)}, {rel(out_json)}; logs in {rel(work)}")
    ok = all(v.get("status") == "ok" for v in results.values())
    return 0 if ok else 1


def _has_nvidia() -> bool:
    """For --dry-run: a cheap guess whether this machine has an NVIDIA GPU (no torch import)."""
    import shutil
    return shutil.which("nvidia-smi") is not None


if __name__ == "__main__":
    sys.exit(main())
