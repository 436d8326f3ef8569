"""What the monitor shows and one poll per tick (I/O here and in ``tail``; numbers in ``state``/``rows``/``table``).

Targets:

* ``follow``  (no argument): the newest run under the runs root; moves on when a new run appears (a sweep starting
  its next run) or the followed one has ended and another is newer. Its table is the run's sweep (``plan.json``
  in the parent) or every run under the root.
* ``run``     a run directory (rank files, ``summary.json``; empty rank files: "starting"; nothing yet: "waiting").
* ``sweep``   a directory with ``plan.json``: the table lists every plan entry; the run view follows the sweep's
  newest run.
* ``results`` any other directory: the table lists the run directories found beneath it; the run view follows the
  newest of them.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sftbench import liveness

from .gpu import GpuSnapshot, GpuSource, HostSnapshot, HostSource, default_gpu_source
from .rows import gpu_rows, host_line, rank_rows
from .state import HISTORY, RunState
from .table import EntryState, TableState, entry_json, make_entry, probe_liveness
from .tail import ProbeCache, RunDirScanner, RunWatcher, is_run_dir, probe_run


@dataclass
class Target:
    kind: str        # "follow" | "run" | "sweep" | "results"
    path: Path


def resolve_target(arg: str | os.PathLike | None, runs_root: str | os.PathLike = "runs") -> Target:
    if arg is None:
        return Target("follow", Path(runs_root))
    p = Path(arg)
    if (p / "plan.json").is_file():
        return Target("sweep", p)
    if p.is_file() and p.name == "plan.json":
        return Target("sweep", p.parent)
    if p.is_file() and p.suffix == ".jsonl" and p.name.startswith("rank"):
        return Target("run", p.parent)
    if not p.is_dir() or is_run_dir(p):
        return Target("run", p)
    if RunDirScanner(p).scan():
        return Target("results", p)
    return Target("run", p)          # an empty directory: a run that has not logged yet


class Session:
    """Holds the followed run, the table (sweep/results), and the latest GPU/host samples."""

    def __init__(self, target: Target, gpu_source: GpuSource | None = None, host_source: Any | None = None,
                 scan_interval: float = 2.0, table_interval: float = 2.0, clock=time.monotonic,
                 history: int = HISTORY):
        self.target = target
        self.gpu_source = gpu_source if gpu_source is not None else default_gpu_source()
        self.host_source = host_source if host_source is not None else HostSource()
        self.local_host = getattr(self.host_source, "hostname", None)
        self.scan_interval = scan_interval
        self.table_interval = table_interval
        self.clock = clock
        self.history = history
        self.pinned = target.kind == "run"
        self.scanner: RunDirScanner | None = None
        if target.kind in ("follow", "sweep", "results"):
            self.scanner = RunDirScanner(target.path)
        self.watcher: RunWatcher | None = None
        self._chosen_at = 0.0          # wall time the followed run was chosen (for "a new run appeared")
        self._next_scan = 0.0
        self._next_table = 0.0
        self.table: TableState | None = None
        self._plan_sig: tuple | None = None
        self._plan: dict | None = None
        self.probe_cache = ProbeCache()
        self.gpu: GpuSnapshot | None = None
        self.host: HostSnapshot | None = None
        self.live_rss: dict[int, float] = {}
        self.gpu_version = 0
        self.notice: str | None = None
        if target.kind == "run":
            self._open(target.path)

    # -- the followed run
    @property
    def run(self) -> RunState | None:
        return self.watcher.state if self.watcher else None

    def _open(self, run_dir: Path) -> None:
        self.watcher = RunWatcher(run_dir, RunState(run_dir, self.history))
        self._chosen_at = time.time()
        self.live_rss = {}

    def open_run(self, run_dir: str | os.PathLike, pin: bool = True) -> None:
        """Show this run (Enter in the table); pinned runs are not replaced by newer ones until ``follow()``."""
        run_dir = Path(run_dir)
        if self.watcher is None or self.watcher.run_dir != run_dir:
            self._open(run_dir)
        self.pinned = pin

    def follow(self) -> None:
        if self.target.kind != "run":
            self.pinned = False
            self._next_scan = 0.0

    def _pick_run(self, now: float) -> bool:
        if self.scanner is None or self.pinned or now < self._next_scan:
            return False
        self._next_scan = now + self.scan_interval
        self.scanner.scan()
        cur = self.watcher.run_dir if self.watcher else None
        choice = None
        if cur is None or cur not in self.scanner.runs:
            choice = self.scanner.newest()
        else:
            fresh = self.scanner.newly_started(self._chosen_at)
            if fresh is not None and fresh != cur:
                choice = fresh
            else:
                st = self.watcher.state
                newest = self.scanner.newest()
                ended = st.final_summary() is not None or st.status() == "dead"  # a killed run ends too
                if newest is not None and newest != cur and ended \
                        and self.scanner.runs[newest] > self.scanner.runs.get(cur, 0.0):
                    choice = newest
        if choice is not None and choice != cur:
            self._open(choice)
            return True
        return False

    # -- the table
    def _table_root(self) -> tuple[str, Path] | None:
        k = self.target.kind
        if k == "sweep":
            return "sweep", self.target.path
        if k == "results":
            return "runs", self.target.path
        if k == "follow":
            cur = self.watcher.run_dir if self.watcher else None
            if cur is not None and (cur.parent / "plan.json").is_file():
                return "sweep", cur.parent
            return "runs", self.target.path
        # a single run: show its sweep when it belongs to one
        if (self.target.path.parent / "plan.json").is_file():
            return "sweep", self.target.path.parent
        return None

    def _load_plan(self, root: Path) -> dict | None:
        p = root / "plan.json"
        try:
            s = os.stat(p)
            sig = (str(p), s.st_ino, s.st_size, s.st_mtime_ns)
        except OSError:
            return None
        if sig != self._plan_sig:
            self._plan_sig = sig
            try:
                plan = json.loads(p.read_text(encoding="utf-8"))
                self._plan = plan if isinstance(plan, dict) else None
            except (OSError, ValueError):
                self._plan = None
        return self._plan

    def _update_table(self, now: float, force: bool = False) -> bool:
        if not force and now < self._next_table:
            return False
        self._next_table = now + self.table_interval
        tr = self._table_root()
        if tr is None:
            changed = self.table is not None
            self.table = None
            return changed
        kind, root = tr
        if self.table is None or self.table.root != root or self.table.kind != kind:
            self.table = TableState(kind, root)
        live = self.run
        entries = []
        if kind == "sweep":
            plan = self._load_plan(root) or {}
            self.table.title = str(plan.get("sweep") or root.name)
            for i, pe in enumerate(plan.get("entries") or []):
                if not isinstance(pe, dict) or not pe.get("run"):
                    continue
                d = root / str(pe["run"])
                lv = live if (live is not None and live.run_dir == d) else None
                entries.append(self._entry(str(d), i, d, pe, lv))
        else:
            self.table.title = str(root)
            if self.scanner is not None and self.scanner.root == root and self.scanner.scans:
                dirs = self.scanner.runs
            else:
                sc = RunDirScanner(root)
                dirs = sc.scan()
            for i, d in enumerate(sorted(dirs)):
                lv = live if (live is not None and live.run_dir == d) else None
                entries.append(self._entry(str(d), i, d, None, lv))
        return self.table.set_entries(entries)

    def _entry(self, key: str, order: int, d: Path, pe: dict | None, lv: RunState | None) -> EntryState:
        """A table row; a run without a summary gets its liveness from rank 0's pid on this host and last record."""
        pr = probe_run(d, self.probe_cache)
        state = None
        if lv is None and pr.exists and not pr.summaries.get(0) and pr.synth is None:
            state = probe_liveness(pr, self.local_host, self._alive)
        return make_entry(key, order, d, pe, pr, lv, state)

    def _alive(self, pid, started=None) -> bool | None:
        fn = getattr(self.host_source, "alive", None)
        return fn(pid, started) if fn is not None else None

    # -- one tick
    @property
    def catching_up(self) -> bool:
        """A long backlog of the followed run is still being read (see ``RunWatcher.poll(budget_s)``)."""
        return self.watcher is not None and self.watcher.behind

    def poll(self, now: float | None = None, force_table: bool = False, budget_s: float | None = None) -> set[str]:
        """Read what is new. Returns what changed: subset of {"switched", "run", "table"}."""
        now = self.clock() if now is None else now
        changed = set()
        if self._pick_run(now):
            changed.add("switched")
            force_table = True
        if self.watcher is not None and self.watcher.poll(budget_s):
            changed.add("run")
        if self._update_table(now, force_table):
            changed.add("table")
        return changed

    def sample_gpu(self) -> None:
        """Sample NVML and the host (psutil) and refresh the live RSS of the followed run's ranks."""
        try:
            self.gpu = self.gpu_source.sample()
        except Exception as e:   # a source must never take the monitor down
            self.gpu = GpuSnapshot(time.time(), [], f"{type(e).__name__}: {e}")
        try:
            self.host = self.host_source.sample()
        except Exception as e:
            self.host = HostSnapshot(time.time(), self.local_host or "?", unavailable=f"{type(e).__name__}: {e}")
        rss: dict[int, float] = {}
        run = self.run
        if run is not None and run.final_summary() is None:
            for r, rs in run.ranks.items():
                m = rs.meta or {}
                if m.get("host") == self.local_host and isinstance(m.get("pid"), int):
                    v = self.host_source.rss_mib(m["pid"], m.get("time"))
                    if v is not None:
                        rss[r] = v
            # which ranks' processes still exist: a run whose local ranks are all gone is dead (sftbench.liveness)
            run.set_alive(liveness.rank_alive({r: rs.meta for r, rs in run.ranks.items() if rs.meta},
                                              self.local_host, self._alive))
        self.live_rss = rss
        self.gpu_version += 1

    def load_all(self) -> None:
        """One-shot: pick the run, read every log to its end, build the table, sample GPU/host once."""
        self.poll(now=float("inf"), force_table=False)
        if self.watcher is not None:
            self.watcher.read_all()
        self.sample_gpu()  # first: it finds which of the run's processes are alive, which the table shows
        self._update_table(0.0, force=True)

    def close(self) -> None:
        try:
            self.gpu_source.close()
        except Exception:
            pass

    # -- export
    def export(self, view: str) -> dict[str, Any]:
        out: dict[str, Any] = {"view": view, "time": time.time(), "target": {"kind": self.target.kind,
                                                                              "path": str(self.target.path)}}
        run = self.run
        if view in ("run", "gpu"):
            if run is not None:
                out["run"] = run.header()
                out["ranks"] = [{k: c.text for k, c in cells.items()} | {"rank": int(key)}
                                for key, cells in rank_rows(run, self.live_rss)]
            else:
                out["run"] = None
        if view == "gpu" or view == "run":
            g = self.gpu
            out["gpu"] = None if g is None else {
                "unavailable": g.unavailable,
                "gpus": [{k: c.text for k, c in cells.items()} for _, cells in gpu_rows(g, run, self.local_host)],
            }
            out["host"] = host_line(self.host)[0]
        if view == "sweep":
            t = self.table
            out["table"] = None if t is None else {"kind": t.kind, "root": str(t.root), "title": t.title,
                                                   "entries": [entry_json(e) for e in t.entries]}
        return out
