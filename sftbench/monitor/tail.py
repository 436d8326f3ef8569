"""Incremental readers of the run logs.

* ``FileTailer``  one rank file, read by byte offset: each poll reads only the bytes appended since the last one,
  keeps an incomplete last line until its newline arrives, and starts over from byte 0 when the file was
  truncated (size < offset), replaced (device/inode changed) or rewritten in place (its first bytes changed).
  Lines that are not a JSON object with a ``type`` are skipped and counted.
* ``RunWatcher``  every rank file of one run directory plus the sweep's ``summary.json``, feeding a
  ``state.RunState``.
* ``probe_run``   a cheap look at a run directory (first line of rank 0, last records of every rank file) for
  tables of many runs; results are cached by file identity, size and mtime so an unchanged run costs one stat.
* ``RunDirScanner`` finds run directories under a root and tells which one is newest.

Nothing here imports torch, deepspeed or Textual.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .state import RunState

RANK_PREFIX = "rank"
RANK_SUFFIX = ".jsonl"
# Files whose presence makes a directory a run directory (the sweep writes predicted.json/console.log first).
RUN_MARKERS = ("summary.json", "predicted.json", "console.log")


def _rank_of(name: str) -> int | None:
    if name.startswith(RANK_PREFIX) and name.endswith(RANK_SUFFIX):
        mid = name[len(RANK_PREFIX):-len(RANK_SUFFIX)]
        if mid.isdigit():
            return int(mid)
    return None


_scan_once = json.JSONDecoder().scan_once     # the C scanner: no per-line encoding detection


def parse_line(line: bytes | str) -> dict | None:
    """One JSONL line -> record, or None when it is not a JSON object with a ``type``."""
    if isinstance(line, bytes):
        line = line.decode("utf-8", "replace")
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        rec, end = _scan_once(line, 0)
    except (ValueError, StopIteration):
        return None
    if end != len(line) or not isinstance(rec, dict) or "type" not in rec:
        return None
    return rec


@dataclass
class TailUpdate:
    records: list[dict] = field(default_factory=list)
    bad: int = 0            # garbage lines skipped in this poll
    reset: bool = False     # the file was truncated/replaced: the records start from the beginning again
    gone: bool = False      # the file disappeared


class FileTailer:
    """Reads one JSONL file incrementally by byte offset."""

    HEAD = 256                  # bytes of the file's start remembered to notice an in-place rewrite
    MAX_PARTIAL = 16 << 20      # an unterminated "line" longer than this is dropped and counted as garbage

    def __init__(self, path: str | os.PathLike, max_read: int = 64 << 20):
        self.path = Path(path)
        self.max_read = max_read
        self.offset = 0
        self.size = 0
        self.ident: tuple[int, int] | None = None
        self.partial = b""
        self.head = b""
        self.bad_lines = 0      # since the last reset
        self.resets = 0

    def _reset(self) -> None:
        self.offset = 0
        self.partial = b""
        self.head = b""
        self.bad_lines = 0
        self.resets += 1

    @property
    def pending_partial(self) -> bool:
        return bool(self.partial)

    @property
    def behind(self) -> bool:
        """More bytes were on disk at the last poll than have been read (a capped read of a long backlog)."""
        return self.size > self.offset

    def poll(self, max_bytes: int | None = None) -> TailUpdate:
        """Read what was appended since the last poll (at most ``max_bytes``, default ``max_read``)."""
        try:
            st = os.stat(self.path)
        except OSError:
            if self.ident is not None:
                self.ident = None
                self._reset()
                return TailUpdate(reset=True, gone=True)
            return TailUpdate()
        ident = (st.st_dev, st.st_ino)
        reset = False
        if self.ident is not None and (ident != self.ident or st.st_size < self.offset):
            self._reset()
            reset = True
        self.ident = ident
        self.size = st.st_size
        if st.st_size == self.offset:
            return TailUpdate(reset=reset)
        try:
            with open(self.path, "rb") as f:
                if self.offset and self.head:
                    # Same inode, not shorter, but rewritten from the start? Then its first bytes differ.
                    if f.read(len(self.head)) != self.head:
                        self._reset()
                        reset = True
                start = self.offset
                f.seek(start)
                data = f.read(min(st.st_size - start, max_bytes or self.max_read))
        except OSError:
            return TailUpdate(reset=reset)
        if start < self.HEAD:
            self.head = (self.head + data)[: self.HEAD]
        self.offset = start + len(data)
        upd = TailUpdate(reset=reset)
        buf = self.partial + data if self.partial else data
        cut = buf.rfind(b"\n")
        if cut < 0:
            complete, self.partial = b"", buf
        else:
            complete, self.partial = buf[:cut], buf[cut + 1:]
        if len(self.partial) > self.MAX_PARTIAL:
            self.partial = b""
            upd.bad += 1
        # Decode whole lines only (a newline byte never sits inside a UTF-8 sequence); bad bytes -> U+FFFD.
        append = upd.records.append
        for line in complete.decode("utf-8", "replace").split("\n"):
            if not line or line.isspace():
                continue
            rec = parse_line(line)
            if rec is None:
                upd.bad += 1
            else:
                append(rec)
        self.bad_lines += upd.bad
        return upd

    def read_all(self) -> TailUpdate:
        """Poll until caught up with the file's current size (for one-shot readers)."""
        total = self.poll()
        while True:
            try:
                size = os.stat(self.path).st_size
            except OSError:
                return total
            if size <= self.offset:
                return total
            more = self.poll()
            if more.reset:
                total = more
            else:
                total.records.extend(more.records)
                total.bad += more.bad


