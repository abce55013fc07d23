"""Helpers of the numerics tests (marker `numerics`; docs/reproducibility.md): the thread count a comparison
pins, and the error bounds their tolerances are derived from.

Notation: u = 2⁻²⁴, the unit roundoff of float32 (half its machine epsilon).
"""

from __future__ import annotations

import math


from alignet_core.hardware import torch_threads  # noqa: F401 (the tests take it from here)

#: float32 unit roundoff
U32 = 2.0**-24


def adam_ratio_bound(t: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Largest |m̂_t| / √v̂_t Adam can reach at step t (1-based), whatever the gradients.

    m_t = (1−β1) Σ_k β1^(t−k) g_k and v_t = (1−β2) Σ_k β2^(t−k) g_k²; by Cauchy–Schwarz
    |m_t| ≤ (1−β1) √(Σ_{j<t} (β1²/β2)^j) · √(v_t / (1−β2)), and the bias corrections multiply the ratio by
    √(1−β2^t) / (1−β1^t). 1 at t = 1 (the step is lr·sign g), 1.016 at t = 6, 7.3 as t → ∞ (β1² < β2)."""
    b1, b2 = betas
    s = sum((b1 * b1 / b2) ** j for j in range(t))
    return (1 - b1) * math.sqrt(s) * math.sqrt(1 - b2**t) / ((1 - b1**t) * math.sqrt(1 - b2))


def adam_divergence_bound(lrs: list[float], betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """Largest |Δθ| two runs of `AdamDecayToInit` with learning rates `lrs` (one per step) can reach on one
    coordinate when their gradients differ only by rounding, however small the difference.

    Where a coordinate's gradient is within rounding of zero, Adam's normalised step m̂/(√v̂ + ε) is decided by
    the rounding: it can take any value in ±`adam_ratio_bound(t)` in either run. Decay to init multiplies the
    difference carried from earlier steps by 1 − lr·w ∈ [0, 1]. So |Δθ_T| ≤ Σ_t 2·lr_t·R_t."""
    return sum(2 * lr * adam_ratio_bound(t + 1, betas) for t, lr in enumerate(lrs))
