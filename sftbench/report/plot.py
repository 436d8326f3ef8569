"""``results.png``: per model, step time against memory, the Pareto front marked, failures on a band apart.
matplotlib is imported only when the plot is drawn."""
from __future__ import annotations

import math
from pathlib import Path

from sftbench.report.runs import Row
from sftbench.report.tables import STATUS_LABEL


def pareto(points: list[tuple[float, float, object]]) -> list[tuple[float, float, object]]:
    """Points not dominated in (x, y), both lower-is-better, sorted by x."""
    front = []
    best_y = math.inf
    for x, y, tag in sorted(points, key=lambda p: (p[0], p[1])):
        if y < best_y:
            front.append((x, y, tag))
            best_y = y
    return front


def write_png(path: Path, rows: list[Row]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = []
    for r in rows:
        if r.model_label not in models:
            models.append(r.model_label)
    models = models or ["(no runs)"]
    fig, axes = plt.subplots(1, len(models), figsize=(7.5 * len(models), 5.5), squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    for ax, label in zip(axes[0], models):
        rs = [r for r in rows if r.model_label == label]
        cpu = bool(rs) and all(r.accelerator == "cpu" for r in rs)
        xname = "host RSS, all ranks (MiB)" if cpu else "GPU memory per rank, NVML peak (MiB)"

        def xval(r: Row) -> float | None:
            return r.host_rss_mib if cpu else r.gpu_mib

        worlds = sorted({r.world for r in rs})
        pts_all = []
        for wi, w in enumerate(worlds):
            pts = [(xval(r), r.step_s, r) for r in rs if r.ok and r.world == w and xval(r) is not None]
            pts_all += pts
            if not pts:
                continue
            c = colors[wi % len(colors)]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=c, zorder=3,
                       label=f"{w} {'rank' if cpu else 'GPU'}{'s' if w > 1 else ''}")
            for x, y, r in pts:
                ax.annotate(f"{r.config_name} {r.precision}", (x, y), fontsize=6.5, xytext=(3, 3),
                            textcoords="offset points")
            front = pareto(pts)
            if len(front) > 0:
                xs, ys = [p[0] for p in front], [p[1] for p in front]
                ax.step(xs, ys, where="post", color=c, alpha=0.6, linestyle="--", zorder=2,
                        label=f"Pareto front ({w})")
        fails = [r for r in rs if not r.ok]
        ys = [p[1] for p in pts_all]
        if ys and max(ys) / max(min(ys), 1e-9) > 20:
            ax.set_yscale("log")
        if fails:
            log = ax.get_yscale() == "log"
            top = (max(ys) * (2.5 if log else 1.2)) if ys else 1.0
            xs_known = [xval(r) or (r.pred_host if cpu else r.pred_gpu) for r in fails]
            span = [x for x, _, _ in pts_all] + [x for x in xs_known if x is not None] or [1.0]
            lo, hi = min(span), max(span)
            for k, (r, x) in enumerate(zip(fails, xs_known)):
                if x is None:  # no prediction either: spread along the band
                    x = lo + (hi - lo) * (k + 1) / (len(fails) + 1)
                ax.scatter([x], [top], marker="x", color="tab:red", zorder=4)
                ax.annotate(f"{r.config_name} {r.precision}: {STATUS_LABEL.get(r.status, r.status)}", (x, top),
                            fontsize=6, rotation=35, xytext=(2, 5), textcoords="offset points", color="tab:red",
                            annotation_clip=False)
            ax.axhline(top, color="tab:red", alpha=0.15, linewidth=10)
            ax.text(0.01, 0.995, "failed runs (x at their predicted memory)", transform=ax.transAxes, fontsize=7,
                    color="tab:red", va="top")
            ax.set_ylim(top=top * (3 if log else 1.25))
            if not log:
                ax.set_ylim(bottom=0)
        ax.set_xlabel(xname)
        ax.set_ylabel("median step time (s/it)")
        ax.set_title(f"{label}" + (" — CPU run" if cpu else ""))
        ax.grid(True, alpha=0.3)
        if pts_all:
            ax.legend(fontsize=7, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