def scan_rank_files(run_dir: Path) -> dict[int, Path]:
    out: dict[int, Path] = {}
    try:
        with os.scandir(run_dir) as it:
            for e in it:
                r = _rank_of(e.name)
                if r is not None:
                    out[r] = Path(e.path)
    except OSError:
        pass
    return out


class RunWatcher:
    """Follows one run directory: every ``rank<k>.jsonl`` plus ``summary.json``; feeds a ``RunState``."""

    def __init__(self, run_dir: str | os.PathLike, state: RunState | None = None):
        self.run_dir = Path(run_dir)
        self.state = state if state is not None else RunState(self.run_dir)
        self.tailers: dict[int, FileTailer] = {}
        self._synth_sig: tuple | None = None

    CHUNK = 1 << 20     # bytes per file per round while catching up under a time budget

    @property
    def behind(self) -> bool:
        return any(t.behind for t in self.tailers.values())

    def progress(self) -> tuple[int, int]:
        """(bytes read, bytes on disk at the last poll) over all rank files."""
        return (sum(t.offset for t in self.tailers.values()),
                sum(max(t.size, t.offset) for t in self.tailers.values()))

    def poll(self, budget_s: float | None = None) -> bool:
        """Read what is new; return True when the state changed.

        With ``budget_s`` a long backlog is read in ``CHUNK``-sized rounds over all files until the budget is
        spent; ``behind`` then tells that more is waiting (the app polls again at once, staying responsive).
        """
        st = self.state
        before = st.version
        exists = self.run_dir.is_dir()
        if exists != st.exists:
            st.exists = exists
            st.touch()
        files = scan_rank_files(self.run_dir) if exists else {}
        for rank, path in files.items():
            if rank not in self.tailers:
                self.tailers[rank] = FileTailer(path)
        if len(files) != st.rank_files:
            st.rank_files = len(files)
            st.touch()
        if budget_s is None:
            for rank in list(self.tailers):
                self._poll_one(rank, None)
        else:
            end = time.perf_counter() + budget_s
            ranks = list(self.tailers)
            first = True
            while ranks:
                for rank in ranks:
                    if first or self.tailers[rank].behind:
                        self._poll_one(rank, self.CHUNK)
                first = False
                ranks = [r for r in ranks if r in self.tailers and self.tailers[r].behind]
                if time.perf_counter() >= end:
                    break
        self._poll_synth()
        return st.version != before

    def _poll_one(self, rank: int, max_bytes: int | None) -> None:
        st = self.state
        t = self.tailers[rank]
        upd = t.poll(max_bytes)
        if upd.reset:
            st.reset_rank(rank)
        if upd.gone:
            del self.tailers[rank]
            st.drop_rank(rank)
            return
        if upd.records or upd.bad:
            st.feed(rank, upd.records, bad=upd.bad)
        rs = st.ranks.get(rank)
        if rs is not None and rs.partial != t.pending_partial:
            rs.partial = t.pending_partial
            st.touch()

    def _poll_synth(self) -> None:
        p = self.run_dir / "summary.json"
        try:
            s = os.stat(p)
            sig = (s.st_ino, s.st_size, s.st_mtime_ns)
        except OSError:
            sig = None
        if sig == self._synth_sig:
            return
        self._synth_sig = sig
        data = None
        if sig is not None:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                data = None
            if not isinstance(data, dict):
                data = None
        self.state.set_synth(data)

    def read_all(self) -> RunState:
        """Poll until every rank file has been read to its current end (one-shot use)."""
        self.poll()
        for _ in range(1000):
            if all(_size(t.path) <= t.offset for t in self.tailers.values()):
                break
            self.poll()
        return self.state


