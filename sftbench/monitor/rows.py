"""Formatted rows of the run view: the rank table, the charts (bounded, warm-up marked), the GPU table with the
matching of GPU processes to ranks, the host line and the RSS table. Pure, like ``state``: it reads a
``state.RunState`` and the GPU / host samples ``session`` hands it; no I/O, no Textual, no torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sftbench.fmt import fmt_float, fmt_int, fmt_mib
from sftbench.nodes import node_of

from .state import STATUS_STYLES, Cell, RankState, RunState

# --------------------------------------------------------------------------------------------------------------
# rank table

RANK_COLUMNS = (
    ("rank", "rank"), ("host", "host"), ("gpu", "GPU"), ("step", "step"), ("loss", "loss"),
    ("s_ema", "s/it EMA"), ("s_last", "s/it last"), ("tps", "tokens/s"), ("mem", "GPU mem NVML/torch rsv"),
    ("rss", "host RSS"), ("bad", "bad"),
)


def rank_rows(run: RunState, live_rss: Mapping[int, float] | None = None) -> list[tuple[str, dict[str, Cell]]]:
    """(row key, {column key: Cell}) for every rank, sorted by rank."""
    live_rss = live_rss or {}
    rows = []
    for r in sorted(run.ranks):
        rs = run.ranks[r]
        m = rs.meta or {}
        gi, gn = m.get("gpu_index"), m.get("device_name")
        if gi is None and gn is None:
            gpu = m.get("device") or "-"
        else:
            gpu = f"{gi if gi is not None else '?'} {gn or ''}".strip()
        warm = rs.in_warmup
        step_style = "dim" if warm else ""
        step_txt = "-" if rs.step is None else str(rs.step) + (" warm-up" if warm else "")
        if rs.summary is not None:
            step_txt += f" [{rs.summary.get('status')}]"
            step_style = STATUS_STYLES.get(str(rs.summary.get("status")), "")
        used = fmt_mib(rs.get("gpu_mem_used_mib"))
        rsv = fmt_mib(rs.get("torch_peak_reserved_mib"))
        if r in live_rss:
            rss = Cell(fmt_mib(live_rss[r]) + " live")
        else:
            rss = Cell(fmt_mib(rs.get("host_rss_mib")) + (" log" if rs.get("host_rss_mib") is not None else ""),
                       "dim" if rs.get("host_rss_mib") is not None else "")
        rows.append((str(r), {
            "rank": Cell(str(r)),
            "host": Cell(node_of(m) if m else "-"),
            "gpu": Cell(gpu),
            "step": Cell(step_txt, step_style),
            "loss": Cell(fmt_float(rs.get("loss"), 4), step_style if warm else ""),
            "s_ema": Cell(fmt_float(rs.ema)),
            "s_last": Cell(fmt_float(rs.last_s), "dim" if warm else ""),
            "tps": Cell(fmt_int(rs.get("tokens_per_s")), "dim" if warm else ""),
            "mem": Cell(f"{used} / {rsv}"),
            "rss": rss,
            "bad": Cell(str(rs.bad_lines), "bold yellow" if rs.bad_lines else "dim"),
        }))
    return rows


# --------------------------------------------------------------------------------------------------------------
# charts (bounded, warm-up marked)

BLOCKS = " ▁▂▃▄▅▆▇█"

CHART_SERIES = (
    ("step_s", "s/it"), ("loss", "loss"), ("gpu_mem_mib", "GPU mem MiB"),
)


def series(rs: RankState | None, field_name: str) -> tuple[list[float | None], list[bool], list[int]]:
    if rs is None:
        return [], [], []
    vals = [getattr(p, field_name) for p in rs.history]
    return vals, [p.warmup for p in rs.history], [p.step for p in rs.history]


def downsample(values: Sequence[float | None], warm: Sequence[bool], width: int
               ) -> tuple[list[float | None], list[bool]]:
    """At most ``width`` buckets (mean of each); a bucket is warm-up only when all its points are."""
    n = len(values)
    if n <= width or width <= 0:
        return list(values), list(warm)
    out_v: list[float | None] = []
    out_w: list[bool] = []
    for i in range(width):
        a, b = i * n // width, (i + 1) * n // width
        chunk = [v for v in values[a:b] if v is not None]
        out_v.append(sum(chunk) / len(chunk) if chunk else None)
        out_w.append(all(warm[a:b]))
    return out_v, out_w


def chart(values: Sequence[float | None], warm: Sequence[bool], width: int, height: int = 1
          ) -> tuple[list[str], list[bool], float | None, float | None]:
    """Block-character bar chart: (lines top to bottom, warm-up flag per column, lo, hi).

    The scale comes from measured points only (a slow first step does not flatten the rest); warm-up points are
    clipped to it and flagged so the caller can dim them.
    """
    v, w = downsample(values, warm, width)
    meas = [x for x, ww in zip(v, w) if x is not None and not ww]
    pool = meas or [x for x in v if x is not None]
    if not pool:
        return [""] * height, w, None, None
    lo, hi = min(pool), max(pool)
    levels = height * 8
    cols = []
    for x in v:
        if x is None:
            cols.append(0)
            continue
        x = min(max(x, lo), hi)
        frac = 0.5 if hi == lo else (x - lo) / (hi - lo)
        cols.append(1 + int(round(frac * (levels - 1))))
    lines = []
    for row in range(height - 1, -1, -1):
        base = row * 8
        lines.append("".join(BLOCKS[min(8, max(0, c - base))] for c in cols))
    return lines, w, lo, hi


# --------------------------------------------------------------------------------------------------------------
# GPU / host

def level_style(value: float | None, warn: float, crit: float) -> str:
    if value is None:
        return "dim"
    if value >= crit:
        return "bold red"
    if value >= warn:
        return "yellow"
    return "green"


GPU_COLUMNS = (
    ("idx", "GPU"), ("name", "name"), ("mem", "memory used/total"), ("util", "util"), ("power", "power"),
    ("temp", "temp"), ("procs", "processes (rank)"),
)


@dataclass
class ProcMatch:
    pid: int | None
    rank: int | None
    used_mib: float | None
    how: str        # "pid", "uuid" (rank on this GPU by UUID, pid not visible), "other" (not a rank of this run)


def match_processes(gpus: Sequence[Any], run: RunState | None, local_host: str | None) -> dict[int, list[ProcMatch]]:
    """Processes on each GPU matched to ranks: by pid when the rank ran on this host, else by device UUID.

    NVML inside a container may report host pids that match nothing; then ranks are placed on the GPU whose UUID
    they logged in ``meta.device_uuid`` and, when exactly one process and one rank are left unmatched on a GPU,
    the two are paired.
    """
    metas = {}
    if run is not None:
        metas = {r: rs.meta for r, rs in run.ranks.items() if rs.meta}
    out: dict[int, list[ProcMatch]] = {}
    for g in gpus:
        matches: list[ProcMatch] = []
        matched_ranks: set[int] = set()
        others: list[ProcMatch] = []
        for p in g.processes:
            rank = None
            for r, m in metas.items():
                if m.get("pid") == p.pid and (local_host is None or m.get("host") in (None, local_host)):
                    rank = r
                    break
            if rank is not None:
                matched_ranks.add(rank)
                matches.append(ProcMatch(p.pid, rank, p.used_mib, "pid"))
            else:
                others.append(ProcMatch(p.pid, None, p.used_mib, "other"))
        by_uuid = [r for r, m in sorted(metas.items())
                   if g.uuid and m.get("device_uuid") == g.uuid and r not in matched_ranks]
        if len(by_uuid) == 1 and len(others) == 1:
            o = others.pop()
            matches.append(ProcMatch(o.pid, by_uuid[0], o.used_mib, "uuid"))
        else:
            for r in by_uuid:
                matches.append(ProcMatch(metas[r].get("pid"), r, None, "uuid"))
        out[g.index] = sorted(matches, key=lambda x: (x.rank is None, x.rank or 0)) + others
    return out


def _proc_text(pm: ProcMatch) -> str:
    mem = f" {fmt_mib(pm.used_mib)}" if pm.used_mib is not None else ""
    if pm.rank is None:
        return f"pid {pm.pid}{mem}"
    if pm.how == "pid":
        return f"rank {pm.rank} (pid {pm.pid}){mem}"
    return f"rank {pm.rank} (by UUID){mem}"


def gpu_rows(snapshot: Any, run: RunState | None, local_host: str | None) -> list[tuple[str, dict[str, Cell]]]:
    if snapshot is None or snapshot.unavailable:
        return []
    procs = match_processes(snapshot.gpus, run, local_host)
    rows = []
    for g in snapshot.gpus:
        mem_pct = (100.0 * g.mem_used_mib / g.mem_total_mib) if (g.mem_used_mib is not None and g.mem_total_mib) \
            else None
        power = "-" if g.power_w is None else f"{g.power_w:.0f} W"
        if g.power_w is not None and g.power_limit_w:
            power += f" / {g.power_limit_w:.0f} W"
        pwr_pct = (100.0 * g.power_w / g.power_limit_w) if (g.power_w is not None and g.power_limit_w) else None
        rows.append((str(g.index), {
            "idx": Cell(str(g.index)),
            "name": Cell(g.name or "-"),
            "mem": Cell(f"{fmt_mib(g.mem_used_mib)} / {fmt_mib(g.mem_total_mib)}"
                        + (f" ({mem_pct:.0f}%)" if mem_pct is not None else ""), level_style(mem_pct, 80, 95)),
            "util": Cell("-" if g.util_pct is None else f"{g.util_pct:.0f}%",
                         "dim" if g.util_pct is None else ("yellow" if g.util_pct < 30 else "green")),
            "power": Cell(power, level_style(pwr_pct, 90, 100)),
            "temp": Cell("-" if g.temp_c is None else f"{g.temp_c:.0f} C", level_style(g.temp_c, 75, 85)),
            "procs": Cell(", ".join(_proc_text(p) for p in procs.get(g.index, [])) or "-"),
        }))
    return rows


def host_line(host: Any) -> tuple[str, str]:
    """(text, style) of the host memory line."""
    if host is None:
        return "host: not sampled yet", "dim"
    if host.unavailable:
        return f"host metrics unavailable: {host.unavailable}", "yellow"
    pct = 100.0 * host.ram_used_mib / host.ram_total_mib if host.ram_total_mib else None
    swap = f"{fmt_mib(host.swap_used_mib)} / {fmt_mib(host.swap_total_mib)}" if host.swap_total_mib else "none"
    cpu = f" | CPU {host.cpu_pct:.0f}%" if host.cpu_pct is not None else ""
    return (f"host {host.hostname}: RAM {fmt_mib(host.ram_used_mib)} / {fmt_mib(host.ram_total_mib)}"
            + (f" ({pct:.0f}%)" if pct is not None else "") + f" | swap {swap}{cpu}", level_style(pct, 85, 95))


RSS_COLUMNS = (("rank", "rank"), ("host", "host"), ("pid", "pid"), ("rss", "RSS"), ("src", "source"),
               ("peak", "peak RSS logged"))


def rss_rows(run: RunState | None, live_rss: Mapping[int, float]) -> list[tuple[str, dict[str, Cell]]]:
    rows = []
    if run is None:
        return rows
    for r in sorted(run.ranks):
        rs = run.ranks[r]
        m = rs.meta or {}
        if r in live_rss:
            val, src = live_rss[r], Cell("psutil (live)", "green")
        else:
            val, src = rs.get("host_rss_mib"), Cell("last logged", "dim")
        rows.append((str(r), {
            "rank": Cell(str(r)), "host": Cell(node_of(m) if m else "-"), "pid": Cell(str(m.get("pid") or "-")),
            "rss": Cell(fmt_mib(val)), "src": src, "peak": Cell(fmt_mib(rs.peaks.get("host_rss_mib"))),
        }))
    return rows
