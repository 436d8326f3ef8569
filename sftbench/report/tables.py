"""The table and what goes beside it: the reference's cells for one run, ``Table`` / ``build_table`` (failures as
numbered footnotes), the hardware preamble, the epoch check and the recommendation per model and GPU count."""
from __future__ import annotations

import functools
import platform
import re
from dataclasses import dataclass, field
from pathlib import Path

from sftbench import memory, reference
from sftbench import nodes as nodes_mod
from sftbench.fmt import fmt_duration, fmt_e, fmt_num, fmt_sig, fmt_step, skipped_steps_text
from sftbench.metrics import StepStats, cpu_model
from sftbench.report.runs import Row, scrub

# The reference's header row, left to right, with English; its "offloard param" is spelled right here (NOTES say so).
REF_HEADERS = [
    ("模型", "model"),
    ("整体耗时/epoch", "epoch time"),
    ("单条样本耗时", "s/it"),
    (None, "s/sample"),
    ("内存使用量", "host RAM"),
    ("显存使用量", "GPU memory"),
    ("GPU型号和数量", "GPU model and count"),
    ("fp16", None),
    ("bf16", None),
    ("deepspeed stage", None),
    ("offload optimizer", None),
    ("pin memory", None),
    ("offload param", None),
    ("overlap comm", None),
    ("allgather bucket size", None),
    ("stage3 max live parameters", None),
]
# Settings the reference held fixed: a column each where the runs of one report differ in them.
SETTING_COLUMNS = (("seq_len", "seq len"), ("micro_batch", "micro batch"), ("grad_accum", "grad accum"))
EXTRA_HEADERS = ["tokens/s/GPU", "TFLOPS/GPU", "MFU", "GPU MiB pred / meas", "host MiB pred / meas", "ref row", "run"]
STATUS_LABEL = {"oom": "OOM", "cuda_error": "CUDA Error", "timeout": "Timeout", "error": "Error",
                "interrupted": "Interrupted", "killed": "Killed (signal 9)", "dead": "Dead", "running": "Running",
                "stalled?": "Stalled?", None: "No summary"}
UNFINISHED = ("running", "stalled?")  # no summary yet, processes not known to be gone (sftbench.liveness)


def _tf(v) -> str:
    return "-" if v is None else ("true" if v else "false")


def config_cells(r: Row) -> list[str]:
    """fp16, bf16, deepspeed stage, offload optimizer, pin memory, offload param, overlap comm, allgather bucket
    size, stage3 max live parameters: as the reference filled them ('-' where a setting does not apply)."""
    prec = r.precision
    fp16, bf16 = _tf(prec == "fp16"), _tf(prec == "bf16")
    d = r.desc
    stage = d.get("zero_stage")
    if stage is None:
        return [fp16, bf16, "-", "-", "-", "-", "-", "-", "-"]
    if stage < 2:
        return [fp16, bf16, str(stage), "-", "-", "-", "-", "-", "-"]
    off = d.get("offload_optimizer") is not None
    pin = _tf(d.get("pin_memory")) if off else "-"
    offp = _tf(d.get("offload_param") is not None) if stage == 3 else "-"
    live = fmt_e(d.get("stage3_max_live_parameters")) if stage == 3 else "-"
    return [fp16, bf16, str(stage), _tf(off), pin, offp, _tf(bool(d.get("overlap_comm"))),
            fmt_e(d.get("allgather_bucket_size")), live]


def gpu_cell(r: Row) -> str:
    if r.accelerator == "cpu":
        return f"{r.world}*CPU"
    return f"{r.world}*{r.device_name}"


def mem_cell(r: Row) -> str:
    if r.accelerator == "cpu":
        return "-"
    v = r.gpu_mib
    return f"{r.world}*{v:.0f}MB" if v is not None else "-"


def pred_meas(pred: float | None, meas: float | None) -> str:
    if pred is None and meas is None:
        return "-"
    return f"{fmt_num(pred)} / {fmt_num(meas)}"


