#!/usr/bin/env python
"""One lever at a time: train.py on one GPU with variants of flags, config keys and environment, one after another;
a table of step time, tokens/s, MFU, speed-up over the first variant of the same config, and the first and last
loss.

    python bench/levers.py --models pangu-2.6b --steps 8 --warmup-steps 3 --out results/levers \\
        "z1 --compile off" "z1" "z1 set:timers.throughput.enabled=false" \\
        "z2_offload_5e8" "z2_offload_5e8 set:data_types.grad_accum_dtype=fp32"
    python bench/levers.py --models pangu-tiny --seq-len 64 --steps 3 --warmup-steps 1 "z1" "z1 --compile"  # CPU

A variant is one string: a ``ds_configs/`` name (``z1``), ``none`` or a JSON path first, then any of
``--train-py-flag [value]``, ``set:dotted.key=VALUE`` (VALUE read as JSON, else as a string; the changed config is
written to the work directory and logged in the run's meta record as every config is) and ``env:NAME=VALUE``.
A variant without flags runs train.py's defaults (``--compile auto`` and ``--cuda-graphs auto``, both eager today);
write "z1 --cuda-graphs on" or "z1 --compile model" for a lever. The baseline of a variant is the first variant of the
same model and config in the order given (put the unchanged or eager one first); "x base" is its step time over the
variant's. The loss columns show whether a lever changed what is computed (same seed, same batches: a speed lever
must leave them equal within bf16 noise).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout, for sftbench
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sftbench.paths import REPO  # noqa: E402
from sftbench.sweep import REFERENCE_LAYOUT  # noqa: E402
from compare import (caller_paths, child_env, config_path, cuda_visible, launcher, measured_steps, mfu,  # noqa: E402
                     flops_per_token, read_ours, rel, resolved, run_job, shown, table_paths)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("variants", nargs="+", help='e.g. "z1" "z1 --compile" "z2_offload_5e8 set:key=value env:K=V"')
    p.add_argument("--models", default=None, help="comma-separated presets (default: pangu-350m on GPU, "
                                                  "pangu-tiny on CPU)")
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per run, warm-up included")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--seq-len", type=int, default=None, help="default: 512 on GPU, 64 on CPU")
    p.add_argument("--data", default=None)
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run before it is killed")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop starting variants when this budget is spent (each run is cut at it); the table "
                        "lists what did not run as 'not run'")
    p.add_argument("--work-dir", default=None, help="run logs (default: runs/levers-<time>)")
    p.add_argument("--out", default=None, help="write the table here: X.md and X.json")
    p.add_argument("--cpu", action="store_true", help="run on CPU (DS_ACCELERATOR=cpu)")
    p.add_argument("--collect", default=None, metavar="DIR[,DIR...]",
                   help="run nothing: table the runs these earlier calls' --work-dir folders hold for the variants "
                        "given (a call stopped by a time limit keeps its finished runs there); a ratio is only "
                        "given against a baseline of the same call")
    a = p.parse_args(argv)
    if a.steps < 1 or a.warmup_steps < 0 or a.warmup_steps >= a.steps:
        p.error("need --steps >= 1 and 0 <= --warmup-steps < --steps")
    try:
        a.parsed = [parse_variant(v) for v in a.variants]
        caller_paths(a, must_exist=("tokenizer", "data"), others=("work_dir", "out"))
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return a


def parse_variant(text: str) -> dict:
    toks = shlex.split(text)
    if not toks:
        raise ValueError("empty variant")
    v = {"text": text, "config": toks[0], "flags": [], "sets": {}, "env": {}}
    for t in toks[1:]:
        if t.startswith("set:"):
            key, sep, val = t[4:].partition("=")
            if not sep or not key:
                raise ValueError(f"variant {text!r}: {t!r} must be set:dotted.key=VALUE")
            try:
                v["sets"][key] = json.loads(val)
            except json.JSONDecodeError:
                v["sets"][key] = val
        elif t.startswith("env:"):
            key, sep, val = t[4:].partition("=")
            if not sep or not key:
                raise ValueError(f"variant {text!r}: {t!r} must be env:NAME=VALUE")
            v["env"][key] = val
        else:
            v["flags"].append(t)
    if v["sets"] and v["config"] == "none":
        raise ValueError(f"variant {text!r}: set: needs a DeepSpeed config, not none")
    v["plain"] = not (v["flags"] or v["sets"] or v["env"])
    return v


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", text).strip("_")[:80]


def derived_config(name: str, sets: dict, dest: Path) -> str:
    """The config with the variant's set: keys changed, written to dest; returns its path for train.py."""
    src = config_path(name)
    cfg = json.loads((REPO / src if not Path(src).is_absolute() else Path(src)).read_text(encoding="utf-8"))
    out = copy.deepcopy(cfg)
    for key, val in sets.items():
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"set:{key}: {part!r} is not an object in {src}")
        node[parts[-1]] = val
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n", encoding="utf-8")
    return rel(dest)


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _range(res: dict) -> str:
    t = measured_steps(res)
    return f" ({min(t):.3f}-{max(t):.3f})" if t else ""


