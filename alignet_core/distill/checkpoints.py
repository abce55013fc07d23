"""Checkpoints and outputs of a training run: `checkpoints/step_<n>/` written by one directory
rename (the newest kept), the exported student (`student.safetensors`, `head.safetensors`) and
`train_log.json`, written last. A checkpoint or finished run records its trajectory (the config
fields that change it, the seed and a fingerprint of the training data) and is never reused for
another.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from alignet_core.config.distill import DistillConfig
from alignet_core.errors import StoreError
from alignet_core.io import store
from alignet_core.io.formats import AlignetTriplets
from alignet_core.models.student import read_train_log

CHECKPOINT_DIR = "checkpoints"


_CKPT_RE = re.compile(r"^step_(\d{8})$")


# DistillConfig fields that change the training trajectory; a checkpoint or finished run made
# under other values is never silently reused.
_TRAJECTORY_FIELDS = (
    "student", "weights", "head_dim", "steps", "batch_triplets", "grad_accum", "lr",
    "warmup_steps", "loss", "tau", "decay_to_init", "image_size",
)


def data_fingerprint(train: AlignetTriplets, n_pool: int) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train.indices, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(train.similarities, dtype=np.float32).tobytes())
    h.update(str(n_pool).encode())
    return h.hexdigest()[:16]


def trajectory_of(cfg: DistillConfig, seed: int, data_key: str) -> dict[str, Any]:
    out: dict[str, Any] = cfg.model_dump(include=set(_TRAJECTORY_FIELDS))
    out["seed"] = int(seed)
    out["data"] = data_key
    if cfg.harmonize is not None:  # only when on, so runs without it keep their trajectories
        out["harmonize"] = cfg.harmonize.model_dump()
    return out


def list_checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
    if not os.path.isdir(ckpt_dir):
        return []
    found = []
    for name in os.listdir(ckpt_dir):
        m = _CKPT_RE.match(name)
        path = os.path.join(ckpt_dir, name)
        if m and os.path.isfile(os.path.join(path, "model.safetensors")) and os.path.isfile(
            os.path.join(path, "state.pt")
        ):
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(
    ckpt_dir: str,
    step: int,
    student: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    history: list[float],
    seconds: float,
    trajectory: dict[str, Any],
    ranks: int = 1,
    cpu_seconds: float = 0.0,
) -> str:
    """Write checkpoints/step_<step>/{model.safetensors, state.pt} by one directory rename,
    then delete older checkpoints (the newest one is kept). Called by one process: the run's only
    process, or rank 0 of `ranks` (whose weights and optimizer state every rank shares)."""
    os.makedirs(ckpt_dir, exist_ok=True)
    tmp = os.path.join(ckpt_dir, f".tmp-{uuid.uuid4().hex}")
    os.makedirs(tmp)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in student.state_dict().items()}
    save_file(sd, os.path.join(tmp, "model.safetensors"))
    state = {
        "step": int(step),
        "optimizer": _to_cpu(opt.state_dict()),
        "scheduler": sched.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "loss_history": [float(x) for x in history],
        "seconds": float(seconds),
        "cpu_seconds": float(cpu_seconds),
        "trajectory": json.dumps(trajectory, sort_keys=True, default=str),
        "ranks": int(ranks),
    }
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    if os.path.exists(final):
        shutil.rmtree(final)
    store.fsync_tree(tmp)
    os.rename(tmp, final)
    store.fsync_dir(ckpt_dir)
    for s, path in list_checkpoints(ckpt_dir):
        if s != step:
            shutil.rmtree(path, ignore_errors=True)
    return final


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu")
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        weights = load_file(os.path.join(path, "model.safetensors"), device="cpu")
        with open(os.path.join(path, "state.pt"), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any reader failure means an unusable checkpoint
        raise StoreError(f"checkpoint {path!r} cannot be read: {err}") from None
    return weights, state


def finished_run(out_dir: str, trajectory: dict[str, Any]) -> dict[str, Any] | None:
    """The log of the finished run in out_dir if there is one (None otherwise); `StoreError` if that run
    followed another trajectory (config, seed or data)."""
    done = read_train_log(out_dir)
    if done is not None and done.get("trajectory") != json.loads(json.dumps(trajectory, default=str)):
        raise StoreError(
            f"{out_dir!r} holds a finished distillation run with another config, seed or dataset; "
            "use a new output directory"
        )
    return done


def write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    store.fsync_dir(os.path.dirname(path) or ".")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
    store.fsync_tree(tmp)
    os.replace(tmp, path)
    store.fsync_dir(os.path.dirname(path) or ".")