# The notes under the table: here, not with the writers, since Table.notes picks them (the compiled one only where
# a row ran compiled).
COMPILED_NOTE = "`(compiled: model)`"
NOTES = [
    "`~` = estimated epoch time: steps per epoch × median step time (`epoch_s_est`); without `~` it was measured "
    "over a full epoch (`epoch_s_measured`).",
    "单条样本耗时 is seconds per optimizer step (s/it), as the reference measured it; `s/sample` divides it by the "
    "samples in one step (micro batch × gradient accumulation × GPUs).",
    "内存使用量: sum over ranks of each process's peak RSS (several nodes: the largest node's sum). 显存使用量: `N*` "
    "peak NVML used memory of each GPU in MiB (what nvidia-smi shows), the largest over the ranks.",
    "Predicted memory: `sftbench/memory.py` before the run (DeepSpeed's ZeRO formulas plus buffers, activations, "
    "logits and CUDA context); measured: the NVML peak per GPU and the summed RSS.",
    COMPILED_NOTE + " after s/it: the run used torch.compile (`train.py --compile model|blocks`; off by default, since "
    "no configuration was measured faster compiled); every other row ran without it.",
    "offload param: the reference's header spells it \"offloard param\".",
    "ref row: the row of the reference table (`ds_configs/README.md`) with the same model, config and GPU count, "
    "of the same precision where it has one; otherwise of its precision (the reference's 3-GPU rows are fp16 on "
    "V100), so compare the fp16/bf16 columns too.",
]


@dataclass
class Table:
    rows: list[list[str]]
    groups: list[int]  # rows per group (for rowspan)
    footnotes: list[str]  # failures, numbered: the GPU-memory cell says "OOM [n]"
    any_estimated: bool
    any_compiled: bool = False
    remarks: list[str] = field(default_factory=list)  # per-run notes (skipped steps left out)
    settings: list[tuple[str, str]] = field(default_factory=list)  # SETTING_COLUMNS that vary: columns of their own
    unmeasured: list[str] = field(default_factory=list)  # ok runs without a measured step (not failures)
    unfinished: list[str] = field(default_factory=list)  # running / stalled? runs (no summary yet)

    @property
    def notes(self) -> list[str]:
        return [n for n in NOTES if self.any_compiled or not n.startswith(COMPILED_NOTE)] + self.remarks


def ref_rows(r: "Row") -> list[int]:
    """The reference rows this run compares with, by the one rule in ``reference.reference_rows`` (applied now, so
    older sweep folders follow it too); the plan entry's own list where the map cannot be read."""
    if r.accelerator == "cpu":
        return []  # the reference measured GPUs only
    try:
        ref = _reference_map()
    except (OSError, ValueError):
        return list(r.entry.get("ref_rows") or [])
    return reference.reference_rows(ref, Path(r.model).name, r.config_name, r.precision, r.world)


@functools.lru_cache(maxsize=1)
def _reference_map():
    return reference.read_reference_map()


def varying_settings(rows: list[Row]) -> list[tuple[str, str]]:
    """The SETTING_COLUMNS whose value differs between the rows."""
    return [(k, h) for k, h in SETTING_COLUMNS if len({getattr(r, k) for r in rows}) > 1]


