"""Progress an operator can read: a Prefect progress artifact whose description carries the count, the
rate and the time left, and the same line in the run's log, at most every few seconds."""

from __future__ import annotations

import logging
import time

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from alignet_core.pipeline.progress import progress_line

log = logging.getLogger("alignet_core.progress")


class Progress:
    """`update(done)` after each unit of work; the artifact and a log line follow at most every `every_s`
    seconds (and at the end). The rate counts only the work done by this run (a resumed stage's earlier
    chunks are not), so the time left is honest after a resume."""

    def __init__(self, key: str, what: str, unit: str, total: int, every_s: float = 10.0) -> None:
        self.what, self.unit, self.total, self.every_s = what, unit, max(total, 0), every_s
        self.artifact = create_progress_artifact(progress=0.0, key=key, description=f"{what}: starting")
        self.t0 = self.last = time.monotonic()
        self.first: int | None = None

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.total = total
        now = time.monotonic()
        if self.first is None:
            self.first, self.t0 = done, now
        if now - self.last < self.every_s and done < self.total:
            return
        self.last = now
        line = progress_line(self.what, self.unit, done, self.total, done - self.first, now - self.t0)
        update_progress_artifact(artifact_id=self.artifact, progress=100.0 * done / max(self.total, 1), description=line)
        log.info(line)

    def finish(self) -> None:
        update_progress_artifact(artifact_id=self.artifact, progress=100.0,
                                 description=f"{self.what}: done, {self.total:,} {self.unit} "
                                             f"in {time.monotonic() - self.t0:.0f} s")
