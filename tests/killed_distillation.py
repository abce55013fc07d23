"""A distillation run killed by SIGKILL after a given step, in a process of its own (no cleanup, no
`finally`: a real kill), for the resume tests of `tests/distill/test_distill.py` and `tests/gpu/`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

_KILLED_RUN = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from alignet_core.config.distill import DistillConfig
    from alignet_core.distill.train import train_student
    from alignet_core.io import formats, sources

    spec = json.loads(sys.argv[1])
    by_id = {r.id: r for r in sources.demo_source().records}
    pool = sources.ImageSource(tuple(by_id[i] for i in spec["ids"]), "demo subset")
    split = formats.read_alignet_npz(spec["npz"], len(pool))

    def die(step, loss):
        if step == spec["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)

    train_student(split, pool, DistillConfig(**spec["cfg"]), spec["out"], torch.device(spec.get("device", "cpu")),
                  spec["seed"], progress=die)
    """
)


def run_until_killed(spec: dict[str, Any], timeout: float = 300) -> subprocess.CompletedProcess:
    """Train as `spec` says and SIGKILL the process after step `spec["kill_at"]`.

    spec: ids (the demo images of the pool, in order), npz (the training split's official .npz), cfg (a
    `DistillConfig` dump), out (the run's directory), seed, kill_at, device (default 'cpu')."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", _KILLED_RUN, json.dumps(spec)], env={**os.environ, "PYTHONPATH": path},
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)
