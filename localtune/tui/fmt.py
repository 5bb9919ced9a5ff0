"""Formatting shared by the screens: sizes, ages, durations. `now()` is the one clock the TUI
reads, so snapshot tests can fix it."""

from __future__ import annotations

import time

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


def duration(s: float | None) -> str:
    """'4:05' or '1:02:03'; '-' when unknown."""
    if s is None or s != s:
        return "-"
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def when(t: float | None) -> str:
    """A wall-clock time: 'HH:MM' today, else 'Mon DD HH:MM'."""
    if not t:
        return "-"
    lt, ln = time.localtime(t), time.localtime(now())
    if lt[:3] == ln[:3]:
        return time.strftime("%H:%M", lt)
    return time.strftime("%b %d %H:%M", lt)


def num(v: float | None, fmt: str = ".4f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"
