"""Simulator configs (configs/sim-*.yaml): which algorithms, heterogeneity levels, data splits,
seeds and budgets to run, on top of a base run config that gives the model and inner loop."""
from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from heloco_p2p.algorithms import ALGORITHMS, AlgorithmPreset
from heloco_p2p.config import ConfigError, RunConfig, format_errors, load_config, read_yaml, resolve_config_path
from heloco_p2p.outer import registry
from heloco_p2p.swarm.sparse import TopkCodec, check_params

# Relative step times (1 = the fastest worker) for 4 workers. moderate follows the Async
# Local-SGD study (Liu et al. 2024); severe is one fast worker and three 15x slower ones.
HETEROGENEITY_LEVELS: dict[str, list[float]] = {
    "none": [1.0, 1.0, 1.0, 1.0],
    "slight": [1.0, 1.1, 1.2, 1.4],
    "moderate": [1.0, 1.3, 2.6, 5.7],
    "very": [1.0, 2.0, 5.0, 10.0],
    "severe": [1.0, 15.0, 15.0, 15.0],
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Experiment(_Strict):
    """A grid block: every algorithm × heterogeneity level × data split listed here is run."""

    algorithms: list[str]
    heterogeneity: list[str]
    # non-iid: one language per worker; iid: every batch mixes the languages; non-iid-disjoint:
    # one language AND a disjoint share of the books per worker (different content, sim/engine.py)
    data: list[Literal["non-iid", "iid", "non-iid-disjoint"]] = ["non-iid"]


class UplinkConfig(_Strict):
    """How workers' pseudo-gradients travel to the coordinator, as ``swarm.compression`` in the
    swarm: each Δ goes through the wire's encoder and decoder before the outer step, and with
    ``topk`` each worker keeps its error-feedback residual (swarm/uplink.py; every simulated
    commit is applied, so the residual is always kept). ``error_feedback: false`` is the ablation
    without it. ``bits`` 1..8 (1: the sign only, scaled by the chunk's mean kept magnitude);
    ``density: 1.0`` keeps every value and sends no indices (bits 1, chunk 128: 1.125 bits/param)."""

    compression: Literal["none", "fp16", "8bit", "topk"] = "none"
    density: float = 0.02
    bits: int = 2
    chunk: int = 128
    error_feedback: bool = True

    @model_validator(mode="after")
    def _valid(self) -> "UplinkConfig":
        check_params(self.density, self.bits, self.chunk)
        return self

    def codec(self) -> TopkCodec:
        return TopkCodec(self.density, self.bits, self.chunk)


class ShardDelay(_Strict):
    """How the parts of a round reach their shard coordinators (``shards``, sim/engine.py): part k
    of worker w sent at t arrives at t + latency[w][k] + J (J exponential with mean ``jitter_s``,
    from the run's seeded RNG; 0 when ``jitter_s`` is 0), then crosses its holder's link of
    ``link`` bytes per virtual second (bytes_k / link, the part as the uplink encodes it), first
    come first served: a part that arrives while the link carries another waits for it. It is
    committed when it has crossed. Its reply (the shard's θ̄ right after that commit) takes
    latency[w][k] back. ``link`` None: no transfer time and no queue.

    ``latency_s``: one value for every worker and shard, one per shard, or one list per worker
    (worker × shard: holders and workers in different places)."""

    latency_s: float | list[float] | list[list[float]] = 0.0
    jitter_s: float = Field(0.0, ge=0)
    link: float | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _valid(self) -> "ShardDelay":
        lat = self.latency_s if isinstance(self.latency_s, list) else [self.latency_s]
        flat = [x for row in lat for x in (row if isinstance(row, list) else [row])]
        if not flat or not all(math.isfinite(x) and x >= 0 for x in flat):
            raise ValueError(f"latency_s: must be >= 0 (one value, one per shard or worker × shard), got {self.latency_s!r}")
        if not math.isfinite(self.jitter_s):
            raise ValueError(f"jitter_s: must be finite, got {self.jitter_s!r}")
        return self

    def latencies(self, shards: int, workers: int) -> list[list[float]]:
        """latency[w][k] for ``workers`` workers and ``shards`` shards.

        :raises ValueError: a list that does not fit S (or the workers)
        """
        lat = self.latency_s
        if not isinstance(lat, list):
            return [[float(lat)] * shards for _ in range(workers)]
        if all(isinstance(row, list) for row in lat):
            if len(lat) != workers or any(len(row) != shards for row in lat):
                raise ValueError(f"shard_delay.latency_s: expected {workers} lists (one per worker) of {shards} values")
            return [[float(x) for x in row] for row in lat]
        if any(isinstance(row, list) for row in lat) or len(lat) != shards:
            raise ValueError(f"shard_delay.latency_s: {len(lat)} values for {shards} shards")
        return [[float(x) for x in lat] for _ in range(workers)]


class Variant(_Strict):
    """A new algorithm name made from a built-in one with other arguments (for ablations)."""

    base: str
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    correction: str | None = None  # another correction by name (None: the base's)
    correction_args: dict[str, Any] = Field(default_factory=dict)
    fairness: str | None = None
    fairness_args: dict[str, Any] = Field(default_factory=dict)
    staleness_weight: str | None = None  # ρ by name (None: the base's, or the config's staleness_weight)
    staleness_weight_args: dict[str, Any] = Field(default_factory=dict)
    dispatch: Literal["current", "lookahead"] | None = None
    weight_order: Literal["after", "before"] | None = None
    steps_per_round: int | None = Field(None, gt=0)  # H for this name (None: the config's)
    dylu: bool | None = None
    overlap: bool | None = None  # overlapped rounds for this name (None: the config's ``overlap``)
    uplink: UplinkConfig | None = None  # Δ compression for this name (None: the config's ``uplink``)
    shards: int | None = Field(None, ge=1)  # S shard coordinators for this name (None: the config's)
    shard_delay: ShardDelay | None = None  # the parts' delays for this name (None: the config's)


class SimConfig(_Strict):
    name: str
    base: str  # run config giving model, data and inner loop, e.g. configs/tiny.yaml
    overrides: dict[str, Any] = Field(default_factory=dict)  # dotted keys into the base config
    regions: list[str] = Field(min_length=1)  # one worker per region
    steps_per_round: int = Field(gt=0)  # H (DyLU scales it down for slower workers)
    step_time: float = Field(1.0, gt=0)  # virtual seconds per inner step of the fastest worker
    bandwidth: float | None = Field(None, gt=0)  # bytes per virtual second; None: free communication
    experiments: list[Experiment] = Field(min_length=1)
    heterogeneity_levels: dict[str, list[float]] = Field(default_factory=dict)
    variants: dict[str, Variant] = Field(default_factory=dict)
    seeds: list[int] = Field(min_length=1)
    token_budget: int = Field(gt=0)
    time_budget: float = Field(gt=0)  # virtual seconds
    # per heterogeneity level (virtual seconds), e.g. the time the asynchronous runs need for the
    # token budget at that level's speeds; a level not listed uses time_budget
    time_budgets: dict[str, float] = Field(default_factory=dict)
    eval_points: int = Field(5, gt=0)
    lr_grid: dict[str, list[float]] = Field(default_factory=dict)  # algorithm -> outer lrs to sweep on seeds[0]
    sweep_heterogeneity: str | None = None  # level the sweep runs at (default: the first one listed)
    processes: int = Field(2, gt=0)
    threads_per_process: int = Field(1, gt=0)
    overlap: bool = False  # overlapped rounds: start the next round before the reply (sim/engine.py)
    # ρ for every asynchronous algorithm and variant (None: each preset's own). HeLoCo's paper gives
    # every asynchronous rule ρ = base (1/√K), so that an ablation compares rules, not step sizes.
    staleness_weight: str | None = None
    uplink: UplinkConfig = Field(default_factory=UplinkConfig)  # Δ on the wire (default: fp32, exact)
    # S shard coordinators, as swarm.shards (1: one coordinator, today's simulator exactly), and
    # how each part of a round reaches its shard (None: at once); per variant too (sim/engine.py)
    shards: int = Field(1, ge=1)
    shard_delay: ShardDelay | None = None

    @model_validator(mode="after")
    def _names_exist(self) -> "SimConfig":
        levels = self.levels()
        algos = self.algorithms()
        for exp in self.experiments:
            for a in exp.algorithms:
                if a not in algos:
                    raise ValueError(f"experiments: unknown algorithm {a!r}; known: {', '.join(algos)}")
            for h in exp.heterogeneity:
                if h not in levels:
                    raise ValueError(f"experiments: unknown heterogeneity {h!r}; known: {', '.join(levels)}")
                if len(levels[h]) != len(self.regions):
                    raise ValueError(f"heterogeneity {h!r} has {len(levels[h])} speeds but there are "
                                     f"{len(self.regions)} regions (one worker per region)")
                if min(levels[h]) < 1.0:
                    raise ValueError(f"heterogeneity {h!r}: relative step times must be >= 1 (1 = the fastest)")
        for a in self.lr_grid:
            if a not in algos:
                raise ValueError(f"lr_grid: unknown algorithm {a!r}")
        for h, t in self.time_budgets.items():
            if h not in levels:
                raise ValueError(f"time_budgets: unknown heterogeneity {h!r}; known: {', '.join(levels)}")
            if not t > 0:
                raise ValueError(f"time_budgets.{h}: must be > 0, got {t!r}")
        if self.staleness_weight is not None:
            registry.check_args("staleness_weight", self.staleness_weight, {})
        return self

    def levels(self) -> dict[str, list[float]]:
        return {**HETEROGENEITY_LEVELS, **self.heterogeneity_levels}

    def algorithms(self) -> dict[str, AlgorithmPreset]:
        algos = {name: self._with_rho(p) for name, p in ALGORITHMS.items()}
        for name, v in self.variants.items():
            if v.base not in ALGORITHMS:
                raise ValueError(f"variants.{name}.base: unknown algorithm {v.base!r}; known: {', '.join(ALGORITHMS)}")
            base = self._with_rho(ALGORITHMS[v.base])
            if v.correction is not None and v.correction != base.correction:
                base = replace(base, correction=v.correction, correction_args={})
            preset = base.with_args(v.optimizer_args, v.correction_args, v.fairness, v.fairness_args,
                                    v.staleness_weight, v.staleness_weight_args, v.dispatch, v.weight_order)
            try:
                registry.check_args("correction", preset.correction, preset.correction_args)
                registry.check_args("fairness", preset.fairness, preset.fairness_args)
                registry.check_args("staleness_weight", preset.staleness_weight, preset.staleness_weight_args)
            except ValueError as exc:
                raise ValueError(f"variants.{name}.{exc}") from None
            algos[name] = replace(preset, name=name, dylu=preset.dylu if v.dylu is None else v.dylu)
        return algos

    def _with_rho(self, preset: AlgorithmPreset) -> AlgorithmPreset:
        if self.staleness_weight is None or preset.mode != "async":
            return preset
        return preset.with_args(staleness_weight=self.staleness_weight)

    def overlap_for(self, algorithm: str) -> bool:
        v = self.variants.get(algorithm)
        return self.overlap if v is None or v.overlap is None else v.overlap

    def uplink_for(self, algorithm: str) -> UplinkConfig:
        v = self.variants.get(algorithm)
        return self.uplink if v is None or v.uplink is None else v.uplink

    def shards_for(self, algorithm: str) -> int:
        v = self.variants.get(algorithm)
        return self.shards if v is None or v.shards is None else v.shards

    def shard_delay_for(self, algorithm: str) -> ShardDelay | None:
        v = self.variants.get(algorithm)
        return self.shard_delay if v is None or v.shard_delay is None else v.shard_delay

    def sharded(self, algorithm: str) -> bool:
        """Whether ``algorithm`` runs on the shard model (S > 1, or any shard delay)."""
        return self.shards_for(algorithm) > 1 or self.shard_delay_for(algorithm) is not None

    def steps_for(self, algorithm: str) -> int:
        """H for ``algorithm``: its variant's ``steps_per_round`` or the config's."""
        v = self.variants.get(algorithm)
        return self.steps_per_round if v is None or v.steps_per_round is None else v.steps_per_round

    def run_config(self) -> RunConfig:
        return load_config(self.base, overrides=self.overrides)


def load_sim_config(path: str | Path) -> SimConfig:
    p = resolve_config_path(path)
    tree = read_yaml(p)
    try:
        cfg = SimConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(str(p), err)) from None
    run_cfg = cfg.run_config()  # the base config and its overrides must be valid too
    try:
        _check_shards(cfg, run_cfg)
    except ValueError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    return cfg


