"""The GPU tests: every CUDA path of the pipeline, run on a GPU by `make gpu-check` (`pytest -m gpu tests/gpu`).

Every test takes the `device` fixture: the CUDA GPU when torch sees one, else it is skipped with the
reason. `ALIGNET_GPU_TESTS_DEVICE=cpu` runs them on the CPU instead, with small models: a dry run of the
tests' own code (`scripts/gpu_check.py --dry-run`), in which the GPU-only facts (bf16 rows, pinned
memory, nvjpeg) hold trivially or are checked as their CPU counterparts.

These modules import only what the GPU machine's image has or the wheelhouse carries (torch, timm,
numpy, zarr, pydantic): no FAISS, scikit-learn or Prefect; Dask only inside the test that needs it.
"""

from __future__ import annotations

import os

import pytest
import torch

NO_GPU = ("torch sees no CUDA GPU (torch.cuda.is_available() is False): run on a GPU machine "
          "(make gpu-check), or ALIGNET_GPU_TESTS_DEVICE=cpu for a dry run of the tests' code")


@pytest.fixture(scope="session")
def device() -> torch.device:
    """The device under test: `cuda` (its first GPU), or the CPU for a dry run."""
    forced = os.environ.get("ALIGNET_GPU_TESTS_DEVICE")
    if forced:
        return torch.device(forced)
    if not torch.cuda.is_available():
        pytest.skip(NO_GPU)
    return torch.device("cuda", 0)
