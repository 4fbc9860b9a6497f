"""Named training algorithms, and the one factory that builds an outer engine from a run config.

Each name is a preset of the outer layer: a mode (``sync``: wait for one pseudo-gradient from
every worker, average, commit; ``async``: commit each one alone as it arrives), an outer
optimizer, a correction, a staleness weight and its order, where rounds start (``dispatch``),
and whether workers use DyLU. The names are an interface: they appear in results.json, in run
configs and in the monitor.

The simulator and the swarm build their engines with ``build_outer_engine`` and their DyLU with
``build_dylu``, so one run config means one algorithm everywhere::

    mode, preset = resolve_outer(cfg.outer)          # a run config's outer section -> a preset
    engine = build_outer_engine(preset, params, names=names, num_workers=5)
    dylu = build_dylu(preset)                         # None unless the preset uses DyLU

``heloco`` is the method as published (Asif et al. 2026, from the first author's reference
code; ALGORITHMS.md): momentum look-ahead (MLA), look-ahead dispatch θ̄ = θ − ημm, the block-wise
correction with the Table 3 constants, and ρ = 1/√K applied before the correction.
``heloco_correction_only`` (no dispatch) and ``mla_dispatch`` (no correction) are its two halves.
Results recorded before 2026-12 under the name ``heloco`` used the correction alone, with other
constants and ρ = 1 (docs/results.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence

from heloco_p2p.outer import DyLU, OuterEngine, build_engine, registry


@dataclass(frozen=True)
class AlgorithmPreset:
    name: str
    mode: Literal["sync", "async"]
    optimizer: str
    optimizer_args: dict[str, Any] = field(default_factory=dict)
    correction: str = "none"
    correction_args: dict[str, Any] = field(default_factory=dict)
    dylu: bool = False
    description: str = ""
    fairness: str = "none"  # region-fair weight per sender (outer/fairness.py)
    fairness_args: dict[str, Any] = field(default_factory=dict)
    dispatch: Literal["current", "lookahead"] = "current"  # where rounds start (OuterEngine.dispatch_params)
    staleness_weight: str = "none"  # ρ (outer/staleness.py)
    staleness_weight_args: dict[str, Any] = field(default_factory=dict)
    weight_order: Literal["after", "before"] = "after"  # ρ applied after or before the correction
    dylu_min_steps: int = 1  # floor on a worker's H under DyLU (config outer.dylu_min_steps)

    def with_args(self, optimizer_args: dict | None = None, correction_args: dict | None = None,
                  fairness: str | None = None, fairness_args: dict | None = None,
                  staleness_weight: str | None = None, staleness_weight_args: dict | None = None,
                  dispatch: str | None = None, weight_order: str | None = None) -> "AlgorithmPreset":
        """This preset with arguments on top; a component renamed (fairness, staleness weight)
        drops the preset's arguments for the old one. None keeps the preset's choice."""
        same_fair = fairness is None or fairness == self.fairness
        same_rho = staleness_weight is None or staleness_weight == self.staleness_weight
        return replace(
            self,
            optimizer_args={**self.optimizer_args, **(optimizer_args or {})},
            correction_args={**self.correction_args, **(correction_args or {})},
            fairness=self.fairness if fairness is None else fairness,
            fairness_args={**(self.fairness_args if same_fair else {}), **(fairness_args or {})},
            staleness_weight=self.staleness_weight if staleness_weight is None else staleness_weight,
            staleness_weight_args={**(self.staleness_weight_args if same_rho else {}), **(staleness_weight_args or {})},
            dispatch=self.dispatch if dispatch is None else dispatch,
            weight_order=self.weight_order if weight_order is None else weight_order,
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer_args["lr"])

    def build_engine(self, params, lr: float | None = None, num_workers: int | None = None,
                     names: Sequence[str] | None = None) -> OuterEngine:
        """``build_outer_engine(self, ...)``, kept for callers of the method."""
        return build_outer_engine(self, params, names=names, num_workers=num_workers, lr=lr)

    def describe(self) -> dict[str, Any]:
        """The resolved components, as ``heloco-peer algorithms --json`` prints them (keys: name,
        optimizer, dispatch, correction, correction_args, staleness_weight, weight_order, dylu,
        fairness, lr); ``mode`` and ``description`` are attributes of the preset."""
        opt_args: dict[str, Any] = registry.check_args("optimizer", self.optimizer, self.optimizer_args)
        if self.optimizer == "delayed_nesterov" and "buffer_size" not in self.optimizer_args:
            opt_args["buffer_size"] = "num_workers"  # K, given when the engine is built (build_outer_engine)
        return {
            "name": self.name,
            "optimizer": {"name": self.optimizer, "args": opt_args},
            "dispatch": self.dispatch,
            "correction": self.correction,
            "correction_args": registry.check_args("correction", self.correction, self.correction_args),
            "staleness_weight": {"name": self.staleness_weight,
                                 "args": registry.check_args("staleness_weight", self.staleness_weight,
                                                             self.staleness_weight_args)},
            "weight_order": self.weight_order,
            "dylu": {"enabled": self.dylu, "min_steps": self.dylu_min_steps},
            "fairness": {"name": self.fairness,
                         "args": registry.check_args("fairness", self.fairness, self.fairness_args)},
            "lr": self.lr,
        }


def build_outer_engine(outer, params: Sequence, names: Sequence[str] | None = None,
                       num_workers: int | None = None, lr: float | None = None) -> OuterEngine:
    """THE outer engine of a run, for the simulator and the swarm alike.

    :param outer: a run config's ``outer`` section (``OuterConfig``) or a resolved ``AlgorithmPreset``
    :param params: initial θ (copied)
    :param names: block names (``param_names(model)``)
    :param num_workers: K, the number of workers. Delayed Nesterov's buffer N defaults to it
        (Liu et al. 2024); staleness weights that need K (``base``) use it when a commit gives
        none. None where K is not known when the engine is built (a swarm): then DN needs an
        explicit ``buffer_size``, and a ``base`` weight needs K with every commit.
    :param lr: overrides the preset's outer learning rate (the simulator's lr sweep)
    :raises ValueError: bad names or arguments, or DN without a buffer size and without K
    """
    preset = outer if isinstance(outer, AlgorithmPreset) else resolve_outer(outer)[1]
    args = dict(preset.optimizer_args)
    if lr is not None:
        args["lr"] = lr
    if preset.optimizer == "delayed_nesterov" and "buffer_size" not in args:
        if num_workers is None:
            raise ValueError("optimizer_args.buffer_size: delayed_nesterov's buffer N defaults to the number of "
                             "workers, which is not known here: set outer.optimizer_args.buffer_size")
        args["buffer_size"] = num_workers
    return build_engine(params, optimizer=preset.optimizer, optimizer_args=args,
                        correction=preset.correction, correction_args=dict(preset.correction_args),
                        staleness_weight=preset.staleness_weight,
                        staleness_weight_args=dict(preset.staleness_weight_args), names=names,
                        fairness=preset.fairness, fairness_args=dict(preset.fairness_args),
                        dispatch=preset.dispatch, weight_order=preset.weight_order, num_workers=num_workers)


def build_dylu(preset: AlgorithmPreset) -> DyLU | None:
    """The DyLU of a run (None unless the preset uses it), for the simulator and the swarm alike."""
    return DyLU(min_steps=preset.dylu_min_steps) if preset.dylu else None


_NESTEROV = {"lr": 0.7, "momentum": 0.9}
_LOOKAHEAD = {"lr": 0.7, "momentum": 0.9}
# DN applies Δ/N per commit: a window of N commits at lr 0.7 moves θ like one sync DiLoCo step.
_DN = {"lr": 0.7, "momentum": 0.9, "c": 0.0}
# HeLoCo's paper (Table 3): async Nesterov at η 0.07, since torch's Nesterov moves θ ≈ 7Δ per Δ
_ASYNC_NESTEROV = {"lr": 0.07, "momentum": 0.9}
# the published HeLoCo's delay weight and its order (the authors' experiment code)
_PUBLISHED = dict(staleness_weight="base", weight_order="before")

_HELOCO = AlgorithmPreset("heloco", "async", "lookahead", _LOOKAHEAD, correction="heloco", dispatch="lookahead",
                          description="HeLoCo as published: MLA + look-ahead dispatch θ̄ = θ − ημm + block-wise "
                                      "correction (Table 3), ρ = 1/√K before the correction", **_PUBLISHED)

ALGORITHMS: dict[str, AlgorithmPreset] = {
    p.name: p
    for p in [
        AlgorithmPreset("sync_diloco", "sync", "nesterov", _NESTEROV,
                        description="synchronous DiLoCo: average one Δ per worker, SGD Nesterov"),
        AlgorithmPreset("async_diloco", "async", "nesterov", _NESTEROV,
                        description="asynchronous DiLoCo: each Δ applied alone with SGD Nesterov"),
        AlgorithmPreset("async_nesterov", "async", "nesterov", _ASYNC_NESTEROV,
                        description="async_diloco at HeLoCo's Table 3 lr 0.07 (SGD Nesterov per arrival)"),
        AlgorithmPreset("async_dn", "async", "delayed_nesterov", _DN,
                        description="asynchronous with Delayed Nesterov (Liu et al. 2024)"),
        AlgorithmPreset("async_dn_dylu", "async", "delayed_nesterov", _DN, dylu=True,
                        description="Delayed Nesterov + Dynamic Local Updates"),
        AlgorithmPreset("async_mla", "async", "lookahead", _LOOKAHEAD,
                        description="asynchronous momentum look-ahead (Ajanthan et al. 2025), dispatching θ"),
        _HELOCO,
        replace(_HELOCO, name="heloco_correction_only", dispatch="current",
                description="HeLoCo's correction (Table 3, ρ = 1/√K before) on MLA, dispatching θ"),
        replace(_HELOCO, name="mla_dispatch", correction="none",
                description="MLA with HeLoCo's look-ahead dispatch θ̄ = θ − ημm, ρ = 1/√K, no correction"),
        replace(_HELOCO, name="heloco_dylu", dylu=True, description="published HeLoCo + Dynamic Local Updates"),
        AlgorithmPreset("async_pcgrad", "async", "lookahead", _LOOKAHEAD, correction="pcgrad",
                        description="look-ahead + PCGrad projection of conflicting Δ"),
        # region-fair rules (docs/algorithms.md, "Region-fair weights"; measured in docs/results.md)
        AlgorithmPreset("dn_fair", "async", "delayed_nesterov", _DN, dylu=True, fairness="compute_time",
                        description="DN + DyLU + Rescaled-ASGD weights (ρ_w ∝ the sender's round time)"),
        replace(_HELOCO, name="heloco_fair", dylu=True, fairness="compute_time",
                description="published HeLoCo + DyLU + Rescaled-ASGD weights (ρ_w ∝ the sender's round time)"),
        replace(_HELOCO, name="heloco_region", dylu=True, fairness="region_memory",
                description="published HeLoCo + DyLU, each commit applying the mean of every region's latest Δ̂"),
    ]
}


def get_algorithm(name: str) -> AlgorithmPreset:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def resolve_outer(outer_cfg) -> tuple[str, AlgorithmPreset]:
    """The mode and preset a run config's ``outer`` section asks for: its named ``algorithm`` with
    the section's arguments on top, or (no algorithm named) an async preset from its fields.
    Fields left None (``dispatch``, ``staleness_weight``, ``weight_order``, ``fairness``) keep
    the preset's choice; without a preset they mean current, none, after, none."""
    if outer_cfg.algorithm is not None:
        preset = get_algorithm(outer_cfg.algorithm).with_args(
            outer_cfg.optimizer_args, outer_cfg.correction_args, outer_cfg.fairness, outer_cfg.fairness_args,
            outer_cfg.staleness_weight, outer_cfg.staleness_weight_args, outer_cfg.dispatch, outer_cfg.weight_order)
    else:
        preset = AlgorithmPreset("custom", "async", outer_cfg.optimizer, dict(outer_cfg.optimizer_args),
                                 outer_cfg.correction, dict(outer_cfg.correction_args), dylu=outer_cfg.dylu,
                                 fairness=outer_cfg.fairness or "none", fairness_args=dict(outer_cfg.fairness_args),
                                 dispatch=outer_cfg.dispatch or "current",
                                 staleness_weight=outer_cfg.staleness_weight or "none",
                                 staleness_weight_args=dict(outer_cfg.staleness_weight_args),
                                 weight_order=outer_cfg.weight_order or "after")
    return preset.mode, replace(preset, dylu_min_steps=outer_cfg.dylu_min_steps)
