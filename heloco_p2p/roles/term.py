"""The term state of one peer: whether it holds the coordinator role, the highest term it has
seen, the lease it believes, and how long it may still acknowledge commits.

Owned by the node's event loop (the handlers); the lease renewal thread calls ``renewed`` and the
maintenance thread ``note_term``/``believe`` (single assignments of immutable values). The rule
for which lease claim counts is roles/lease.py's; this object only remembers what the peer
concluded from it.
"""
from __future__ import annotations

import asyncio
import logging
import time

from heloco_p2p.roles import messages

logger = logging.getLogger(__name__)


class TermState:
    """:param state: the CommitState whose ``term`` is the term this peer coordinates or follows
    :param lease_seconds: the run's lease period"""

    def __init__(self, state, lease_seconds: float):
        self.state = state
        self.lease_seconds = lease_seconds
        self.active = False  # this peer holds the lease now
        self.highest_seen = state.term
        # acknowledge only while the lease is surely ours: until a fraction of a lease period after the
        # start of its last successful renewal (monotonic: a frozen process wakes up past it)
        self.lease_until = 0.0
        # (holder, term) of the lease this peer believes, from the DHT under the holder-bound rule
        # (roles/lease.py): only that holder, in that term, may replicate to this peer or hand it the role
        self.believed: tuple[str, int] | None = None
        self.verify_lease = None  # blocking callable: re-read the lease from the DHT now (set by the election)
        self._last_verify = 0.0
        self.on_step_down = None  # callback() run when this peer stops coordinating

    def activate(self, term: int, peer_id: str) -> None:
        """Hold the role in ``term``: the caller publishes the lease claim right after, so the lease
        counts as renewed now."""
        self.state.term = term
        self.highest_seen = max(self.highest_seen, term)
        self.active = True
        self.believed = (peer_id, term)
        self.renewed(time.monotonic())

    def step_down(self, higher_term: int) -> None:
        """Only on a term this peer believes (a verified lease claim, or replication from its
        holder): an unverified number in a message deposes no one."""
        if self.active:
            logger.warning("stepping down: saw term %d > my term %d", higher_term, self.state.term)
            if self.on_step_down is not None:
                self.on_step_down()
        self.active = False
        self.highest_seen = max(self.highest_seen, higher_term)

    def note_term(self, term: int) -> None:
        """A term this peer believes exists: a coordinator of an older one steps down."""
        if term > self.highest_seen:
            self.highest_seen = term
        if self.active and term > self.state.term:
            self.step_down(term)

    def renewed(self, started: float) -> None:
        """The lease claim written from ``started`` (time.monotonic) on is in the DHT: acknowledge
        until 3/4 of a lease period after that. Peers see it lapse at renewal + lease_seconds."""
        self.lease_until = max(self.lease_until, started + 0.75 * self.lease_seconds)

    def lease_valid(self) -> bool:
        return self.active and time.monotonic() < self.lease_until

    def from_holder(self, remote: str, term: int) -> bool:
        return self.believed == (remote, term)

    async def verify(self, force: bool = False) -> None:
        """Re-read the lease from the DHT (at most once a second unless ``force``): a sender that
        is not the holder we believe may hold a claim newer than our last read."""
        if self.verify_lease is None or (not force and time.monotonic() - self._last_verify < 1.0):
            return
        self._last_verify = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.verify_lease)
        except Exception as exc:  # the DHT can fail; then nothing is believed anew
            logger.info("re-reading the lease failed: %s", exc)

    async def sent_by_holder(self, remote: str, term: int) -> bool:
        """Whether ``remote`` holds the lease of ``term`` as this peer believes it, after one fresh
        read of the lease if not (its claim may be newer than our last read). A term in a message is
        never proof: only the holder-bound claim in the DHT is (roles/lease.py)."""
        if self.from_holder(remote, term):
            return True
        await self.verify()
        return self.from_holder(remote, term)

    def not_holder(self, term: int) -> messages.Reply:
        believed = f"{self.believed[0][-8:]} in term {self.believed[1]}" if self.believed else "no lease yet"
        return messages.refused(f"the sender does not hold the lease of term {term} as this peer reads it ({believed}); "
                                "only the lease holder may replicate or hand over",
                                reason="not_lease_holder", term=self.highest_seen)
