"""Dynamic Local Updates (DyLU): fewer inner steps for slower peers, so rounds end together.

    s_w ← γ s_w + (1 − γ) x          (EMA of peer w's measured steps/second x; first x sets s_w)
    H_w = max(min_steps, ⌈H · s_w / max_j s_j⌉)

Source: Liu, Douillard et al. 2024, Asynchronous Local-SGD Training for Language Modeling
(arXiv 2401.09135), where min_steps = 1 and speeds are known; the EMA is this project's, because
a volunteer's measured speed is noisy.
"""
from __future__ import annotations

import math
from typing import Any, Hashable


class DyLU:
    """Per-peer speed estimates and the inner steps each peer should run.

    :param min_steps: floor on H_w (config ``outer.dylu_min_steps``)
    :param decay: γ, weight of the previous estimate in the EMA; 0 = use the latest measurement

    Example::

        dylu = DyLU(min_steps=1, decay=0.5)
        dylu.update("peer-a", 10.0); dylu.update("peer-b", 2.5)
        dylu.steps_for("peer-b", 500)   # -> 125
    """

    def __init__(self, min_steps: int = 1, decay: float = 0.5) -> None:
        if isinstance(min_steps, bool) or not isinstance(min_steps, int) or min_steps < 1:
            raise ValueError(f"min_steps: must be an integer >= 1, got {min_steps!r}")
        if not (0.0 <= decay < 1.0):
            raise ValueError(f"decay: must be a number in [0, 1), got {decay!r}")
        self.min_steps = min_steps
        self.decay = float(decay)
        self._speed: dict[Hashable, float] = {}

    def update(self, peer: Hashable, steps_per_second: float) -> float:
        """Fold one measurement into the peer's estimate; return the new estimate.

        :raises ValueError: a speed that is not a finite number > 0 (the estimate is unchanged)
        """
        x = float(steps_per_second)
        if not (math.isfinite(x) and x > 0.0):
            raise ValueError(f"steps_per_second: must be a finite number > 0, got {steps_per_second!r}")
        old = self._speed.get(peer)
        self._speed[peer] = x if old is None else self.decay * old + (1.0 - self.decay) * x
        return self._speed[peer]

    def speed(self, peer: Hashable) -> float | None:
        """The smoothed steps/second of ``peer``, None before its first measurement."""
        return self._speed.get(peer)

    def steps_for(self, peer: Hashable, inner_steps: int) -> int:
        """H_w for ``peer`` given the nominal H; a peer never measured gets H (and is measured).

        The ratio is rounded to 9 decimals before the ceiling, so float noise (250.00000000000003)
        does not add a step.
        """
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or inner_steps < 1:
            raise ValueError(f"inner_steps: must be an integer >= 1, got {inner_steps!r}")
        s = self._speed.get(peer)
        if s is None:
            return max(self.min_steps, inner_steps)
        fastest = max(self._speed.values())
        return max(self.min_steps, math.ceil(round(inner_steps * s / fastest, 9)))

    def forget(self, peer: Hashable) -> None:
        """Drop a peer that left, so it no longer sets the fastest speed."""
        self._speed.pop(peer, None)

    @property
    def peers(self) -> list[Hashable]:
        return list(self._speed)

    def state_dict(self) -> dict[str, Any]:
        return {"min_steps": self.min_steps, "decay": self.decay, "speeds": dict(self._speed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        speeds = dict(state["speeds"])
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in speeds.values()):
            raise ValueError("state: speeds must be finite numbers > 0")
        self.min_steps, self.decay = int(state["min_steps"]), float(state["decay"])
        self._speed = {k: float(v) for k, v in speeds.items()}
