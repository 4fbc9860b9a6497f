"""The outer state and the one call the coordinator (and the simulator) makes: ``commit``.

::

    engine = build_engine(params, optimizer="lookahead", correction="heloco")
    info = engine.commit(pseudo_grad, base_version=3)     # Δ = θ(v0) − θ_local, v0 = 3
    info.staleness, info.branch_counts(), info.summary()  # what monitoring shows
    engine.params                                         # θ at version info.version

A commit is: check the inputs (a rejected commit changes nothing) → per-block scalars
(‖Δ_b‖, ‖m_b‖, cos) → the correction's decision per block → Δ̂ materialised only for blocks it
changes → G = ρ(τ)·ρ_w·Δ̂ (staleness and region-fair weights) → one outer optimizer step →
version + 1. With ``weight_order="before"`` the staleness weight multiplies Δ before the
correction instead (G = ρ_w·Δ̂(ρΔ)), as in HeLoCo's experiment code.

Where a round starts (``dispatch_params``): ``current`` hands out θ; ``lookahead`` hands out
θ̄ = θ − η·μ·m (HeLoCo's Eq. 5). A worker measures Δ from the point it was handed, and the
engine applies Δ to θ, never to θ̄: θ̄ is derived from (θ, m) on demand and is not state.
"""
from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from . import registry
from .corrections import Block, Correction, Decision
from .fairness import Fairness
from .optimizers import OuterOptimizer, check_optimizer_state
from .staleness import StalenessWeight
from .stats import BlockStats, block_stats

STATE_FORMAT = "heloco_p2p.outer.engine/1"
DISPATCH = ("current", "lookahead")
WEIGHT_ORDERS = ("after", "before")


