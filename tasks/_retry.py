"""Which failures a stage task retries: crashes, not the user's errors.

Every stage task has `retries` for what a second try can get past (a worker killed or out of memory, a
lost file system, a training rank that died: `DistributedError`, whose rerun resumes from its newest
checkpoint). An `AlignetError` otherwise (a bad config, input or store: `ConfigError`, `InputError`,
`StoreError`) is deterministic: a retry meets it again after the delay, and the one-line message the CLI
prints as its `error:` line waits behind a second traceback. `retry_unless_user_error` is the tasks'
`retry_condition_fn`, so such a task fails on its first try.
"""

from __future__ import annotations

from typing import Any

from alignet_core.errors import AlignetError, DistributedError


def user_error(exc: BaseException | None) -> bool:
    """Whether `exc` is the user's to fix (an `AlignetError` other than a dead rank's `DistributedError`)."""
    return isinstance(exc, AlignetError) and not isinstance(exc, DistributedError)


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect's `retry_condition_fn` (task, task run, its Failed state): retry unless the task raised a
    user error. The state's data is the exception the task raised (what Prefect's engine hands here)."""
    return not user_error(state.data if isinstance(state.data, BaseException) else None)
