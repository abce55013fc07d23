"""Stage 4: distil the (human-aligned) teacher's triplet similarities into a student network.

The method follows the public reference code (google-deepmind/alignet: `losses.py`,
`bv_wrapper.py`, `configs/siglip.py`):

- Student = a pretrained timm backbone whose pooled pre-logits feed a *new* linear head
  (`TripletStudent`); the student's similarity of two images is the plain dot product of their
  head outputs (no normalization).
- Loss (`alignet_loss`) on each triplet, rows ordered so that image 2 is the teacher's odd one
  out: p = softmax([s01, s02, s12]) of the teacher's stored similarities (no temperature: the
  teacher transform was fitted so that these are calibrated logits), q = softmax(ŝ / τ) of the
  student's dot products, τ = 100. 'jsd' (the reference default) = Jensen–Shannon divergence,
  'kl' = KL(p ‖ q), 'hard' = −ŝ01/τ + logsumexp(ŝ/τ).
- Optimizer (`AdamDecayToInit`): the optax chain scale_by_adam → decay_to_init(w) →
  scale_by_learning_rate, i.e. θ ← θ − lr·(m̂/(√v̂ + ε) + w·(θ − θ₀)), θ₀ = the weights at
  construction (pretrained backbone, initial head). Learning rate: linear warm-up, then cosine
  decay to 0 at the last step (`warmup_cosine`).
- Data (`TripletBatches`): the order of triplets is a pure function of (seed, step), so a run
  resumed from a checkpoint follows exactly the trajectory of an uninterrupted one.

Choices the reference leaves open, made here:
- The backbone runs in eval mode during training: BatchNorm keeps its pretrained running
  statistics (its affine weights still train) and there is no dropout. The reference student
  (a ViT) has neither, training batches of a few dozen triplets give poor batch statistics, and
  the embedding the student is trained on is then exactly the one evaluated and exported.
- The first warm-up step uses lr/(warmup+1), not 0 as optax does (a zero step is a wasted step
  on a 150-step demo run).
- The head is initialised like flax's `nn.Dense` in the reference: LeCun-normal weights
  (std 1/√fan_in) and zero bias, from a generator seeded by the run's seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import timm
import timm.data
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from alignet_core import models

from alignet_core.io.images import load_image
from alignet_core.errors import ConfigError, InputError, StoreError
from alignet_core.evaluate.metrics import triplet_accuracy
from alignet_core.io.formats import AlignetTriplets
from alignet_core.hardware import autocast_dtype

log = logging.getLogger(__name__)

LossKind = Literal["jsd", "kl", "hard"]

STUDENT_FILE = "student.safetensors"
HEAD_FILE = "head.safetensors"
LOG_FILE = "train_log.json"
CHECKPOINT_DIR = "checkpoints"
_CKPT_RE = re.compile(r"^step_(\d{8})$")

# DistillConfig fields that change the training trajectory; a checkpoint or finished run made
# under other values is never silently reused.
_TRAJECTORY_FIELDS = (
    "student", "weights", "head_dim", "steps", "batch_triplets", "grad_accum", "lr",
    "warmup_steps", "loss", "tau", "decay_to_init", "image_size",
)


# ============================================================================ student
class TripletStudent(nn.Module):
    """A timm backbone plus a new linear triplet head.

    forward(images (b, 3, H, W) float32) → (b, head_dim) float: the head outputs whose dot
    products are the student's similarities. `embed(images, use_head=False)` returns the
    backbone's pooled pre-logits (b, feature_dim) instead (the pretrained model's own space).
    `image_size` (optional) records the square input resolution the student is trained and
    evaluated at; None means the backbone's own pretrained input size.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_dim: int,
        image_size: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if head_dim <= 0:
            raise ConfigError(f"distill.head_dim: expected a positive width, got {head_dim}")
        self.backbone = backbone
        p = models.feature_dim(backbone)
        self.head = nn.Linear(p, head_dim)
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():  # flax nn.Dense default: lecun_normal kernel, zero bias
            self.head.weight.copy_(torch.randn(head_dim, p, generator=g) / math.sqrt(p))
            self.head.bias.zero_()
        self.image_size = image_size

    def embed(self, images: torch.Tensor, use_head: bool = True) -> torch.Tensor:
        """images (b, 3, H, W) float → (b, head_dim) with the head, else (b, feature_dim)."""
        f = models.pooled_features(self.backbone, images)
        return self.head(f) if use_head else f

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (b, 3, H, W) float → head outputs (b, head_dim)."""
        return self.embed(images, use_head=True)

    def train(self, mode: bool = True) -> "TripletStudent":
        """Only the flag changes: the backbone always runs in eval mode (frozen BN statistics,
        no dropout), see the module docstring."""
        super().train(mode)
        self.backbone.eval()
        return self


def triplet_similarities(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dot-product similarities [s01, s02, s12] of each triplet.

    embeddings: (u, d) float; rows: (b, 3) long indices into embeddings. Returns (b, 3) float32
    (computed in float32 whatever the embeddings' dtype).
    """
    e = embeddings.float()
    a, b, c = e[rows[:, 0]], e[rows[:, 1]], e[rows[:, 2]]
    return torch.stack([(a * b).sum(-1), (a * c).sum(-1), (b * c).sum(-1)], dim=-1)


