"""One progress line: the count, the share, the rate and the time left; and `ProgressLog`, which logs it.

Library code reports long work through `ProgressLog`: a throttled INFO line on the `alignet_core.progress`
logger whose record also carries the numbers (`record.progress`, a `ProgressRecord`), so a caller that
wants more than a log line (the Prefect tasks publish progress artifacts) listens to that logger
instead of threading callbacks through every function.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

LOGGER = "alignet_core.progress"


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


@dataclass(frozen=True)
class ProgressRecord:
    """The numbers behind one progress line (attached to its log record as `record.progress`)."""

    what: str
    unit: str
    done: int
    total: int
    line: str


class ProgressLog:
    """`update(done)` after each unit of work: a progress line is logged at most every `every_s` seconds,
    and always for the first and the last unit. The rate counts only work done since the first update
    (a resumed stage's earlier work is given as `done` there), so the time left stays honest."""

    def __init__(self, what: str, unit: str, total: int, every_s: float = 10.0,
                 logger: logging.Logger | None = None) -> None:
        self.what, self.unit, self.total, self.every_s = what, unit, max(int(total), 0), every_s
        self.log = logger or logging.getLogger(LOGGER)
        self.first: int | None = None
        self.t0 = self.last = 0.0

    def update(self, done: int, extra: str = "", total: int | None = None) -> None:
        """Record that `done` of `total` units are finished (`total` updated when given, for work whose size is
        known only once it starts); `extra` is appended to the line."""
        if total is not None:
            self.total = max(int(total), 0)
        now = time.monotonic()
        if self.first is None:
            self.first, self.t0 = done, now
        elif now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        line = progress_line(self.what, self.unit, done, self.total, done - self.first, now - self.t0) + extra
        self.log.info("%s", line, extra={"progress": ProgressRecord(self.what, self.unit, done, self.total, line)})