def collected_run(dirs: list[Path], model: str, variant: str) -> tuple[int, Path] | None:
    """The first run of this model and variant in the earlier calls' work folders: (which call, its run folder)."""
    for k, d in enumerate(dirs):
        for run_dir in sorted(d.glob(f"{model}__[0-9][0-9]_{slug(variant)}")):
            if run_dir.is_dir():
                return k, run_dir
    return None


def markdown(rows: list[dict], devices: list[str], steps: int, warmup: int, seq: int, seed: int,
             calls: list[str] | None) -> str:
    runs = "" if calls else f"{steps} steps ({warmup} warm-up) of 8 x {seq} tokens per GPU, seed {seed}; "
    lines = [f"Levers on {', '.join(devices)}: {runs}medians of the measured steps, (fastest-slowest) measured step "
             "beside them. x base: the "
             "first variant of the same model and config over this one; ~ marks a ratio whose two runs' measured "
             "steps overlap in time (these steps do not decide it).", ""]
    if calls:
        def shape(k: int) -> str:
            got = sorted({(len(r.get("step_times_s") or []), r.get("warmup_steps"), r.get("seq_len"))
                          for r in rows if r.get("call") == k})
            return ", ".join(f"{n} steps ({w} warm-up) x {q} tokens" for n, w, q in got) or "no run used"
        lines += ["Collected from earlier calls' runs, so the steps are each run's own and a ratio is given only "
                  "within one call: " + "; ".join(f"call {k + 1}: `{c}`, {shape(k)}" for k, c in enumerate(calls)),
                  ""]
    head = ["model", "variant"] + (["call"] if calls else []) + [
        "status", "s/step", "tokens/s", "MFU %", "x base", "loss first", "loss last", "GPU peak MiB", "host RSS MiB"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        ok = r.get("status") == "ok"
        xb = r.get("x_base")
        cells = [r["model"], f"`{r['variant']}`"] + ([str(r["call"] + 1) if "call" in r else "-"] if calls else []) + [
            f"{r.get('status')}{'' if ok else ': ' + str(r.get('error'))[:80]}",
            _f(r.get("step_s_median"), ".4f") + (_range(r) if ok else ""),
            _f(r.get("tokens_per_s"), ",.0f"), _f(r.get("mfu_pct"), ".1f"),
            ("~" if xb is not None and r.get("x_base_resolved") is False else "") + _f(xb, ".2f"),
            _f(r.get("first_loss"), ".4f"), _f(r.get("final_loss"), ".4f"),
            _f(r.get("gpu_mem_used_mib_peak"), ",.0f"), _f(r.get("host_rss_mib_peak"), ",.0f")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(args, rows: list[dict], gpu: bool, seq: int, work: Path, calls: list[str] | None,
                 final: bool) -> None:
    """The table so far, written after every run: a call stopped by its time limit still leaves what finished."""
    devices = sorted({r.get("device_name") for r in rows if r.get("device_name")}) or ["GPU" if gpu else "CPU"]
    md = markdown(rows, devices, args.steps, args.warmup_steps, seq, args.seed, calls)
    if final:
        print()
        print(md, end="")
    out_md, out_json = table_paths(args.out or work / "levers")
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(md, encoding="utf-8")
    shape = {} if calls else {"seq_len": seq, "steps": args.steps, "warmup_steps": args.warmup_steps}  # else per row
    out_json.write_text(json.dumps({"created": time.time(), "devices": devices, **shape, "collected_from": calls,
                                    "complete": final, "rows": rows}, indent=1, default=str) + "\n",
                        encoding="utf-8")


def run_variant(args, v: dict, m: str, name: str, work: Path, gpu: bool, common: list[str],
                deadline: float | None) -> dict:
    """train.py for one variant of one model; its result (read_ours), or status 'not run' once --max-minutes is
    spent."""
    if v["config"] == "none":
        ds = "none"
    elif v["sets"]:
        try:
            ds = derived_config(v["config"], v["sets"], work / f"{name}.json")
        except (OSError, ValueError) as e:  # a missing config file or a set: through a non-object key
            sys.exit(f"error: variant {v['text']!r}: {e}")
    else:
        ds = config_path(v["config"])
    run_dir = work / name
    cmd = [*launcher(gpu), "train.py", "--ds", ds, "--model", m, "--run-dir", rel(run_dir), *common, *REFERENCE_LAYOUT,
           *v["flags"]]
    env = {**child_env(gpu), **v["env"]}
    job = {"cmd": cmd, "log": work / f"{name}.log"}
    left = deadline - time.time() if deadline else None
    if left is not None and left < 30:
        return {"status": "not run", "error": "--max-minutes spent"}
    print(f"[{Path(m).name}] {v['text']}: {shown(cmd)}", flush=True)
    t0 = time.time()
    rc, err = run_job(job, env, args.timeout if left is None else min(args.timeout, left))
    res = read_ours(run_dir) if run_dir.is_dir() else {"status": "error", "error": err or "no run dir"}
    if rc != 0 and res.get("status") == "ok":
        res = {"status": "error", "error": err}
    if rc == 124:
        res = {"status": "timeout", "error": err}
    return {**res, "wall_s": time.time() - t0, "log": rel(job["log"])}


def collect_variant(calls: list[str], m: str, v: dict) -> dict:
    """One variant's run from the earlier calls' work folders (``call``: which of them), or status 'not run'."""
    found = collected_run([Path(c) for c in calls], Path(m).name, v["text"])
    if found is None:
        return {"status": "not run", "error": "in none of the --collect folders"}
    call, run_dir = found
    return {**read_ours(run_dir), "call": call, "wall_s": None}


def main(argv=None) -> int:
    args = parse_args(argv)
    gpu = False if args.cpu else cuda_visible()
    seq = args.seq_len or (512 if gpu else 64)
    models = [m.strip() for m in (args.models or ("pangu-350m" if gpu else "pangu-tiny")).split(",") if m.strip()]
    calls = [c.strip() for c in args.collect.split(",") if c.strip()] if args.collect else None
    if calls:
        missing = [c for c in calls if not Path(c).is_dir()]
        if missing:
            sys.exit(f"error: --collect: no such folder: {', '.join(missing)}")
    work = Path(args.work_dir) if args.work_dir else REPO / "runs" / f"levers-{time.strftime('%Y%m%d-%H%M%S')}"
    if not calls:
        work.mkdir(parents=True, exist_ok=True)
    common = ["--seq-len", str(seq), "--seed", str(args.seed), "--max-steps", str(args.steps),
              "--warmup-steps", str(args.warmup_steps)]
    for flag in ("data", "tokenizer"):
        if getattr(args, flag):
            common += [f"--{flag}", getattr(args, flag)]
    rows = []
    deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    for m in models:
        base_of: dict[str, dict] = {}
        for i, v in enumerate(args.parsed):
            row = {"model": Path(m).name, "variant": v["text"], "config": v["config"]}
            res = (collect_variant(calls, m, v) if calls else
                   run_variant(args, v, m, f"{Path(m).name}__{i:02d}_{slug(v['text'])}", work, gpu, common, deadline))
            if res["status"] == "not run":
                rows.append({**row, **res})
                continue
            # the run's own sequence length (a collected run's may not be this machine's default)
            res["mfu_pct"] = mfu(res, flops_per_token(m, res.get("seq_len") or seq), "bf16")
            res.update(row)
            if v["config"] not in base_of:  # the first variant of a config is its baseline
                base_of[v["config"]] = res
            base = base_of[v["config"]]
            ok = res.get("status") == "ok" and res.get("step_s_median")
            same_call = base.get("call") == res.get("call")  # collected runs: a ratio only within one call
            res["x_base"] = (base["step_s_median"] / res["step_s_median"]
                             if ok and same_call and base.get("status") == "ok" and base.get("step_s_median")
                             else None)
            res["x_base_resolved"] = resolved(base, res) if res["x_base"] is not None and res is not base else None
            rows.append(res)
            if not calls:
                st = (f"{res['step_s_median']:.4f} s/step, {res['tokens_per_s']:.0f} tok/s, MFU "
                      f"{_f(res['mfu_pct'], '.1f')}%" if ok else f"{res.get('status')}: {res.get('error')}")
                print(f"[{Path(m).name}] {v['text']}: {st} ({res['wall_s']:.0f}s)", flush=True)
                write_tables(args, rows, gpu, seq, work, calls, final=False)

    write_tables(args, rows, gpu, seq, work, calls, final=True)
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
