"""The results table: the reference's columns, our measurements, failures with their reasons, a plot.

    python -m sftbench.report runs/<sweep> --out results/<sweep>/   (every option: --help; what it writes: ``cli``)

Modules, each importing only those above it:

* ``runs``     ``collect``: run folders into ``Row``s (rank logs, summaries, plan entry, prediction); ``scrub``.
* ``tables``   the table's cells, ``Table`` / ``build_table``, hardware lines, epoch checks, recommendations.
* ``writers``  ``results.md``, ``results.html``, ``results.csv``, ``summaries.jsonl``.
* ``plot``     ``results.png`` (``pareto``, ``write_png``; matplotlib imported only there).
* ``cli``      ``make_report`` (all of the above for one folder) and ``main``, the command line.

The names below are re-exported so ``from sftbench import report; report.make_report(...)`` works.
"""
from __future__ import annotations

from sftbench.fmt import fmt_duration, fmt_e, fmt_num, fmt_sig, fmt_step
from sftbench.report.runs import MODEL_LABEL, Row, collect, scrub
from sftbench.report.tables import (COMPILED_NOTE, EXTRA_HEADERS, NOTES, REF_HEADERS, SETTING_COLUMNS, STATUS_LABEL,
                                    UNFINISHED, Table, build_table, config_cells, epoch_checks, gpu_cell,
                                    hardware_lines, mem_cell, pred_meas, recommendations, ref_rows, varying_settings)
from sftbench.report.writers import (CONFIG_COLUMNS, DERIVED_COLUMNS, META_COLUMNS, META_DROP, PLAN_COLUMNS,
                                     csv_columns, html_headers, md_headers, write_csv, write_html, write_md,
                                     write_summaries)
from sftbench.report.plot import pareto, write_png
from sftbench.report.cli import main, make_report

__all__ = [
    "fmt_duration", "fmt_e", "fmt_num", "fmt_sig", "fmt_step",
    "MODEL_LABEL", "Row", "collect", "scrub",
    "COMPILED_NOTE", "EXTRA_HEADERS", "NOTES", "REF_HEADERS", "SETTING_COLUMNS", "STATUS_LABEL", "UNFINISHED", "Table",
    "build_table", "config_cells", "epoch_checks", "gpu_cell", "hardware_lines", "mem_cell", "pred_meas",
    "recommendations", "ref_rows", "varying_settings",
    "CONFIG_COLUMNS", "DERIVED_COLUMNS", "META_COLUMNS", "META_DROP", "PLAN_COLUMNS", "csv_columns", "html_headers",
    "md_headers", "write_csv", "write_html", "write_md", "write_summaries",
    "pareto", "write_png",
    "main", "make_report",
]
