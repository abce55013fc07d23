"""benchmarks/distill_ranks.py: the GPU mode refuses clearly without two GPUs and its code runs end to end on
two CPU ranks (dry run, nothing written); the CPU mode's four set-ups run and report consistent numbers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks._machine import RESULTS
from benchmarks.distill_ranks import run_cpu

REPO = Path(__file__).resolve().parents[2]


def _bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "benchmarks.distill_ranks", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the refusal on a machine with fewer than 2 GPUs")
def test_gpu_mode_refuses_without_two_gpus() -> None:
    out = _bench("--gpu")
    assert out.returncode == 1
    assert "--gpu needs a machine with at least 2 CUDA GPUs; torch sees" in out.stderr and "--dry-run" in out.stderr


@pytest.mark.slow
def test_gpu_mode_code_runs_on_two_cpu_ranks_and_writes_nothing() -> None:
    before = sorted(RESULTS.glob("distill_ranks*.json"))
    stamps = [p.stat().st_mtime for p in before]
    out = _bench("--gpu", "--dry-run", "--repeats", "1")
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert "not a GPU result" in result["mode"] and result["backend"] == "gloo" and result["devices"] == 2
    assert result["micro_batch_triplets"] == 8 and result["efficiency"] > 0
    assert sorted(RESULTS.glob("distill_ranks*.json")) == before and [p.stat().st_mtime for p in before] == stamps


@pytest.mark.slow
def test_cpu_mode_reports_every_set_up() -> None:
    r = run_cpu(steps=2, repeats=1, n_images=60)
    for name in ("one_rank_1_thread", "one_rank_all_threads", "two_ranks", "independent_halves"):
        assert len(r[f"{name}_s"]) == 1 and r[f"{name}_steps_per_s"] > 0, name
    assert r["efficiency"] == pytest.approx(r["one_rank_1_thread_s"][0] / r["two_ranks_s"][0] / 2, abs=2e-3)
    assert r["machine_ceiling"] * r["efficiency_vs_ceiling"] == pytest.approx(r["efficiency"], rel=1e-2)
    assert r["threads_per_rank"] >= 1
