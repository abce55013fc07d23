"""Session-wide test setup: a project-local Prefect home and no analytics, set before Prefect loads."""

import os
from pathlib import Path

_HOME = Path(__file__).resolve().parent.parent / ".prefect" / "tests"
os.environ.setdefault("PREFECT_HOME", str(_HOME))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


import pytest  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small torch fits run far faster on one thread on a shared 2-core machine; restored after."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