def _size(p: Path) -> int:
    try:
        return os.stat(p).st_size
    except OSError:
        return 0


# --------------------------------------------------------------------------------------------------------------
# Cheap probes of many runs (sweep / results tables)

@dataclass
class RunProbe:
    run_dir: Path
    exists: bool = False
    n_rank_files: int = 0
    meta0: dict | None = None
    last_step0: dict | None = None
    summaries: dict[int, dict] = field(default_factory=dict)   # rank -> summary record
    peaks: dict[str, float] = field(default_factory=dict)      # max over the ranks' last records/summaries
    synth: dict | None = None
    mtime: float = 0.0                                          # newest mtime of the dir and its rank files


def _read_head_record(path: Path, limit: int = 4 << 20) -> dict | None:
    try:
        with open(path, "rb") as f:
            line = f.readline(limit)
    except OSError:
        return None
    if not line.endswith(b"\n"):
        return None
    return parse_line(line)


def _read_tail_records(path: Path, size: int, first: int = 16 << 10, most: int = 1 << 20) -> list[dict]:
    """The complete records in the last bytes of a file (grows the window until a record is found)."""
    n = first
    while True:
        start = max(0, size - n)
        try:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(size - start)
        except OSError:
            return []
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]          # first piece is the tail of an earlier line
        if lines and not data.endswith(b"\n"):
            lines = lines[:-1]         # partial last line
        recs = [r for r in (parse_line(x) for x in lines if x.strip()) if r is not None]
        if recs or start == 0 or n >= most:
            return recs
        n *= 4


