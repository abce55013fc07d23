"""Follow a flow run on the Prefect server: its log lines (and its subflows') as they arrive, then its
final state with the reason, so a run started by `prefect deployment run` (whose `--watch` prints only
state changes) ends on the terminal with why it failed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterParentFlowRunId,
    LogFilter,
    LogFilterFlowRunId,
    LogFilterTimestamp,
    TaskRunFilter,
    TaskRunFilterFlowRunId,
)
from prefect.client.schemas.sorting import LogSort

from alignet_core.errors import InputError

PAGE = 200
LATE = timedelta(seconds=60)


@dataclass(frozen=True)
class Outcome:
    """How a watched run ended: its state's name and type, and the reason (the state's message, and the
    messages of its failed or crashed task runs)."""

    name: str
    state: str
    reasons: list[str]

    @property
    def ok(self) -> bool:
        return self.state == "COMPLETED"


def _run_ids(client, run_id: uuid.UUID) -> list[uuid.UUID]:
    """The run and its subflow runs (any depth)."""
    ids, frontier = [run_id], [run_id]
    while frontier:
        subs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
        frontier = [r.id for r in subs if r.id not in ids]
        ids += frontier
    return ids


def _reasons(client, run, ids: list[uuid.UUID]) -> list[str]:
    reasons = [f"{run.state.name}: {run.state.message}"] if run.state and run.state.message else []
    tasks = client.read_task_runs(task_run_filter=TaskRunFilter(flow_run_id=TaskRunFilterFlowRunId(any_=ids)))
    for t in tasks:
        if t.state is not None and t.state.type.value in ("FAILED", "CRASHED") and t.state.message:
            reasons.append(f"task {t.name}: {t.state.name}: {t.state.message}")
    return reasons


def _new_logs(client, ids: list[uuid.UUID], seen: set[uuid.UUID], since: datetime | None) -> list:
    """The runs' log lines not yet in `seen` (added to it), oldest first. Lines reach the server in batches
    from several processes, so one may arrive after a later one: every poll reads back `LATE` before the
    newest line seen."""
    after = None if since is None else since - LATE
    out, offset = [], 0
    while True:
        page = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids),
                                                     timestamp=LogFilterTimestamp(after_=after)),
                                sort=LogSort.TIMESTAMP_ASC, limit=PAGE, offset=offset)
        out += [entry for entry in page if entry.id not in seen]
        seen.update(entry.id for entry in page)
        if len(page) < PAGE:
            return out
        offset += PAGE


def follow(flow_run_id: str, poll_s: float = 2.0, timeout_s: float | None = None,
           settle_s: float = 30.0) -> Iterator[str | Outcome]:
    """Yield the run's log lines (`HH:MM:SS LEVEL message`) as they arrive, then its `Outcome` once it is in a
    final state and its last line arrived (lines reach the server in batches, after the state; at most
    `settle_s` of waiting for a run that never wrote it, e.g. a crashed one). `InputError` for an id that is
    not a UUID or names no run; `TimeoutError` after `timeout_s`."""
    try:
        run_id = uuid.UUID(flow_run_id)
    except ValueError:
        raise InputError(f"flow run id: expected a UUID (as `prefect deployment run` prints), got {flow_run_id!r}") from None
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    seen: set[uuid.UUID] = set()
    since: datetime | None = None
    final_at, last_line = 0.0, False
    with get_client(sync_client=True) as client:
        try:
            client.read_flow_run(run_id)
        except Exception as err:  # ObjectNotFound, or a server that cannot be reached
            raise InputError(f"flow run {flow_run_id}: not found on the Prefect server ({type(err).__name__})") from None
        while True:
            run = client.read_flow_run(run_id)  # read first: the logs read after it are complete for a final state
            ids = _run_ids(client, run_id)
            for entry in _new_logs(client, ids, seen, since):
                since = entry.timestamp if since is None else max(since, entry.timestamp)
                last_line |= entry.flow_run_id == run_id and entry.task_run_id is None and \
                    entry.message.startswith("Finished in state")
                yield f"{entry.timestamp:%H:%M:%S} {logging.getLevelName(entry.level)} {entry.message}"
            if run.state is not None and run.state.is_final():
                final_at = final_at or time.monotonic()
                # the engine's own last line ("Finished in state ...") comes in a later batch than the state;
                # a crashed run never writes it
                if last_line or time.monotonic() - final_at > settle_s:
                    yield Outcome(name=run.name, state=run.state.type.value, reasons=_reasons(client, run, ids))
                    return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"flow run {flow_run_id} is still {run.state.name if run.state else 'pending'}")
            time.sleep(poll_s)
