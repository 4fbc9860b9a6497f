"""Corrections of an incoming pseudo-gradient against the outer momentum, one block at a time.

Every rule here changes a block Δ_b only within the plane of Δ_b and the momentum direction
v̂ = m_b/‖m_b‖, so a rule is pure scalar math: from ‖Δ_b‖, ‖m_b‖ (in pseudo-gradient units,
see optimizers.py), c = cos(Δ_b, m_b) and the staleness τ it returns a ``Decision``

    Δ̂_b = a · Δ_b + s · ‖Δ_b‖ · v̂         (a = 1, s = 0: the block passes through untouched)

and the engine applies it in one pass over memory (two when a ≠ 1 and s ≠ 0). Rules that use the momentum are skipped
(branch ``skip``) on a block without a usable reference: no momentum yet, Δ_b = 0, or
‖m_b‖ < momentum_floor · ‖Δ_b‖ (m_b ≈ 0 relative to Δ_b, e.g. the start of training).

``heloco`` takes the published constants (Table 3 of Asif et al. 2026, read from the first
author's reference code: ALGORITHMS.md, section HeLoCo); ``heloco_smooth`` is this project's
continuous variant, its constants provisional.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from .registry import Arg, Registered, register


@dataclass(frozen=True)
class Block:
    """What a rule sees of one parameter tensor (all float64).

    :param delta_norm: ‖Δ_b‖
    :param momentum_norm: ‖m_b‖ in pseudo-gradient units (raw norm × optimizer.momentum_unit), None without momentum
    :param cosine: cos(Δ_b, m_b), None when undefined
    :param staleness: τ of the pseudo-gradient this block belongs to
    """

    delta_norm: float
    momentum_norm: float | None
    cosine: float | None
    staleness: int


@dataclass(frozen=True)
class Decision:
    """Δ̂_b = a·Δ_b + s·‖Δ_b‖·v̂, and the name of the branch that produced it."""

    branch: str
    a: float = 1.0
    s: float = 0.0

    @property
    def identity(self) -> bool:
        return self.a == 1.0 and self.s == 0.0


KEEP = Decision("keep")
SKIP = Decision("skip")

_FLOOR = Arg(1e-6, "skip a block when ‖m_b‖ < momentum_floor·‖Δ_b‖ (momentum ≈ 0)", min=0.0, max=1.0, min_open=True)
_C_OK = Arg(0.1, "c_ok: blocks with cos(Δ_b, m_b) >= c_ok pass unchanged", min=0.0, max=1.0)
_KAPPA = Arg(1.0, "κ in conf = ‖Δ‖/(‖Δ‖ + κ‖m‖ + ε): how much a large momentum lowers confidence", min=0.0)
_EPS = Arg(1e-12, "ε: guards divisions (absolute, in norm units)", min=0.0)


class Correction(Registered):
    """Base class. Subclasses implement ``rule(block) -> Decision``.

    ``uses_momentum``: the rule needs c and ‖m_b‖; blocks without a usable reference get SKIP.
    A rule that returns s ≠ 0 must use the momentum. A rule that needs more than the plane of
    Δ_b and m_b (e.g. elementwise DC-ASGD) would be applied outside ``apply_correction``.
    """

    uses_momentum = True

    def __call__(self, block: Block) -> Decision:
        if self.uses_momentum and not self.has_reference(block):
            return SKIP
        return self.rule(block)

    def has_reference(self, block: Block) -> bool:
        floor = self.args.get("momentum_floor", 0.0)
        return (
            block.cosine is not None
            and block.momentum_norm is not None
            and block.delta_norm > 0.0
            and block.momentum_norm >= floor * block.delta_norm
        )

    def rule(self, block: Block) -> Decision:
        raise NotImplementedError

    @staticmethod
    def confidence(block: Block, kappa: float, eps: float) -> float:
        """conf = ‖Δ_b‖ / (‖Δ_b‖ + κ‖m_b‖ + ε) ∈ [0, 1]: a small Δ against a large m is trusted less."""
        denom = block.delta_norm + kappa * block.momentum_norm + eps
        return block.delta_norm / denom if denom > 0.0 and math.isfinite(denom) else 0.0


@register("correction", "none")
class NoCorrection(Correction):
    """Δ̂ = Δ: the pseudo-gradient goes to the optimizer as it came (async DiLoCo, MLA)."""

    uses_momentum = False

    def rule(self, block: Block) -> Decision:
        return KEEP


@register("correction", "heloco")
class HeLoCo(Correction):
    """HeLoCo's block-wise directional correction (Algorithm 2), with the published constants.

        û = Δ/‖Δ‖, v̂ = m/‖m‖, c = clamp(ûᵀv̂, −1, 1), conf = ‖Δ‖/(‖Δ‖ + κ‖m‖ + ε)   (Eqs. 7–8, 15)
        c ≥ c_ok       keep:      Δ̂ = Δ                                                (Eq. 9)
        c < 0          shrink:    Δ̂ = Δ − β c ‖Δ‖ v̂,  β = min(k_s·(−c)·conf, β_max)     (Eqs. 10–11)
        0 ≤ c < c_ok   reorient:  ũ = (1−λ)û + λv̂,  Δ̂ = ‖Δ‖ ũ / max(‖ũ‖, ε)             (Eqs. 12–13)
          lambda_rule normalized (default, the authors' experiment code; continuous at c_ok):
                         λ = min(k_d·(c_ok − c)/(c_ok − c_bad)·conf, 1)
          lambda_rule printed (Eq. 14 as printed):
                         λ = min(k_d·(1 − c)·conf, 1)

    shrink removes the share β of the component opposing m (β = 1 is PCGrad's projection);
    reorient bends Δ towards m and keeps ‖Δ‖ (‖ũ‖² = (1−λ)² + λ² + 2λ(1−λ)c ≥ 1/2 for c ≥ 0).
    Defaults: Table 3 (c_ok 0.2, k_s 0.5, k_d 1.0, β_max 0.5, κ 3.0, ε 1e-8; c_bad −0.2). The
    method as published also dispatches θ̄ = θ − ημm and weights Δ by ρ = 1/√K before this
    rule: that is the ``heloco`` preset (heloco_p2p/algorithms.py), not this class alone.
    Source: Asif et al. 2026, HeLoCo (arXiv 2606.00271); the first author's reference code.
    """

    ARGS = {
        "c_ok": Arg(0.2, "c_ok: blocks with cos(Δ_b, m_b) >= c_ok pass unchanged", min=0.0, max=1.0),
        "k_s": Arg(0.5, "k_s: shrink strength, β = min(k_s·(−c)·conf, β_max)", min=0.0),
        "beta_max": Arg(0.5, "β_max: largest share of the opposing component removed (1 = PCGrad)", min=0.0, max=1.0),
        "k_d": Arg(1.0, "k_d: reorient strength (see lambda_rule)", min=0.0),
        "kappa": Arg(3.0, _KAPPA.doc, min=0.0),
        "eps": Arg(1e-8, _EPS.doc, min=0.0),
        "lambda_rule": Arg("normalized", "λ of the reorient branch: normalized (k_d·(c_ok−c)/(c_ok−c_bad)·conf, "
                           "the authors' code) or printed (k_d·(1−c)·conf, Eq. 14)",
                           choices=("normalized", "printed")),
        "c_bad": Arg(-0.2, "c_bad: the cosine at which the normalized λ reaches k_d·conf (< c_ok)",
                     min=-1.0, max=1.0),
        "momentum_floor": _FLOOR,
    }

    @classmethod
    def check_combined(cls, args: dict) -> None:
        if args["c_bad"] >= args["c_ok"]:
            raise ValueError(f"c_bad: must be < c_ok ({args['c_ok']!r}), got {args['c_bad']!r}")

    def rule(self, block: Block) -> Decision:
        p, c = self.args, max(-1.0, min(1.0, block.cosine))
        if c >= p["c_ok"]:
            return KEEP
        conf = self.confidence(block, p["kappa"], p["eps"])
        if c < 0.0:
            beta = min(p["k_s"] * -c * conf, p["beta_max"])
            return Decision("shrink", 1.0, -beta * c)
        if p["lambda_rule"] == "normalized":
            lam = min(p["k_d"] * (p["c_ok"] - c) / (p["c_ok"] - p["c_bad"]) * conf, 1.0)
        else:
            lam = min(p["k_d"] * (1.0 - c) * conf, 1.0)
        u = max(math.sqrt((1.0 - lam) ** 2 + lam**2 + 2.0 * lam * (1.0 - lam) * c), p["eps"])
        return Decision("reorient", (1.0 - lam) / u, lam / u)


@register("correction", "heloco_smooth")
class HeLoCoSmooth(Correction):
    """Continuous HeLoCo: one rule that pulls the along-momentum component up towards c_ok·‖Δ‖.

        c ≥ c_ok:  Δ̂ = Δ                                           (keep)
        c < c_ok:  Δ̂ = Δ + β (c_ok − c) ‖Δ‖ v̂,  β = min(k·conf, β_max)   (pull)

    The component of Δ along v̂ moves from c‖Δ‖ to ((1−β)c + βc_ok)‖Δ‖; the part orthogonal to
    m is untouched. With β = 1 this is the projection onto the half-space {x: xᵀv̂ ≥ c_ok‖Δ‖}
    (PCGrad with a margin c_ok; c_ok = 0 is PCGrad). The correction strength β(c_ok − c)₊ is
    continuous in c and goes to 0 as c → c_ok, so there is no jump at c = 0 or at c = c_ok
    (unlike ``heloco``), and opposed blocks (c < 0) get the strongest pull. Defaults provisional.
    Source: this project (a continuous variant of the HeLoCo reading, arXiv 2606.00271).
    """

    ARGS = {
        "c_ok": _C_OK,
        "k": Arg(1.0, "k: pull strength, β = min(k·conf, β_max)", min=0.0),
        "beta_max": Arg(1.0, "β_max: largest pull (1 = projection onto cos >= c_ok)", min=0.0, max=1.0),
        "kappa": _KAPPA,
        "eps": _EPS,
        "momentum_floor": _FLOOR,
    }

    def rule(self, block: Block) -> Decision:
        p, c = self.args, block.cosine
        if c >= p["c_ok"]:
            return KEEP
        beta = min(p["k"] * self.confidence(block, p["kappa"], p["eps"]), p["beta_max"])
        return Decision("pull", 1.0, beta * (p["c_ok"] - c))


@register("correction", "pcgrad")
class PCGrad(Correction):
    """Projection of conflicting pseudo-gradients: drop the component that opposes the momentum.

        c < 0:  Δ̂ = Δ − (Δᵀv̂) v̂ = Δ − c ‖Δ‖ v̂      (project; Δ̂ ⟂ m)
        c ≥ 0:  Δ̂ = Δ                                (keep)

    Source: Yu et al. 2020, Gradient Surgery for Multi-Task Learning (arXiv 2001.06782),
    with the momentum in place of the other task's gradient.
    """

    ARGS = {"momentum_floor": _FLOOR}

    def rule(self, block: Block) -> Decision:
        c = block.cosine
        return Decision("project", 1.0, -c) if c < 0.0 else KEEP


@register("correction", "staleness")
class Staleness(Correction):
    """Staleness-scaled pseudo-gradient: Δ̂ = (1 + τ)^(−α) · Δ, before the optimizer sees it.

    Under a momentum optimizer this is *not* the same as scaling the learning rate by
    (1 + τ)^(−α): a scaled Δ enters the momentum scaled and stays down-weighted in every later
    step, while a scaled η would shrink only this step, including the momentum accumulated from
    other, fresh pseudo-gradients. Branch ``keep`` when τ = 0 (bitwise unchanged), ``scale`` otherwise.
    Source: staleness-aware asynchronous SGD, η/max(1, τ) or η(1+τ)^(−1/2) (ALGORITHMS.md).
    """

    uses_momentum = False
    ARGS = {"alpha": Arg(0.5, "α in (1 + τ)^(−α)", min=0.0)}

    def rule(self, block: Block) -> Decision:
        if block.staleness == 0:
            return KEEP
        return Decision("scale", (1.0 + block.staleness) ** -self.args["alpha"], 0.0)