def build_table(rows: list[Row]) -> Table:
    out, foot, groups, remarks, unmeasured, unfinished = [], [], [], [], [], []
    settings = varying_settings(rows)
    any_est = False
    cur = None
    for r in rows:
        if r.group != cur:
            groups.append(0)
            cur = r.group
        groups[-1] += 1
        cfg = config_cells(r) + ["-" if getattr(r, k) is None else str(getattr(r, k)) for k, _ in settings]
        extra_tail = [",".join(str(x) for x in ref_rows(r)) or "-", r.run]
        for w in r.warnings:
            remarks.append(f"`{r.run}`: warning: {w}")
        if (r.summary or {}).get("eval_loss") is not None:  # a fine-tuning run with --eval-data / --eval-split
            remarks.append(f"`{r.run}`: eval loss {r.summary['eval_loss']:.4f} at its last evaluation")
        if r.nodes > 1:
            seen = len(nodes_mod.ranks_by_node(r.rank_metas))
            remarks.append(f"`{r.run}`: {r.nodes} nodes; host RAM is the largest node's (the peak RSS of its ranks "
                           f"summed), GPU memory per rank; logs of {seen} of the {r.nodes} nodes read"
                           + ("" if seen >= r.nodes else " (the others: give their folders with --node-dir)"))
        skipped = (r.summary or {}).get("skipped_steps") or 0
        if r.ok and skipped:
            remarks.append(f"`{r.run}`: {skipped_steps_text(skipped, r.meta.get('precision'))}; like warm-up they "
                           f"are left out, {(r.summary or {}).get('measured_steps')} step(s) measured.")
        if r.ok:
            remarks += prediction_misses(r)
            ep, est = r.epoch
            any_est = any_est or (est and ep is not None)
            epoch = ("~" if est and ep is not None else "") + fmt_duration(ep)
            host = r.host_rss_mib
            mfu = (r.summary or {}).get("mfu_pct")
            step = fmt_step(r.step_s) + ("" if r.compile == "off" else f" (compiled: {r.compile})")
            cells = [r.model_label, epoch, step, fmt_num(r.s_per_sample, 3, "s"),
                     f"{host / 1024:.1f}G" if host is not None else "-", mem_cell(r), gpu_cell(r), *cfg,
                     fmt_num((r.summary or {}).get("tokens_per_s_per_gpu")),
                     fmt_sig((r.summary or {}).get("tflops")), fmt_num(mfu, 1, "%") if mfu is not None else "-",
                     pred_meas(r.pred_gpu, r.gpu_mib if r.accelerator == "cuda" else None),
                     pred_meas(r.pred_host, r.host_rss_mib), *extra_tail]
        else:
            label = STATUS_LABEL.get(r.status, str(r.status))
            if r.unmeasured:  # finished as asked, only too short for numbers: said so, not filed as a failure
                label = "no measured step"
                unmeasured.append(scrub(f"`{r.run}`: {_why_unmeasured(r)}"))
                cell = label
            elif r.status in UNFINISHED:
                unfinished.append(scrub(f"`{r.run}`: {label}: {r.live_note}"))
                cell = label
            else:
                err = (r.summary or {}).get("error") or r.live_note or (
                    "the run left no summary (still running, or killed before the sweep could record it)"
                    if not r.summary else "")
                synth = " (recorded by the sweep)" if (r.summary or {}).get("synthesized") else ""
                foot.append(scrub(f"{r.run}: {label}{synth}: {err}".rstrip(": ")))
                cell = f"{label} [{len(foot)}]"
            cells = [r.model_label, "-", "-", "-", "-", cell, gpu_cell(r), *cfg, "-", "-", "-",
                     pred_meas(r.pred_gpu, None), pred_meas(r.pred_host, None), *extra_tail]
        out.append(cells)
    return Table(out, groups, foot, any_est, any(r.ok and r.compile != "off" for r in rows), remarks, settings,
                 unmeasured, unfinished)