# ============================================================================ losses
def _kl(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last axis with 0·log 0 = 0: (b, 3) → (b,)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def alignet_loss(
    student_sims: torch.Tensor,
    teacher_sims: torch.Tensor,
    kind: LossKind = "jsd",
    tau: float = 100.0,
) -> torch.Tensor:
    """The AligNet triplet loss, averaged over the batch.

    student_sims: (b, 3) float [ŝ01, ŝ02, ŝ12], the student's dot products;
    teacher_sims: (b, 3) float [s01, s02, s12], the teacher's similarities as stored (image 2
    the odd one out). p = softmax(teacher_sims) (no temperature), q = softmax(student_sims/τ).
    kind 'jsd': ½KL(p‖m) + ½KL(q‖m), m = (p+q)/2 (the reference default); 'kl': KL(p‖q);
    'hard': −ŝ01/τ + logsumexp(ŝ/τ) (teacher similarities unused beyond the row order).
    Returns a scalar float32 tensor.
    """
    if student_sims.shape != teacher_sims.shape or student_sims.ndim != 2 or student_sims.shape[-1] != 3:
        raise InputError(
            f"alignet_loss: expected student and teacher similarities of shape (b, 3), got "
            f"{tuple(student_sims.shape)} and {tuple(teacher_sims.shape)}"
        )
    s = student_sims.float() / tau
    if kind == "hard":
        return (-s[:, 0] + torch.logsumexp(s, dim=-1)).mean()
    t = teacher_sims.float()
    log_p, log_q = F.log_softmax(t, dim=-1), F.log_softmax(s, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    if kind == "kl":
        return _kl(p, log_p, log_q).mean()
    if kind == "jsd":
        m = (p + q) / 2
        log_m = torch.log(m)
        return (0.5 * _kl(p, log_p, log_m) + 0.5 * _kl(q, log_q, log_m)).mean()
    raise ConfigError(f"distill.loss: expected 'jsd', 'kl' or 'hard', got {kind!r}")


# ============================================================================ optimizer
class AdamDecayToInit(torch.optim.Optimizer):
    """Adam with decoupled decay toward the initial weights (optax: scale_by_adam →
    decay_to_init → scale_by_learning_rate).

    Update per parameter: θ ← θ − lr · (m̂/(√v̂ + ε) + w·(θ − θ₀)), with θ₀ a copy of θ taken at
    construction (kept in the optimizer state, so it is checkpointed), m̂, v̂ the bias-corrected
    first and second moments. A parameter whose gradient is None is updated as with a zero
    gradient, as optax does (it still decays toward θ₀); parameters with requires_grad False are
    left alone. Parameters must be float32 (use autocast for lower-precision compute); the
    update runs as a few multi-tensor (`torch._foreach_*`) kernels per group.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        decay_to_init: float = 1.0,
    ) -> None:
        if lr < 0:
            raise ConfigError(f"distill.lr: expected >= 0, got {lr}")
        if decay_to_init < 0:
            raise ConfigError(f"distill.decay_to_init: expected >= 0, got {decay_to_init}")
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "decay_to_init": decay_to_init}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.requires_grad:
                    self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> None:
        if p.dtype != torch.float32:
            raise InputError(
                f"AdamDecayToInit: parameters must be float32 (got {p.dtype}); keep weights in "
                "float32 and use autocast for bf16 compute"
            )
        state = self.state[p]
        state["init"] = p.detach().clone()
        state["step"] = torch.zeros((), dtype=torch.float32)
        state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One update of every trainable parameter; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, w = group["lr"], group["betas"], group["eps"], group["decay_to_init"]
            params, grads, inits, ms, vs, bc1, bc2_sqrt = [], [], [], [], [], [], []
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                if "init" not in self.state[p]:  # a parameter group added after construction
                    self._init_state(p)
                state = self.state[p]
                state["step"] += 1
                t = float(state["step"])
                params.append(p)
                grads.append(torch.zeros_like(p) if p.grad is None else p.grad)
                inits.append(state["init"])
                ms.append(state["exp_avg"])
                vs.append(state["exp_avg_sq"])
                bc1.append(1.0 - b1**t)
                bc2_sqrt.append(math.sqrt(1.0 - b2**t))
            if not params:
                continue
            torch._foreach_lerp_(ms, grads, 1.0 - b1)  # m ← b1·m + (1 − b1)·g
            torch._foreach_mul_(vs, b2)
            torch._foreach_addcmul_(vs, grads, grads, value=1.0 - b2)
            # m̂/(√v̂ + ε) = (m / bc1) / (√v / √bc2 + ε)
            denom = torch._foreach_sqrt(vs)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            if w:  # θ ← θ − lr·w·(θ − θ₀), computed from θ before the Adam part (which does not read θ)
                torch._foreach_lerp_(params, inits, lr * w)
            torch._foreach_addcdiv_(params, ms, denom, [-lr / b for b in bc1])
        return loss


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier for step s (0-based): (s+1)/(warmup+1) while s < warmup, then
    ½(1 + cos(π (s − warmup)/(total − warmup))): peak at s = warmup, 0 at s = total."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        span = max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup_steps) / span)))

    return factor


# ============================================================================ data
def eval_transform(model: nn.Module, image_size: int | None = None) -> Callable[[Any], torch.Tensor]:
    """The model's eval transform (RGB PIL → (3, H, W) float32), optionally at a square
    `image_size` instead of the model's pretrained input size (same interpolation, crop
    fraction, mean and std)."""
    if image_size is None:
        return models.build_transform(model)
    if image_size <= 0:
        raise ConfigError(f"distill.image_size: expected a positive number of pixels, got {image_size}")
    cfg = models.data_config(model)
    cfg["input_size"] = (3, int(image_size), int(image_size))
    return timm.data.create_transform(**cfg, is_training=False)


def decode_images(paths: list[str], transform: Callable[[Any], torch.Tensor]) -> torch.Tensor:
    """Decode and preprocess images with `io.images.load_image` (the extraction code):
    paths (u,) → (u, 3, H, W) float32. An unreadable image is an `InputError` naming it."""
    return torch.stack([transform(load_image(p)) for p in paths])


class TripletBatches(torch.utils.data.Dataset):
    """Deterministic micro-batches of triplets with each unique image decoded once.

    The triplets of optimizer step s are a pure function of (seed, s): epoch e = s // n_batches
    uses the permutation `default_rng([seed, e]).permutation(n)`, step s takes its
    (s % n_batches)-th slice of `batch_triplets` rows (the incomplete tail of an epoch is
    dropped). With `grad_accum` > 1 the step's triplets are cut into `grad_accum` equal
    micro-batches, so the data of a step does not depend on grad_accum.

    Item k (micro-batch k = step·grad_accum + j) is (images (u, 3, H, W) float32, rows (b, 3)
    int64 indices into images, teacher_sims (b, 3) float32, triplet ids (b,) int64 rows of the
    split). Indexable by any k ≥ 0, so a torch DataLoader over `range(start, stop)` with
    batch_size=None serves any stretch of a run, with any number of workers.

    split.indices are rows into the pool: row i is `source.records[i]`.
    """

    def __init__(
        self,
        split: AlignetTriplets,
        source: Any,
        transform: Callable[[Any], torch.Tensor],
        batch_triplets: int,
        seed: int,
        grad_accum: int = 1,
        cache: bool = False,
    ) -> None:
        n = len(split)
        if batch_triplets <= 0 or grad_accum <= 0 or batch_triplets % grad_accum:
            raise ConfigError(
                f"distill.batch_triplets ({batch_triplets}) must be a positive multiple of "
                f"distill.grad_accum ({grad_accum})"
            )
        if n < batch_triplets:
            raise InputError(
                f"training split has {n} triplets, fewer than distill.batch_triplets={batch_triplets}"
            )
        n_pool = len(source)
        if n and (split.indices.min() < 0 or split.indices.max() >= n_pool):
            raise InputError(
                f"triplet indices must be rows of the image source [0, {n_pool}); got range "
                f"[{int(split.indices.min())}, {int(split.indices.max())}]"
            )
        self.indices = np.asarray(split.indices, dtype=np.int64)
        self.similarities = np.asarray(split.similarities, dtype=np.float32)
        self.paths = [str(r.path) for r in source.records]
        self.transform = transform
        self.batch_triplets = batch_triplets
        self.grad_accum = grad_accum
        self.micro = batch_triplets // grad_accum
        self.seed = int(seed)
        self.batches_per_epoch = n // batch_triplets
        self._perm_epoch = -1
        self._perm: np.ndarray | None = None
        self._cache: torch.Tensor | None = None
        self._slot: np.ndarray | None = None
        if cache:  # every image the split uses, decoded once: (u, 3, H, W) float32 plus pool row → slot
            used = np.unique(self.indices)
            self._slot = np.full(n_pool, -1, dtype=np.int64)
            self._slot[used] = np.arange(len(used))
            self._cache = decode_images([self.paths[u] for u in used], transform)
            log.info("distill: %d training images decoded into memory (%.0f MiB)", len(used),
                     self._cache.numel() * 4 / 2**20)

    def __len__(self) -> int:
        """Micro-batches per epoch (indexing goes on past it into later epochs)."""
        return self.batches_per_epoch * self.grad_accum

    def step_triplets(self, step: int) -> np.ndarray:
        """Rows of the split used at optimizer step `step`: (batch_triplets,) int64."""
        epoch, i = divmod(int(step), self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[i * self.batch_triplets : (i + 1) * self.batch_triplets]

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        step, j = divmod(int(k), self.grad_accum)
        ids = self.step_triplets(step)[j * self.micro : (j + 1) * self.micro]
        pool_rows = self.indices[ids]  # (b, 3)
        unique, inverse = np.unique(pool_rows, return_inverse=True)
        if self._cache is not None and self._slot is not None:
            images = self._cache[torch.from_numpy(self._slot[unique])]
        else:
            images = decode_images([self.paths[u] for u in unique], self.transform)
        rows = torch.from_numpy(inverse.reshape(pool_rows.shape).astype(np.int64))
        sims = torch.from_numpy(self.similarities[ids])
        return images, rows, sims, torch.from_numpy(ids.astype(np.int64))


def join_by_filenames(split: AlignetTriplets, source: Any, what: str) -> AlignetTriplets:
    """Point a split's indices at the rows of `source` by its filenames (for datasets made
    elsewhere, whose indices number another image pool).

    Each file name is matched to an image id of the source, else to the base name of an image's
    path (a base name shared by several images never matches). A name found nowhere is an
    `InputError` naming how many are missing, with examples."""
    by_id: dict[str, int] = {}
    by_base: dict[str, int] = {}
    for row, rec in enumerate(source.records):
        by_id.setdefault(str(rec.id), row)
        base = posixpath.basename(str(rec.path))
        by_base[base] = -2 if base in by_base else row  # -2: ambiguous
    names, inverse = np.unique(split.filenames.ravel(), return_inverse=True)
    rows = np.array([by_id.get(n, by_base.get(posixpath.basename(n), -1)) for n in names.tolist()], dtype=np.int64)
    if (rows < 0).any():
        missing = names[rows < 0]
        raise InputError(
            f"{what}: {len(missing)} of {len(names)} filenames match no image of the source by id or file name "
            f"(e.g. {missing[:3].tolist()}); point source.path at the images the dataset was made from"
        )
    indices = rows[inverse].reshape(split.filenames.shape)
    return AlignetTriplets(indices, split.filenames, split.similarities, split.n_reordered)


def _loader(dataset: torch.utils.data.Dataset, ks: range, num_workers: int, device: torch.device) -> Iterator[Any]:
    """Items `ks` of a map-style dataset, in order, decoded by `num_workers` processes."""
    return iter(
        torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            sampler=ks,
            num_workers=num_workers,
            shuffle=False,
            pin_memory=device.type == "cuda",
        )
    )


# ============================================================================ checkpoints
def _fingerprint(train: AlignetTriplets, n_pool: int) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(train.indices, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(train.similarities, dtype=np.float32).tobytes())
    h.update(str(n_pool).encode())
    return h.hexdigest()[:16]


def _trajectory(cfg: Any, seed: int, data_key: str) -> dict[str, Any]:
    out = {f: getattr(cfg, f, None) for f in _TRAJECTORY_FIELDS}
    out["seed"] = int(seed)
    out["data"] = data_key
    return out


def _checkpoints(ckpt_dir: str) -> list[tuple[int, str]]:
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


def _save_checkpoint(
    ckpt_dir: str,
    step: int,
    student: TripletStudent,
    opt: AdamDecayToInit,
    sched: torch.optim.lr_scheduler.LRScheduler,
    history: list[float],
    seconds: float,
    trajectory: dict[str, Any],
) -> str:
    """Write checkpoints/step_<step>/{model.safetensors, state.pt} by one directory rename,
    then delete older checkpoints (the newest one is kept)."""
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
        "trajectory": json.dumps(trajectory, sort_keys=True, default=str),
    }
    with open(os.path.join(tmp, "state.pt"), "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    final = os.path.join(ckpt_dir, f"step_{step:08d}")
    if os.path.exists(final):
        shutil.rmtree(final)
    os.rename(tmp, final)
    for s, path in _checkpoints(ckpt_dir):
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


def _load_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    try:
        weights = load_file(os.path.join(path, "model.safetensors"), device="cpu")
        with open(os.path.join(path, "state.pt"), "rb") as f:
            state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 — any reader failure means an unusable checkpoint
        raise StoreError(f"checkpoint {path!r} cannot be read: {err}") from None
    return weights, state


# ============================================================================ training
def build_student(cfg: Any, seed: int) -> TripletStudent:
    """The untrained student of a run: `cfg.student` with `cfg.weights` plus a new head of
    width `cfg.head_dim` (initialised from `seed`), at `cfg.image_size` if the config has one."""
    # random-init backbones (weights=None) draw from torch's global RNG: fix it by the seed
    # without touching the caller's RNG state
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        backbone = models.create_model(cfg.student, cfg.weights)
    return TripletStudent(backbone, cfg.head_dim, getattr(cfg, "image_size", None), seed=seed)


def read_train_log(out_dir: str) -> dict[str, Any] | None:
    """The finished run's log in out_dir (dict with 'complete': True), or None if there is none."""
    path = os.path.join(out_dir, LOG_FILE)
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(out_dir, STUDENT_FILE))):
        return None
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return data if data.get("complete") else None


