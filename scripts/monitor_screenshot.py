#!/usr/bin/env python
"""Save an SVG screenshot of the monitor, driven headless, while a run or sweep is going (for the docs).

    python scripts/monitor_screenshot.py [TARGET] --seconds 8 --out docs/monitor_gpu.svg [--view run|sweep|gpu]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sftbench.monitor.app import MonitorApp  # noqa: E402
from sftbench.monitor.gpu import default_gpu_source  # noqa: E402
from sftbench.monitor.session import Session, resolve_target  # noqa: E402


async def shoot(app: MonitorApp, seconds: float, tabs: int, out: Path) -> None:
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause(seconds)
        for _ in range(tabs):
            await pilot.press("tab")
            await pilot.pause(1.5)
        out.write_text(app.export_screenshot(), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("target", nargs="?")
    ap.add_argument("--runs-root", default="runs")
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--tabs", type=int, default=0, help="press tab this many times before the shot")
    ap.add_argument("--out", default="docs/monitor_gpu.svg")
    a = ap.parse_args()
    session = Session(resolve_target(a.target, a.runs_root), gpu_source=default_gpu_source(disabled=False))
    try:
        asyncio.run(shoot(MonitorApp(session, refresh=1.0), a.seconds, a.tabs, Path(a.out)))
    finally:
        session.close()
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