def prediction_misses(r: Row) -> list[str]:
    """A remark for each memory prediction of an ok run outside ``memory.TOLERANCE_PCT`` of its measurement, naming
    where the miss lies. GPU: the part (outside torch's pool: context and NCCL; or the pool) that carries most of
    the gap, with both numbers; in the pool, what torch's allocator reserved beyond its allocated peak (segments the
    predictor does not model) where that covers at least half the gap, else a term the predictor knows it leaves
    out for this config (``memory.unmodelled_terms``), else the prediction's largest term. Host: the largest term."""
    out = []
    s = r.summary or {}
    for kind, pred, meas in (("GPU", r.pred_gpu, r.gpu_mib if r.accelerator == "cuda" else None),
                             ("host", r.pred_host, r.host_rss_mib)):
        err = memory.error_pct(pred, meas)
        if err is None or abs(err) <= memory.TOLERANCE_PCT:
            continue
        breakdown = (r.predicted or {}).get(f"{kind.lower()}_breakdown_mib")
        term = memory.largest_term(breakdown)
        why = f"the prediction's largest term is `{term}`" if term else "the prediction kept no breakdown"
        miss = (memory.locate_gpu_miss(breakdown, pred, meas, s.get("torch_peak_reserved_mib"),
                                       s.get("torch_peak_alloc_mib"), r.meta.get("ds_config")) if kind == "GPU"
                else None)
        if miss is not None:
            (po, mo), (pp, mp) = miss["outside"], miss["pool"]
            if miss["where"] == "outside":
                why = (f"outside torch's pool (CUDA context, NCCL) it measured {mo:,.0f} MiB against the "
                       f"{po:,.0f} predicted (`cuda_context` + `nccl`); the pool {mp:,.0f} against {pp:,.0f}")
            else:
                why = f"torch's pool peaked at {mp:,.0f} MiB against the {pp:,.0f} predicted for it"
                if miss["cause"] == "reserve":
                    why += (f": the allocator reserved {miss['reserve_mib']:,.0f} MiB beyond its allocated peak "
                            "(cached segments and any CUDA-graph pool's working memory, not modelled)")
                    # the config's known gap is the likely cause of that reserve: name it beside the number
                    why += "".join(f"; not modelled for this config: {name}" for name, _ in miss["unmodelled"])
                elif miss["cause"] == "unmodelled":
                    why += ": " + "; ".join(f"{name}: {evidence}" for name, evidence in miss["unmodelled"])
                elif term:
                    why += f"; its largest term is `{term}`"
        out.append(f"`{r.run}`: {kind} memory predicted {pred:,.0f} MiB, {err:+.0f}% of the measured {meas:,.0f} "
                   f"(outside ±{memory.TOLERANCE_PCT:.0f}%): {why}.")
    return out


def _why_unmeasured(r: Row) -> str:
    """Why an ok run has no measured step, from its own step records (the causes that apply, as train.py says)."""
    rank = 0 if 0 in r.steps else (min(r.steps) if r.steps else None)
    if rank is not None and r.steps[rank]:
        st = StepStats(int(r.meta.get("warmup_steps") or 0), r.meta.get("precision"))
        for rec in r.steps[rank]:
            st.add({**rec, "warmup": bool(rec.get("warmup"))})
        return st.no_statistics_reason()
    s = r.summary or {}
    return (f"no measured step: of {s.get('steps')} step(s), "
            f"{skipped_steps_text(s.get('skipped_steps') or 0, r.meta.get('precision'))}, warm-up "
            f"{r.meta.get('warmup_steps', '?')}; run more steps")


def _cpu_text(hw: dict) -> str:
    return (str(hw.get("cpu_model") or "unknown CPU")
            + (f", {hw['cpu_count']} logical cores" if hw.get("cpu_count") else "")
            + (f", {hw['host_mem_mib'] / 1024:.0f} GiB host memory" if hw.get("host_mem_mib") else ""))


