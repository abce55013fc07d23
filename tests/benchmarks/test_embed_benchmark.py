"""benchmarks/embed.py --gpu: refuses clearly without CUDA; its code runs end to end on the CPU (dry run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks._machine import RESULTS
from benchmarks.embed import peak_bf16_flops

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.embed", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1"})


def test_peak_flops_table_by_device_name() -> None:
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12  # SXM
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("Tesla T4") is None  # unknown: --peak-flops gives it


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_gpu_mode_refuses_without_cuda() -> None:
    out = _bench("--gpu")
    assert out.returncode == 2
    assert "a CUDA GPU is needed and torch sees none" in out.stderr and "--device cpu" in out.stderr


@pytest.mark.slow
def test_gpu_mode_code_runs_on_the_cpu_and_writes_no_result(tmp_path: Path) -> None:
    before = sorted(RESULTS.rglob("embed_gpu*.json"))
    out = _bench("--gpu", "--device", "cpu", "--model", "test_vit", "--images", "48", "--batch-size", "4",
                 "--workers", "1", "--iters", "3", "--warmup", "1", "--jpeg-dir", str(tmp_path / "jpegs"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["device"] == "cpu" and "not a GPU result" in result["note"]
    assert result["n_valid"] == 48 and result["synthetic_images_per_s"] > 0 and result["end_to_end_images_per_s"] > 0
    assert result["flops_per_image"] > 1e6 and result["mfu"] is None
    assert sorted(RESULTS.rglob("embed_gpu*.json")) == before
