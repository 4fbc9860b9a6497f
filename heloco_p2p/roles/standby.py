"""The standby side of replication: the ``replicate`` and ``handover`` handlers.

Nothing a participant sends can make a replica load state or follow a term on its say-so: both
are accepted only from the peer holding the lease this peer believes (``TermState.believed``,
from the holder-bound rule in roles/lease.py), in that term, after at most one fresh read of the
lease. One coordinator per term: only the peer that replicated first in a term may replicate in
it; older terms are ``fenced``. Owned by the node's event loop; every change to the replica
happens under the commit lock.
"""
from __future__ import annotations

import asyncio
import logging
import math

from heloco_p2p.roles import messages
from heloco_p2p.roles.commit_state import params_digest, parse_state, scaled, tensor_norm
from heloco_p2p.swarm.lifetime import trim_heap
from heloco_p2p.swarm.wire import WireError, decode_tensors

logger = logging.getLogger(__name__)

TERMS_KEPT = 8  # the coordinators of this many recent terms are remembered


class StandbyService:
    """:param node: the peer's SwarmNode
    :param state: the replica (CommitState)
    :param term: this peer's TermState
    :param lock: the commit lock
    :param expected: the tensor layout of a pseudo-gradient
    :param take_role: callback(term, standbys) making this peer coordinate ``term`` (a handover)"""

    def __init__(self, node, state, term, lock: asyncio.Lock, expected: list, take_role):
        self.node, self.state, self.term, self.lock, self.expected = node, state, term, lock, expected
        self.take_role = take_role
        self.term_sources: dict[int, str] = {}  # term -> the peer that replicated to us in it (its coordinator)
        self.on_handover = None  # blocking callback(term) once a leaving coordinator handed the role to us
        # callback(dict) for each commit this replica applied: the audit of who holds what (an
        # acknowledged commit whose holder died before logging it is recorded here)
        self.on_replica = None
        self.accepts_replicas = True  # False for a --client-mode peer (it could never take the role over)

    async def handle_replicate(self, header: dict, payload: bytes, remote: str) -> messages.Reply:
        try:
            msg = messages.parse_replicate(header)
        except WireError as exc:
            return messages.rejected(exc.code, exc.message)
        if isinstance(msg, messages.FullStateHeader) and not self.accepts_replicas:
            return messages.rejected("client_mode", "this peer joined with --client-mode: no peer can dial it, so it "
                                                    "cannot stand by or take the role over")
        if msg.term >= self.term.highest_seen and not await self.term.sent_by_holder(remote, msg.term):
            return self.term.not_holder(msg.term)  # before a full state is even parsed
        loop = asyncio.get_running_loop()
        incoming = None
        if isinstance(msg, messages.FullStateHeader):
            try:  # parsed outside the lock (it can be large); checked against the state under it
                incoming = await loop.run_in_executor(None, parse_state, payload)
            except ValueError as exc:
                return messages.rejected("malformed", str(exc))
        async with self.lock:
            refusal = self._check_sender(remote, msg.term)
            if refusal is not None:
                return refusal
            if incoming is not None:
                return await self._load(incoming, msg.term, remote)
            return await self._apply(msg, payload, remote)

    def _check_sender(self, remote: str, term: int) -> messages.Reply | None:
        if term < self.term.highest_seen:
            return messages.fenced(self.term.highest_seen, f"term {term} is older than term {self.term.highest_seen}")
        if not self.term.from_holder(remote, term):  # the belief changed while we waited for the lock
            return self.term.not_holder(term)
        mine = self.node.peer_id if self.term.active and term == self.state.term else None
        source = self.term_sources.get(term, mine)
        if source is not None and source != remote:
            return messages.fenced(self.term.highest_seen, f"term {term} is coordinated by {source[-8:]}, not by the sender")
        return None

    async def _load(self, incoming: dict, term: int, remote: str) -> messages.Reply:
        before = self.state.version
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.state.load_state_dict, incoming)
        except ValueError as exc:  # checked before anything changed: the replica is as it was
            return messages.rejected("malformed", str(exc)[:500])
        self._follow(term, remote)
        self.state.term = term
        logger.info("standby: replica loaded at version %d (term %d)", self.state.version, term)
        if self.on_replica is not None:  # the commits the full state brought (those its commit log keeps)
            for e in list(self.state.log.entries):
                if e.version > before:
                    self.on_replica({"version": e.version, "term": e.term, "peer": e.peer, "seq": e.seq,
                                     "digest": e.digest, "source": remote, "full": True})
        asyncio.get_running_loop().run_in_executor(None, trim_heap)  # the parsed state's copy of θ and m
        return messages.ok(version=self.state.version)

    async def _apply(self, commit: messages.CommitForward, payload: bytes, remote: str) -> messages.Reply:
        if self._holds(commit):  # a resend after a lost reply: held already, never applied twice
            return messages.ok(version=self.state.version)
        if commit.version_before != self.state.version or self.state.engine.hollow:  # hollow: no replica yet
            return {"status": "out_of_sync", "version": self.state.version}, b""
        if commit.base_version > self.state.version:
            return messages.rejected("bad_version", f"base version {commit.base_version} is ahead of {self.state.version}")
        loop = asyncio.get_running_loop()
        try:
            delta = await loop.run_in_executor(None, decode_tensors, commit.tensors, payload, self.expected)
        except WireError as exc:
            return messages.rejected(exc.code, exc.message)
        if commit.scale != 1.0:  # the coordinator's norm clip, applied the same way
            delta = await loop.run_in_executor(None, scaled, delta, commit.scale)
        norm = await loop.run_in_executor(None, tensor_norm, delta)
        if not math.isfinite(norm):  # the coordinator never commits these: a replica must not either
            return messages.rejected("not_finite", "the pseudo-gradient contains NaN or Inf")
        self._follow(commit.term, remote)
        await loop.run_in_executor(None, self.state.apply, delta, commit.base_version, commit.peer, commit.seq,
                                   commit.steps, norm, commit.worker, commit.seconds, commit.tokens, commit.num_workers,
                                   commit.commit_time, True)  # Δ decoded here for this commit: the engine works in it
        del delta
        mine = await loop.run_in_executor(None, params_digest, self.state.engine.params)
        if mine != commit.digest:
            logger.warning("standby: digest differs at version %d; asking for the full state", self.state.version)
            return {"status": "out_of_sync", "version": self.state.version}, b""
        self.state.log.append(self.state.version, commit.term, commit.peer, commit.seq, commit.base_version, mine)
        if self.on_replica is not None:
            self.on_replica({"version": self.state.version, "term": commit.term, "peer": commit.peer,
                             "seq": commit.seq, "digest": mine, "source": remote})
        loop.run_in_executor(None, trim_heap)  # the decoded Δ's memory
        return messages.ok(version=self.state.version)

    def _holds(self, commit: messages.CommitForward) -> bool:
        """Whether the newest commit here is ``commit`` (same version, term, sender, seq and θ digest)."""
        if self.state.version != commit.version_before + 1 or not self.state.log.entries:
            return False
        last = self.state.log.entries[-1]
        return (last.version, last.term, last.peer, last.seq, last.digest) == (
            self.state.version, commit.term, commit.peer, commit.seq, commit.digest)

    def _follow(self, term: int, remote: str) -> None:
        """``remote`` coordinates ``term`` (it replicated to us): remember it, and follow the term
        (a coordinator of an older term steps down; older terms are fenced from now on)."""
        self.term_sources.setdefault(term, remote)
        for old in sorted(self.term_sources)[:-TERMS_KEPT]:
            del self.term_sources[old]
        self.term.note_term(term)

    async def handle_handover(self, header: dict, payload: bytes, remote: str) -> messages.Reply:
        try:
            req = messages.HandoverRequest.parse(header)
        except WireError as exc:
            return messages.rejected(exc.code, exc.message)
        if req.term < self.term.highest_seen or self.state.version != req.version or self.on_handover is None:
            return messages.refused(f"replica at version {self.state.version}, term {self.term.highest_seen}")
        if not await self.term.sent_by_holder(remote, req.term):
            return self.term.not_holder(req.term)
        if self.term_sources.get(req.term) != remote:
            return messages.refused(f"only the coordinator of term {req.term}, whose commits this replica holds, can "
                                    "hand the role over")
        self.take_role(req.term + 1, [s for s in req.standbys if s != self.node.peer_id])
        await asyncio.get_running_loop().run_in_executor(None, self.on_handover, req.term + 1)
        return messages.ok()
