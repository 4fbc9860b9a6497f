"""Named training algorithms: how the coordinator (or the simulator) combines pseudo-gradients.

Each name is a preset of the outer layer: a mode (``sync``: wait for one pseudo-gradient from
every worker, average, commit; ``async``: commit each one alone as it arrives), an outer
optimizer, a correction, and whether workers use DyLU. The names are an interface: they appear
in results.json, in run configs and in the monitor.

    preset = ALGORITHMS["heloco"]
    engine = preset.build_engine(params, lr=0.7, num_workers=4)
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

from heloco_p2p.outer import build_engine


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

    def with_args(self, optimizer_args: dict | None = None, correction_args: dict | None = None,
                  fairness: str | None = None, fairness_args: dict | None = None) -> "AlgorithmPreset":
        same = fairness is None or fairness == self.fairness
        return replace(
            self,
            optimizer_args={**self.optimizer_args, **(optimizer_args or {})},
            correction_args={**self.correction_args, **(correction_args or {})},
            fairness=self.fairness if fairness is None else fairness,
            fairness_args={**(self.fairness_args if same else {}), **(fairness_args or {})},
        )

    @property
    def lr(self) -> float:
        return float(self.optimizer_args["lr"])

    def build_engine(self, params, lr: float | None = None, num_workers: int = 1):
        """An OuterEngine over ``params``; ``lr`` overrides the preset's outer learning rate and
        Delayed Nesterov's buffer defaults to the number of workers (Liu et al. 2024)."""
        args = dict(self.optimizer_args)
        if lr is not None:
            args["lr"] = lr
        if self.optimizer == "delayed_nesterov":
            args.setdefault("buffer_size", num_workers)
        return build_engine(params, optimizer=self.optimizer, optimizer_args=args,
                            correction=self.correction, correction_args=dict(self.correction_args),
                            fairness=self.fairness, fairness_args=dict(self.fairness_args))


_NESTEROV = {"lr": 0.7, "momentum": 0.9}
_LOOKAHEAD = {"lr": 0.7, "momentum": 0.9}
# DN applies Δ/N per commit: a window of N commits at lr 0.7 moves θ like one sync DiLoCo step.
_DN = {"lr": 0.7, "momentum": 0.9, "c": 0.0}

ALGORITHMS: dict[str, AlgorithmPreset] = {
    p.name: p
    for p in [
        AlgorithmPreset("sync_diloco", "sync", "nesterov", _NESTEROV,
                        description="synchronous DiLoCo: average one Δ per worker, SGD Nesterov"),
        AlgorithmPreset("async_diloco", "async", "nesterov", _NESTEROV,
                        description="asynchronous DiLoCo: each Δ applied alone with SGD Nesterov"),
        AlgorithmPreset("async_dn", "async", "delayed_nesterov", _DN,
                        description="asynchronous with Delayed Nesterov (Liu et al. 2024)"),
        AlgorithmPreset("async_dn_dylu", "async", "delayed_nesterov", _DN, dylu=True,
                        description="Delayed Nesterov + Dynamic Local Updates"),
        AlgorithmPreset("async_mla", "async", "lookahead", _LOOKAHEAD,
                        description="asynchronous momentum look-ahead (Ajanthan et al. 2025)"),
        AlgorithmPreset("heloco", "async", "lookahead", _LOOKAHEAD, correction="heloco",
                        description="look-ahead + HeLoCo correction of each Δ against the momentum"),
        AlgorithmPreset("heloco_dylu", "async", "lookahead", _LOOKAHEAD, correction="heloco", dylu=True,
                        description="HeLoCo + Dynamic Local Updates"),
        AlgorithmPreset("async_pcgrad", "async", "lookahead", _LOOKAHEAD, correction="pcgrad",
                        description="look-ahead + PCGrad projection of conflicting Δ"),
        # region-fair rules (docs/algorithms.md, "Region-fair weights"; measured in docs/results.md)
        AlgorithmPreset("dn_fair", "async", "delayed_nesterov", _DN, dylu=True, fairness="compute_time",
                        description="DN + DyLU + Rescaled-ASGD weights (ρ_w ∝ the sender's round time)"),
        AlgorithmPreset("heloco_fair", "async", "lookahead", _LOOKAHEAD, correction="heloco", dylu=True,
                        fairness="compute_time",
                        description="HeLoCo + DyLU + Rescaled-ASGD weights (ρ_w ∝ the sender's round time)"),
        AlgorithmPreset("heloco_region", "async", "lookahead", _LOOKAHEAD, correction="heloco", dylu=True,
                        fairness="region_memory",
                        description="HeLoCo + DyLU, each commit applying the mean of every region's latest Δ̂"),
    ]
}


def get_algorithm(name: str) -> AlgorithmPreset:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None


def resolve_outer(outer_cfg) -> tuple[str, AlgorithmPreset]:
    """The mode and preset a run config's ``outer`` section asks for: its named ``algorithm`` with
    the section's arguments on top, or (no algorithm named) an async preset from its fields."""
    if outer_cfg.algorithm is not None:
        preset = get_algorithm(outer_cfg.algorithm).with_args(outer_cfg.optimizer_args, outer_cfg.correction_args,
                                                              outer_cfg.fairness, outer_cfg.fairness_args)
    else:
        preset = AlgorithmPreset("custom", "async", outer_cfg.optimizer, dict(outer_cfg.optimizer_args),
                                 outer_cfg.correction, dict(outer_cfg.correction_args), dylu=outer_cfg.dylu,
                                 fairness=outer_cfg.fairness or "none", fairness_args=dict(outer_cfg.fairness_args))
    return preset.mode, preset