def _write_json_atomic(path: str, obj: Any) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str) -> None:
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
    os.replace(tmp, path)


def train_student(
    train: AlignetTriplets,
    source: Any,
    cfg: Any,
    out_dir: str,
    device: torch.device,
    seed: int,
    progress: Callable[[int, float], None] | None = None,
) -> dict[str, Any]:
    """Finetune `cfg.student` on the training triplets; resumable, deterministic in (seed, step).

    train: the split (indices (n, 3) rows into `source`, similarities (n, 3) [s01, s02, s12],
    image 2 the odd one out); source: the image pool (`ImageSource`, row i = records[i]);
    cfg: a `DistillConfig` (optional extra field `image_size`); out_dir: a local directory.

    Trains cfg.steps Adam-with-decay-to-init steps of cfg.batch_triplets triplets (in
    cfg.grad_accum micro-batches), bf16 autocast on GPUs only, the forward pass optionally
    `torch.compile`d (cfg.compile), checkpointing every
    cfg.checkpoint_every steps to out_dir/checkpoints/step_<n>/ (atomic directory rename; the
    newest is kept). A run that was killed resumes from its newest checkpoint on the same
    trajectory. At the end writes out_dir/student.safetensors (the backbone's timm state dict),
    out_dir/head.safetensors ('weight' (head_dim, p), 'bias' (head_dim,)) and, last,
    out_dir/train_log.json. If out_dir already holds a finished run of the same trajectory its
    log is returned without training. `progress(step, loss)` is called after each step.

    Returns {"steps", "final_loss", "loss_curve" (per step), "seconds" (training time summed
    over resumes), ...}.
    """
    if not isinstance(out_dir, str) or ("://" in out_dir and not out_dir.startswith("file://")):
        raise StoreError(f"distill output {out_dir!r}: training checkpoints need a local directory")
    out_dir = out_dir.removeprefix("file://")
    if cfg.batch_triplets % cfg.grad_accum:
        raise ConfigError(
            f"distill.batch_triplets ({cfg.batch_triplets}) must be a multiple of distill.grad_accum ({cfg.grad_accum})"
        )
    data_key = _fingerprint(train, len(source))
    trajectory = _trajectory(cfg, seed, data_key)
    done = read_train_log(out_dir)
    if done is not None:
        if done.get("trajectory") != json.loads(json.dumps(trajectory, default=str)):
            raise StoreError(
                f"{out_dir!r} holds a finished distillation run with another config, seed or dataset; "
                "use a new output directory"
            )
        log.info("distill: %s already holds a finished run; reusing it", out_dir)
        return done

    os.makedirs(out_dir, exist_ok=True)
    ckpt_dir = os.path.join(out_dir, CHECKPOINT_DIR)
    for name in os.listdir(ckpt_dir) if os.path.isdir(ckpt_dir) else []:
        if name.startswith(".tmp-"):  # debris of a checkpoint write that was killed
            shutil.rmtree(os.path.join(ckpt_dir, name), ignore_errors=True)

    student = build_student(cfg, seed).to(device).train()
    opt = AdamDecayToInit(student.parameters(), lr=cfg.lr, decay_to_init=cfg.decay_to_init)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(cfg.warmup_steps, cfg.steps))
    start, history, seconds = 0, [], 0.0
    ckpts = _checkpoints(ckpt_dir)
    if ckpts:
        _, path = ckpts[-1]
        weights, state = _load_checkpoint(path)
        if state.get("trajectory") != json.dumps(trajectory, sort_keys=True, default=str):
            raise StoreError(
                f"checkpoint {path!r} was made with another config, seed or dataset; "
                "remove it or use a new output directory"
            )
        student.load_state_dict(weights, strict=True)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng_cpu"])
        start, history, seconds = int(state["step"]), list(state["loss_history"]), float(state["seconds"])
        log.info("distill: resuming from %s (step %d of %d)", path, start, cfg.steps)

    transform = eval_transform(student.backbone, student.image_size)
    batches = TripletBatches(train, source, transform, cfg.batch_triplets, seed, cfg.grad_accum,
                             cache=bool(getattr(cfg, "cache_images", False)))
    amp = autocast_dtype(device)
    forward = torch.compile(student) if getattr(cfg, "compile", False) else student  # same parameters
    t_last = time.perf_counter()
    micro = iter(())
    if start < cfg.steps:
        micro = _loader(
            batches, range(start * cfg.grad_accum, cfg.steps * cfg.grad_accum), cfg.num_workers, device
        )
    for step in range(start, cfg.steps):
        opt.zero_grad(set_to_none=True)
        step_loss = 0.0
        for _ in range(cfg.grad_accum):
            images, rows, sims, _ids = next(micro)
            images = images.to(device, non_blocking=True)
            rows, sims = rows.to(device), sims.to(device)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                out = forward(images)
            loss = alignet_loss(triplet_similarities(out, rows), sims, cfg.loss, cfg.tau)
            (loss / cfg.grad_accum).backward()
            step_loss += float(loss.detach()) / cfg.grad_accum
        if not math.isfinite(step_loss):
            raise ConfigError(f"distill.lr: the loss became {step_loss} at step {step + 1}; use a lower learning rate")
        opt.step()
        sched.step()
        history.append(step_loss)
        if progress is not None:
            progress(step + 1, step_loss)
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            now = time.perf_counter()
            seconds += now - t_last
            t_last = now
            _save_checkpoint(ckpt_dir, step + 1, student, opt, sched, history, seconds, trajectory)
            log.debug("distill: checkpoint at step %d, loss %.5f", step + 1, step_loss)
    seconds += time.perf_counter() - t_last

    student.eval()
    _save_safetensors_atomic(student.backbone.state_dict(), os.path.join(out_dir, STUDENT_FILE))
    _save_safetensors_atomic(student.head.state_dict(), os.path.join(out_dir, HEAD_FILE))
    if cfg.steps > start or not ckpts:
        _save_checkpoint(ckpt_dir, cfg.steps, student, opt, sched, history, seconds, trajectory)
    result = {
        "complete": True,
        "steps": int(cfg.steps),
        "final_loss": float(history[-1]) if history else float("nan"),
        "loss_curve": [float(x) for x in history],
        "seconds": round(seconds, 3),
        "student": cfg.student,
        "image_size": student.image_size,
        "input_size": list(_input_size(student)),
        "trajectory": json.loads(json.dumps(trajectory, default=str)),
    }
    _write_json_atomic(os.path.join(out_dir, LOG_FILE), result)
    log.info("distill: %d steps in %.1f s, final loss %.5f", cfg.steps, seconds, result["final_loss"])
    return result


