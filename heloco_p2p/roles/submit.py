"""The submit client: one pseudo-gradient to whichever peer holds the lease, until it is
accepted, refused for good, or given up. It returns an outcome and changes nothing of the peer:
the round loop decides what an outcome means (adopt the reply's θ, download the state, ...).

Retries keep the same sequence number (the coordinator's ledger makes a resend idempotent):
after a connection error, ``not_coordinator``, ``busy`` / ``rate_limited`` (waiting
``retry_after``), and when the lease moves to another holder while a reply is awaited (a frozen
or deposed coordinator): docs/protocol.md, "A round" and "Election and failover".

With ``swarm.compression: topk`` the client keeps the error-feedback residual (swarm/uplink.py):
Δ + e is sent, e ← (Δ + e) − sent once accepted, e ← 0 on any other outcome.

A reply's θ̄ is dense (``unpack_params``) or, with ``swarm.reply_compression: wrap8``, decoded
against the peer's start point (swarm/downlink.py); a wrap8 reply whose checksums do not match
(or that does not parse) is accepted with ``params`` None and ``resync`` set: the round loop
then downloads the exact state. The header's ``held`` says what the start point is.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from heloco_p2p.swarm.downlink import decode_wrap8
from heloco_p2p.swarm.records import LeaseRecord
from heloco_p2p.swarm.uplink import Uplink
from heloco_p2p.swarm.wire import WireError, unpack_params

logger = logging.getLogger(__name__)


class LeaseMoved(Exception):
    """The submission in flight went to a coordinator whose lease another peer now holds."""


@dataclass
class SubmitOutcome:
    """How a submission ended: ``accepted`` (``params`` at ``version``), ``rejected`` (``reason``:
    a refusal a retry cannot fix), or ``gave_up`` (no acceptance within ``submit_timeout``, or
    the peer is stopping). An accepted wrap8 reply that did not decode has ``params`` None and
    ``resync`` True; ``held`` is what the peer holds once it adopts ``params``."""

    status: str
    reply: dict = field(default_factory=dict)
    params: list[torch.Tensor] | None = None
    rtt: float = 0.0
    attempts: int = 0
    serialize_seconds: float = 0.0
    payload_bytes: int = 0
    reply_bytes: int = 0
    resync: bool = False
    held: str = "exact"
    param_count: int = 0  # of the layout: reply bits per parameter = 8 · reply_bytes / param_count

    @property
    def reply_bits_per_param(self) -> float | None:
        return 8.0 * self.reply_bytes / self.param_count if self.param_count else None

    @property
    def version(self) -> int:
        return int(self.reply["version"])

    @property
    def reason(self) -> str | None:
        return self.reply.get("reason")


class SubmitClient:
    """Sends pseudo-gradients for one peer.

    :param node: the peer's ``SwarmNode``
    :param election: its ``Election`` (the believed lease; refreshed before each attempt)
    :param service: its ``CoordinatorService`` (a coordinator submits to itself without the network)
    :param swarm: the run's ``swarm`` config (compression, submit_timeout)
    :param region: the peer's region (the region-fair weight keys on it)
    :param names: the tensor names of the layout (checked by the coordinator)
    :param keep_going: False when the peer is leaving or out of time
    :param start_point: ``() -> (params, held)``: where the round being submitted started (the
        peer's θ̄ or its wrap8 grid, and which: "exact", "wrap8", "none"), read when a submission
        starts; a wrap8 reply is decoded against it. None: replies are only decoded when dense
    """

    def __init__(self, node, election, service, swarm, region: str, names: list[str], stop_event: threading.Event,
                 keep_going: Callable[[], bool], start_point: Callable[[], tuple] | None = None):
        self.node, self.election, self.service, self.swarm = node, election, service, swarm
        self.region, self.names, self.stop_event, self.keep_going = region, list(names), stop_event, keep_going
        self.start_point = start_point
        self.uplink = Uplink(swarm.compression, swarm.topk_codec() if swarm.compression == "topk" else None)

    def header(self, seq: int, base: int, stats, meta: list, held: str = "exact") -> dict:
        loss = stats.loss if math.isfinite(stats.loss) else None  # headers are strict JSON
        return {"run_id": self.node.run_id, "seq": seq, "base_version": base, "steps": stats.steps,
                "region": self.region, "tensors": meta, "names": self.names, "held": held,
                "stats": {"loss": loss, "tokens": stats.tokens, "seconds": stats.seconds}}

    def submit(self, seq: int, delta: list[torch.Tensor], base: int, stats,
               expected: list[tuple[tuple[int, ...], torch.dtype]], release: bool = False) -> SubmitOutcome:
        """Send Δ until it is accepted, refused for good or given up. ``release``: the caller hands
        ``delta`` over, and the list is emptied once Δ is encoded (its tensors are read no more; an
        overlapped round's list lives until the next round ends: a copy of θ while that one trains)."""
        start, held = self.start_point() if self.start_point is not None else (None, "none")
        out = self._submit(seq, delta, base, stats, expected, start, held if start is not None else "none", release)
        self.uplink.settle(out.status == "accepted")  # the residual is kept only for an applied Δ
        return out

    def reply_params(self, reply: dict, data: bytes, expected, start) -> tuple[list[torch.Tensor] | None, str]:
        """The θ̄ an accepted reply brings and what the peer then holds ("exact", "wrap8", "none" for
        a lossy dense reply); (None, "none") for a wrap8 reply that does not decode on ``start``."""
        if reply.get("params_encoding") != "wrap8":
            return unpack_params(data, expected), "exact" if self.swarm.reply_compression in ("none", "wrap8") else "none"
        if start is None:
            return None, "none"
        try:
            params, bad = decode_wrap8(data, start)
        except WireError as exc:
            logger.warning("the wrap8 reply of version %s does not parse (%s): downloading the state instead",
                           reply.get("version"), exc)
            return None, "none"
        if bad:
            logger.warning("%d blocks of the wrap8 reply of version %s do not match their checksums: downloading "
                           "the state instead", bad, reply.get("version"))
            return None, "none"
        return params, "wrap8"

    def _submit(self, seq: int, delta: list[torch.Tensor], base: int, stats,
                expected: list[tuple[tuple[int, ...], torch.dtype]], start=None, held: str = "none",
                release: bool = False) -> SubmitOutcome:
        t0 = time.perf_counter()
        enc = self.uplink.prepare(delta)
        if release:
            delta.clear()  # encoded: the fp32 Δ is read no more
        meta, payload = enc.meta, enc.payload
        t_ser = time.perf_counter() - t0
        header = self.header(seq, base, stats, meta, held)
        deadline = time.time() + self.swarm.submit_timeout
        attempt = 0
        while time.time() < deadline and not self.stop_event.is_set() and self.keep_going():
            attempt += 1
            lease = self.election.refresh()
            if lease is None:
                time.sleep(0.5)
                continue
            header["term"] = self.service.term.highest_seen
            t1 = time.perf_counter()
            try:
                reply, data = self.send(lease, header, payload)
            except LeaseMoved as exc:
                logger.info("%s; resubmitting there", exc)
                continue
            except Exception as exc:
                logger.info("submission to %s failed (%s); retrying", lease.peer_id[-8:], exc if isinstance(exc, WireError)
                            else type(exc).__name__)
                retry_after = getattr(exc, "retry_after", None)  # an unsigned "busy" from a keyed call
                self.stop_event.wait(min(2.0, 0.25 * attempt) if retry_after is None else min(10.0, retry_after))
                continue
            rtt = time.perf_counter() - t1
            status = reply.get("status")
            if reply.get("term", 0) < self.service.term.highest_seen and status == "accepted":
                continue  # a deposed coordinator answered: ignore it (its commit cannot be acknowledged)
            if status == "accepted":
                params, now_held = self.reply_params(reply, data, expected, start)
                return SubmitOutcome("accepted", reply, params, rtt, attempt, t_ser, len(payload), len(data),
                                     resync=params is None, held=now_held,
                                     param_count=sum(math.prod(shape) for shape, _ in expected))
            if status == "not_coordinator":
                time.sleep(0.3)
                continue
            if status == "rejected" and reply.get("reason") in ("busy", "rate_limited"):
                # flood control, or no standby holds the commit yet: the same submission (same seq) again
                retry_after = reply.get("retry_after")
                retry_after = float(retry_after) if isinstance(retry_after, (int, float)) else 1.0
                logger.info("coordinator %s: %s; retrying in %.2f s", reply.get("reason"), reply.get("message"), retry_after)
                self.stop_event.wait(min(10.0, max(0.05, retry_after), max(0.0, deadline - time.time())))
                continue
            return SubmitOutcome("rejected", reply, attempts=attempt, serialize_seconds=t_ser, payload_bytes=len(payload))
        logger.warning("gave up on submission %d after %d attempts", seq, attempt)
        return SubmitOutcome("gave_up", attempts=attempt, serialize_seconds=t_ser, payload_bytes=len(payload))

    def send(self, lease: LeaseRecord, header: dict, payload: bytes) -> tuple[dict, bytes]:
        """Send one submission to the lease holder and wait for the reply, but not past the moment
        this peer believes a later lease (held by another peer): a submission in flight to a frozen
        or deposed coordinator moves to the new one (the ledger makes the resend idempotent)."""
        timeout = self.swarm.submit_timeout
        if lease.peer_id == self.node.peer_id:
            call = self.service.handle_submit(header, payload, self.node.peer_id)
        else:
            call = self.node.acall(lease.peer_id, "submit", header, payload)
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(call, timeout), self.node.loop)
        while True:
            try:
                return future.result(timeout=0.5)
            except concurrent.futures.TimeoutError:
                if future.done():  # the call itself timed out
                    raise
                now = self.election.lease
                if now is not None and now.term > lease.term and now.peer_id != lease.peer_id:
                    future.cancel()
                    raise LeaseMoved(f"the lease moved from {lease.peer_id[-8:]} (term {lease.term}) to "
                                     f"{now.peer_id[-8:]} (term {now.term})") from None
                if self.stop_event.is_set():
                    future.cancel()
                    raise
