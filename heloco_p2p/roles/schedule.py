"""How long a peer's rounds are and when they stop: the ``steps_for`` and ``more`` of its
``RoundLoop`` (roles/rounds.py), and the peer's deadline (``--max-minutes``), which its submit
client and the evaluator's loop keep to as well.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from heloco_p2p.outer import DyLU
from heloco_p2p.roles.rounds import RoundLoop
from heloco_p2p.roles.shards import scalar_version

logger = logging.getLogger(__name__)


class RoundSchedule:
    """H of the next round (DyLU, outer/dylu.py: from the speeds peers publish in their records
    and this peer's own, or the run's H) and whether another round runs: not once the peer is
    stopping, out of time, past ``max_rounds``, or when the run reached its budget of versions or
    tokens (``max_versions`` / ``max_tokens`` of the genesis record). Called on the training
    thread; ``time_left`` from any thread.

    :param steps_per_round: the run's H (``inner.steps_per_round``)
    :param dylu: the run's ``DyLU`` (``algorithms.build_dylu``), or None: every round has H steps
    :param election: the peer's ``Election`` (``run_tokens``: the tokens the run committed)
    :param genesis: ``() -> GenesisRecord``: the run's genesis record (its budgets)
    :param held: ``() -> (θ, version)``: the global θ the peer holds
    :param max_rounds: ``--max-rounds`` (None: no limit)
    """

    def __init__(self, node, steps_per_round: int, dylu: DyLU | None, election, genesis: Callable, held: Callable,
                 stop_event: threading.Event, max_rounds: int | None = None):
        self.node, self.steps_per_round, self.dylu, self.election = node, steps_per_round, dylu, election
        self.genesis, self.held, self.stop_event, self.max_rounds = genesis, held, stop_event, max_rounds
        self.deadline: float | None = None  # unix time; None: no time limit
        self.loop: RoundLoop | None = None  # the rounds this schedules (set once the loop exists)

    def start_clock(self, max_minutes: float | None) -> None:
        self.deadline = time.time() + 60 * max_minutes if max_minutes else None

    def time_left(self) -> bool:
        return self.deadline is None or time.time() < self.deadline

    def steps_for(self) -> int:
        H, dylu, me = self.steps_per_round, self.dylu, self.node.peer_id
        if dylu is None:
            return H
        for p in self.node.records.peers():
            if p.steps_per_second > 0:
                dylu.update(p.peer_id, p.steps_per_second)
        if self.loop.steps_per_second > 0:
            dylu.update(me, self.loop.steps_per_second)
        return dylu.steps_for(me, H) if dylu.speed(me) else H

    def more(self) -> bool:
        if self.stop_event.is_set() or not self.time_left():
            return False
        if self.max_rounds is not None and self.loop.rounds >= self.max_rounds:
            return False
        genesis, run_tokens = self.genesis(), self.election.run_tokens
        if genesis.max_versions and scalar_version(self.held()[1]) >= genesis.max_versions:
            logger.info("the run reached its budget of %d versions", genesis.max_versions)
            return False
        if genesis.max_tokens and run_tokens >= genesis.max_tokens:
            logger.info("the run reached its budget of %d tokens (%d committed)", genesis.max_tokens, run_tokens)
            return False
        return True
