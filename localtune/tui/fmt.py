"""Formatting shared by the screens: sizes, ages, durations, numbers. `now()` is the one clock
the TUI reads, so snapshot tests can fix it. Durations and numbers are core's formatters
(localtune.progress), which the headless view uses too."""

from __future__ import annotations

import time

from localtune.progress import duration, num  # noqa: F401 - for the screens: fmt.duration

GiB = 1024**3


def now() -> float:
    return time.time()


def gb(n: int | float | None, digits: int = 1) -> str:
    return "-" if n is None else f"{n / GiB:.{digits}f} GB"


def age(t: float | None) -> str:
    """'12s ago', '5m ago', '3h ago', '2d ago', or '-'."""
    if not t:
        return "-"
    s = max(0.0, now() - t)
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= n:
            return f"{int(s // n)}{unit} ago"
    return f"{int(s)}s ago"


def when(t: float | None) -> str:
    """A wall-clock time: 'HH:MM' today, else 'Mon DD HH:MM'."""
    if not t:
        return "-"
    lt, ln = time.localtime(t), time.localtime(now())
    if lt[:3] == ln[:3]:
        return time.strftime("%H:%M", lt)
    return time.strftime("%b %d %H:%M", lt)
