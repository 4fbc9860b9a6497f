"""Outer optimization: pure torch math on lists of tensors (no I/O, clocks or network).

The simulator and the coordinator both call exactly this code::

    from heloco_p2p.outer import build_engine, DyLU, registry
    engine = build_engine(params, optimizer="lookahead", correction="heloco")
    info = engine.commit(pseudo_grad, base_version)      # -> CommitInfo
    registry.names("correction")                          # -> ['heloco', 'heloco_smooth', ...]

Modules: ``optimizers`` (nesterov, delayed_nesterov, lookahead), ``corrections`` (none, heloco,
heloco_smooth, pcgrad, staleness), ``staleness`` (ρ(τ) weights), ``fairness`` (ρ_w region-fair weights), ``stats`` (per-block norms and
cosines), ``engine`` (state, commit, sync_commit, state_dict), ``dylu`` (inner steps per peer),
``registry`` (names → classes, argument checks). Imports no other heloco_p2p module.
"""
from . import corrections, fairness, optimizers, registry, staleness  # noqa: F401  (importing registers the classes)
from .corrections import Block, Correction, Decision
from .dylu import DyLU
from .engine import CommitInfo, Corrected, OuterEngine, apply_correction, build_engine
from .fairness import Fairness
from .optimizers import OuterOptimizer
from .staleness import StalenessWeight

__all__ = [
    "Block",
    "CommitInfo",
    "Corrected",
    "Correction",
    "Decision",
    "DyLU",
    "Fairness",
    "OuterEngine",
    "OuterOptimizer",
    "StalenessWeight",
    "apply_correction",
    "build_engine",
    "registry",
]
