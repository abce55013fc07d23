"""The AligNet objective: the triplet loss and the decay-to-init optimizer (docs/method.md, stage 4).

Following the public reference code (google-deepmind/alignet: `losses.py`, `configs/siglip.py`):

- Loss (`alignet_loss`) on each triplet, rows ordered so that image 2 is the teacher's odd one
  out: p = softmax([s01, s02, s12]) of the teacher's stored similarities (no temperature: the
  teacher transform was fitted so that these are calibrated logits), q = softmax(ŝ / τ) of the
  student's dot products (`triplet_similarities`), τ = 100. 'jsd' (the reference default) =
  Jensen–Shannon divergence, 'kl' = KL(p ‖ q), 'hard' = −ŝ01/τ + logsumexp(ŝ/τ).
- Optimizer (`AdamDecayToInit`): the optax chain scale_by_adam → decay_to_init(w) →
  scale_by_learning_rate, i.e. θ ← θ − lr·(m̂/(√v̂ + ε) + w·(θ − θ₀)), θ₀ = the weights at
  construction (pretrained backbone, initial head). Learning rate: linear warm-up, then cosine
  decay to 0 at the last step (`warmup_cosine`); the first warm-up step uses lr/(warmup+1), not 0
  as optax does (a zero step is a wasted step on a 150-step demo run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F

from alignet_core.errors import ConfigError, InputError

LossKind = Literal["jsd", "kl", "hard"]


def triplet_similarities(embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Dot-product similarities [s01, s02, s12] of each triplet.

    embeddings: (u, d) float; rows: (b, 3) long indices into embeddings. Returns (b, 3) float32
    (computed in float32 whatever the embeddings' dtype).
    """
    e = embeddings.float()
    a, b, c = e[rows[:, 0]], e[rows[:, 1]], e[rows[:, 2]]
    return torch.stack([(a * b).sum(-1), (a * c).sum(-1), (b * c).sum(-1)], dim=-1)


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
