"""Progress an operator can read: a Prefect progress artifact whose description carries the count, the
rate and the time left, and the same line in the run's log, at most every few seconds.

`progress_artifact` turns the library's progress lines (`alignet_core.runtime.progress.ProgressLog`, also
driven from the tasks' callbacks for embed and distill) into an artifact for the length of a `with` block;
a failed block removes its listener too."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from alignet_core.runtime.progress import LOGGER, ProgressRecord


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
