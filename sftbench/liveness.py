"""Is a run that has written no summary still going? One rule for the monitor and the report; no torch import.

* ``dead``: every rank of the run that logged a pid on this host is gone (no such process, a zombie, or the pid now
  belongs to a process started after the run's meta record), and no summary was written.
* ``stalled?``: its processes can't be seen (ranks on another host, or psutil missing) or they exist, but no rank
  has written a record for longer than ``stall_limit_s``: 10 × its slowest step so far, at least 5 minutes; before
  the first step record, 15 minutes after the meta record (the first step can compile, build ops, page in offloaded
  state).
* ``running``: otherwise.
"""
from __future__ import annotations

import time
from typing import Iterable, Mapping

STALL_STEPS = 10                 # silent for this many of the slowest step so far ...
STALL_FLOOR_S = 300.0            # ... and at least this long
STALL_FIRST_STEP_S = 900.0       # meta written, no step yet
PID_REUSE_SLACK_S = 5.0          # a process created this long after the run's meta time is another one


def pid_alive(pid, started: float | None = None) -> bool | None:
    """True/False for a pid on this host; None when it can't be told (psutil missing, not a pid)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        proc = psutil.Process(pid)
        if started is not None and proc.create_time() > started + PID_REUSE_SLACK_S:
            return False  # the pid was reused by a newer process
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # it exists, it is just not ours to inspect
    except OSError:
        return None


def stall_limit_s(slowest_step_s: float | None) -> float:
    """Seconds without a record after which a run whose processes are not known to be gone is ``stalled?``."""
    if slowest_step_s is None:
        return STALL_FIRST_STEP_S
    return max(STALL_FLOOR_S, STALL_STEPS * slowest_step_s)


def classify(alive: Iterable[bool | None], last_record_time: float | None, slowest_step_s: float | None,
             now: float | None = None) -> str:
    """``running``, ``stalled?`` or ``dead`` (module docstring) for a run without a summary. ``alive``: one entry per
    rank with a pid (None where it can't be checked from here)."""
    known = [a for a in alive if a is not None]
    if known and not any(known):
        return "dead"
    now = time.time() if now is None else now
    if last_record_time is not None and now - last_record_time > stall_limit_s(slowest_step_s):
        return "stalled?"
    return "running"


def rank_alive(metas: Mapping[int, dict], local_host: str | None, check=pid_alive) -> dict[int, bool | None]:
    """rank -> alive for every rank with a meta record: checked where it ran on this host, else None."""
    out: dict[int, bool | None] = {}
    for r, m in metas.items():
        if m and local_host is not None and m.get("host") == local_host:
            out[r] = check(m.get("pid"), m.get("time"))
        else:
            out[r] = None
    return out


def describe(state: str, last_record_time: float | None, slowest_step_s: float | None,
             now: float | None = None, with_state: bool = True) -> str:
    """One line saying what ``state`` means for this run, with the time of its last record (``with_state``: led by
    the state's name, for a reader that does not show it beside)."""
    text = _describe(state, last_record_time, slowest_step_s, now)
    return text if with_state or state not in ("dead", "stalled?") else text.split(": ", 1)[1]


def _describe(state: str, last_record_time: float | None, slowest_step_s: float | None,
              now: float | None = None) -> str:
    now = time.time() if now is None else now
    when = "no record yet" if last_record_time is None else (
        f"last record {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last_record_time))} "
        f"({_ago(now - last_record_time)} ago)")
    if state == "dead":
        return f"dead: no process of this run is left on this host and it wrote no summary; {when}"
    if state == "stalled?":
        return (f"stalled?: nothing written for longer than {_ago(stall_limit_s(slowest_step_s))} "
                f"(10 x its slowest step, at least 5 min; 15 min before the first step); {when}")
    return when


def _ago(s: float) -> str:
    s = max(0.0, s)
    if s < 120:
        return f"{s:.0f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"