def _json_float(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


@dataclass
class CommitInfo:
    """What one commit did, per block and in total. ``to_dict()``/``summary()`` are JSON-friendly.

    Norms are of the pseudo-gradient before and after the correction (``norms_after`` excludes
    the staleness weight ρ, reported on its own); they are computed from the block scalars, not
    by another pass over memory. ``cosines[i]`` is cos(Δ_b, m_b) against the momentum *before*
    this commit (None where undefined, e.g. the first commit).
    """

    version: int  # version after this commit
    base_version: int
    staleness: int  # τ = version before this commit − base_version
    num_pseudo_grads: int  # 1 for commit(), k for sync_commit()
    staleness_weight: float  # ρ(τ) applied to Δ̂
    optimizer: str
    correction: str
    names: list[str]
    branches: list[str]
    cosines: list[float | None]
    norms_before: list[float]
    norms_after: list[float]
    momentum_norms: list[float | None] = field(default_factory=list)  # raw ‖m_b‖ before the commit
    fairness_weight: float = 1.0  # ρ_w applied to Δ̂ for the worker that sent it (fairness.py)

    @property
    def total_norm_before(self) -> float:
        return math.hypot(*self.norms_before)

    @property
    def total_norm_after(self) -> float:
        return math.hypot(*self.norms_after)

    def branch_counts(self) -> dict[str, int]:
        """Number of blocks per branch, e.g. ``{"keep": 40, "shrink": 7, "reorient": 15}``."""
        return dict(sorted(Counter(self.branches).items()))

    def mean_cosine(self) -> float | None:
        """Unweighted mean of the defined per-block cosines."""
        cs = [c for c in self.cosines if c is not None]
        return sum(cs) / len(cs) if cs else None

    def global_cosine(self) -> float | None:
        """cos(Δ, m) over all parameters at once (blocks weighted by their norms)."""
        td = self.total_norm_before
        tm = math.hypot(*[m for m in self.momentum_norms if m is not None and math.isfinite(m)])
        if td == 0.0 or tm == 0.0 or not self.momentum_norms:
            return None
        total = 0.0
        for c, nd, nm in zip(self.cosines, self.norms_before, self.momentum_norms):
            if c is not None and nm is not None:
                total += c * (nd / td) * (nm / tm)  # scaled first: no overflow
        return max(-1.0, min(1.0, total))

    def summary(self) -> dict[str, Any]:
        """Aggregates for logs and dashboards (plain JSON types)."""
        cs = [c for c in self.cosines if c is not None]
        changed = sum(b not in ("keep", "skip") for b in self.branches)
        before, after = self.total_norm_before, self.total_norm_after
        return {
            "version": self.version,
            "base_version": self.base_version,
            "staleness": self.staleness,
            "num_pseudo_grads": self.num_pseudo_grads,
            "staleness_weight": _json_float(self.staleness_weight),
            "fairness_weight": _json_float(self.fairness_weight),
            "optimizer": self.optimizer,
            "correction": self.correction,
            "branches": self.branch_counts(),
            "corrected_fraction": changed / len(self.branches) if self.branches else 0.0,
            "mean_cosine": _json_float(self.mean_cosine()),
            "min_cosine": _json_float(min(cs)) if cs else None,
            "global_cosine": _json_float(self.global_cosine()),
            "total_norm_before": _json_float(before),
            "total_norm_after": _json_float(after),
            "norm_ratio": _json_float(after / before) if before > 0.0 else None,
        }

    def to_dict(self) -> dict[str, Any]:
        """``summary()`` plus one entry per block (name, branch, cosine, norms)."""
        blocks = [
            {
                "name": name,
                "branch": branch,
                "cosine": _json_float(c),
                "norm_before": _json_float(nb),
                "norm_after": _json_float(na),
                "momentum_norm": _json_float(nm),
            }
            for name, branch, c, nb, na, nm in zip(
                self.names, self.branches, self.cosines, self.norms_before, self.norms_after,
                self.momentum_norms or [None] * len(self.names),
            )
        ]
        return {**self.summary(), "blocks": blocks}


class OuterEngine:
    """The global parameters θ, the outer optimizer's state and the version counter.

    :param params: initial θ, one tensor per parameter block; copied (the engine owns θ)
    :param optimizer: an outer optimizer instance (see ``registry.names("optimizer")``)
    :param correction: a correction instance (see ``registry.names("correction")``)
    :param staleness_weight: ρ(τ) instance; None means ρ = 1
    :param fairness: ρ_w instance (region-fair weight per worker); None means ρ_w = 1
    :param names: a name per block for CommitInfo and error messages (default "0", "1", ...)
    :param dispatch: ``current`` (rounds start from θ) or ``lookahead`` (from θ − η·μ·m)
    :param weight_order: ``after`` (G = ρ·Δ̂, the default) or ``before`` (Δ̂ of ρ·Δ) the correction
    :param num_workers: K for staleness weights that need it, used when a commit gives none
        (the simulator's fixed K; a swarm passes K with every commit instead)

    Prefer ``build_engine`` (by names and args, as in a config). Not thread-safe: the caller
    serialises commits.
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        optimizer: OuterOptimizer,
        correction: Correction,
        staleness_weight: StalenessWeight | None = None,
        names: Sequence[str] | None = None,
        fairness: Fairness | None = None,
        dispatch: str = "current",
        weight_order: str = "after",
        num_workers: int | None = None,
    ) -> None:
        if dispatch not in DISPATCH:
            raise ValueError(f"dispatch: must be one of {', '.join(DISPATCH)}, got {dispatch!r}")
        if weight_order not in WEIGHT_ORDERS:
            raise ValueError(f"weight_order: must be one of {', '.join(WEIGHT_ORDERS)}, got {weight_order!r}")
        if num_workers is not None:
            StalenessWeight.check_num_workers(num_workers)
        if not isinstance(params, (list, tuple)) or not params:
            raise ValueError("params: expected a non-empty list of tensors")
        for i, p in enumerate(params):
            if not isinstance(p, Tensor) or not p.is_floating_point():
                raise ValueError(f"params[{i}]: expected a floating-point tensor, got {type(p).__name__}")
        if names is not None and len(names) != len(params):
            raise ValueError(f"names: expected {len(params)} names, got {len(names)}")
        self.params: list[Tensor] = [p.detach().clone(memory_format=torch.contiguous_format) for p in params]
        self.names: list[str] = [str(n) for n in names] if names is not None else [str(i) for i in range(len(params))]
        self.optimizer = optimizer
        self.correction = correction
        self.staleness_weight = staleness_weight or registry.build("staleness_weight", "none")
        self.fairness = fairness or registry.build("fairness", "none")
        self.dispatch = dispatch
        self.weight_order = weight_order
        self.num_workers = num_workers
        self.version = 0
        self._work: list[Tensor] | None = None  # scratch for corrected blocks and sync means; not state
        self._devices: list[torch.device] | None = None  # set while hollow (release): where θ goes on load

    # ------------------------------------------------------------------ holding no state
    @property
    def hollow(self) -> bool:
        """Whether this engine holds no θ (``release``) until a state is loaded."""
        return self._devices is not None

    def release(self) -> None:
        """Hold no θ and no optimizer buffers until ``load_state_dict`` (a peer that is not a
        replica: a joiner's commit state is only ever loaded whole, never committed from genesis).
        The layout (shapes, dtypes) stays, so a state is checked against it as before; committing,
        dispatching or saving a hollow engine raises RuntimeError."""
        if self._devices is None:
            self._devices = [p.device for p in self.params]
        self.params = [torch.empty(p.shape, dtype=p.dtype, device="meta") for p in self.params]
        self.optimizer.drop_buffers()
        self._work = None

    def _held(self) -> None:
        if self._devices is not None:
            raise RuntimeError("the outer engine holds no state (it was released): load a state first")

    # ------------------------------------------------------------------ the two commits
    def commit(self, pseudo_grad: Sequence[Tensor], base_version: int, worker: str | None = None,
               seconds: float | None = None, num_workers: int | None = None, consume: bool = False) -> CommitInfo:
        """Correct one pseudo-gradient, apply it, and advance the version by one.

        :param pseudo_grad: Δ = θ̄(base_version) − θ_local, one tensor per block (converted to
            θ's dtype), measured from the point ``dispatch_params`` gave at base_version
        :param base_version: the version the round started from; staleness τ = version − base_version
        :param worker: who sent Δ (a peer id, a worker index), for the region-fair weight ρ_w
        :param seconds: how long that worker's round took (for ``fairness: compute_time``)
        :param num_workers: K for a staleness weight that needs it (``base``); None: the engine's
        :param consume: the caller gives ``pseudo_grad`` up (it reads it no more): ρ·Δ and the
            corrected blocks are written into its tensors instead of the engine's scratch (one
            copy of θ less held; the values, and so θ, are bitwise the same). Its tensors are
            undefined afterwards, also when the commit is refused
        :raises ValueError: bad base_version (negative or > version), layout, NaN/inf in Δ, bad
            seconds, or no K where the weight needs one; the state is then left bitwise unchanged
        """
        self._held()
        v0 = self._check_base_version(base_version)
        delta = self._layout(pseudo_grad, "pseudo_grad")
        if seconds is not None and not (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                                        and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds: must be a finite number > 0, got {seconds!r}")
        return self._commit(delta, v0, 1, worker, seconds, num_workers, consume)

    def sync_commit(self, pseudo_grads: Sequence[Sequence[Tensor]], base_version: int,
                    num_workers: int | None = None) -> CommitInfo:
        """Synchronous DiLoCo: one outer step on the mean of k pseudo-gradients.

            Δ = (1/k) Σ_i Δ_i ;  θ ← OuterOpt(θ, correction(Δ))

        The mean is a running mean (exact when all Δ_i are equal). Source: Douillard et al.
        2023, DiLoCo (arXiv 2311.08105).

        :param pseudo_grads: k ≥ 1 pseudo-gradients, all from ``base_version``
        :param base_version: the version all k rounds started from (normally the current one)
        :raises ValueError: as ``commit``; nothing changes
        """
        self._held()
        v0 = self._check_base_version(base_version)
        if not isinstance(pseudo_grads, (list, tuple)) or not pseudo_grads:
            raise ValueError("pseudo_grads: expected a non-empty list of pseudo-gradients")
        deltas = [self._layout(pg, f"pseudo_grads[{k}]") for k, pg in enumerate(pseudo_grads)]
        if len(deltas) == 1:
            return self._commit(deltas[0], v0, 1, num_workers=num_workers)
        mean = self._scratch()
        torch._foreach_copy_(mean, deltas[0])
        for k, d in enumerate(deltas[1:], start=2):
            torch._foreach_lerp_(mean, d, 1.0 / k)  # mean_k = mean_{k-1} + (Δ_k − mean_{k-1})/k
        return self._commit(mean, v0, len(deltas), num_workers=num_workers)

    def _commit(self, delta: list[Tensor], base_version: int, count: int, worker: str | None = None,
                seconds: float | None = None, num_workers: int | None = None, consume: bool = False) -> CommitInfo:
        staleness = self.version - base_version
        # ρ first: a missing K must refuse the commit before anything (fairness estimates) changes
        rho = self.staleness_weight.weight(staleness, self.num_workers if num_workers is None else num_workers)
        before = self.weight_order == "before" and rho != 1.0
        # where ρΔ and corrected blocks go: the scratch, never the caller's tensors unless it gives them up
        scratch = (lambda: delta) if consume else self._scratch
        if before:  # ρ in (0, 1]: NaN/inf in Δ stay NaN/inf and are refused below. Δ̂ of ρΔ: the correction's confidence compares ‖ρΔ‖ with ‖m‖ (HeLoCo's code)
            work = scratch()
            for w, d in zip(work, delta):
                torch.mul(d, rho, out=w)
            delta = work
        momentum = self.optimizer.momentum
        fixed = apply_correction(  # raises on NaN/inf in Δ before any state changes
            self.correction, delta, momentum, self.optimizer.momentum_unit, staleness, scratch, self.names
        )
        key = None if worker is None else str(worker)
        rho_w = self.fairness.weight(key, seconds, self.version)
        combine = getattr(self.fairness, "combine", None)
        g = fixed.tensors if combine is None else combine(key, fixed.tensors, self.version)
        self.optimizer.step(self.params, g, scale=rho_w if before else rho * rho_w)
        self.version += 1
        stats, decisions = fixed.stats, fixed.decisions
        unweight = 1.0 / rho if before else 1.0  # report norms of Δ and Δ̂ without ρ in both orders
        return CommitInfo(
            version=self.version,
            base_version=base_version,
            staleness=staleness,
            num_pseudo_grads=count,
            staleness_weight=rho,
            optimizer=self.optimizer.name,
            correction=self.correction.name,
            names=list(self.names),
            branches=[d.branch for d in decisions],
            cosines=list(stats.cosines),
            norms_before=[nd * unweight for nd in stats.delta_norms],
            norms_after=[_norm_after(d, nd, c) * unweight for d, nd, c in zip(decisions, stats.delta_norms, stats.cosines)],
            momentum_norms=list(stats.momentum_norms) if stats.momentum_norms is not None else [None] * len(delta),
            fairness_weight=rho_w,
        )

    # ------------------------------------------------------------------ checks
    def _check_base_version(self, base_version: Any) -> int:
        if isinstance(base_version, bool):
            raise ValueError(f"base_version: must be an int, got {base_version!r}")
        try:
            v0 = operator.index(base_version)
        except TypeError:
            raise ValueError(f"base_version: must be an int, got {base_version!r}") from None
        if v0 < 0 or v0 > self.version:
            raise ValueError(f"base_version: must be in [0, {self.version}] (the current version), got {v0}")
        return v0

    def _layout(self, tensors: Any, what: str) -> list[Tensor]:
        n = len(self.params)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != n:
            got = f"{len(tensors)} items" if isinstance(tensors, (list, tuple)) else type(tensors).__name__
            raise ValueError(f"{what}: expected a list of {n} tensors, got {got}")
        out = []
        for i, (t, p) in enumerate(zip(tensors, self.params)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise ValueError(f"{what}[{self.names[i]}]: expected a floating-point tensor, got {type(t).__name__}")
            if t.shape != p.shape:
                raise ValueError(f"{what}[{self.names[i]}]: shape {tuple(t.shape)} != parameter shape {tuple(p.shape)}")
            out.append(t.detach().to(device=p.device, dtype=p.dtype))
        return out

    def _scratch(self) -> list[Tensor]:
        if self._work is None:
            self._work = [torch.empty_like(p) for p in self.params]
        return self._work

    # ------------------------------------------------------------------ dispatch
    def dispatch_params(self) -> list[Tensor]:
        """Where a round started now begins: θ (``current``) or θ̄ = θ − η·μ·m (``lookahead``).

        ``current``, and ``lookahead`` before the momentum exists, return the live θ tensors
        themselves (no copy: read them, copy them, never write them); ``lookahead`` with a
        momentum returns new tensors, computed the same way every time (bitwise reproducible).
        Source: HeLoCo's Eq. 5 (Asif et al. 2026, arXiv 2606.00271; ALGORITHMS.md).
        """
        self._held()
        m = self.optimizer.momentum
        coef = self.optimizer.dispatch_coefficient
        if self.dispatch == "current" or m is None or coef == 0.0:
            return self.params
        return torch._foreach_add(self.params, m, alpha=-coef)

    # ------------------------------------------------------------------ state
    @property
    def momentum(self) -> list[Tensor] | None:
        """The optimizer's momentum (the corrections' reference), None before it exists."""
        return self.optimizer.momentum

    @property
    def config(self) -> dict[str, Any]:
        """Names and resolved arguments of the three components (what build_engine takes)."""
        return {
            "optimizer": self.optimizer.name,
            "optimizer_args": dict(self.optimizer.args),
            "correction": self.correction.name,
            "correction_args": dict(self.correction.args),
            "staleness_weight": self.staleness_weight.name,
            "staleness_weight_args": dict(self.staleness_weight.args),
            "fairness": self.fairness.name,
            "fairness_args": dict(self.fairness.args),
            "dispatch": self.dispatch,
            "weight_order": self.weight_order,
        }

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """θ, optimizer buffers and step count, version and config; tensors are cloned.

        Loading it into an engine with the same config reproduces every later commit bitwise
        (on the same machine and torch build; see docs/algorithms.md on replicas).

        :param copy: False: θ and the optimizer buffers are the live tensors themselves (no copy of
            θ and m: for a caller that serialises the dict at once and commits nothing meanwhile)
        """
        self._held()
        return {
            "format": STATE_FORMAT,
            "version": self.version,
            "config": self.config,
            "names": list(self.names),
            "params": [p.detach().clone() if copy else p.detach() for p in self.params],
            "optimizer": self.optimizer.state_dict(copy),
            "fairness": self.fairness.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any], strict: bool = True) -> None:
        """Restore ``state_dict()``. Everything is checked before anything changes.

        :param state: from ``state_dict()`` (possibly after torch.save/torch.load)
        :param strict: require the same config (names and args); False allows other
            correction / staleness-weight / optimizer args, but never another optimizer
        :raises ValueError: wrong format, config, layout or buffers
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"state: not an outer engine state (format {STATE_FORMAT!r} expected)")
        version = state.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"state: version must be an int >= 0, got {version!r}")
        config = state.get("config")
        if isinstance(config, dict) and "fairness" not in config:  # states written before fairness existed
            config = {**config, "fairness": "none", "fairness_args": {}}
        if isinstance(config, dict) and "dispatch" not in config:  # states written before the dispatch option
            config = {**config, "dispatch": "current", "weight_order": "after"}
        if not isinstance(config, dict) or config.get("optimizer") != self.optimizer.name:
            raise ValueError(f"state: optimizer {config.get('optimizer') if isinstance(config, dict) else None!r} "
                             f"!= this engine's {self.optimizer.name!r}")
        if strict and config != self.config:
            diff = sorted(k for k in set(config) | set(self.config) if config.get(k) != self.config.get(k))
            raise ValueError(f"state: config differs in {', '.join(diff)} (load with strict=False to allow)")
        params = state.get("params")
        if not isinstance(params, (list, tuple)) or len(params) != len(self.params):
            raise ValueError(f"state: params must be a list of {len(self.params)} tensors")
        for i, (t, p) in enumerate(zip(params, self.params)):
            if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                raise ValueError(f"state: params[{self.names[i]}] must be a {p.dtype} tensor of shape {tuple(p.shape)}")
        check_optimizer_state(self.optimizer, state.get("optimizer"), self.params)
        fair = type(self.fairness)(**self.fairness.args)
        fair.load_state_dict(state.get("fairness") or {})  # checked on a copy: nothing changes on error
        if self._devices is not None:  # hollow: θ is allocated now, where it was before the release
            self.params = [t.detach().to(d).clone(memory_format=torch.contiguous_format)
                           for t, d in zip(params, self._devices)]
            self._devices = None
        else:
            for p, t in zip(self.params, params):
                p.copy_(t)
        self.optimizer.load_state_dict(state["optimizer"], self.params)
        self.fairness = fair
        self.version = version

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.params)
        return (f"OuterEngine(version={self.version}, blocks={len(self.params)}, numel={n}, "
                f"optimizer={self.optimizer!r}, correction={self.correction!r}, "
                f"staleness_weight={self.staleness_weight!r}, fairness={self.fairness!r}, "
                f"dispatch={self.dispatch!r}, weight_order={self.weight_order!r})")


