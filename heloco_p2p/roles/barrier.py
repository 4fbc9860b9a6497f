"""The synchronous barrier (``outer`` mode ``sync``: synchronous DiLoCo in the real swarm): every
participant's Δ for the current version waits here until all have arrived (or the barrier times
out), then one averaged commit answers them all. Owned by the node's event loop; the
maintenance thread sets ``participants`` (one assignment of a new set).
"""
from __future__ import annotations

import asyncio
import logging
import time

from heloco_p2p.roles import messages
from heloco_p2p.roles.commit_state import Rejection, params_digest

logger = logging.getLogger(__name__)


class SyncBarrier:
    """:param coordinator: the CoordinatorService whose state, lock and replication commit the average
    :param timeout: seconds a submission waits for the others before what arrived is committed"""

    def __init__(self, coordinator, timeout: float = 300.0):
        self.coord = coordinator
        self.timeout = timeout
        self.pending: dict[str, tuple] = {}  # peer -> (seq, steps, tokens, norm, Δ, future)
        self._participants: set[str] = set()  # peers the barrier waits for

    @property
    def participants(self) -> set[str]:
        return self._participants

    @participants.setter
    def participants(self, peers: set[str]) -> None:
        # the barrier holds one submission per participant until all arrived: admit them all
        self._participants = set(peers)
        self.coord.admit_at_once(len(self._participants) + 2)

    async def submit(self, delta, peer: str, sub: messages.Submission) -> messages.Reply:
        c, st = self.coord, self.coord.state
        loop = asyncio.get_running_loop()
        async with c.lock:
            early = await c.early_reply(peer, sub.seq)
            if early is not None:
                return early
            if sub.base_version != st.version:
                return c.reject(peer, "too_stale", f"a synchronous round starts from the current version "
                                                   f"{st.version}, not {sub.base_version}; download the state")
            try:  # off the event loop: the check reads every tensor
                norm = await loop.run_in_executor(None, st.check, delta, sub.base_version, c.limits)
            except Rejection as exc:
                return c.reject(peer, exc.code, str(exc), exc.detail)
            future = loop.create_future()
            self.pending[peer] = (sub.seq, sub.steps, sub.tokens, norm, delta, future)
        await self.check()
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=self.timeout)
        except asyncio.TimeoutError:
            await self.check(force=True)  # commit what arrived rather than wait forever
            return await future

    async def check(self, force: bool = False) -> None:
        """Commit the pending pseudo-gradients if every participant has sent one (or ``force``)."""
        c, st, rep = self.coord, self.coord.state, self.coord.replication
        loop = asyncio.get_running_loop()
        async with c.lock:
            if not self.pending or not c.active:
                return
            if self.participants - set(self.pending) and not force:
                return
            items = [(p, seq, steps, tokens, norm, d) for p, (seq, steps, tokens, norm, d, _) in sorted(self.pending.items())]
            futures = [f for (*_, f) in self.pending.values()]
            self.pending = {}
            t1 = time.perf_counter()
            info = await loop.run_in_executor(None, st.apply_sync, items, st.version)
            digest = await loop.run_in_executor(None, params_digest, st.engine.params)
            st.log.append(st.version, st.term, ",".join(p for p, *_ in items), -1, st.version - 1, digest)
            t2 = time.perf_counter()
            held = await rep.replicate_full()
            required = rep.required()
            summary = info.summary()
            event = {**summary, "peer": ",".join(p for p, *_ in items), "seq": -1, "digest": digest, "term": st.term,
                     "peers": len(items), "staleness": 0}
            if not rep.settle(event, held, digest) or not c.term.lease_valid():  # not acknowledged: retries are duplicates
                answer = c.busy(f"the commit is held by {held} of {required} standbys")
            else:
                for p, seq, *_ in items:
                    c.acknowledged.append((p, seq, info.version))
                t3 = time.perf_counter()
                data = await loop.run_in_executor(None, c.encode_params, None)
                timing = {"decode": 0.0, "commit": t2 - t1, "replicate": t3 - t2, "encode_reply": time.perf_counter() - t3}
                answer = (messages.accepted(info.version, st.term, 0, st.schedule_step(), st.total_tokens,
                                            branches=summary["branches"], timing=timing, peers=len(items)), data)
            for f in futures:
                if not f.done():
                    f.set_result(answer)