def _input_size(student: TripletStudent) -> tuple[int, int, int]:
    if student.image_size is not None:
        return (3, int(student.image_size), int(student.image_size))
    return tuple(models.data_config(student.backbone)["input_size"])  # type: ignore[return-value]


def load_student(out_dir: str, cfg: Any) -> TripletStudent:
    """The trained student of a finished run in out_dir (eval mode, on CPU).

    Builds `cfg.student` with random init and loads out_dir/student.safetensors and
    out_dir/head.safetensors strictly; the input resolution is the one the run used.
    """
    out_dir = out_dir.removeprefix("file://")
    done = read_train_log(out_dir)
    if done is None:
        raise StoreError(f"{out_dir!r} holds no finished distillation run (no {STUDENT_FILE} + complete {LOG_FILE})")
    backbone = models.create_model(cfg.student, None)
    try:
        backbone.load_state_dict(load_file(os.path.join(out_dir, STUDENT_FILE)), strict=True)
        head = load_file(os.path.join(out_dir, HEAD_FILE))
    except (RuntimeError, OSError) as err:
        raise StoreError(f"{out_dir!r}: the saved student does not fit model {cfg.student!r}: {err}") from None
    if "weight" not in head or head["weight"].ndim != 2:
        raise StoreError(f"{out_dir!r}: {HEAD_FILE} must hold 'weight' (head_dim, p) and 'bias'")
    image_size = done.get("image_size", getattr(cfg, "image_size", None))
    student = TripletStudent(backbone, int(head["weight"].shape[0]), image_size)
    try:
        student.head.load_state_dict(head, strict=True)
    except RuntimeError as err:
        raise StoreError(f"{out_dir!r}: {HEAD_FILE} does not fit the backbone: {err}") from None
    return student.eval()


