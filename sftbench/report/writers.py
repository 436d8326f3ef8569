"""The results folder's text files: ``results.md``, ``results.html``, ``results.csv`` and ``summaries.jsonl``."""
from __future__ import annotations

import csv
import html
import json
import re
from pathlib import Path

from sftbench import runlog
from sftbench.report.runs import Row, scrub
from sftbench.report.tables import EXTRA_HEADERS, REF_HEADERS, Table

META_DROP = ("argv", "env", "host", "pid", "device_uuid")  # bulky or machine-specific; the rest goes to summaries


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def md_headers(settings: list[tuple[str, str]] = ()) -> list[str]:
    hs = []
    for zh, en in REF_HEADERS:
        if zh and en:
            hs.append(f"{zh} ({en})")
        else:
            hs.append(zh or en)
    return hs + [h for _, h in settings] + EXTRA_HEADERS


def html_headers(settings: list[tuple[str, str]] = ()) -> list[str]:
    hs = []
    for zh, en in REF_HEADERS:
        if zh and en:
            hs.append(f"{html.escape(zh)}<br><small>{html.escape(en)}</small>")
        else:
            hs.append(html.escape(zh or en))
    return hs + [html.escape(h) for _, h in settings] + [html.escape(h) for h in EXTRA_HEADERS]