def hardware_lines(rows: list[Row], info: dict) -> list[str]:
    lines = []
    cpu_runs = [r for r in rows if r.accelerator == "cpu"]
    gpu_runs = [r for r in rows if r.accelerator == "cuda"]
    if gpu_runs:
        seen = sorted({(r.device_name, r.world) for r in gpu_runs})
        lines.append("GPU: " + "; ".join(f"{n} × {name}" for name, n in seen)
                     + " (device name and world size from the runs' meta records)")
    if cpu_runs:
        ranks = sorted({r.world for r in cpu_runs})
        lines.append(f"**Ran on CPU** (DS_ACCELERATOR=cpu, {'/'.join(map(str, ranks))} ranks over gloo): these "
                     "numbers show the pipeline working; they say nothing about GPU speed or GPU memory.")
    hw = info.get("hardware") or {}
    cmds = [c for c in info.get("commands") or [] if isinstance(c, dict) and c.get("command")]
    hosts: list[str] = []  # the machines the commands ran on, in order (entries before host tags have none)
    for c in cmds:
        if c.get("host") and c["host"] not in hosts:
            hosts.append(c["host"])
    label = {h: f"host {chr(ord('A') + i)}" if i < 26 else f"host {h}" for i, h in enumerate(hosts)}
    cpu = hw.get("cpu_model")
    # Commands from before the sweep recorded its machine may have run elsewhere: the top-level hardware is the
    # latest command's, so it only stands for the whole folder when every command is of that one machine.
    untagged = hosts and any(not c.get("host") for c in cmds)
    per_host = len(hosts) > 1 or untagged
    if per_host:  # one folder filled on several machines: each one's CPU, from its first command
        for h in hosts:
            c = next(c for c in cmds if c.get("host") == h)
            lines.append(f"CPU ({label[h]}): {_cpu_text(c)} (recorded by the sweep)")
        if untagged:
            lines.append("CPU of the commands without a host: not recorded (they predate the sweep's machine record)")
    elif cpu:
        lines.append(f"CPU: {_cpu_text(hw)} (recorded by the sweep)")
    else:
        lines.append(f"CPU: {cpu_model()} ({platform.platform()}; read when this report was written, "
                     "not recorded by the runs)")
    metas = [r.meta for r in rows if r.meta.get("versions")]
    if metas:
        v: dict = {}
        for m in metas:  # --ds none runs have no deepspeed version: take each key from the first run that has it
            for k, val in m["versions"].items():
                if val and k not in v:
                    v[k] = val
        lines.append("Versions: " + ", ".join(f"{k} {val}" for k, val in v.items()))
        commits = sorted({m["git_commit"] for m in metas
                          if re.fullmatch(r"[0-9a-f]{7,40}", str(m.get("git_commit") or ""))})
        if commits:
            lines.append("Harness commit: " + ", ".join(c[:12] for c in commits))
    distinct: list[dict] = []
    for c in cmds:  # the same command resumed again and again on the same GPUs of one machine is one line
        if not any(d["command"] == c["command"] and d.get("gpus") == c.get("gpus") and d.get("host") == c.get("host")
                   for d in distinct):
            distinct.append(c)
    if len(distinct) > 1:  # e.g. two sweeps sharing one host, or batches resumed with other filters
        for i, c in enumerate(distinct, 1):
            where = [label[c["host"]]] if per_host and c.get("host") in label else []
            if c.get("gpus"):
                where.append("GPUs " + ",".join(str(g) for g in c["gpus"]))
            if c.get("cores"):
                where.append(f"{c['cores']} cores")
            lines.append(f"Command {i} of {len(distinct)}" + (f" ({'; '.join(where)})" if where else "")
                         + f": `{scrub(c['command'])}`")
    elif info.get("command"):
        lines.append(f"Command: `{scrub(info['command'])}`")
    first = next((r for r in rows if r.meta.get("argv")), None)
    if first is not None:
        args = [scrub(str(a)) for a in first.meta["argv"][1:] if not str(a).startswith("--local_rank")]
        # a run on several nodes was launched from a hostfile, N ranks on each node
        launcher = "deepspeed --hostfile H --num_nodes M --num_gpus N" if first.nodes > 1 else "deepspeed --num_gpus N"
        lines.append(f"Each run: `{launcher} train.py " + " ".join(args) + "` (first run shown)")
    return lines