def _check_shards(cfg: SimConfig, run_cfg: RunConfig) -> None:
    """Every algorithm run on the shard model: asynchronous, not overlapped, S a plan the model
    allows (roles/shards.py), latencies that fit S."""
    names = {a for exp in cfg.experiments for a in exp.algorithms} | set(cfg.lr_grid)
    algos = cfg.algorithms()
    for a in sorted(names):
        if not cfg.sharded(a):
            continue
        S = cfg.shards_for(a)
        if algos[a].mode != "async":
            raise ValueError(f"{a}: shards and shard_delay are modelled for asynchronous algorithms only "
                             "(the sync barrier is one commit over all blocks)")
        if cfg.overlap_for(a):
            raise ValueError(f"{a}: shards and shard_delay are not modelled with overlapped rounds")
        delay = cfg.shard_delay_for(a)
        if delay is not None:
            delay.latencies(S, len(cfg.regions))
        shard_shapes(run_cfg, S)


def shard_shapes(run_cfg: RunConfig, shards: int) -> list[list[tuple[int, ...]]]:
    """The trainable tensors' shapes of each shard of ``run_cfg``'s model (ShardPlan, by bytes).

    :raises ShardError: S more than the model's tensors (or MAX_SHARDS)
    """
    import torch

    from heloco_p2p.local import build_model
    from heloco_p2p.local.model import trainable_params
    from heloco_p2p.swarm.shard_plan import ShardPlan

    with torch.device("meta"):
        model = build_model(run_cfg.model)
    shapes = [tuple(p.shape) for p in trainable_params(model)]
    return ShardPlan.for_shapes(shapes, shards).split(shapes)
