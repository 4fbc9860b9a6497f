"""The coordinator role: check each pseudo-gradient, commit it to the ``CommitState``
(roles/commit_state.py), replicate the commit to the standbys before acknowledging it, and
answer with the new global parameters. ``CoordinatorService`` serves the state over a
``SwarmNode``: the ``submit`` handler for peers, ``replicate`` and ``handover`` between the
coordinator and its standbys (only from the believed lease holder, fenced by term).

Bad input never touches state. Before a handler runs, the node has checked the frame, the swarm
key, the size and the flood limits (``swarm/node.py``); the handlers then check every header
field's type (``malformed``), the run (``unknown_run``), the layout (``layout_mismatch``), the
tensors' bytes (``bad_tensor``), and ``CommitState.check`` the values (``bad_version``,
``too_stale``, ``not_finite``, ``norm_too_large``). A refused request is answered
``{"status": "rejected", "reason": code, "message": ...}``. Reason codes: docs/security.md.
"""
from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import Counter, deque

import torch

from heloco_p2p.roles.commit_state import (
    MAX_WORKERS,
    CommitState,
    Rejection,
    SubmissionLimits,
    fairness_inputs,
    header_int,
    header_str,
    max_submission_bytes,
    params_digest,
    parse_state,
    positive,
    submission_tokens,
    tensor_norm,
)
from heloco_p2p.swarm.node import HandlerLimits
from heloco_p2p.swarm.wire import WireError, decode_tensors, encode_tensors, pack_params

logger = logging.getLogger(__name__)


