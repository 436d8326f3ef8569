"""``monitor.py --once``: the same information as the live views, as plain text (no Textual, no event loop)."""
from __future__ import annotations

from typing import Sequence

from sftbench.fmt import fmt_g

from .rows import (CHART_SERIES, GPU_COLUMNS, RANK_COLUMNS, RSS_COLUMNS, chart, gpu_rows, host_line, rank_rows,
                   rss_rows, series)
from .session import Session
from .state import Cell, header_lines
from .table import TABLE_COLUMNS, counts_line, entry_row


def text_table(columns: Sequence[tuple[str, str]], rows: Sequence[tuple[str, dict[str, Cell]]]) -> list[str]:
    """Left-aligned columns separated by two spaces; cells are ``state.Cell``."""
    keys = [k for k, _ in columns]
    heads = [h for _, h in columns]
    body = [[cells[k].text if k in cells else "" for k in keys] for _, cells in rows]
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(heads)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths)).rstrip()  # noqa: E731
    return [fmt(heads), fmt(["-" * w for w in widths])] + [fmt(r) for r in body]


def chart_line(title: str, values, warm, width: int = 60) -> str:
    lines, wcols, lo, hi = chart(values, warm, width, 1)
    if lo is None:
        return f"{title:<12} (no data)"
    bars = "".join("░" if w else ch for ch, w in zip(lines[0], wcols))
    nw = sum(1 for w in warm if w)
    extra = f"  (░ = {nw} warm-up steps)" if nw else ""
    return f"{title:<12} {bars}  min {fmt_g(lo)} max {fmt_g(hi)}{extra}"


def render(session: Session, chart_width: int = 60) -> str:
    out: list[str] = []
    run = session.run
    if run is None:
        out.append(f"no run found under {session.target.path}")
    else:
        h = run.header()
        out += header_lines(h)
        if run.ranks:
            out.append("")
            out.append("RANKS")
            out += text_table(RANK_COLUMNS, rank_rows(run, session.live_rss))
            p = run.primary
            if p is not None and p.history:
                out.append("")
                out.append(f"HISTORY (rank {p.rank}, last {len(p.history)} steps)")
                for key, title in CHART_SERIES:
                    vals, warm, _ = series(p, key)
                    out.append(chart_line(title, vals, warm, chart_width))
    out.append("")
    out.append("GPU / HOST")
    g = session.gpu
    if g is None or g.unavailable:
        out.append(f"GPU metrics unavailable: {g.unavailable if g is not None else 'not sampled'}")
    else:
        rows = gpu_rows(g, run, session.local_host)
        out += text_table(GPU_COLUMNS, rows) if rows else ["no GPUs"]
    out.append(host_line(session.host)[0])
    if run is not None and run.ranks:
        out += text_table(RSS_COLUMNS, rss_rows(run, session.live_rss))
    t = session.table
    if t is not None:
        out.append("")
        out.append(("SWEEP " if t.kind == "sweep" else "RUNS ") + counts_line(t))
        rows = [(e.key, entry_row(e)) for e in t.entries]
        out += text_table(TABLE_COLUMNS, rows) if rows else ["(no entries)"]
    return "\n".join(out) + "\n"


def snapshot_text(session: Session, chart_width: int = 60) -> str:
    session.load_all()
    return render(session, chart_width)
