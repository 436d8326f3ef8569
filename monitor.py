#!/usr/bin/env python
"""Live monitor of sftbench runs and sweeps (Textual UI, or plain text with --once).

    python monitor.py                 # follow the newest run under runs/ (moves on as a sweep starts runs)
    python monitor.py RUN_DIR         # one run
    python monitor.py SWEEP_DIR       # a sweep (directory with plan.json)
    python monitor.py RESULTS_DIR     # every run directory found beneath it
    python monitor.py --once [TARGET] # print a plain-text snapshot and exit

Never imports torch or deepspeed. See docs/monitor.md.
"""
from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="monitor.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("target", nargs="?", default=None,
                    help="run dir, sweep dir (with plan.json) or results dir; default: newest run under --runs-root")
    ap.add_argument("--runs-root", default="runs", help="where to look for the newest run (default: runs)")
    ap.add_argument("--once", action="store_true", help="print a plain-text snapshot and exit (no UI)")
    ap.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS",
                    help="seconds between log reads (default 1.0); GPU/host are sampled once a second")
    ap.add_argument("--no-gpu", action="store_true",
                    help="do not use NVML (same as SFTBENCH_NO_NVML=1)")
    ap.add_argument("--export-dir", default=".", help="where 'Export view as JSON' writes (default: .)")
    args = ap.parse_args(argv)
    if args.refresh <= 0:
        ap.error("--refresh must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.target is not None and not os.path.exists(args.target):
        # A typo would otherwise wait forever for logs that never come ("waiting: no logs ...").
        print(f"monitor.py: error: {args.target} does not exist (give a run directory, a sweep directory with "
              f"plan.json, or a folder of runs; with no argument the newest run under --runs-root)", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from sftbench.monitor.gpu import default_gpu_source
    from sftbench.monitor.session import Session, resolve_target

    target = resolve_target(args.target, args.runs_root)
    session = Session(target, gpu_source=default_gpu_source(disabled=args.no_gpu))
    if args.once:
        from sftbench.monitor.snapshot import snapshot_text
        try:
            sys.stdout.write(snapshot_text(session))
        finally:
            session.close()
        return 0
    from sftbench.monitor.app import MonitorApp
    app = MonitorApp(session, refresh=args.refresh, export_dir=args.export_dir)
    try:
        app.run()
    finally:
        session.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