# ============================================================================ evaluation
class _ImageList(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform: Callable[[Any], torch.Tensor], batch_size: int) -> None:
        self.paths, self.transform, self.batch_size = paths, transform, batch_size

    def __len__(self) -> int:
        return (len(self.paths) + self.batch_size - 1) // self.batch_size

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_images(self.paths[i * self.batch_size : (i + 1) * self.batch_size], self.transform)


@torch.no_grad()
def embed_images(
    model: TripletStudent | nn.Module,
    paths: list[str],
    device: torch.device,
    batch_size: int = 256,
    use_head: bool = True,
    image_size: int | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Embeddings of images: (u,) paths → (u, d) float32 (head outputs, or pooled pre-logits of
    the backbone with use_head=False or a plain timm model)."""
    is_student = isinstance(model, TripletStudent)
    backbone = model.backbone if is_student else model
    if image_size is None and is_student:
        image_size = model.image_size
    transform = eval_transform(backbone, image_size)
    was_training = model.training
    model.eval().to(device)
    amp = autocast_dtype(device)
    out = []
    try:
        n_batches = -(-len(paths) // batch_size)
        for images in _loader(_ImageList(paths, transform, batch_size), range(n_batches), num_workers, device):
            images = images.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                if is_student:
                    e = model.embed(images, use_head=use_head)
                else:
                    e = models.pooled_features(model, images)
            out.append(e.float().cpu().numpy())
    finally:
        model.train(was_training)
    if out:
        return np.concatenate(out)
    width = model.head.out_features if is_student and use_head else models.feature_dim(backbone)
    return np.zeros((0, width), np.float32)


def evaluate_student(
    model: TripletStudent | nn.Module,
    split: AlignetTriplets,
    source: Any,
    device: torch.device,
    batch_size: int = 256,
    use_head: bool = True,
    max_triplets: int | None = None,
    image_size: int | None = None,
) -> float:
    """Triplet accuracy of the student against the teacher on held-out triplets.

    split rows are ordered with the teacher's odd one out last; the score is the fraction of
    (the first `max_triplets`) rows where the student's s01 is strictly largest
    (`evaluate.triplet_accuracy`). Each unique image is embedded once. use_head=False scores the
    backbone's pooled pre-logits (the pretrained student before training; a plain timm model is
    always scored that way). image_size: input resolution; None → the student's own
    (`TripletStudent.image_size`, else the backbone's pretrained input size).
    """
    idx = np.asarray(split.indices, dtype=np.int64)
    if max_triplets is not None:
        idx = idx[:max_triplets]
    if len(idx) == 0:
        return float("nan")
    n_pool = len(source)
    if idx.min() < 0 or idx.max() >= n_pool:
        raise InputError(f"evaluation triplets must index the image source [0, {n_pool}); got max {int(idx.max())}")
    unique, inverse = np.unique(idx, return_inverse=True)
    paths = [str(source.records[int(u)].path) for u in unique]
    emb = embed_images(model, paths, device, batch_size, use_head, image_size)
    sims = triplet_similarities(torch.from_numpy(emb), torch.from_numpy(inverse.reshape(idx.shape)))
    return triplet_accuracy(sims.numpy())
