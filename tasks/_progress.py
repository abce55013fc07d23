"""Progress an operator can read: a Prefect progress artifact whose description carries the count, the
rate and the time left, and the same line in the run's log, at most every few seconds.

`Progress` is driven by a callback (embed, distill); `progress_artifact` turns the library's own progress
lines (`alignet_core.pipeline.progress.ProgressLog`) into an artifact for the length of a `with` block."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from alignet_core.pipeline.progress import LOGGER, ProgressLog, ProgressRecord


class Progress:
    """`update(done)` after each unit of work (a callback for embed and distill); the artifact and a log
    line follow at most every `every_s` seconds (and at the end). The rate counts only the work done by
    this run (a resumed stage's earlier chunks are not), so the time left is honest after a resume."""

    def __init__(self, key: str, what: str, unit: str, total: int, every_s: float = 10.0) -> None:
        self.lines = ProgressLog(what, unit, total, every_s)
        self._artifact = progress_artifact(key, what)
        self._artifact.__enter__()

    def update(self, done: int, total: int | None = None) -> None:
        if total is not None:
            self.lines.total = total
        self.lines.update(done)

    def finish(self) -> None:
        self._artifact.__exit__(None, None, None)


def _show(artifact: object, done: int, total: int, line: str) -> None:
    update_progress_artifact(artifact_id=artifact, progress=100.0 * done / max(total, 1), description=line)


class _ArtifactHandler(logging.Handler):
    """Updates one progress artifact from the progress records of the kinds of work in `whats`."""

    def __init__(self, artifact: object, whats: tuple[str, ...]) -> None:
        super().__init__(logging.INFO)
        self.artifact, self.whats = artifact, whats
        self.last: ProgressRecord | None = None

    def emit(self, record: logging.LogRecord) -> None:
        p = getattr(record, "progress", None)
        if not isinstance(p, ProgressRecord) or p.what not in self.whats:
            return
        self.last = p
        try:
            _show(self.artifact, p.done, p.total, p.line)
        except Exception:  # a lost API call must not fail the work it reports on
            self.handleError(record)


@contextmanager
def progress_artifact(key: str, *whats: str) -> Iterator[None]:
    """A progress artifact `key` that follows the library's progress lines for `whats` (e.g. "k-means
    fit", then "k-means assign") while the block runs, and says "done" with the last count and the time
    when it ends without an error (a failed block leaves the last line standing)."""
    what = whats[0]
    artifact = create_progress_artifact(progress=0.0, key=key, description=f"{what}: starting")
    handler = _ArtifactHandler(artifact, whats)
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    t0 = time.monotonic()
    try:
        yield
    finally:
        logger.removeHandler(handler)
    last = handler.last
    if last is None:
        update_progress_artifact(artifact_id=artifact, progress=100.0,
                                 description=f"{what}: done in {time.monotonic() - t0:.0f} s (no work left)")
    else:
        update_progress_artifact(artifact_id=artifact, progress=100.0, description=f"{last.what}: done, "
                                 f"{last.total:,} {last.unit} in {time.monotonic() - t0:.0f} s")