def epoch_checks(rows: list[Row]) -> list[str]:
    """For every full-epoch run (``sweep --epoch``): the short run's estimate against the measured epoch."""
    by_run = {r.run: r for r in rows}
    out = []
    for r in rows:
        if r.epoch_twin_of is None:
            continue
        measured = (r.summary or {}).get("epoch_s_measured")
        what = f"`{r.epoch_twin_of}`"
        if not r.ok or measured is None:
            out.append(f"{what}: the full-epoch run did not finish ({r.status or 'no summary'}); nothing to compare.")
            continue
        own = (r.summary or {}).get("epoch_s_est")
        line = (f"{what}: one full epoch ({(r.summary or {}).get('steps_per_epoch')} steps) took "
                f"**{fmt_duration(measured)}** ({measured:.0f} s)")
        short = by_run.get(r.epoch_twin_of)
        s_est = (short.summary or {}).get("epoch_s_est") if short is not None and short.ok else None
        if s_est is not None:
            n = (short.summary or {}).get("measured_steps")
            line += (f"; the short run estimated ~{fmt_duration(s_est)} ({s_est:.0f} s, from {n} measured steps): "
                     f"**{(s_est / measured - 1) * 100:+.1f}%**")
        else:
            line += "; no finished short run of the same name to compare with"
        if own is not None:
            line += (f"; the epoch run's own median step × steps gives {own:.0f} s "
                     f"({(own / measured - 1) * 100:+.1f}%: warm-up and drift)")
        out.append(line + ".")
    return out


def recommendations(rows: list[Row]) -> list[str]:
    """Per model, GPU count and step settings (sequence length, micro batch, gradient accumulation: only like is
    compared with like): the fastest configuration that ran, and the one with the least GPU memory. Runs with an
    engine warning (``engine_checks``: the model does not learn) are not recommended."""
    out = []
    groups: dict[tuple, list[Row]] = {}
    vary = varying_settings(rows)
    for r in rows:
        if r.epoch_twin_of is not None:  # the same configuration again, run longer
            continue
        groups.setdefault(r.group + r.settings, []).append(r)
    for (label, dev, world, seq, mb, ga), rs in groups.items():
        ok = [r for r in rs if r.ok and not r.warnings]
        where = f"{label} on {world} × {dev}" if dev != "CPU" else f"{label} on CPU ({world} ranks)"
        if vary:  # the folder holds runs of other settings too: name this group's
            where += ", " + ", ".join(f"{h} {v}" for (k, h), v in zip(SETTING_COLUMNS, (seq, mb, ga))
                                      if k in dict(vary))
        if not ok:
            flagged = any(r.ok for r in rs)
            if not flagged and any(r.unmeasured for r in rs):
                out.append(f"**{where}**: no configuration has a measured step (see \"No measured step\").")
                continue
            out.append(f"**{where}**: no configuration finished" + (" that trains (see the warnings above)." if flagged
                                                                    else "."))
            continue
        fast = min(ok, key=lambda r: r.s_per_sample)
        if dev == "CPU":
            lean = min((r for r in ok if r.host_rss_mib is not None), key=lambda r: r.host_rss_mib, default=None)
            mem_of = lambda r: f"{r.host_rss_mib / 1024:.1f} GiB host RSS"  # noqa: E731
            what = "least host memory"
        else:
            lean = min((r for r in ok if r.gpu_mib is not None), key=lambda r: r.gpu_mib, default=None)
            mem_of = lambda r: f"{r.gpu_mib:.0f} MiB per GPU"  # noqa: E731
            what = "least GPU memory"

        def desc(r: Row) -> str:
            ep, est = r.epoch
            mem = mem_of(r) if (r.gpu_mib is not None or dev == "CPU") and (
                r.host_rss_mib is not None or dev != "CPU") else "memory not measured"
            return (f"`{r.config_name}` {r.precision} ({fmt_step(r.step_s)}, {r.s_per_sample:.3f} s/sample, "
                    f"{'~' if est else ''}{fmt_duration(ep)}/epoch, {mem})")

        line = f"**{where}**: fastest {desc(fast)}"
        if lean is not None:
            line += f"; {what}: {desc(lean)}" if lean is not fast else f"; it also uses the {what}"
        out.append(line + ".")
    return out
