"""A training peer's submissions to S shard coordinators: each Δ split by shard (``ShardPlan``),
the parts sent in parallel, each through that shard's own ``SubmitClient`` (its lease, its
retries, its ledger), and each answered on its own (docs/protocol.md, "Sharded coordinators").

A shard that is failing over delays only its part. Per shard, one submission is in flight at a
time, on this object's pool:

- ``submit`` starts, for every shard with nothing in flight, a job that sends first the part that
  last gave up (``in_doubt``: sent, outcome unknown, so it is sent again under its own sequence
  number: the shard's ledger answers ``duplicate`` if it was committed), then the carried parts
  and the new one, in order, each under its own sequence number and base (each is one round's Δ
  part, so each meets the shard's norm bounds as any round's does);
- a shard still busy with an earlier job gets nothing now: its new part is carried. Past
  ``MAX_CARRIED`` carried parts the two oldest are merged into one (never sent: their Δ add up,
  under the newer sequence number, with the older base, so the staleness the shard measures is
  never too small; steps, tokens and round seconds add up), which bounds the memory a long
  failover takes at ``MAX_CARRIED`` parts of Δ;
- ``submit`` waits for every job it started, but once one shard answered, the others get at
  most ``grace(elapsed)`` more seconds; a job still running then finishes in the background and
  its outcome is returned by a later ``submit`` (or ``settle``).

Nothing acknowledged is lost (a part leaves this object only once its shard acknowledged or
refused it) and nothing is applied twice (a resent part keeps its sequence number; a merged part
takes the newer number of the parts it merges, and only parts never sent are merged).
Owned by the thread that submits (one at a time, as the ``SubmitClient`` is).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from heloco_p2p.roles.shards import ShardPlan
from heloco_p2p.roles.submit import SubmitOutcome

logger = logging.getLogger(__name__)

MAX_CARRIED = 8  # carried parts kept apart per shard; past it the two oldest are merged


@dataclass
class Part:
    """One shard's part of one or more rounds' Δ: what is sent, under which sequence number."""

    seq: int
    delta: list[torch.Tensor]
    base: int
    stats: object  # the round's RoundStats (steps and tokens summed over merged rounds)
    rounds: int = 1

    def merged(self, newer: "Part") -> "Part":
        stats = self.stats
        if dataclasses.is_dataclass(stats):
            stats = dataclasses.replace(newer.stats, steps=stats.steps + newer.stats.steps,
                                        tokens=stats.tokens + newer.stats.tokens,
                                        seconds=stats.seconds + newer.stats.seconds)
        return Part(newer.seq, [a + b for a, b in zip(self.delta, newer.delta)], min(self.base, newer.base), stats,
                    self.rounds + newer.rounds)


@dataclass
class PartOutcome:
    """How one part ended on its shard (``outcome.status``: accepted, rejected or gave_up)."""

    shard: int
    part: Part
    outcome: SubmitOutcome


@dataclass
class _Shard:
    in_doubt: Part | None = None
    carried: list = field(default_factory=list)  # parts never sent, oldest first
    job: concurrent.futures.Future | None = None
    done: list = field(default_factory=list)  # the parts of the job in flight (unsettled if it dies)

    def carry(self, part: Part) -> None:
        self.carried.append(part)
        if len(self.carried) > MAX_CARRIED:
            self.carried[:2] = [self.carried[0].merged(self.carried[1])]


class ShardedSubmit:
    """:param plan: the run's ``ShardPlan``
    :param send: ``send(shard, seq, Δ part, base version, stats) -> SubmitOutcome`` (that shard's
        ``SubmitClient.submit``)
    :param grace: ``grace(seconds the first answer took) -> seconds`` the other shards get after it
    """

    def __init__(self, plan: ShardPlan, send: Callable[..., SubmitOutcome], grace: Callable[[float], float]):
        self.plan, self.send, self.grace = plan, send, grace
        self.shards = [_Shard() for _ in range(plan.count)]
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=plan.count, thread_name_prefix="shard-submit")

    def pending(self, shard: int) -> int:
        """Rounds whose part of ``shard`` is not acknowledged yet (in flight, in doubt, carried)."""
        s = self.shards[shard]
        return sum(p.rounds for p in [s.in_doubt, *s.carried] if p is not None) + \
            (sum(p.rounds for p in s.done) if s.job is not None else 0)

    def _run(self, shard: int, parts: list[Part]) -> tuple[list[PartOutcome], list[Part]]:
        """Send ``parts`` in order, stopping at the first that gives up: returns the outcomes and
        the parts not settled (the one that gave up first, then the ones never sent)."""
        outcomes: list[PartOutcome] = []
        for i, part in enumerate(parts):
            out = self.send(shard, part.seq, part.delta, part.base, part.stats)
            outcomes.append(PartOutcome(shard, part, out))
            if out.status == "gave_up":
                return outcomes, parts[i:]
        return outcomes, []

    def _collect(self, shard: int) -> list[PartOutcome]:
        """The outcomes of ``shard``'s finished job; unsettled parts go back to in_doubt / carried."""
        s = self.shards[shard]
        if s.job is None or not s.job.done():
            return []
        try:
            outcomes, unsettled = s.job.result()
        except Exception:  # a bug in a send: the parts stay in doubt rather than lost
            logger.exception("shard %d: the submission failed", shard)
            outcomes, unsettled = [], s.done
        s.job, s.done = None, []
        if unsettled:
            s.in_doubt = unsettled[0]
            later, s.carried = s.carried, []
            for p in unsettled[1:] + later:
                s.carry(p)
        return outcomes

    def submit(self, seq: int, delta: list[torch.Tensor], bases, stats) -> list[PartOutcome]:
        """Hand the new round's Δ to the shards (module docstring); returns the outcomes that
        arrived (of this round's parts and of earlier ones), in shard order."""
        parts = self.plan.split(delta)
        out: list[PartOutcome] = []
        started: dict[int, concurrent.futures.Future] = {}
        for k, s in enumerate(self.shards):
            out += self._collect(k)
            s.carry(Part(seq, parts[k], int(bases[k]), stats))
            if s.job is not None:
                logger.info("shard %d is still busy with an earlier part: this round's part is carried (%d rounds)",
                            k, sum(p.rounds for p in s.carried))
                continue
            queue = [p for p in [s.in_doubt, *s.carried] if p is not None]
            s.in_doubt, s.carried = None, []
            s.done = queue  # what comes back as unsettled if the job dies
            s.job = started[k] = self.pool.submit(self._run, k, queue)
        t0 = time.monotonic()
        waiting = set(started)
        first_at = None
        while waiting:
            timeout = None if first_at is None else max(0.0, first_at + self.grace(first_at - t0) - time.monotonic())
            done, _ = concurrent.futures.wait([started[k] for k in waiting], timeout=timeout,
                                              return_when=concurrent.futures.FIRST_COMPLETED)
            if not done:
                break  # the grace is over: the rest finish in the background
            if first_at is None:
                first_at = time.monotonic()
            waiting -= {k for k in waiting if started[k].done()}
        for k in sorted(started):
            out += self._collect(k)
        return sorted(out, key=lambda o: o.shard)

    def settle(self, timeout: float) -> list[PartOutcome]:
        """Wait up to ``timeout`` s for the jobs in flight (leaving) and return their outcomes."""
        jobs = [s.job for s in self.shards if s.job is not None]
        if jobs:
            concurrent.futures.wait(jobs, timeout=timeout)
        out = []
        for k in range(len(self.shards)):
            out += self._collect(k)
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
