"""One progress line: the count, the share, the rate and the time left."""

from __future__ import annotations


def duration(seconds: float) -> str:
    """`h:mm:ss` (or `m:ss` under an hour)."""
    s = max(int(round(seconds)), 0)
    h, rest = divmod(s, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(what: str, unit: str, done: int, total: int, done_here: int, seconds: float) -> str:
    """E.g. `embed: 1,024/1,906 images (53.7%), 41.2 images/s, 0:21 left`. The rate is `done_here` (the work
    of this process) over `seconds`; the time left is unknown until some work is done."""
    share = f" ({100 * done / total:.1f}%)" if total else ""
    if done_here <= 0 or seconds <= 0:
        return f"{what}: {done:,}/{total:,} {unit}{share}"
    rate = done_here / seconds
    left = duration((total - done) / rate) if total >= done else "?"
    shown = f"{rate:.3g}" if rate < 100 else f"{rate:,.0f}"
    return f"{what}: {done:,}/{total:,} {unit}{share}, {shown} {unit}/s, {left} left"