@dataclass
class Corrected:
    """Output of ``apply_correction``: the Δ̂ blocks, the decision and the scalars of each block."""

    tensors: list[Tensor]
    decisions: list[Decision]
    stats: BlockStats


def apply_correction(
    correction: Correction,
    pseudo_grad: list[Tensor],
    momentum: list[Tensor] | None,
    momentum_unit: float = 1.0,
    staleness: int = 0,
    out: list[Tensor] | Callable[[], list[Tensor]] | None = None,
    names: list[str] | None = None,
) -> Corrected:
    """Δ̂_b = a·Δ_b + s·‖Δ_b‖·m_b/‖m_b‖ for every block, as the correction decides.

    Blocks the correction keeps are returned as the input tensors themselves (bitwise unchanged,
    no copy); only changed blocks are written, into ``out`` (which may alias ``pseudo_grad``).
    The inputs are never modified unless ``out`` aliases them.

    :param correction: a Correction instance
    :param pseudo_grad: Δ blocks
    :param momentum: the reference m blocks, or None (rules that need it then skip)
    :param momentum_unit: factor expressing ‖m‖ in pseudo-gradient units (optimizer.momentum_unit)
    :param staleness: τ, for rules that use it
    :param out: tensors to write changed blocks into, or a function returning them; None: new tensors
    :param names: block names for error messages
    :raises ValueError: NaN or inf in Δ
    """
    stats = block_stats(pseudo_grad, momentum, names)
    decisions = [
        correction(Block(nd, None if stats.momentum_norms is None else stats.momentum_norms[i] * momentum_unit,
                         stats.cosines[i], staleness))
        for i, nd in enumerate(stats.delta_norms)
    ]
    tensors = list(pseudo_grad)
    for i, d in enumerate(decisions):
        if d.identity:
            continue  # bitwise pass-through, no copy
        if out is None:
            work = torch.empty_like(pseudo_grad[i])
        else:
            work = (out() if callable(out) else out)[i]
        if d.s == 0.0:
            torch.mul(pseudo_grad[i], d.a, out=work)
        else:
            if momentum is None or not stats.momentum_norms[i] > 0.0:
                raise ValueError(f"correction {correction.name!r}: s != 0 needs a momentum reference (uses_momentum)")
            # momentum_floor bounds ‖Δ_b‖/‖m_b‖, so this coefficient stays finite in float32
            b = d.s * stats.delta_norms[i] / stats.momentum_norms[i]
            if d.a == 1.0:
                torch.add(pseudo_grad[i], momentum[i], alpha=b, out=work)
            else:
                torch.mul(pseudo_grad[i], d.a, out=work)
                work.add_(momentum[i], alpha=b)
        tensors[i] = work
    return Corrected(tensors, decisions, stats)


