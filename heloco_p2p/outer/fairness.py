"""Region-fair weights ρ_w: a factor on each pseudo-gradient from *who* sent it.

Under non-IID data an asynchronous coordinator that applies every Δ with the same weight
optimizes the mixture of the workers' objectives weighted by how often each one commits: one
fast peer with its own language, three 15× slower peers with theirs, and the global model
drifts to the fast peer's language (docs/results.md, Simulator). The fix is to give each
worker the same aggregate step per unit of time:

Rescaled ASGD (Mahran, Maranjyan, Richtárik 2026, arXiv 2605.13434) scales worker w's step by
its computation time τ_w, so over a cycle every worker contributes the same learning rate and
the method converges to the stationary points of the *uniform* mixture. Here the same idea is
applied to pseudo-gradients, and normalised so that the commit-rate-weighted mean of ρ is 1
(the total step per unit of time stays that of plain asynchronous training; the learning rate
keeps its meaning)::

    compute_time:  T̂_w ← γ T̂_w + (1 − γ) T        (T = seconds worker w's round took)
                   ρ_w = clip(c · T̂_w^α, ρ_min, ρ_max),   c = Σ_j T̂_j^(−1) / Σ_j T̂_j^(α−1)
    commit_share:  s_j ← (1 − λ) s_j + λ [j = w]     (share of recent commits, no clock needed)
                   ρ_w = clip(c · s_w^(−α), ρ_min, ρ_max), c = 1 / Σ_j s_j^(1−α)

α = 1 is full rescaling (each worker's commits, per unit of time, weigh the same), α = 0 is no
weighting; values in between trade the fast worker's extra progress against fairness. Both sums
run over the *active* workers: those that committed within the last ``forget`` versions. The
weight multiplies Δ̂ after the correction, together with the staleness weight, so the outer
momentum accumulates the re-weighted Δ̂ and stops being one region's.

The state (estimates, last versions) is part of the engine's state_dict, so a standby that
replays the same commits with the same (worker, seconds) arguments stays bitwise equal.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .registry import Arg, Registered, register


class Fairness(Registered):
    """Base class: ``weight(worker, seconds, version) -> ρ_w`` (updates the estimates first)."""

    def weight(self, worker: str | None, seconds: float | None, version: int) -> float:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


@register("fairness", "none")
class NoFairness(Fairness):
    """ρ_w = 1: every pseudo-gradient weighs the same, whoever sent it (plain asynchronous)."""

    def weight(self, worker: str | None, seconds: float | None, version: int) -> float:
        return 1.0


class _Tracked(Fairness):
    """Shared bookkeeping: per-worker value, last version seen, the active set and the clip."""

    ARGS = {
        "alpha": Arg(1.0, "exponent: 1 = full rescaling, 0 = none", min=0.0, max=2.0),
        "rho_min": Arg(0.0, "lower clip on ρ_w", min=0.0),
        "rho_max": Arg(10.0, "upper clip on ρ_w (bounds what one worker can weigh)", min=1.0),
        "forget": Arg(256, "a worker with no commit in this many versions is no longer active", min=1, integer=True),
    }

    @classmethod
    def check_combined(cls, args: dict[str, Any]) -> None:
        if args["rho_min"] > args["rho_max"]:
            raise ValueError(f"rho_min: must be <= rho_max ({args['rho_max']}), got {args['rho_min']}")

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.values: dict[str, float] = {}
        self.last: dict[str, int] = {}

    def _active(self, version: int) -> list[str]:
        horizon = version - int(self.args["forget"])
        for w in [w for w, v in self.last.items() if v < horizon]:
            del self.values[w], self.last[w]
        return sorted(self.values)

    def _clip(self, rho: float) -> float:
        return min(self.args["rho_max"], max(self.args["rho_min"], rho))

    def state_dict(self) -> dict[str, Any]:
        return {"values": dict(self.values), "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        values, last = dict(state.get("values", {})), dict(state.get("last", {}))
        if set(values) != set(last) or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                                               for v in values.values()):
            raise ValueError("state: fairness values must be finite numbers > 0, one per worker in 'last'")
        self.values = {str(k): float(v) for k, v in values.items()}
        self.last = {str(k): int(v) for k, v in last.items()}


@register("fairness", "compute_time")
class ComputeTime(_Tracked):
    """Rescaled ASGD on pseudo-gradients: ρ_w = c · T̂_w^α, T̂_w ← EMA of w's round time.

    Source: Mahran, Maranjyan, Richtárik 2026, Rescaled Asynchronous SGD (arXiv 2605.13434),
    step sizes proportional to computation times; the EMA, the α exponent, the normalisation to a
    commit-weighted mean of 1 and the clip are this project's.
    """

    ARGS = {**_Tracked.ARGS, "decay": Arg(0.5, "γ, weight of the previous round-time estimate", min=0.0, max=0.99)}

    def weight(self, worker: str | None, seconds: float | None, version: int) -> float:
        if worker is None or seconds is None:
            return 1.0
        t = float(seconds)
        if not (math.isfinite(t) and t > 0.0):
            raise ValueError(f"seconds: must be a finite number > 0 for fairness 'compute_time', got {seconds!r}")
        w = str(worker)
        old = self.values.get(w)
        self.values[w] = t if old is None else self.args["decay"] * old + (1.0 - self.args["decay"]) * t
        self.last[w] = version
        active = self._active(version)
        a = self.args["alpha"]
        c = sum(1.0 / self.values[j] for j in active) / sum(self.values[j] ** (a - 1.0) for j in active)
        return self._clip(c * self.values[w] ** a)


@register("fairness", "commit_share")
class CommitShare(_Tracked):
    """ρ_w = c · s_w^(−α), s the EMA share of recent commits: no clock, only who committed.

    Source: the frequency-weighting bias analysed in Rescaled ASGD (arXiv 2605.13434), corrected
    by inverse commit frequency instead of computation time; this project's variant.
    """

    ARGS = {**_Tracked.ARGS, "rate": Arg(0.05, "λ, weight of the newest commit in the shares", min=0.001, max=1.0)}

    def weight(self, worker: str | None, seconds: float | None, version: int) -> float:
        if worker is None:
            return 1.0
        w, lam = str(worker), self.args["rate"]
        for j in self.values:
            self.values[j] *= 1.0 - lam
        # a newcomer starts at the mean share of the others, so it is neither ignored nor dominant
        start = (sum(self.values.values()) / len(self.values)) if self.values else 1.0
        self.values[w] = self.values.get(w, start) + lam
        self.last[w] = version
        active = self._active(version)
        a = self.args["alpha"]
        c = 1.0 / sum(self.values[j] ** (1.0 - a) for j in active) * sum(self.values[j] for j in active)
        return self._clip(c * self.values[w] ** (-a))


@register("fairness", "region_memory")
class RegionMemory(Fairness):
    """Each commit applies the mean of every active worker's latest (corrected) pseudo-gradient.

        D_w ← Δ̂_w                       (the sender's slot; the others keep theirs)
        G   = (1/|A|) Σ_{r ∈ A} D_r        (A: workers seen within the last ``forget`` versions)

    A fast worker refreshes its slot often, a slow worker's slot is reused until its next round,
    so per unit of time every worker's data moves θ equally (each slot is applied once per commit,
    whoever triggered it), and the total step per commit is that of one pseudo-gradient, as in
    plain asynchronous training. Unlike an instant weight ρ_w = T_w/T̄ (``compute_time``), a slow
    worker's Δ is spread over its whole round instead of landing as one large step. Costs one
    stored pseudo-gradient per worker (key the workers by region in a large swarm).
    Source: the memorised-update averaging of MIFA (Gu et al. 2021, arXiv 2106.04159) and SAG,
    applied to asynchronous pseudo-gradients; this project's combination.
    """

    ARGS = {"forget": Arg(256, "a worker with no commit in this many versions drops out of the mean",
                          min=1, integer=True)}

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.slots: dict[str, list] = {}  # worker -> its latest Δ̂ (tensors, owned)
        self.last: dict[str, int] = {}

    def weight(self, worker: str | None, seconds: float | None, version: int) -> float:
        return 1.0

    def combine(self, worker: str | None, pseudo_grad: list, version: int) -> list:
        """Store the sender's Δ̂ and return G (new tensors); no worker: Δ̂ itself (not stored)."""
        if worker is None:
            return pseudo_grad
        w = str(worker)
        self.slots[w] = [t.detach().clone() for t in pseudo_grad]
        self.last[w] = version
        horizon = version - int(self.args["forget"])
        for old in [k for k, v in self.last.items() if v < horizon]:
            del self.slots[old], self.last[old]
        active = sorted(self.slots)
        out = [t.clone() for t in self.slots[active[0]]]
        for k in active[1:]:
            torch._foreach_add_(out, self.slots[k])
        if len(active) > 1:
            torch._foreach_mul_(out, 1.0 / len(active))
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"slots": {k: [t.clone() for t in v] for k, v in self.slots.items()}, "last": dict(self.last)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        slots, last = dict(state.get("slots", {})), dict(state.get("last", {}))
        if set(slots) != set(last) or not all(isinstance(v, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in v)
                                              for v in slots.values()):
            raise ValueError("state: region_memory slots must be lists of tensors, one per worker in 'last'")
        self.slots = {str(k): [t.clone() for t in v] for k, v in slots.items()}
        self.last = {str(k): int(v) for k, v in last.items()}
