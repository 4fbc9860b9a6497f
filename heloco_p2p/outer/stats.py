"""Per-tensor ("block") scalars of a pseudo-gradient against the momentum: ‖Δ_b‖, ‖m_b‖, cos.

Fast path: one batched ``_foreach_norm`` over Δ, one over m, one ``dot`` per block, in the
tensors' dtype, read back together. Float32 squares overflow above ~1e19 per element and
underflow below ~1e-19, so a block whose scalars are not finite, or whose dot may have
underflowed, is recomputed exactly in float64 after scaling by its largest element (rare: it
costs a float64 copy of that block). Results are Python floats (float64).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

# Below this ‖Δ_b‖·‖m_b‖ the float32 products in a dot may underflow: recompute in float64.
_DOT_UNDERFLOW = 1e-20


@dataclass
class BlockStats:
    """Scalars of each block. ``momentum_norms`` and ``cosines`` are None without momentum;
    a cosine is None for a block where it is undefined (zero Δ_b or zero m_b)."""

    delta_norms: list[float]
    momentum_norms: list[float] | None
    cosines: list[float | None]


class NonFiniteError(ValueError):
    """A pseudo-gradient contains NaN or ±inf."""


def _floats(ts: list[Tensor]) -> list[float]:
    # one stack and one device-to-host copy for all blocks (stack promotes mixed dtypes exactly)
    return torch.stack(ts).to(torch.float64).tolist() if ts else []


def _exact_norm(x: Tensor) -> float:
    """‖x‖ in float64 without overflow or underflow (scaled by max |x|)."""
    x = x.reshape(-1).to(torch.float64)
    top = x.abs().max().item() if x.numel() else 0.0
    if top == 0.0:
        return 0.0
    return top * torch.linalg.vector_norm(x / top).item()


def _exact_cosine(d: Tensor, m: Tensor) -> float:
    """cos(d, m) in float64, each scaled by its max |x| first (no overflow or underflow)."""
    d = d.reshape(-1).to(torch.float64)
    m = m.reshape(-1).to(torch.float64)
    d = d / d.abs().max()
    m = m / m.abs().max()
    return torch.dot(d, m).item() / torch.linalg.vector_norm(d).item() / torch.linalg.vector_norm(m).item()


def block_stats(delta: list[Tensor], momentum: list[Tensor] | None, names: list[str] | None = None) -> BlockStats:
    """‖Δ_b‖, ‖m_b‖ and cos(Δ_b, m_b) for every block.

    :param delta: pseudo-gradient blocks
    :param momentum: reference blocks (same shapes) or None
    :param names: block names for error messages
    :raises NonFiniteError: a Δ block contains NaN or inf (nothing has been changed)
    """
    nd = _floats(torch._foreach_norm(delta)) if delta else []
    if momentum is None:
        nm, dots = None, None
    else:
        nm = _floats(torch._foreach_norm(momentum))
        dots = _floats([torch.dot(d.reshape(-1), m.reshape(-1)) for d, m in zip(delta, momentum)])
    cosines: list[float | None] = []
    for i, d in enumerate(delta):
        if not math.isfinite(nd[i]) or (nd[i] == 0.0 and bool(d.any())):
            if not bool(torch.isfinite(d).all()):
                label = names[i] if names else str(i)
                raise NonFiniteError(f"pseudo_grad[{label}]: contains NaN or inf")
            nd[i] = _exact_norm(d)  # finite values whose squares over/underflowed
        if nm is None:
            cosines.append(None)
            continue
        m = momentum[i]
        if not math.isfinite(nm[i]) or (nm[i] == 0.0 and bool(m.any())):
            nm[i] = _exact_norm(m) if bool(torch.isfinite(m).all()) else math.nan
        if nd[i] == 0.0 or nm[i] == 0.0 or not math.isfinite(nm[i]):
            cosines.append(None)
            continue
        dot = dots[i]
        if math.isfinite(dot) and nd[i] * nm[i] >= _DOT_UNDERFLOW and math.isfinite(nd[i] * nm[i]):
            c = dot / nd[i] / nm[i]
        else:
            c = _exact_cosine(d, m)
        cosines.append(min(1.0, max(-1.0, c)))
    return BlockStats(delta_norms=nd, momentum_norms=nm, cosines=cosines)
