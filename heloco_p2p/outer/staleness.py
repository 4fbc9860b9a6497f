"""Staleness weights ρ(τ): a factor on a corrected pseudo-gradient, G = ρ(τ) · Δ̂.

τ = version at commit − version the round started from. ρ multiplies Δ̂ *before* it enters the
outer optimizer, so under a momentum rule it also weights this Δ in all later steps; scaling the
learning rate instead would scale only the current step, including the momentum of other Δs.
Chosen by name (``none``, ``inverse_sqrt``, ``power``); composes with any correction.
"""
from __future__ import annotations

from typing import Any

from .registry import Arg, Registered, register


class StalenessWeight(Registered):
    """Base class: ``weight(tau) -> float`` in (0, 1]."""

    def weight(self, tau: int) -> float:
        raise NotImplementedError


@register("staleness_weight", "none")
class NoWeight(StalenessWeight):
    """ρ(τ) = 1: every pseudo-gradient counts fully, however stale."""

    def weight(self, tau: int) -> float:
        return 1.0


@register("staleness_weight", "inverse_sqrt")
class InverseSqrt(StalenessWeight):
    """ρ(τ) = (1 + τ)^(−1/2).

    Source: the official toy code of Liu, Douillard et al. 2024, Asynchronous Local-SGD
    (arXiv 2401.09135), where it is optional.
    """

    def weight(self, tau: int) -> float:
        return (1.0 + tau) ** -0.5


@register("staleness_weight", "power")
class Power(StalenessWeight):
    """ρ(τ) = (1 + τ)^(−α); α = 1/2 is ``inverse_sqrt``, α = 0 is ``none``.

    Source: generalises the staleness-scaled steps surveyed in ALGORITHMS.md
    (η/max(1, τ), η(1+τ)^(−1/2)), applied to Δ rather than to η.
    """

    ARGS = {"alpha": Arg(0.5, "exponent α of (1 + τ)^(−α)", min=0.0)}

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.alpha = self.args["alpha"]

    def weight(self, tau: int) -> float:
        return (1.0 + tau) ** -self.alpha
