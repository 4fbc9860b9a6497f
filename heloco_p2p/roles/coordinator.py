"""The coordinator role: check each pseudo-gradient, commit it to the ``CommitState``
(roles/commit_state.py), replicate the commit to the standbys before acknowledging it, and
answer with the parameters the sender's next round starts from.

``CoordinatorService`` composes the parts of the role, each in its own module:
``TermState`` (roles/term.py: does this peer hold the lease, which lease it believes),
``Replication`` (roles/replication.py: the leader side), ``StandbyService``
(roles/standby.py: the ``replicate`` and ``handover`` handlers) and ``SyncBarrier``
(roles/barrier.py: sync mode). It serves ``submit``.

Bad input never touches state. Before a handler runs, the node has checked the frame, the swarm
key, the size and the flood limits (``swarm/node.py``); ``messages.Submission.parse`` checks every
header field (``malformed``, ``unknown_run``, ``layout_mismatch``), the decoder the tensors' bytes
(``bad_tensor``), and ``CommitState.check`` the values (``bad_version``, ``too_stale``,
``not_finite``, ``norm_too_large``). Reason codes: docs/security.md.

Replies carry the dispatch point θ̄ of the new version: dense (``pack_params``, with
``swarm.reply_compression`` none/fp16/8bit, encoded per reply), or with ``wrap8`` one payload per
version (swarm/downlink.py), built in an executor job beside the replication of the commit and
sent to every sender whose start point the ``DownlinkWindow`` can bound; any other sender (a base
older than ``swarm.reply_window``, nothing decodable held) gets the dense fp32 θ̄: a resync.
"""
from __future__ import annotations

import asyncio
import logging
import statistics
import time
from collections import Counter, deque

import torch

from heloco_p2p.roles import messages
from heloco_p2p.roles.barrier import SyncBarrier
from heloco_p2p.roles.commit_state import CommitState, Rejection, SubmissionLimits, params_digest
from heloco_p2p.roles.replication import Replication
from heloco_p2p.roles.standby import StandbyService
from heloco_p2p.roles.term import TermState
from heloco_p2p.swarm.downlink import DownlinkWindow
from heloco_p2p.swarm.lifetime import trim_heap
from heloco_p2p.swarm.node import HandlerLimits
from heloco_p2p.swarm.wire import WireError, decode_tensors, encode_tensors, pack_params

logger = logging.getLogger(__name__)

ACKS_KEPT = 1024  # (peer, seq, version) of the latest acknowledgements, for tests and diagnosis


