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


@pytest.fixture(autouse=True)
def _torch_threads_left_as_found():
    """Every test leaves torch's thread count as it found it. One that does not changes the numbers of the tests
    after it (a float32 sum split over another number of threads adds in another order): the reproducibility test
    compares this process's run with a fresh process's, bit for bit."""
    import torch

    before = torch.get_num_threads()
    yield
    after = torch.get_num_threads()
    assert after == before, f"this test left torch on {after} thread(s), it found {before}: restore it"