def write_md(path: Path, title: str, table: Table, hw: list[str], recs: list[str], n_runs: int,
             checks: list[str] | None = None) -> None:
    hs = md_headers(table.settings)
    lines = [f"# {title}", ""]
    lines += [f"- {h}" for h in hw]
    lines += ["", f"{n_runs} runs.", "", "| " + " | ".join(hs) + " |", "|" + "---|" * len(hs)]
    i = 0
    for g in table.groups:
        for k in range(g):
            cells = list(table.rows[i])
            if k > 0:
                cells[0] = ""  # the model once per group, as the reference's rowspan
            lines.append("| " + " | ".join(_md_escape(c) for c in cells) + " |")
            i += 1
    lines += [""] + [f"- {x}" for x in table.notes]
    if table.footnotes:
        lines += ["", "**Failures**", ""]
        lines += [f"{n}. {_md_escape(f)}" for n, f in enumerate(table.footnotes, 1)]
    if table.unmeasured:
        lines += ["", "**No measured step** (finished, but too short for statistics; not failures)", ""]
        lines += [f"- {_md_escape(f)}" for f in table.unmeasured]
    if table.unfinished:
        lines += ["", "**Not finished** (no summary yet)", ""] + [f"- {_md_escape(f)}" for f in table.unfinished]
    if checks:
        lines += ["", "## Epoch check", ""] + [f"- {c}" for c in checks]
    lines += ["", "## Recommendation", ""] + [f"- {r}" for r in recs]
    lines += ["", "![step time vs memory](results.png)", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def write_html(path: Path, title: str, table: Table, hw: list[str], recs: list[str], n_runs: int,
               checks: list[str] | None = None) -> None:
    def inline(s: str) -> str:
        s = html.escape(s)
        # `code` and **bold** from the Markdown strings
        s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
        return re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", s)

    out = ["<!DOCTYPE html>", "<html><head><meta charset=\"utf-8\">", f"<title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
           "td,th{border:1px solid #bbb;padding:3px 6px;text-align:center}thead td{background:#eee;font-weight:bold}"
           "td.fail{color:#b00;font-weight:bold}</style></head><body>",
           f"<h1>{html.escape(title)}</h1>", "<ul>"] + [f"<li>{inline(h)}</li>" for h in hw] + [
        "</ul>", f"<p>{n_runs} runs.</p>", "<table>", "    <thead>",
        "        <tr> " + " ".join(f"<td>{h}</td>" for h in html_headers(table.settings)) + " </tr>", "    </thead>",
        "   <tbody>"]
    i = 0
    for g in table.groups:
        for k in range(g):
            cells = table.rows[i]
            tds = []
            for j, c in enumerate(cells):
                if j == 0:
                    if k == 0:
                        tds.append(f"<td rowspan=\"{g}\">{html.escape(c)}</td>")
                    continue
                cls = " class=\"fail\"" if j == 5 and "[" in c else ""
                tds.append(f"<td{cls}>{html.escape(c)}</td>")
            out.append("       <tr> " + " ".join(tds) + " </tr>")
            i += 1
    out += ["    </tbody>", "</table>", "<p>" + "<br>".join(inline(n) for n in table.notes) + "</p>"]
    if table.footnotes:
        out += ["<h3>Failures</h3>", "<ol>"] + [f"<li>{html.escape(f)}</li>" for f in table.footnotes] + ["</ol>"]
    if table.unmeasured:
        out += ["<h3>No measured step</h3>", "<ul>"] + [f"<li>{inline(f)}</li>" for f in table.unmeasured] + ["</ul>"]
    if table.unfinished:
        out += ["<h3>Not finished</h3>", "<ul>"] + [f"<li>{inline(f)}</li>" for f in table.unfinished] + ["</ul>"]
    if checks:
        out += ["<h2>Epoch check</h2>", "<ul>"] + [f"<li>{inline(c)}</li>" for c in checks] + ["</ul>"]
    out += ["<h2>Recommendation</h2>", "<ul>"] + [f"<li>{inline(r)}</li>" for r in recs] + ["</ul>"]
    out += ["<img src=\"results.png\" alt=\"step time vs memory\" style=\"max-width:100%\">", "</body></html>", ""]
    path.write_text("\n".join(out), encoding="utf-8")


CONFIG_COLUMNS = ("zero_stage", "offload_optimizer", "offload_param", "pin_memory", "overlap_comm",
                  "allgather_bucket_size", "reduce_bucket_size", "stage3_max_live_parameters", "contiguous_gradients")
PLAN_COLUMNS = ("run", "model", "ds_config", "precision", "num_gpus", "num_nodes", "max_steps", "warmup_steps",
                "accelerator", "data", "seq_len", "extra_args", "ref_rows")
META_COLUMNS = ("device_name", "world_size", "micro_batch", "grad_accum", "seq_len", "n_params", "flops_per_token",
                "peak_tflops", "dataset_samples", "real_tokens", "pad_tokens")
DERIVED_COLUMNS = ("config", "compile", "s_per_sample", "gpu_mem_used_mib_max_over_ranks",
                   "host_rss_mib_sum_over_ranks", "host_rss_mib_max_over_nodes", "predicted_gpu_mib",
                   "predicted_host_mib", "predicted_host_mib_per_node", "predicted_fits")


def csv_columns() -> list[str]:
    summ = [k for k in runlog.SUMMARY_KEYS if k != "type"]
    cols = list(PLAN_COLUMNS) + list(DERIVED_COLUMNS) + [f"meta_{k}" for k in META_COLUMNS] + list(CONFIG_COLUMNS)
    return cols + [k for k in summ if k not in cols]


def write_csv(path: Path, rows: list[Row]) -> None:
    cols = csv_columns()
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            d: dict = {}
            for k in PLAN_COLUMNS:
                v = r.entry.get(k)
                d[k] = json.dumps(v) if isinstance(v, (list, dict)) else v
            d["run"] = r.run
            d["model"] = d.get("model") or r.model
            d["precision"] = d.get("precision") or r.precision
            d["config"] = r.config_name
            d["compile"] = r.compile
            d["s_per_sample"] = r.s_per_sample
            d["gpu_mem_used_mib_max_over_ranks"] = r.gpu_mib
            d["num_nodes"] = r.nodes
            d["host_rss_mib_sum_over_ranks"] = r.host_rss_all_mib
            d["host_rss_mib_max_over_nodes"] = r.host_rss_mib
            d["predicted_gpu_mib"] = (r.predicted or {}).get("gpu_mib")
            d["predicted_host_mib"] = (r.predicted or {}).get("host_mib")
            d["predicted_host_mib_per_node"] = (r.predicted or {}).get("host_mib_per_node", d["predicted_host_mib"])
            d["predicted_fits"] = (r.predicted or {}).get("fits")
            for k in META_COLUMNS:
                d[f"meta_{k}"] = r.meta.get(k)
            for k in CONFIG_COLUMNS:
                d[k] = r.desc.get(k)
            for k in runlog.SUMMARY_KEYS:
                if k != "type":
                    d[k] = (r.summary or {}).get(k)
            w.writerow({k: scrub(v) for k, v in d.items()})


def write_summaries(path: Path, rows: list[Row], planned: list[dict] = ()) -> None:
    """Every run's records (see cli.py); ``planned``: the sweep's plan entries that have no run folder yet, as
    ``plan_entry`` records alone, so a restored sweep still knows what is left to run."""
    with open(path, "w", encoding="utf-8") as f:
        for e in planned:
            f.write(json.dumps({**scrub(dict(e)), "type": "plan_entry"}, ensure_ascii=False, default=str) + "\n")
        for r in rows:
            if r.entry:  # the sweep's plan entry and prediction: what `sweep restore` rebuilds a run folder from
                f.write(json.dumps({**scrub(dict(r.entry)), "type": "plan_entry", "run": r.run,
                                    "predicted": r.predicted}, ensure_ascii=False, default=str) + "\n")
            if r.meta:
                meta = scrub({k: v for k, v in r.meta.items() if k not in META_DROP})
                meta["run"] = r.run
                f.write(json.dumps(meta, ensure_ascii=False, default=str) + "\n")
            sums = dict(r.rank_summaries)
            if r.summary is not None and (not sums or r.summary.get("synthesized")):
                sums = {**sums, (-1 if sums else 0): r.summary}
            for rank, s in sorted(sums.items()):
                rec = scrub(dict(s))
                rec["run"] = r.run
                rec["rank"] = rank if rank >= 0 else None
                f.write(json.dumps(rec, ensure_ascii=False, default=str) + "\n")


def write_sweep_info_copy(path: Path, info: dict) -> None:
    """The sweep's ``sweep_info.json`` for the results folder: paths scrubbed, the GPUs' serial numbers left out."""
    info = scrub(info)  # a new dict and lists all the way down: the sweep's own stays as it is
    for gpu in (info.get("hardware") or {}).get("gpus") or []:
        if isinstance(gpu, dict):
            gpu.pop("uuid", None)
    path.write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
