"""Staleness weights ρ(τ): a factor on a corrected pseudo-gradient, G = ρ(τ) · Δ̂.

τ = version at commit − version the round started from. ρ multiplies Δ̂ *before* it enters the
outer optimizer, so under a momentum rule it also weights this Δ in all later steps; scaling the
learning rate instead would scale only the current step, including the momentum of other Δs.
Chosen by name (``none``, ``inverse_sqrt``, ``power``, ``base``, ``base_inverse_sqrt``);
composes with any correction. ``base`` and ``base_inverse_sqrt`` also depend on the number of
workers K, which the caller passes with every commit (``num_workers``): in the simulator K is
fixed, in a swarm the coordinator counts it, and a replica must be given the same K to stay
bitwise equal, so K is an input, never state read from elsewhere.
"""
from __future__ import annotations

from typing import Any

from .registry import Arg, Registered, register


class StalenessWeight(Registered):
    """Base class: ``weight(tau, num_workers) -> float`` in (0, 1].

    ``needs_num_workers``: the weight depends on K; ``weight`` then raises ValueError when
    ``num_workers`` is None.
    """

    needs_num_workers = False

    def weight(self, tau: int, num_workers: int | None = None) -> float:
        raise NotImplementedError

    @staticmethod
    def check_num_workers(num_workers: int | None) -> int:
        """K as an int >= 1; ValueError (``num_workers: ...``) otherwise."""
        if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"num_workers: this staleness weight needs the number of workers K (an integer >= 1), "
                             f"got {num_workers!r}")
        return num_workers


@register("staleness_weight", "none")
class NoWeight(StalenessWeight):
    """ρ(τ) = 1: every pseudo-gradient counts fully, however stale."""

    def weight(self, tau: int, num_workers: int | None = None) -> float:
        return 1.0


@register("staleness_weight", "inverse_sqrt")
class InverseSqrt(StalenessWeight):
    """ρ(τ) = (1 + τ)^(−1/2).

    Source: the official toy code of Liu, Douillard et al. 2024, Asynchronous Local-SGD
    (arXiv 2401.09135), where it is optional.
    """

    def weight(self, tau: int, num_workers: int | None = None) -> float:
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

    def weight(self, tau: int, num_workers: int | None = None) -> float:
        return (1.0 + tau) ** -self.alpha


@register("staleness_weight", "base")
class Base(StalenessWeight):
    """ρ = 1/√K for K workers, whatever τ: the delay weight HeLoCo's authors give every
    asynchronous method (K = 5 there: ρ ≈ 0.447).

    Source: the first author's reference code for HeLoCo (Asif et al. 2026, arXiv 2606.00271),
    "base" weight; ALGORITHMS.md, section HeLoCo.
    """

    needs_num_workers = True

    def weight(self, tau: int, num_workers: int | None = None) -> float:
        return self.check_num_workers(num_workers) ** -0.5


@register("staleness_weight", "base_inverse_sqrt")
class BaseInverseSqrt(StalenessWeight):
    """ρ(τ) = (1/√K) · (1 + τ)^(−1/2): ``base`` times ``inverse_sqrt``.

    Source: the option of the same reference code (ALGORITHMS.md, section HeLoCo).
    """

    needs_num_workers = True

    def weight(self, tau: int, num_workers: int | None = None) -> float:
        return self.check_num_workers(num_workers) ** -0.5 * (1.0 + tau) ** -0.5
