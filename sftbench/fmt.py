"""Units and number formatting shared by the report, the monitor and the planner (torch-free, standard library only).

``fmt_duration`` is the tables' coarse form ('12.3min', '1.5h'); ``fmt_clock`` the live views' ('12m18s'). Every
formatter shows '-' for a missing value.
"""
from __future__ import annotations

import math
from typing import Any

MIB = 2 ** 20  # bytes in a MiB: NVML, torch and psutil report bytes; every *_mib field of the log is in these


def as_number(v: Any) -> float | None:
    """A finite int or float as a float; anything else (None, bool, NaN, text) as None."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)) and math.isfinite(v):
        return float(v)
    return None


def fmt_float(v: Any, digits: int = 3) -> str:
    x = as_number(v)
    return "-" if x is None else f"{x:.{digits}f}"


def fmt_int(v: Any) -> str:
    x = as_number(v)
    return "-" if x is None else f"{x:,.0f}"


def fmt_mib(v: Any) -> str:
    """MiB -> '512 MiB' / '12.3 GiB'."""
    x = as_number(v)
    if x is None:
        return "-"
    if abs(x) >= 1024:
        return f"{x / 1024:.1f} GiB"
    return f"{x:.0f} MiB"


def fmt_clock(v: Any) -> str:
    """Seconds as a clock-like span for live views: '42.0s', '12m18s', '3h05m', '2d04h'."""
    x = as_number(v)
    if x is None:
        return "-"
    x = max(0.0, x)
    if x < 60:
        return f"{x:.1f}s"
    m, s = divmod(int(round(x)), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h}h{m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d{h:02d}h"


def fmt_params(v: Any) -> str:
    x = as_number(v)
    if x is None:
        return "-"
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def fmt_g(v: Any) -> str:
    """Compact number for chart labels: 4 significant digits, no exponent below a million."""
    x = as_number(v)
    if x is None:
        return "-"
    if abs(x) >= 10_000:
        return f"{x:,.0f}"
    return f"{x:.4g}"


def fmt_e(n) -> str:
    """500000000 -> '5e8', 1e9 -> '1e9', 150000000 -> '1.5e8'."""
    if n is None:
        return "-"
    n = float(n)
    if n == 0:
        return "0"
    exp = int(math.floor(math.log10(abs(n))))
    mant = n / 10 ** exp
    m = f"{mant:.2f}".rstrip("0").rstrip(".")
    return f"{m}e{exp}"


def fmt_duration(s: float | None) -> str:
    """Seconds, coarse, for tables: '45s', '12.3min', '1.5h'."""
    if s is None:
        return "-"
    if s < 60:
        return f"{s:.0f}s" if s >= 10 else f"{s:.1f}s"
    if s < 3600:
        return f"{s / 60:.1f}min"
    return f"{s / 3600:.1f}h"


def fmt_step(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s:.2f}s/it" if s < 10 else f"{s:.1f}s/it"


def fmt_num(v, nd: int = 0, suffix: str = "") -> str:
    if v is None:
        return "-"
    return f"{v:,.{nd}f}{suffix}"


def fmt_sig(v) -> str:
    """1 decimal from 1 up, 3 significant digits below (CPU runs reach a few GFLOPS)."""
    if v is None:
        return "-"
    return f"{v:,.1f}" if abs(v) >= 1 else f"{v:.3g}"


def skipped_steps_text(n: int, precision: str | None) -> str:
    """``n`` steps whose optimizer update DeepSpeed skipped (``skipped`` in the log), with the cause the run's
    precision implies: fp16's loss scale coming down, or non-finite bf16 gradients where a config turns
    ``bf16.check_grad_overflow`` on."""
    if precision == "fp16":
        return (f"{n} fp16 overflow step(s) that skipped the optimizer update while the loss scale came down (it "
                "halves per overflow)")
    if precision == "bf16":
        return (f"{n} step(s) with non-finite bf16 gradients that skipped the optimizer update "
                "(bf16.check_grad_overflow)")
    return f"{n} step(s) that skipped the optimizer update (gradient overflow)"