class CoordinatorService:
    """Serves ``CommitState`` on a node. ``active`` says whether this peer holds the lease now;
    a standby keeps ``active`` False and accepts ``replicate`` from the coordinator of its term.

    :param node: the peer's SwarmNode
    :param state: the replicated state
    :param shapes: the expected tensor layout of a pseudo-gradient
    :param limits: what a submission may be and the flood limits of ``submit``
    :param reply_compression: how θ travels back to peers ("none" keeps replicas exact)
    """

    def __init__(self, node, state: CommitState, shapes: list[tuple[int, ...]], limits: SubmissionLimits,
                 reply_compression: str = "none", config_digest: str = "", mode: str = "async",
                 barrier_timeout: float = 300.0, min_replicas: int = 1, lease_seconds: float = 10.0):
        self.node, self.state, self.limits = node, state, limits
        # a submission is acknowledged only once this many standbys hold its commit (swarm.min_replicas),
        # unless no other peer is alive to hold it (``others_alive`` == 0: a lone peer commits, loudly)
        self.min_replicas = min_replicas
        # live peers that could be standbys (kept by the peer's maintenance); None: not known yet, so
        # the rule holds (only a peer that saw nobody else alive acknowledges unreplicated commits)
        self.others_alive: int | None = None
        self.lease_seconds = lease_seconds
        # acknowledge only while the lease is surely ours: until a fraction of a lease period after the
        # start of its last successful renewal (monotonic: a frozen process wakes up past it)
        self.lease_until = 0.0
        # (holder, term) of the lease this peer believes, from the DHT under the holder-bound rule
        # (roles/lease.py): only that holder, in that term, may replicate to this peer or hand it the role
        self.believed: tuple[str, int] | None = None
        self.verify_lease = None  # blocking callable: re-read the lease from the DHT now (set by the peer)
        self._last_verify = 0.0
        self._heirs: set[str] = set()  # every standby named in this term (a dropped one may have taken over)
        self.replicated_version = state.version  # the newest version at least ``required_replicas()`` standbys hold
        self._unreplicated: list[dict] = []  # commit events of this term's commits that too few standbys hold yet
        self.dropped_at: dict[str, float] = {}  # standby -> when (unix time) it failed a replication
        self.replicate_rtts: deque = deque(maxlen=20)  # seconds of recent replications (their timeout follows them)
        self.replicate_floor = max(2.0, lease_seconds / 2)
        self.snapshot: tuple[int, int, str, int] | None = None  # (term, version, θ digest, tokens) of the last commit
        self.mode = mode  # "async": commit each Δ alone; "sync": barrier, average, commit (sync DiLoCo)
        self.barrier_timeout = barrier_timeout
        self.pending: dict[str, tuple] = {}  # sync mode: peer -> (seq, steps, tokens, norm, Δ, future)
        self._participants: set[str] = set()  # sync mode: peers the barrier waits for (kept by the peer's maintenance)
        self._submit_gate = None
        self.expected = [(tuple(s), torch.float32) for s in shapes]
        self.reply_compression = reply_compression
        self.config_digest = config_digest
        self.active = False
        self.standbys: list[str] = []
        self.highest_term_seen = state.term
        self.lock = asyncio.Lock()
        self.commits_this_term = 0
        self.rejected_this_term = 0
        self.rejected_by_peer: Counter = Counter()
        self.branches: Counter = Counter()
        self.staleness_recent: deque = deque(maxlen=100)
        self.commit_times: deque = deque(maxlen=200)
        self.acknowledged: list[tuple[str, int, int]] = []  # (peer, seq, version) acknowledged by this process
        self.on_commit = None  # callback(info_summary) for metrics
        self.term_sources: dict[int, str] = {}  # term -> the peer that replicated to us in it (its coordinator)
        self.commit_seconds: deque = deque(maxlen=20)  # time each recent submission held the commit lock
        self._submit_gate = node.add_handler("submit", self.handle_submit, limits=HandlerLimits(
            max_payload_bytes=max_submission_bytes([s for s, _ in self.expected]),
            max_inflight=limits.max_pending_submits, rate=limits.submit_rate, burst=limits.submit_burst,
            busy_retry_after=self._busy_retry_after, trusted=self._has_contributed))
        node.add_handler("replicate", self.handle_replicate,
                         limits=HandlerLimits(max_payload_bytes=node.max_payload_bytes, max_inflight=4))
        node.add_handler("handover", self.handle_handover, limits=HandlerLimits(max_inflight=2))
        self.on_handover = None  # callback(term) when a leaving coordinator hands the role to us

    @property
    def participants(self) -> set[str]:
        return self._participants

    @participants.setter
    def participants(self, peers: set[str]) -> None:
        # the barrier holds one submission per participant until all arrived: admit them all
        self._participants = set(peers)
        if self._submit_gate is not None:
            self._submit_gate.max_inflight = max(self.limits.max_pending_submits, len(self._participants) + 2)

    def _has_contributed(self, peer: str) -> bool:
        """A peer with an accepted submission in the ledger gets the submission slots kept for such peers."""
        return peer in self.state.applied

    def _busy_retry_after(self) -> float:
        """When a refused submission may find room: the queue ahead of it times a recent commit."""
        per_commit = statistics.fmean(self.commit_seconds) if self.commit_seconds else 1.0
        queued = self._submit_gate.inflight if self._submit_gate is not None else 1
        return min(10.0, max(0.25, per_commit * queued))

    # -- role changes -------------------------------------------------------------------------
    def activate(self, term: int) -> None:
        """Hold the role in ``term``: the caller publishes the lease claim right after, so the lease
        counts as renewed now."""
        self.state.term = term
        self.highest_term_seen = max(self.highest_term_seen, term)
        self.active = True
        self.believed = (self.node.peer_id, term)
        self._heirs = set(self.standbys)
        self.replicated_version = self.state.version  # a standby's replica was current when it took over
        self._unreplicated = []
        self.commits_this_term = 0
        self.rejected_this_term = 0
        self.branches.clear()
        self.mark_committed(params_digest(self.state.engine.params))
        self.renewed(time.monotonic())
        logger.info("coordinator for term %d at version %d", term, self.state.version)

    def step_down(self, higher_term: int) -> None:
        """Only on a term this peer believes (a verified lease claim, or replication from its
        holder): an unverified number in a message deposes no one."""
        if self.active:
            logger.warning("stepping down: saw term %d > my term %d", higher_term, self.state.term)
            if self._unreplicated:
                logger.warning("versions %d-%d were committed here only and never acknowledged: they are not the "
                               "run's", self._unreplicated[0]["version"], self._unreplicated[-1]["version"])
                self._unreplicated = []
        self.active = False
        self.highest_term_seen = max(self.highest_term_seen, higher_term)

    def renewed(self, started: float) -> None:
        """The lease claim written from ``started`` (time.monotonic) on is in the DHT: acknowledge
        until 3/4 of a lease period after that. Peers see it lapse at renewal + lease_seconds."""
        self.lease_until = max(self.lease_until, started + 0.75 * self.lease_seconds)

    def lease_valid(self) -> bool:
        return self.active and time.monotonic() < self.lease_until

    def heirs(self) -> set[str]:
        """The peers that may claim this term's successor: every standby named in this term."""
        return self._heirs | set(self.standbys)

    def drop_standby(self, standby: str) -> None:
        """``standby`` failed a replication: unlisted, and not recruited again until it heartbeats
        after this (a frozen peer's last heartbeat stays "fresh" for 3 heartbeat periods: trying it
        again would stall the commits; one that failed for a passing reason heartbeats on)."""
        if standby in self.standbys:
            self.standbys.remove(standby)
        self._heirs.add(standby)
        self.dropped_at[standby] = time.time()  # wall clock: compared with the peer's heartbeats
        for old in sorted(self.dropped_at, key=self.dropped_at.get)[:-64]:
            del self.dropped_at[old]

    def required_replicas(self) -> int:
        """Standbys that must hold a commit before it is acknowledged: ``min_replicas``, or 0 for a
        lone peer: nobody else alive and no standby named in this term. A coordinator that had a
        standby never counts as lone again in its term: cut off from the swarm, it reads no peer
        records either, and must not mistake that for being alone (it would acknowledge
        unreplicated commits beside the standby that took over)."""
        lone = self.others_alive == 0 and not self.standbys and not self._heirs
        return 0 if lone else self.min_replicas

    def waiting_for_standby(self) -> bool:
        return self.active and len(self.standbys) < self.required_replicas()

    def mark_committed(self, digest: str) -> None:
        """What the next lease renewal publishes: the newest version enough standbys hold (a
        standby claims a lapsed lease only if its replica is at the lease's version, so the lease
        must never name a version no standby has). Written under the commit lock, read without it
        (one tuple assignment), so that renewing the lease never waits for a commit."""
        self.snapshot = (self.state.term, self.state.version, digest, self.state.total_tokens)

    def replicate_timeout(self) -> float:
        """Seconds to wait for a standby: 5 × the slowest recent replication, at least
        ``replicate_floor`` (half a lease), at most 120 s."""
        if not self.replicate_rtts:
            return self.replicate_floor
        return min(120.0, max(self.replicate_floor, 5.0 * max(self.replicate_rtts)))

    def _from_holder(self, remote: str, term: int) -> bool:
        return self.believed == (remote, term)

    async def _verify(self, force: bool = False) -> None:
        """Re-read the lease from the DHT (at most once a second unless ``force``): a sender that
        is not the holder we believe may hold a claim newer than our last read."""
        if self.verify_lease is None or (not force and time.monotonic() - self._last_verify < 1.0):
            return
        self._last_verify = time.monotonic()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.verify_lease)
        except Exception as exc:  # the DHT can fail; then nothing is believed anew
            logger.info("re-reading the lease failed: %s", exc)

    def _busy(self, message: str, retry_after: float = 1.0) -> tuple[dict, bytes]:
        """Not now, and not the sender's fault: it keeps its Δ and resubmits the same sequence number."""
        return {"status": "rejected", "reason": "busy", "retry_after": retry_after, "message": message,
                "term": self.state.term, "version": self.state.version}, b""

    def note_term(self, term: int) -> None:
        if term > self.highest_term_seen:
            self.highest_term_seen = term
            if self.active and term > self.state.term:
                self.step_down(term)

    def commits_per_minute(self) -> float:
        now = time.time()
        recent = [t for t in self.commit_times if now - t <= 60]
        return float(len(recent))

    # -- submit -------------------------------------------------------------------------------
    def _parse_submit(self, header: dict) -> tuple[int, int, int, int, int]:
        """(term, seq, base_version, steps, tokens) of a submission header, or WireError with the reason."""
        run_id = header.get("run_id")
        if run_id != self.node.run_id:
            raise WireError("unknown_run", f"this coordinator serves run {self.node.run_id!r}, not "
                                           f"{str(run_id)[:80]!r}")
        term = header_int(header, "term", default=0)
        seq = header_int(header, "seq")
        base_version = header_int(header, "base_version")
        steps = header_int(header, "steps", default=0, hi=self.limits.max_steps)
        if not isinstance(header.get("stats", {}), dict):
            raise WireError("malformed", "header field 'stats' must be an object")
        tokens = submission_tokens(header, steps)
        if not isinstance(header.get("tensors"), list):
            raise WireError("malformed", "header field 'tensors' must be the list of tensor metadata")
        names = header.get("names")
        if names is not None:
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise WireError("malformed", "header field 'names' must be a list of strings")
            mine = self.state.engine.names
            if names != mine:
                bad = next((i for i, (a, b) in enumerate(zip(names, mine)) if a != b), min(len(names), len(mine)))
                raise WireError("layout_mismatch", f"{len(names)} tensor names sent, {len(mine)} expected; first "
                                                   f"difference at {bad}: {names[bad] if bad < len(names) else None!r} "
                                                   f"vs {mine[bad] if bad < len(mine) else None!r}")
        return term, seq, base_version, steps, tokens

    async def handle_submit(self, header: dict, payload: bytes, remote: str) -> tuple[dict, bytes]:
        try:
            term, seq, base_version, steps, tokens = self._parse_submit(header)
        except WireError as exc:
            return self._reject(remote, exc.code, exc.message)
        if not self.active:
            return {"status": "not_coordinator", "term": self.highest_term_seen,
                    "message": "this peer does not hold the coordinator lease; read the lease again"}, b""
        if term > self.state.term:
            # The sender says it saw a later term. That is no proof (anyone can write a number): do not
            # step down on it, the lease in the DHT decides; but do not commit for a peer that follows another.
            return {"status": "not_coordinator", "term": self.state.term,
                    "message": f"you saw term {term}, this coordinator holds term {self.state.term}; read the lease again"}, b""
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            delta = await loop.run_in_executor(None, decode_tensors, header["tensors"], payload, self.expected)
        except WireError as exc:
            return self._reject(remote, exc.code, exc.message)
        t_decode = time.perf_counter() - t0
        peer = remote
        if self.mode == "sync":
            return await self._handle_sync_submit(delta, peer, seq, base_version, steps, tokens)
        async with self.lock:
            if not self.active:
                return {"status": "not_coordinator", "term": self.highest_term_seen, "message": "stepped down"}, b""
            if not self.lease_valid():  # frozen, or the renewal failed: the lease may have lapsed
                return self._busy("the coordinator is confirming its lease", retry_after=0.5)
            required = self.required_replicas()
            if self.state.is_duplicate(peer, seq):
                if required and self.replicated_version < self.state.version:
                    return self._busy("this submission is committed but no standby holds it yet")
                reply = {"status": "accepted", "duplicate": True, "version": self.state.version, "term": self.state.term,
                         "staleness": None, "schedule_step": self.state.schedule_step(),
                         "run_tokens": self.state.total_tokens}
                return reply, await loop.run_in_executor(None, self._encode_params)
            if len(self.standbys) < required:
                return self._busy(f"waiting for a standby ({len(self.standbys)} of {required} hold the state)")
            commit_time = time.time()  # the coordinator's clock: the commit-share rule counts commits by it
            try:
                norm = await loop.run_in_executor(None, lambda: self.state.check(
                    delta, base_version, self.limits, peer=peer, region=header.get("region"), now=commit_time))
            except Rejection as exc:
                if exc.code == "busy":  # over its commit share: the sender keeps its Δ and resends it
                    return self._busy(str(exc), exc.retry_after or 1.0)
                return self._reject(remote, exc.code, str(exc), exc.detail)
            version_before = self.state.version
            t1 = time.perf_counter()
            worker, seconds = fairness_inputs(header, peer)
            num_workers = self.state.workers(peer)
            info = await loop.run_in_executor(None, self.state.apply, delta, base_version, peer, seq, steps, norm,
                                              worker, seconds, tokens, num_workers, commit_time)
            digest = await loop.run_in_executor(None, params_digest, self.state.engine.params)
            dispatched = self.state.engine.dispatch_params()  # computed once: digested, then sent in the reply
            dispatch_digest = digest if dispatched is self.state.engine.params else \
                await loop.run_in_executor(None, params_digest, dispatched)
            t2 = time.perf_counter()
            held = await self._replicate_commit(peer, seq, steps, base_version, header.get("tensors", []), payload,
                                                version_before, digest, worker, seconds, tokens, num_workers,
                                                commit_time)
            if not self.active:
                # a standby follows a newer term that this peer verified: another peer coordinates, and
                # this commit (applied here only) must not be acknowledged; the sender resubmits there
                return {"status": "not_coordinator", "term": self.highest_term_seen,
                        "message": "a standby follows a newer term; read the lease again"}, b""
            summary = info.summary()
            event = {**summary, "peer": peer, "seq": seq, "norm": norm, "digest": digest, "term": self.state.term,
                     "dispatch_digest": dispatch_digest, "num_workers": num_workers, "stats": header.get("stats", {}),
                     "replicas": held, "screen": self.state.last_screen}
            if held < required:  # committed here, held by too few: not acknowledged (the retry is a duplicate)
                logger.warning("commit %d is held by %d standbys of the %d required: not acknowledged",
                               info.version, held, required)
                self._unreplicated.append(event)
                return self._busy(f"the commit is held by {held} of {required} standbys; a new standby is recruited")
            self._durable(event)
            self.mark_committed(digest)  # the lease advertises only versions a standby holds
            if not self.lease_valid():  # held, but the lease may have lapsed meanwhile: the retry is a duplicate
                return self._busy("the coordinator is confirming its lease", retry_after=0.5)
            if required == 0 and self.min_replicas > 0:
                logger.warning("version %d acknowledged with no replica: no other peer is alive to hold it",
                               info.version)
            self.acknowledged.append((peer, seq, info.version))
            t3 = time.perf_counter()
            data = await loop.run_in_executor(None, self._encode_params, dispatched)
            self.commit_seconds.append(time.perf_counter() - t1)
            timing = {"decode": t_decode, "commit": t2 - t1, "replicate": t3 - t2, "encode_reply": time.perf_counter() - t3}
            reply = {"status": "accepted", "duplicate": False, "version": info.version, "term": self.state.term,
                     "staleness": info.staleness, "branches": summary["branches"],
                     "schedule_step": self.state.schedule_step(), "run_tokens": self.state.total_tokens, "timing": timing}
        return reply, data

    # -- synchronous barrier ------------------------------------------------------------------
    async def _handle_sync_submit(self, delta, peer: str, seq: int, base_version: int, steps: int,
                                  tokens: int = 0) -> tuple[dict, bytes]:
        """Wait until every participant has sent its Δ for the current version, then one averaged
        commit answers them all (synchronous DiLoCo in the real swarm)."""
        loop = asyncio.get_running_loop()
        async with self.lock:
            if not self.active:
                return {"status": "not_coordinator", "term": self.highest_term_seen, "message": "stepped down"}, b""
            if not self.lease_valid():
                return self._busy("the coordinator is confirming its lease", retry_after=0.5)
            if self.state.is_duplicate(peer, seq):
                if self.required_replicas() and self.replicated_version < self.state.version:
                    return self._busy("this submission is committed but no standby holds it yet")
                return ({"status": "accepted", "duplicate": True, "version": self.state.version, "term": self.state.term,
                         "staleness": None, "schedule_step": self.state.schedule_step(),
                         "run_tokens": self.state.total_tokens},
                        await loop.run_in_executor(None, self._encode_params))
            if base_version != self.state.version:
                return self._reject(peer, "too_stale", f"a synchronous round starts from the current version "
                                                       f"{self.state.version}, not {base_version}; download the state")
            try:
                norm = self.state.check(delta, base_version, self.limits)
            except Rejection as exc:
                return self._reject(peer, exc.code, str(exc), exc.detail)
            future = loop.create_future()
            self.pending[peer] = (seq, steps, tokens, norm, delta, future)
        await self.check_barrier()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=self.barrier_timeout)
        except asyncio.TimeoutError:
            await self.check_barrier(force=True)  # commit what arrived rather than wait forever
            return await future

    async def check_barrier(self, force: bool = False) -> None:
        """Commit the pending pseudo-gradients if every participant has sent one (or ``force``)."""
        loop = asyncio.get_running_loop()
        async with self.lock:
            if not self.pending or not self.active:
                return
            waiting_for = self.participants - set(self.pending)
            if waiting_for and not force:
                return
            items = [(p, seq, steps, tokens, norm, d) for p, (seq, steps, tokens, norm, d, _) in sorted(self.pending.items())]
            futures = [f for (*_, f) in self.pending.values()]
            self.pending = {}
            t1 = time.perf_counter()
            info = await loop.run_in_executor(None, self.state.apply_sync, items, self.state.version)
            digest = await loop.run_in_executor(None, params_digest, self.state.engine.params)
            t2 = time.perf_counter()
            held = 0
            for sb in list(self.standbys):  # a sync commit is rare and large: standbys take the whole state
                try:
                    await self.send_full_state(sb)
                    held += 1
                except Exception as exc:
                    logger.warning("standby %s did not take the sync commit (%s); dropping it", sb[-8:], exc)
                    self.drop_standby(sb)
            required = self.required_replicas()
            if held < required or not self.lease_valid():  # committed, not acknowledged: the retries are duplicates
                if held >= required:
                    self._durable({**info.summary(), "peer": ",".join(p for p, *_ in items), "seq": -1,
                                   "digest": digest, "term": self.state.term, "peers": len(items), "staleness": 0})
                    self.mark_committed(digest)
                busy = self._busy(f"the commit is held by {held} of {required} standbys")
                for f in futures:
                    if not f.done():
                        f.set_result(busy)
                return
            summary = info.summary()
            self._durable({**summary, "peer": ",".join(p for p, *_ in items), "seq": -1, "digest": digest,
                           "term": self.state.term, "peers": len(items), "staleness": 0})
            self.mark_committed(digest)
            for p, seq, *_ in items:
                self.acknowledged.append((p, seq, info.version))
            t3 = time.perf_counter()
            data = await loop.run_in_executor(None, self._encode_params)
            timing = {"decode": 0.0, "commit": t2 - t1, "replicate": t3 - t2, "encode_reply": time.perf_counter() - t3}
            reply = {"status": "accepted", "duplicate": False, "version": info.version, "term": self.state.term,
                     "staleness": 0, "branches": summary["branches"], "schedule_step": self.state.schedule_step(),
                     "run_tokens": self.state.total_tokens, "timing": timing, "peers": len(items)}
            for f in futures:
                if not f.done():
                    f.set_result((reply, data))

    def _durable(self, event: dict) -> None:
        """A commit that enough standbys hold (or a lone peer's): it is part of the run's history now
        (metrics, the ``commit`` event chaos.py checks the chain with), with those held back before it."""
        self.replicated_version = max(self.replicated_version, event["version"])
        for e in self._unreplicated + [event]:
            self.commits_this_term += 1
            self.commit_times.append(time.time())
            self.staleness_recent.append(e.get("staleness") or 0)
            self.branches.update(e.get("branches", {}))
            if self.on_commit is not None:
                self.on_commit(e)
        self._unreplicated = []

    def checkpointed(self, version: int) -> None:
        """A leaving coordinator's last checkpoint holds the commits no standby took (there is none
        to hand over to): they are the run's history now, to resume from."""
        held_back = [e for e in self._unreplicated if e["version"] <= version]
        self._unreplicated = [e for e in self._unreplicated if e["version"] > version]
        for e in held_back:
            self.commit_times.append(time.time())
            if self.on_commit is not None:
                self.on_commit({**e, "checkpointed": True})

    def _reject(self, remote: str, code: str, message: str, detail: str = "") -> tuple[dict, bytes]:
        """The sender gets the reason code and a message without exact thresholds (an attacker would
        learn the bound from them); the operator's log has the detail."""
        self.rejected_this_term += 1
        self.rejected_by_peer[remote] += 1
        logger.info("rejected a submission from %s: %s (%s)", remote[-8:], code, detail or message)
        return {"status": "rejected", "reason": code, "message": message, "term": self.state.term,
                "version": self.state.version}, b""

    def _encode_params(self, dispatched: list | None = None) -> bytes:
        """The reply's parameters: where the sender's next round starts (``OuterEngine.dispatch_params``:
        θ̄ = θ − η·μ·m with look-ahead dispatch, θ otherwise), unless given already computed."""
        params = self.state.engine.dispatch_params() if dispatched is None else dispatched
        meta, data = encode_tensors([p.detach() for p in params], self.reply_compression)
        self._last_param_meta = meta
        return pack_params(meta, data)

    async def _replicate_commit(self, peer: str, seq: int, steps: int, base_version: int, tensors: list,
                                payload: bytes, version_before: int, digest: str, worker: str | None = None,
                                seconds: float | None = None, tokens: int = 0, num_workers: int | None = None,
                                commit_time: float | None = None) -> int:
        """Forward the commit to every standby and wait for each (at most ``replicate_timeout()``);
        returns how many hold it. A standby that cannot follow gets the full state; one that does not
        answer, refuses, or answers ``fenced`` is dropped (and named no more in the lease). ``fenced``
        (it follows a newer term) is a reason to re-read the lease at once: this peer steps down only
        on a claim it verifies there, never on the number in the reply."""
        msg = {"kind": "commit", "term": self.state.term, "version_before": version_before, "base_version": base_version,
               "peer": peer, "seq": seq, "steps": steps, "tensors": tensors, "digest": digest,
               "worker": worker, "seconds": seconds, "tokens": tokens, "num_workers": num_workers,
               "commit_time": commit_time}
        held, fenced = 0, False
        for sb in list(self.standbys):
            t0 = time.monotonic()
            try:
                reply, _ = await asyncio.wait_for(self.node.acall(sb, "replicate", msg, payload),
                                                  timeout=self.replicate_timeout())
                status = reply.get("status")
                if status == "fenced":
                    fenced = True
                    raise RuntimeError(f"it follows term {str(reply.get('term'))[:20]}")
                if status == "out_of_sync":
                    await self.send_full_state(sb)
                elif status != "ok":
                    raise RuntimeError(str(reply)[:300])
                else:
                    self.replicate_rtts.append(time.monotonic() - t0)
                held += 1
            except Exception as exc:
                logger.warning("standby %s did not take commit %d (%s); dropping it", sb[-8:], version_before + 1,
                               exc if str(exc) else type(exc).__name__)
                self.drop_standby(sb)
        if fenced:
            await self._verify(force=True)
        return held

    async def send_full_state(self, standby: str) -> None:
        """The whole commit state to ``standby`` (call with the commit lock held, so that no commit
        slips between the copy and the standby's listing). Its time bounds later replication waits."""
        data = await asyncio.get_running_loop().run_in_executor(None, self.state.to_bytes)
        t0 = time.monotonic()
        # the commits wait meanwhile: a candidate that does not take the state at 5 MB/s within a
        # lease period more than that is given up (it is tried again after a back-off)
        timeout = self.lease_seconds + len(data) / 5e6
        reply, _ = await asyncio.wait_for(self.node.acall(standby, "replicate", {"kind": "full", "term": self.state.term,
                                                                                  "version": self.state.version}, data),
                                          timeout)
        if reply.get("status") != "ok":
            raise RuntimeError(f"standby refused the full state: {str(reply)[:300]}")
        self.replicate_rtts.append(time.monotonic() - t0)

    async def recruit(self, standby: str) -> None:
        """Make ``standby`` hold the state and list it; every commit so far is then replicated."""
        async with self.lock:
            if not self.active or standby in self.standbys:
                return
            await self.send_full_state(standby)
            self.standbys.append(standby)
            self._heirs.add(standby)
            if len(self.standbys) >= self.required_replicas() and self._unreplicated:
                logger.info("standby %s holds versions %d-%d, which no standby held before", standby[-8:],
                            self._unreplicated[0]["version"], self._unreplicated[-1]["version"])
                self._durable(self._unreplicated.pop())
            if len(self.standbys) >= self.required_replicas():
                self.replicated_version = self.state.version
                digest = await asyncio.get_running_loop().run_in_executor(None, params_digest, self.state.engine.params)
                self.mark_committed(digest)

    async def hand_over(self) -> str | None:
        """Leaving: stop committing, then ask the first standby that answers to take the next term.
        Its replica is current (every commit was forwarded before it was acknowledged)."""
        async with self.lock:
            self.active = False
            for sb in list(self.standbys):
                try:
                    reply, _ = await asyncio.wait_for(self.node.acall(sb, "handover", {
                        "term": self.state.term, "version": self.state.version,
                        "standbys": [s for s in self.standbys if s != sb]}), timeout=15)
                    if reply.get("status") == "ok":
                        logger.info("handed the coordinator role to %s (term %d)", sb[-8:], self.state.term + 1)
                        return sb
                except Exception as exc:
                    logger.warning("handover to %s failed: %s", sb[-8:], exc)
        return None

    async def handle_handover(self, header: dict, payload: bytes, remote: str) -> tuple[dict, bytes]:
        try:
            term, version = header_int(header, "term"), header_int(header, "version")
            standbys = header.get("standbys", [])
            if not isinstance(standbys, list) or len(standbys) > 64 or not all(isinstance(x, str) for x in standbys):
                raise WireError("malformed", "header field 'standbys' must be a list of at most 64 peer ids")
        except WireError as exc:
            return {"status": "rejected", "reason": exc.code, "message": exc.message}, b""
        if term < self.highest_term_seen or self.state.version != version or self.on_handover is None:
            return {"status": "refused", "message": f"replica at version {self.state.version}, term {self.highest_term_seen}"}, b""
        if not await self._sent_by_holder(remote, term):
            return self._not_holder(term)
        if self.term_sources.get(term) != remote:
            return {"status": "refused", "message": f"only the coordinator of term {term}, whose commits this replica "
                                                    "holds, can hand the role over"}, b""
        self.standbys = [s for s in standbys if s != self.node.peer_id]
        self.activate(term + 1)
        await asyncio.get_running_loop().run_in_executor(None, self.on_handover, term + 1)
        return {"status": "ok"}, b""

    # -- standby side -------------------------------------------------------------------------
    @staticmethod
    def _parse_replicate(header: dict) -> tuple[str, int]:
        kind = header.get("kind")
        if kind not in ("full", "commit"):
            raise WireError("malformed", "header field 'kind' must be 'full' or 'commit'")
        term = header_int(header, "term")
        if kind == "commit":
            for key in ("version_before", "base_version", "seq", "steps"):
                header_int(header, key)
            header_int(header, "tokens", default=0)
            if header.get("num_workers") is not None:
                header_int(header, "num_workers", lo=1, hi=MAX_WORKERS)
            header_str(header, "peer")
            header_str(header, "digest")
            if not isinstance(header.get("tensors"), list):
                raise WireError("malformed", "header field 'tensors' must be the list of tensor metadata")
            worker, seconds = header.get("worker"), header.get("seconds")
            if not (worker is None or isinstance(worker, str) and len(worker) <= 256) or \
                    not (seconds is None or positive(seconds)):
                raise WireError("malformed", "header fields 'worker' (a string) and 'seconds' (a number > 0) are malformed")
            if not (header.get("commit_time") is None or positive(header["commit_time"])):
                raise WireError("malformed", "header field 'commit_time' must be a number > 0")
        return kind, term

    async def handle_replicate(self, header: dict, payload: bytes, remote: str) -> tuple[dict, bytes]:
        try:
            kind, term = self._parse_replicate(header)
        except WireError as exc:
            return {"status": "rejected", "reason": exc.code, "message": exc.message}, b""
        if term >= self.highest_term_seen and not await self._sent_by_holder(remote, term):
            return self._not_holder(term)  # before a full state is even parsed
        loop = asyncio.get_running_loop()
        incoming = None
        if kind == "full":
            try:  # parsed outside the lock (it can be large); checked against the state under it
                incoming = await loop.run_in_executor(None, parse_state, payload)
            except ValueError as exc:
                return {"status": "rejected", "reason": "malformed", "message": str(exc)}, b""
        async with self.lock:
            if term < self.highest_term_seen:
                return {"status": "fenced", "term": self.highest_term_seen,
                        "message": f"term {term} is older than term {self.highest_term_seen}"}, b""
            if not self._from_holder(remote, term):  # the belief changed while we waited for the lock
                return self._not_holder(term)
            # one coordinator per term: only the peer that replicated first in a term may replicate in it
            source = self.term_sources.get(term, self.node.peer_id if self.active and term == self.state.term else None)
            if source is not None and source != remote:
                return {"status": "fenced", "term": self.highest_term_seen,
                        "message": f"term {term} is coordinated by {source[-8:]}, not by the sender"}, b""
            if kind == "full":
                try:
                    await loop.run_in_executor(None, self.state.load_state_dict, incoming)
                except ValueError as exc:  # checked before anything changed: the replica is as it was
                    return {"status": "rejected", "reason": "malformed", "message": str(exc)[:500]}, b""
                self._follow(term, remote)
                self.state.term = term
                logger.info("standby: replica loaded at version %d (term %d)", self.state.version, term)
                return {"status": "ok", "version": self.state.version}, b""
            if header["version_before"] != self.state.version:
                return {"status": "out_of_sync", "version": self.state.version}, b""
            if header["base_version"] > self.state.version:
                return {"status": "rejected", "reason": "bad_version",
                        "message": f"base version {header['base_version']} is ahead of {self.state.version}"}, b""
            try:
                delta = await loop.run_in_executor(None, decode_tensors, header["tensors"], payload, self.expected)
            except WireError as exc:
                return {"status": "rejected", "reason": exc.code, "message": exc.message}, b""
            norm = tensor_norm(delta)
            if not math.isfinite(norm):  # the coordinator never commits these: a replica must not either
                return {"status": "rejected", "reason": "not_finite", "message": "the pseudo-gradient contains NaN or Inf"}, b""
            self._follow(term, remote)
            await loop.run_in_executor(None, self.state.apply, delta, header["base_version"], header["peer"],
                                       header["seq"], header["steps"], norm, header.get("worker"), header.get("seconds"),
                                       header.get("tokens", 0), header.get("num_workers"), header.get("commit_time"))
            mine = await loop.run_in_executor(None, params_digest, self.state.engine.params)
            if mine != header["digest"]:
                logger.warning("standby: digest differs at version %d; asking for the full state", self.state.version)
                return {"status": "out_of_sync", "version": self.state.version}, b""
            return {"status": "ok", "version": self.state.version}, b""

    async def _sent_by_holder(self, remote: str, term: int) -> bool:
        """Whether ``remote`` holds the lease of ``term`` as this peer believes it, after one fresh
        read of the lease if not (its claim may be newer than our last read). A term in a message is
        never proof: only the holder-bound claim in the DHT is (roles/lease.py)."""
        if self._from_holder(remote, term):
            return True
        await self._verify()
        return self._from_holder(remote, term)

    def _not_holder(self, term: int) -> tuple[dict, bytes]:
        believed = f"{self.believed[0][-8:]} in term {self.believed[1]}" if self.believed else "no lease yet"
        return {"status": "refused", "reason": "not_lease_holder", "term": self.highest_term_seen,
                "message": f"the sender does not hold the lease of term {term} as this peer reads it ({believed}); "
                           "only the lease holder may replicate or hand over"}, b""

    def _follow(self, term: int, remote: str) -> None:
        """``remote`` coordinates ``term`` (it replicated to us): remember it, and follow the term
        (a coordinator of an older term steps down; older terms are fenced from now on)."""
        self.term_sources.setdefault(term, remote)
        for old in sorted(self.term_sources)[:-8]:
            del self.term_sources[old]
        self.note_term(term)
        if self.active and term > self.state.term:
            self.step_down(term)
