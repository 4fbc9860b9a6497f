"""The leader side of replication: which standbys hold the coordinator's state, forwarding each
commit to them before it is acknowledged, recruiting new ones, and handing the role over.

A commit is *durable* once ``required()`` standbys hold it (``swarm.min_replicas``; 0 for a lone
peer). Until then it is held back: not acknowledged, not advertised in the lease, not in the
run's history (metrics, the ``commit`` event). Owned by the node's event loop, under the commit
lock; the maintenance thread reads ``snapshot``, ``standbys`` and ``waiting_for_standby()`` to
publish the lease and writes ``others_alive`` (single assignments).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

from heloco_p2p.roles import messages
from heloco_p2p.roles.commit_state import params_digest
from heloco_p2p.swarm.lifetime import trim_heap
from heloco_p2p.swarm.wire import WireError

logger = logging.getLogger(__name__)

DROPPED_KEPT = 64  # dropped standbys remembered (so that a frozen one is not recruited again at once)


class Replication:
    """:param node: the peer's SwarmNode
    :param state: the CommitState replicated
    :param term: this peer's TermState
    :param lock: the commit lock (asyncio.Lock) shared with the coordinator and the standby handlers
    :param min_replicas: standbys that must hold a commit before it is acknowledged
    :param lease_seconds: the run's lease period (bounds the replication waits)"""

    def __init__(self, node, state, term, lock: asyncio.Lock, min_replicas: int = 1, lease_seconds: float = 10.0):
        self.node, self.state, self.term, self.lock = node, state, term, lock
        self.min_replicas = min_replicas
        self.lease_seconds = lease_seconds
        self.standbys: list[str] = []
        # live peers that could be standbys (kept by the election); None: not known yet, so the rule
        # holds (only a peer that saw nobody else alive acknowledges unreplicated commits)
        self.others_alive: int | None = None
        self._heirs: set[str] = set()  # every standby named in this term (a dropped one may have taken over)
        self.dropped_at: dict[str, float] = {}  # standby -> when (unix time) it failed a replication
        self.rtts: deque = deque(maxlen=20)  # seconds of recent replications (their timeout follows them)
        self.floor = max(2.0, lease_seconds / 2)
        self.replicated_version = state.version  # the newest version at least ``required()`` standbys hold
        self.unreplicated: list[dict] = []  # commit events of this term's commits that too few standbys hold yet
        self.snapshot: tuple[int, int, str, int] | None = None  # (term, version, θ digest, tokens) the lease names
        self.on_durable = None  # callback(events, checkpointed: bool): commits that became the run's history
        # blocking callable() -> bool: store a lease claim naming ``announced()`` (the election's publish); a
        # recruited standby counts only once the lease names it, so an heir of every acknowledged commit is
        # always named in the DHT (a coordinator that died between the two left a replica no one followed)
        self.announce = None
        self.recruiting: str | None = None  # the standby being recruited, named by claims from now on

    # -- the rule -------------------------------------------------------------------------------
    def begin_term(self) -> None:
        """A new term of this peer's: its state was current when it took over."""
        self._heirs = set(self.standbys)
        self.replicated_version = self.state.version
        self.unreplicated = []

    def required(self) -> int:
        """Standbys that must hold a commit before it is acknowledged: ``min_replicas``, or 0 for a
        lone peer: nobody else alive and no standby named in this term. A coordinator that had a
        standby never counts as lone again in its term: cut off from the swarm, it reads no peer
        records either, and must not mistake that for being alone (it would acknowledge
        unreplicated commits beside the standby that took over)."""
        lone = self.others_alive == 0 and not self.standbys and not self._heirs
        return 0 if lone else self.min_replicas

    def waiting_for_standby(self) -> bool:
        return self.term.active and len(self.standbys) < self.required()

    def announced(self) -> list[str]:
        """The standbys a lease claim names: those listed, and the one being recruited."""
        pending = self.recruiting
        return list(self.standbys) + ([pending] if pending is not None and pending not in self.standbys else [])

    def heirs(self) -> set[str]:
        """The peers that may claim this term's successor: every standby named in this term."""
        return self._heirs | set(self.standbys)

    def drop(self, standby: str) -> None:
        """``standby`` failed a replication: unlisted, and not recruited again until it heartbeats
        after this (a frozen peer's last heartbeat stays "fresh" for 3 heartbeat periods: trying it
        again would stall the commits; one that failed for a passing reason heartbeats on)."""
        if standby in self.standbys:
            self.standbys.remove(standby)
        self._heirs.add(standby)
        self.dropped_at[standby] = time.time()  # wall clock: compared with the peer's heartbeats
        for old in sorted(self.dropped_at, key=self.dropped_at.get)[:-DROPPED_KEPT]:
            del self.dropped_at[old]

    def timeout(self) -> float:
        """Seconds to wait for a standby: 5 × the slowest recent replication, at least ``floor``
        (half a lease), at most 120 s."""
        if not self.rtts:
            return self.floor
        return min(120.0, max(self.floor, 5.0 * max(self.rtts)))

    def mark_committed(self, digest: str) -> None:
        """What the next lease renewal publishes: the newest version enough standbys hold (a
        standby claims a lapsed lease only if its replica is at the lease's version, so the lease
        must never name a version no standby has). Written under the commit lock, read without it
        (one tuple assignment), so that renewing the lease never waits for a commit."""
        self.snapshot = (self.state.term, self.state.version, digest, self.state.total_tokens)

    # -- history --------------------------------------------------------------------------------
    def durable(self, event: dict) -> None:
        """``event``'s commit is held by enough standbys: it and those held back before it are the run's."""
        self.replicated_version = max(self.replicated_version, event["version"])
        events, self.unreplicated = self.unreplicated + [event], []
        if self.on_durable is not None:
            self.on_durable(events, False)

    def hold_back(self, event: dict) -> None:
        self.unreplicated.append(event)

    def settle(self, event: dict, held: int, digest: str) -> bool:
        """After a commit was replicated to ``held`` standbys: enough of them (``required``), and it
        is the run's (``durable``, and the lease may name it); too few, and it is held back, to
        become the run's with the next durable commit or recruit. Returns whether it may be
        acknowledged (the asynchronous and the synchronous commit alike)."""
        required = self.required()
        if held < required:
            logger.warning("commit %d is held by %d standbys of the %d required: not acknowledged",
                           event["version"], held, required)
            self.hold_back(event)
            return False
        self.durable(event)
        self.mark_committed(digest)  # the lease advertises only versions a standby holds
        return True

    def forget_unreplicated(self) -> None:
        """Stepping down: what only this peer held was never acknowledged and is not the run's."""
        if self.unreplicated:
            logger.warning("versions %d-%d were committed here only and never acknowledged: they are not the run's",
                           self.unreplicated[0]["version"], self.unreplicated[-1]["version"])
        self.unreplicated = []

    def checkpointed(self, version: int) -> None:
        """A leaving coordinator's last checkpoint holds the commits no standby took (there is none
        to hand over to): they are the run's history now, to resume from."""
        held_back = [e for e in self.unreplicated if e["version"] <= version]
        self.unreplicated = [e for e in self.unreplicated if e["version"] > version]
        if held_back and self.on_durable is not None:
            self.on_durable(held_back, True)

    # -- the wire -------------------------------------------------------------------------------
    async def forward(self, commit: messages.CommitForward, payload: bytes) -> int:
        """Forward the commit to every standby and wait for each (at most ``timeout()``); returns
        how many hold it. A standby that cannot follow gets the full state; one that does not
        answer, refuses, or answers ``fenced`` is dropped (and named no more in the lease).
        ``fenced`` (it follows a newer term) is a reason to re-read the lease at once: this peer
        steps down only on a claim it verifies there, never on the number in the reply."""
        header = commit.header()
        held, was_fenced = 0, False
        for sb in list(self.standbys):
            t0 = time.monotonic()
            try:
                reply = await self._send_commit(sb, header, payload)
                status = reply.get("status")
                if status == "fenced":
                    was_fenced = True
                    raise RuntimeError(f"it follows term {str(reply.get('term'))[:20]}")
                if status == "out_of_sync":
                    await self.send_full_state(sb)
                elif status != "ok":
                    raise RuntimeError(str(reply)[:300])
                else:
                    self.rtts.append(time.monotonic() - t0)
                held += 1
            except Exception as exc:
                logger.warning("standby %s did not take commit %d (%s); dropping it", sb[-8:], commit.version_before + 1,
                               exc if str(exc) else type(exc).__name__)
                self.drop(sb)
        if was_fenced:
            await self.term.verify(force=True)
        return held

    async def _send_commit(self, standby: str, header: dict, payload: bytes) -> dict:
        """One forwarded commit, sent again once if the stream broke before the reply (a lost
        reply, not a slow standby: a resend of a commit it holds is answered ``ok``, not applied
        twice). A timeout is not retried: the wait is bounded by ``timeout()`` in all."""
        deadline = time.monotonic() + self.timeout()
        for attempt in (1, 2):
            try:
                reply, _ = await asyncio.wait_for(self.node.acall(standby, "replicate", header, payload),
                                                  timeout=max(0.1, deadline - time.monotonic()))
                return reply
            except asyncio.TimeoutError:  # a subclass of OSError: slow, not a lost reply
                raise
            except (WireError, ConnectionError, OSError) as exc:
                if attempt == 2 or (isinstance(exc, WireError) and exc.code not in ("closed", "truncated")):
                    raise
                logger.info("standby %s: the stream broke before the reply (%s); sending the commit again",
                            standby[-8:], exc)
        raise AssertionError("unreachable")

    async def send_full_state(self, standby: str) -> None:
        """The whole commit state to ``standby`` (call with the commit lock held, so that no commit
        slips between the copy and the standby's listing). Its time bounds later replication waits."""
        data = await asyncio.get_running_loop().run_in_executor(None, self.state.to_bytes)
        t0 = time.monotonic()
        # the commits wait meanwhile: a candidate that does not take the state at 5 MB/s within a
        # lease period more than that is given up (it is tried again after a back-off)
        timeout = self.lease_seconds + len(data) / 5e6
        header = messages.FullStateHeader(self.state.term, self.state.version).header()
        reply, _ = await asyncio.wait_for(self.node.acall(standby, "replicate", header, data), timeout)
        del data
        asyncio.get_running_loop().run_in_executor(None, trim_heap)
        if reply.get("status") != "ok":
            raise RuntimeError(f"standby refused the full state: {str(reply)[:300]}")
        self.rtts.append(time.monotonic() - t0)

    async def replicate_full(self) -> int:
        """Every standby takes the whole state (a synchronous commit: rare and large); returns how many did."""
        held = 0
        for sb in list(self.standbys):
            try:
                await self.send_full_state(sb)
                held += 1
            except Exception as exc:
                logger.warning("standby %s did not take the full state (%s); dropping it", sb[-8:], exc)
                self.drop(sb)
        return held

    async def recruit(self, standby: str) -> None:
        """Make ``standby`` hold the state and list it; every commit so far is then replicated."""
        async with self.lock:
            if not self.term.active or standby in self.standbys:
                return
            await self.send_full_state(standby)
            if self.announce is not None:  # named in the DHT before any commit counts on it
                self.recruiting = standby
                try:
                    stored = await asyncio.get_running_loop().run_in_executor(None, self.announce)
                finally:
                    self.recruiting = None
                if not stored:
                    raise RuntimeError("the lease claim naming it could not be stored")
            self.standbys.append(standby)
            self._heirs.add(standby)
            if len(self.standbys) < self.required():
                return
            if self.unreplicated:
                logger.info("standby %s holds versions %d-%d, which no standby held before", standby[-8:],
                            self.unreplicated[0]["version"], self.unreplicated[-1]["version"])
                self.durable(self.unreplicated.pop())
            self.replicated_version = self.state.version
            digest = await asyncio.get_running_loop().run_in_executor(None, params_digest, self.state.engine.params)
            self.mark_committed(digest)

    async def hand_over(self) -> str | None:
        """Leaving: stop committing, then ask the first standby that answers to take the next term.
        Its replica is current (every commit was forwarded before it was acknowledged)."""
        async with self.lock:
            self.term.active = False
            for sb in list(self.standbys):
                request = messages.HandoverRequest(self.state.term, self.state.version,
                                                   [s for s in self.standbys if s != sb])
                try:
                    reply, _ = await asyncio.wait_for(self.node.acall(sb, "handover", request.header()), timeout=15)
                    if reply.get("status") == "ok":
                        logger.info("handed the coordinator role to %s (term %d)", sb[-8:], self.state.term + 1)
                        return sb
                except Exception as exc:
                    logger.warning("handover to %s failed: %s", sb[-8:], exc)
        return None