class ProbeCache:
    """Caches per-file probe results by (inode, size, mtime): unchanged files are not reopened."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[tuple, Any]] = {}

    def get(self, path: Path, sig: tuple, compute: Callable[[], Any]) -> Any:
        hit = self._files.get(path)
        if hit is not None and hit[0] == sig:
            return hit[1]
        val = compute()
        self._files[path] = (sig, val)
        return val

    def forget_under(self, root: Path) -> None:
        for p in [p for p in self._files if root in p.parents]:
            del self._files[p]


PEAK_KEYS = ("gpu_mem_used_mib", "torch_peak_reserved_mib", "host_rss_mib", "host_used_mib")
SUMMARY_PEAK_KEYS = {
    "gpu_mem_used_mib": "gpu_mem_used_mib_peak", "torch_peak_reserved_mib": "torch_peak_reserved_mib",
    "host_rss_mib": "host_rss_mib_peak", "host_used_mib": "host_used_mib_peak",
}


def probe_run(run_dir: str | os.PathLike, cache: ProbeCache | None = None) -> RunProbe:
    """What a table row needs of one run without reading its whole logs."""
    cache = cache if cache is not None else ProbeCache()
    d = Path(run_dir)
    pr = RunProbe(d)
    try:
        pr.mtime = os.stat(d).st_mtime
        pr.exists = True
    except OSError:
        return pr
    files = scan_rank_files(d)
    pr.n_rank_files = len(files)
    for rank, path in sorted(files.items()):
        try:
            s = os.stat(path)
        except OSError:
            continue
        pr.mtime = max(pr.mtime, s.st_mtime)
        sig = (s.st_ino, s.st_size, s.st_mtime_ns)

        def compute(path=path, size=s.st_size, rank=rank):
            recs = _read_tail_records(path, size)
            out: dict[str, Any] = {"last_step": None, "summary": None, "meta": None}
            for r in recs:
                t = r.get("type")
                if t == "step":
                    out["last_step"] = r
                elif t == "summary":
                    out["summary"] = r
                elif t == "meta":
                    out["meta"] = r
            if rank == 0 and out["meta"] is None:
                out["meta"] = _read_head_record(path)
            return out

        info = cache.get(path, sig, compute)
        if rank == 0:
            pr.meta0 = info["meta"]
            pr.last_step0 = info["last_step"]
        if info["summary"] is not None:
            pr.summaries[rank] = info["summary"]
        for k in PEAK_KEYS:
            v = None
            if info["summary"] is not None:
                v = info["summary"].get(SUMMARY_PEAK_KEYS[k])
            if v is None and info["last_step"] is not None:
                v = info["last_step"].get(k)
            if isinstance(v, (int, float)):
                pr.peaks[k] = max(pr.peaks.get(k, v), v)
    sp = d / "summary.json"
    try:
        s = os.stat(sp)
        sig = (s.st_ino, s.st_size, s.st_mtime_ns)

        def load_synth():
            try:
                v = json.loads(sp.read_text(encoding="utf-8"))
                return v if isinstance(v, dict) else None
            except (OSError, ValueError):
                return None

        pr.synth = cache.get(sp, sig, load_synth)
        pr.mtime = max(pr.mtime, s.st_mtime)
    except OSError:
        pass
    return pr


# --------------------------------------------------------------------------------------------------------------
# Finding runs

def is_run_dir(path: Path) -> bool:
    try:
        with os.scandir(path) as it:
            for e in it:
                if _rank_of(e.name) is not None or e.name in RUN_MARKERS:
                    return True
    except OSError:
        pass
    return False


def _dir_activity(path: Path, names: list[str]) -> float:
    """Newest mtime of a run directory and its rank files (what "newest run" is judged by)."""
    best = 0.0
    try:
        best = os.stat(path).st_mtime
    except OSError:
        return 0.0
    for n in names:
        try:
            best = max(best, os.stat(path / n).st_mtime)
        except OSError:
            pass
    return best


class RunDirScanner:
    """Finds run directories under a root (to a bounded depth) and their latest activity time.

    A directory is a run directory when it holds rank files or one of ``RUN_MARKERS``; run directories are not
    descended into. ``newest()`` is the one with the most recent modification (of the directory or a rank file).
    """

    def __init__(self, root: str | os.PathLike, max_depth: int = 4):
        self.root = Path(root)
        self.max_depth = max_depth
        self.runs: dict[Path, float] = {}     # run dir -> activity time
        self.first_seen: dict[Path, float] = {}
        self.scans = 0

    def scan(self) -> dict[Path, float]:
        found: dict[Path, float] = {}
        self._walk(self.root, 0, found)
        now = time.time()
        for p in found:
            if p not in self.first_seen:
                # Runs present at the first scan count as seen long ago (they are not "new").
                self.first_seen[p] = now if self.scans else 0.0
        self.runs = found
        self.scans += 1
        return found

    def _walk(self, d: Path, depth: int, found: dict[Path, float]) -> None:
        names, subdirs = [], []
        try:
            with os.scandir(d) as it:
                for e in it:
                    if _rank_of(e.name) is not None:
                        names.append(e.name)
                    elif e.name in RUN_MARKERS:
                        names.append("")
                    elif depth < self.max_depth and not e.name.startswith("."):
                        try:
                            if e.is_dir(follow_symlinks=False):
                                subdirs.append(Path(e.path))
                        except OSError:
                            pass
        except OSError:
            return
        if names:
            found[d] = _dir_activity(d, [n for n in names if n])
            return
        for s in subdirs:
            self._walk(s, depth + 1, found)

    def newest(self) -> Path | None:
        if not self.runs:
            return None
        return max(self.runs, key=lambda p: (self.runs[p], str(p)))

    def newly_started(self, since: float) -> Path | None:
        """The most recently appeared run directory first seen after ``since`` (a sweep's next run)."""
        new = [p for p, t in self.first_seen.items() if t > since and p in self.runs]
        if not new:
            return None
        return max(new, key=lambda p: (self.first_seen[p], self.runs[p]))