def _norm_after(d: Decision, nd: float, c: float | None) -> float:
    # ‖aΔ + s‖Δ‖v̂‖ = ‖Δ‖·sqrt(a² + 2as·c + s²)
    c = 0.0 if c is None else c
    return nd * math.sqrt(max(0.0, d.a * d.a + 2.0 * d.a * d.s * c + d.s * d.s))


def build_engine(
    params: Sequence[Tensor],
    optimizer: str = "lookahead",
    optimizer_args: dict[str, Any] | None = None,
    correction: str = "none",
    correction_args: dict[str, Any] | None = None,
    staleness_weight: str | None = None,
    staleness_weight_args: dict[str, Any] | None = None,
    names: Sequence[str] | None = None,
    fairness: str | None = None,
    fairness_args: dict[str, Any] | None = None,
    dispatch: str = "current",
    weight_order: str = "after",
    num_workers: int | None = None,
) -> OuterEngine:
    """An OuterEngine from registered names and arguments, as a run config gives them.

    :param params: initial θ (copied)
    :param optimizer: ``nesterov`` | ``delayed_nesterov`` | ``lookahead``
    :param optimizer_args: e.g. ``{"lr": 0.7, "momentum": 0.9}``; missing keys take defaults
    :param correction: ``none`` | ``heloco`` | ``heloco_smooth`` | ``pcgrad`` | ``staleness``
    :param correction_args: e.g. ``{"c_ok": 0.1}``
    :param staleness_weight: None (ρ = 1) | ``none`` | ``inverse_sqrt`` | ``power``
    :param staleness_weight_args: e.g. ``{"alpha": 0.5}`` for ``power``
    :param names: optional block names (e.g. from ``model.named_parameters()``)
    :param fairness: None (ρ_w = 1) | ``none`` | ``compute_time`` | ``commit_share``
    :param fairness_args: e.g. ``{"alpha": 1.0, "rho_max": 10.0}``
    :param dispatch: ``current`` | ``lookahead`` (see ``OuterEngine.dispatch_params``)
    :param weight_order: ``after`` | ``before`` the correction, for the staleness weight
    :param num_workers: K for ``base`` weights when a commit gives none
    :raises ValueError: unknown name or bad argument (message starts with the key)

    Example::

        engine = build_engine([p.data for p in model.parameters()], "delayed_nesterov",
                              {"buffer_size": 4}, "heloco", {"c_ok": 0.1}, "inverse_sqrt")
    """
    return OuterEngine(
        params,
        registry.build("optimizer", optimizer, optimizer_args),
        registry.build("correction", correction, correction_args),
        registry.build("staleness_weight", staleness_weight or "none", staleness_weight_args),
        names=names,
        fairness=registry.build("fairness", fairness or "none", fairness_args),
        dispatch=dispatch,
        weight_order=weight_order,
        num_workers=num_workers,
    )