class CoordinatorService:
    """Serves ``CommitState`` on a node. ``active`` says whether this peer holds the lease now;
    a standby keeps ``active`` False and accepts ``replicate`` from the coordinator of its term.

    :param node: the peer's SwarmNode
    :param state: the replicated state
    :param shapes: the expected tensor layout of a pseudo-gradient
    :param limits: what a submission may be and the flood limits of ``submit``
    :param reply_compression: how θ travels back to peers ("none" keeps replicas exact; "wrap8":
        swarm/downlink.py, with ``reply_window`` versions of window)
    :param mode: "async" commits each Δ alone; "sync" waits at the barrier and commits the average
    """

    def __init__(self, node, state: CommitState, shapes: list[tuple[int, ...]], limits: SubmissionLimits,
                 reply_compression: str = "none", config_digest: str = "", mode: str = "async",
                 barrier_timeout: float = 300.0, min_replicas: int = 1, lease_seconds: float = 10.0,
                 reply_window: int = 16):
        self.node, self.state, self.limits = node, state, limits
        self.expected = [(tuple(s), torch.float32) for s in shapes]
        self.reply_compression = reply_compression
        # the dense encoding of replies (wrap8's fallback is fp32: a resync must be exact)
        self.dense_compression = "none" if reply_compression == "wrap8" else reply_compression
        self.downlink = DownlinkWindow(reply_window) if reply_compression == "wrap8" else None
        self.reply_resyncs = 0  # wrap8: replies sent dense because the window could not bound the sender
        self.config_digest = config_digest
        self.mode = mode
        self.lock = asyncio.Lock()  # the commit lock: no commit, replica load or snapshot runs beside another
        self.term = TermState(state, lease_seconds)
        self.replication = Replication(node, state, self.term, self.lock, min_replicas, lease_seconds)
        self.standby = StandbyService(node, state, self.term, self.lock, self.expected, self._take_role)
        self.barrier = SyncBarrier(self, barrier_timeout)
        self.term.on_step_down = self._stepped_down
        self.replication.on_durable = self._record
        # what this term did (the lease record publishes it)
        self.commits_this_term = 0
        self.rejected_this_term = 0
        self.rejected_by_peer: Counter = Counter()
        self.branches: Counter = Counter()
        self.staleness_recent: deque = deque(maxlen=100)
        self.commit_times: deque = deque(maxlen=200)
        self.commit_seconds: deque = deque(maxlen=20)  # time each recent submission held the commit lock
        self.acknowledged: deque = deque(maxlen=ACKS_KEPT)  # (peer, seq, version) acknowledged by this process
        self.on_commit = None  # callback(event) for each commit that became the run's history
        self._submit_gate = node.add_handler("submit", self.handle_submit, limits=HandlerLimits(
            max_payload_bytes=messages.max_submission_bytes([s for s, _ in self.expected]),
            max_inflight=limits.max_pending_submits, rate=limits.submit_rate, burst=limits.submit_burst,
            busy_retry_after=self._busy_retry_after, trusted=lambda peer: peer in self.state.applied))
        node.add_handler("replicate", self.standby.handle_replicate,
                         limits=HandlerLimits(max_payload_bytes=node.max_payload_bytes, max_inflight=4))
        node.add_handler("handover", self.standby.handle_handover, limits=HandlerLimits(max_inflight=2))

    @property
    def active(self) -> bool:
        return self.term.active

    def admit_at_once(self, n: int) -> None:
        """At least ``n`` submissions may be admitted at once (the sync barrier holds one per participant)."""
        self._submit_gate.max_inflight = max(self.limits.max_pending_submits, n)

    def _busy_retry_after(self) -> float:
        """When a refused submission may find room: the queue ahead of it times a recent commit."""
        per_commit = statistics.fmean(self.commit_seconds) if self.commit_seconds else 1.0
        return min(10.0, max(0.25, per_commit * self._submit_gate.inflight))

    # -- role changes -------------------------------------------------------------------------
    def activate(self, term: int) -> None:
        """Hold the role in ``term`` (a takeover, a handover, the founder, a resume)."""
        self.term.activate(term, self.node.peer_id)
        self.replication.begin_term()
        self.commits_this_term = self.rejected_this_term = 0
        self.branches.clear()
        self.replication.mark_committed(params_digest(self.state.engine.params))
        logger.info("coordinator for term %d at version %d", term, self.state.version)

    def _take_role(self, term: int, standbys: list[str]) -> None:
        self.replication.standbys = list(standbys)
        self.activate(term)

    def commits_per_minute(self) -> float:
        now = time.time()
        return float(sum(1 for t in self.commit_times if now - t <= 60))

    # -- replies ------------------------------------------------------------------------------
    def busy(self, message: str, retry_after: float = 1.0) -> messages.Reply:
        return messages.busy(message, retry_after, self.state.term, self.state.version)

    def reject(self, remote: str, code: str, message: str, detail: str = "") -> messages.Reply:
        """The sender gets the reason code and a message without exact thresholds (an attacker would
        learn the bound from them); the operator's log has the detail."""
        self.rejected_this_term += 1
        self.rejected_by_peer[remote] += 1
        logger.info("rejected a submission from %s: %s (%s)", remote[-8:], code, detail or message)
        return messages.rejected(code, message, term=self.state.term, version=self.state.version)

    def encode_params(self, dispatched: list | None = None) -> bytes:
        """The reply's parameters: where the sender's next round starts (``OuterEngine.dispatch_params``:
        θ̄ = θ − η·μ·m with look-ahead dispatch, θ otherwise), unless given already computed."""
        params = self.state.engine.dispatch_params() if dispatched is None else dispatched
        meta, data = encode_tensors([p.detach() for p in params], self.dense_compression)
        return pack_params(meta, data)

    async def reply_params(self, sub: messages.Submission, dispatched: list | None = None,
                           grid: asyncio.Future | None = None) -> tuple[bytes, dict]:
        """(under the commit lock) The reply's payload and its header fields: the version's wrap8
        payload (``grid``: its job, started at the commit; else the cached one, built now if this
        version has none) when the window bounds the sender's start point, else dense θ̄."""
        loop, st = asyncio.get_running_loop(), self.state
        if self.downlink is not None:
            payload = None
            try:
                cached = self.downlink.payload
                if grid is not None:
                    payload = await grid
                elif cached is not None and (cached.version, cached.term) == (st.version, st.term):  # a duplicate
                    payload = cached
                else:
                    payload = await loop.run_in_executor(
                        None, lambda: self.downlink.advance(st.engine.dispatch_params() if dispatched is None
                                                            else dispatched, st.version, st.term))
            except Exception:  # the dense reply is always right
                logger.exception("the wrap8 payload of version %d failed; replying with fp32", st.version)
            if payload is not None and payload.version == st.version and \
                    self.downlink.decodable(sub.base_version, sub.held):
                return payload.data, {"params_encoding": "wrap8", "drift_rel_l2": payload.drift_rel_l2}
            self.reply_resyncs += 1
            logger.info("version %d to a sender at base %d holding %r: fp32 (outside the wrap8 window)",
                        st.version, sub.base_version, sub.held or "?")
        data = await loop.run_in_executor(None, self.encode_params, dispatched)
        return data, {"params_encoding": "dense"}

    async def early_reply(self, peer: str, seq: int, sub: messages.Submission | None = None) -> messages.Reply | None:
        """Under the commit lock, before a submission is checked: the answer when this peer may not
        commit now (stepped down, lease unsure) or already did (a retry: a duplicate)."""
        st = self.state
        if not self.term.active:
            return messages.not_coordinator(self.term.highest_seen, "stepped down")
        if not self.term.lease_valid():  # frozen, or the renewal failed: the lease may have lapsed
            return self.busy("the coordinator is confirming its lease", retry_after=0.5)
        if st.is_duplicate(peer, seq):
            if self.replication.required() and self.replication.replicated_version < st.version:
                return self.busy("this submission is committed but no standby holds it yet")
            if sub is None:
                data, fields = await asyncio.get_running_loop().run_in_executor(None, self.encode_params, None), {}
            else:  # the version's wrap8 payload is reused for every duplicate
                data, fields = await self.reply_params(sub)
            return messages.accepted(st.version, st.term, None, st.schedule_step(), st.total_tokens, duplicate=True,
                                     **fields), data
        return None

    # -- submit -------------------------------------------------------------------------------
    async def handle_submit(self, header: dict, payload: bytes, remote: str) -> messages.Reply:
        try:
            sub = messages.Submission.parse(header, remote, self.node.run_id, self.state.engine.names,
                                            self.limits.max_steps)
        except WireError as exc:
            return self.reject(remote, exc.code, exc.message)
        if not self.term.active:
            return messages.not_coordinator(self.term.highest_seen,
                                            "this peer does not hold the coordinator lease; read the lease again")
        if sub.term > self.state.term:
            # The sender says it saw a later term. That is no proof (anyone can write a number): do not
            # step down on it, the lease in the DHT decides; but do not commit for a peer that follows another.
            return messages.not_coordinator(self.state.term, f"you saw term {sub.term}, this coordinator holds term "
                                                             f"{self.state.term}; read the lease again")
        t0 = time.perf_counter()
        try:
            delta = await asyncio.get_running_loop().run_in_executor(None, decode_tensors, sub.tensors, payload,
                                                                     self.expected)
        except WireError as exc:
            return self.reject(remote, exc.code, exc.message)
        t_decode = time.perf_counter() - t0
        if self.mode == "sync":
            return await self.barrier.submit(delta, remote, sub)
        async with self.lock:
            early = await self.early_reply(remote, sub.seq, sub)
            if early is not None:
                return early
            required = self.replication.required()
            if len(self.replication.standbys) < required:
                return self.busy(f"waiting for a standby ({len(self.replication.standbys)} of {required} hold the state)")
            return await self._commit(delta, remote, sub, payload, t_decode)

    async def _commit(self, delta, peer: str, sub: messages.Submission, payload: bytes, t_decode: float) -> messages.Reply:
        """Check, apply, replicate, acknowledge (under the commit lock)."""
        st, rep, loop = self.state, self.replication, asyncio.get_running_loop()
        commit_time = time.time()  # the coordinator's clock: the commit-share rule counts commits by it
        try:
            norm = await loop.run_in_executor(None, lambda: st.check(delta, sub.base_version, self.limits, peer=peer,
                                                                     region=sub.region or None, now=commit_time))
        except Rejection as exc:
            if exc.code == "busy":  # over its commit share: the sender keeps its Δ and resends it
                return self.busy(str(exc), exc.retry_after or 1.0)
            return self.reject(peer, exc.code, str(exc), exc.detail)
        worker = st.fairness_worker(sub.worker, self.limits)  # read now: the next check replaces last_screen
        clipped, norm, scale = await loop.run_in_executor(None, lambda: st.clip(delta, norm, self.limits, peer=peer))
        if clipped is not delta:
            delta.clear()  # the unclipped Δ is read no more (decode_tensors' list, this submission's own)
        delta = clipped
        if scale < 1.0:
            logger.info("norm clip: the submission of %s scaled by %.3f", peer[-8:], scale)
        version_before = st.version
        t1 = time.perf_counter()
        if self.downlink is not None and not self.downlink.follows(version_before, st.term):
            # the first commit of this window (a new term, a gap): θ̄ before it, to measure the change from
            await loop.run_in_executor(None, self.downlink.start, st.engine.dispatch_params(), version_before, st.term)
        num_workers = st.workers(peer)
        # Δ is this submission's own decoded copy, read no more after it: the engine works in it (no
        # scratch copy of θ), and it is freed before θ̄ is made (the caller's frame holds the same list)
        info = await loop.run_in_executor(None, st.apply, delta, sub.base_version, peer, sub.seq, sub.steps, norm,
                                          worker, sub.seconds, sub.tokens, num_workers, commit_time, True)
        delta.clear()
        digest = await loop.run_in_executor(None, params_digest, st.engine.params)
        st.log.append(st.version, st.term, peer, sub.seq, sub.base_version, digest)
        # computed once, off the event loop: digested, then sent in the reply
        dispatched = await loop.run_in_executor(None, st.engine.dispatch_params)
        # the dispatch digest (for the run's audit: what peers received) is computed while the
        # commit travels to the standbys, not before
        dispatch_digest_future = None if dispatched is st.engine.params else \
            loop.run_in_executor(None, params_digest, dispatched)
        t2 = time.perf_counter()
        commit = messages.CommitForward(st.term, version_before, sub.base_version, peer, sub.seq, sub.steps, sub.tensors,
                                        digest, worker, sub.seconds, sub.tokens, num_workers, commit_time, scale)
        # wrap8: the version's payload is built beside the replication, and awaited before the lock is
        # released whatever happens (it reads θ̄, which the next commit changes in place)
        grid = loop.run_in_executor(None, self.downlink.advance, dispatched, st.version, st.term) \
            if self.downlink is not None else None
        try:
            held = await rep.forward(commit, payload)
        finally:
            if grid is not None:
                await asyncio.gather(grid, return_exceptions=True)
        dispatch_digest = digest if dispatch_digest_future is None else await dispatch_digest_future
        if not self.term.active:
            # a standby follows a newer term that this peer verified: another peer coordinates, and
            # this commit (applied here only) must not be acknowledged; the sender resubmits there
            return messages.not_coordinator(self.term.highest_seen, "a standby follows a newer term; read the lease again")
        summary = info.summary()
        event = {**summary, "peer": peer, "seq": sub.seq, "norm": norm, "digest": digest, "term": st.term,
                 "dispatch_digest": dispatch_digest, "num_workers": num_workers, "stats": sub.stats, "replicas": held,
                 "screen": st.last_screen}
        grid_payload = self.downlink.payload if self.downlink is not None else None
        if grid_payload is not None and grid_payload.version == info.version:  # the drift of this version's grid
            event["reply_drift_rel_l2"] = grid_payload.drift_rel_l2
        required = rep.required()
        if not rep.settle(event, held, digest):  # committed here, held by too few: the retry is a duplicate
            return self.busy(f"the commit is held by {held} of {required} standbys; a new standby is recruited")
        if not self.term.lease_valid():  # held, but the lease may have lapsed meanwhile: the retry is a duplicate
            return self.busy("the coordinator is confirming its lease", retry_after=0.5)
        if required == 0 and rep.min_replicas > 0:
            logger.warning("version %d acknowledged with no replica: no other peer is alive to hold it", info.version)
        self.acknowledged.append((peer, sub.seq, info.version))
        t3 = time.perf_counter()
        data, fields = await self.reply_params(sub, dispatched, grid)
        self.commit_seconds.append(time.perf_counter() - t1)
        timing = {"decode": t_decode, "commit": t2 - t1, "replicate": t3 - t2, "encode_reply": time.perf_counter() - t3}
        if fields["params_encoding"] == "wrap8":
            timing["grid"] = self.downlink.payload.seconds  # the version's payload, built beside the replication
        loop.run_in_executor(None, trim_heap)  # the commit's transient copies of θ (Δ, θ̄), while the reply goes
        return messages.accepted(info.version, st.term, info.staleness, st.schedule_step(), st.total_tokens,
                                 branches=summary["branches"], timing=timing, **fields), data

    def _stepped_down(self) -> None:
        """This peer stopped coordinating (from the event loop or the election's thread): what only
        it committed is not the run's, and the wrap8 window's copy of θ̄ is released (a standby
        holds no reply state; a new term starts the window again)."""
        self.replication.forget_unreplicated()
        if self.downlink is None:
            return
        try:
            asyncio.get_running_loop().create_task(self._release_downlink())  # a standby's handler
        except RuntimeError:  # the election's thread: the node's event loop runs the release
            loop = getattr(self.node, "loop", None)
            if loop is not None:
                loop.call_soon_threadsafe(lambda: loop.create_task(self._release_downlink()))

    async def _release_downlink(self) -> None:
        async with self.lock:  # no commit reads the window meanwhile
            if not self.term.active and self.downlink is not None:
                self.downlink.clear()

    def _record(self, events: list[dict], checkpointed: bool) -> None:
        """Commits that became the run's history (metrics, the ``commit`` event chaos.py checks the
        chain with); ``checkpointed``: held by a leaving coordinator's last checkpoint only."""
        for e in events:
            self.commit_times.append(time.time())
            if not checkpointed:
                self.commits_this_term += 1
                self.staleness_recent.append(e.get("staleness") or 0)
                self.branches.update(e.get("branches", {}))
            if self.on_commit is not None:
                self.on_commit({**e, "checkpointed": True} if checkpointed else e)
