"""A peer's presence in the swarm: its libp2p daemon, its DHT, its RPC handlers and client calls.

hivemind is the engine: ``P2P`` (a p2pd daemon: NAT traversal, relays, TLS) and ``DHT`` (a
Kademlia DHT in a child process). The P2P is created in *this* process and handed to the DHT,
so p2pd is our child, and both can be guarded (``lifetime.guard_children``) so that a killed
peer leaves nothing running. Async work runs on one event-loop thread; the training thread calls
in through ``run``.

    node = SwarmNode("demo", identity_dir="~/.heloco/peer1", initial_peers=[...])
    node.add_handler("submit", handle)                          # async (header, payload, remote) -> (header, payload)
    reply, data = node.call(peer_id, "submit", {"v": 1}, payload)

Every request passes the same gates, in this order, before its handler runs; a refusal is a
reply ``{"status": "rejected", "reason": code, "message": ...}`` (plus ``retry_after`` for
``busy`` and ``rate_limited``) and is counted per remote peer in ``rejections``:

1. at most ``max_open_streams`` requests open at once (``busy``, before anything is read), and
   the header within ``header_timeout`` seconds (``truncated``); after its reply a stream lingers
   until the client closes (``wire.linger_close``), at most ``max_open_streams`` of them at once
   (past that a stream is closed at once: ``Lingering``);
2. the frame (``wire.read_head``: ``bad_magic``, ``truncated``, ``too_large``, ``malformed``);
3. with a swarm key (``swarm/auth.py``): the request's MAC, timestamp and nonce
   (``unauthenticated``, ``replayed``); a keyless node refuses authenticated requests
   (``unauthenticated``: the peers' configurations differ);
4. the payload's declared length against the handler's limit (``too_large``);
5. the handler's :class:`HandlerLimits`: a token bucket per remote peer (``rate_limited``) and a
   bound on requests admitted and not yet answered (``busy``), so memory stays bounded under a
   flood: at most ``max_inflight`` payloads per handler are held;
6. only then is the payload read (after the go-ahead, with the key's proof), and its hash checked.

With a key, every reply to an authenticated request is authenticated too, and ``acall`` refuses
a reply that is not (``WireError("unauthenticated")``): a state download from an impostor fails.
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import hivemind
from cryptography.hazmat.primitives import serialization
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from heloco_p2p.swarm.auth import ReplayGuard, SwarmKey
from heloco_p2p.swarm.lifetime import p2p_daemon_pid
from heloco_p2p.swarm.records import RunRecords, make_validators
from heloco_p2p.swarm.wire import (
    Lingering,
    WireError,
    read_head,
    read_payload,
    request,
    send_continue,
    write_message,
)

logger = logging.getLogger(__name__)

JOIN_HELP = "see README 'Joining from another machine'"


def start_error_message(exc: Exception, initial_peers: Sequence[str]) -> str:
    """What to tell a user whose node cannot start: no peer answered, a bad address, or a daemon failure."""
    text = str(exc)
    addrs = " ".join(initial_peers)
    if "failed to connect to bootstrap peers" in text:
        return (f"no peer answered at {addrs}: check the address, that the peer is running, "
                f"and firewalls/NAT ({JOIN_HELP})")
    if "multiaddr" in text:
        return (f"not a valid peer address: {addrs} ({text.split(':', 1)[-1].strip()}); a peer prints its address "
                "when it starts, e.g. /ip4/203.0.113.5/tcp/31337/p2p/Qm...")
    if "address already in use" in text.lower():
        return f"could not listen: {text}; choose another port in --host-maddrs (or tcp/0 for any free port)"
    return f"could not start the libp2p daemon: {text} ({JOIN_HELP})"


Handler = Callable[[dict, bytes, str], Awaitable[tuple[dict, bytes]]]

PROOF_BYTES = 32  # the swarm key's proof after the go-ahead byte
MAX_TRACKED_PEERS = 4096  # token buckets and rejection counters kept (least recently seen dropped)


@dataclass
class HandlerLimits:
    """Flood control for one handler.

    :param max_payload_bytes: largest request payload (None: the node's ``max_request_bytes``)
    :param max_inflight: requests admitted past their header and not yet answered; more are
        refused ``busy`` without reading their payload
    :param rate: requests per second per remote peer (token bucket; 0: no per-peer limit)
    :param burst: the bucket's size: requests a peer may send at once after a quiet spell
    :param busy_retry_after: seconds to suggest in a ``busy`` reply, or a function giving them
    :param payload_timeout: seconds to receive the payload once the go-ahead is sent
    :param trusted: a function saying whether a remote peer has earned priority (for ``submit``:
        it has had a submission accepted); untrusted peers get at most half the slots, so a
        flood from fresh identities cannot take them all from the peers that are training
    """

    max_payload_bytes: int | None = None
    max_inflight: int = 8
    rate: float = 0.0
    burst: float = 1.0
    busy_retry_after: float | Callable[[], float] = 1.0
    payload_timeout: float = 300.0
    trusted: Callable[[str], bool] | None = None


class Gate:
    """The admission state of one handler (see :class:`HandlerLimits`)."""

    def __init__(self, limits: HandlerLimits):
        self.limits = limits
        self.inflight = 0
        self.max_inflight = limits.max_inflight  # may be raised at run time (synchronous barrier)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # peer -> (tokens, time)

    def admit(self, remote: str, now: float | None = None) -> None:
        """Take a slot for ``remote`` (release it with :meth:`release`), or raise ``rate_limited`` / ``busy``."""
        lim = self.limits
        now = time.monotonic() if now is None else now
        tokens = None
        if lim.rate > 0:
            tokens, last = self._buckets.pop(remote, (lim.burst, now))
            tokens = min(lim.burst, tokens + (now - last) * lim.rate)
            if tokens < 1.0:
                self._remember(remote, tokens, now)
                wait = (1.0 - tokens) / lim.rate
                raise WireError("rate_limited", f"more than {lim.rate:g} requests/s (burst {lim.burst:g}) from this "
                                                f"peer; retry after {wait:.2f} s", retry_after=round(wait, 3))
        limit = self.max_inflight
        if lim.trusted is not None and not lim.trusted(remote):
            limit = max(1, self.max_inflight // 2)  # the other half is kept for peers with a record
        if self.inflight >= limit:
            if tokens is not None:
                self._remember(remote, tokens, now)  # a refused request costs the peer no token
            retry = lim.busy_retry_after() if callable(lim.busy_retry_after) else lim.busy_retry_after
            raise WireError("busy", f"{self.inflight} requests already in progress (limit {limit} for this peer); "
                                    f"retry after {retry:.2f} s", retry_after=round(float(retry), 3))
        if tokens is not None:
            self._remember(remote, tokens - 1.0, now)
        self.inflight += 1

    def release(self) -> None:
        self.inflight -= 1

    def _remember(self, remote: str, tokens: float, now: float) -> None:
        self._buckets[remote] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED_PEERS:  # a forgotten peer gets a full bucket: bounded memory first
            self._buckets.popitem(last=False)


async def _ping_into_routing_table(dht, node, peer_ids: list[str]) -> int:
    """Runs in the DHT's process (``DHT.run_coroutine``): forget the failures that banned peers and
    ping each given peer, which adds every one that answers to the routing table again."""
    node.blacklist.clear()
    answered = 0
    for peer_id in peer_ids:
        try:
            if await node.protocol.call_ping(PeerID.from_base58(peer_id)) is not None:
                answered += 1
        except Exception as exc:  # a malformed id or a dead peer: the others may answer
            logger.debug("ping %s: %s", peer_id[-8:], exc)
    return answered


def load_or_create_rsa_key(path: Path) -> RSAPrivateKey:
    """The RSA key that signs this peer's DHT records, persisted so a restarted peer still owns them."""
    if path.exists():
        key = RSAPrivateKey.__new__(RSAPrivateKey)
        key._private_key = serialization.load_der_private_key(path.read_bytes(), password=None)
        return key
    key = RSAPrivateKey()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(key.to_bytes())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)
    return key


class SwarmNode:
    """See module docstring.

    :param run_id: the run's name (prefix of DHT keys and RPC handler names)
    :param identity_dir: where the libp2p identity and the RSA record key live (None: ephemeral)
    :param initial_peers: multiaddrs of peers already in the swarm
    :param host_maddrs: addresses to listen on
    :param announce_maddrs: addresses others should use (behind NAT / port forwarding)
    :param client_mode: do not accept incoming DHT requests (peers behind NAT without relays)
    :param max_payload_bytes: cap on any reply body this node reads, and on request bodies of
        handlers that allow large payloads
    :param max_request_bytes: cap on request bodies of handlers that set no limit of their own
    :param swarm_key: the run's key (``swarm/auth.py``); None: an open run, nothing authenticated
    :param max_open_streams: requests served at once, all handlers together; more are refused ``busy``
    :param header_timeout: seconds a request may take to send its header
    """

    def __init__(self, run_id: str, identity_dir: str | os.PathLike | None = None,
                 initial_peers: Sequence[str] = (), host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                 announce_maddrs: Sequence[str] | None = None, client_mode: bool = False,
                 max_payload_bytes: int = 1 << 30, startup_timeout: float = 60.0,
                 swarm_key: SwarmKey | None = None, max_request_bytes: int = 1 << 20,
                 max_open_streams: int = 128, header_timeout: float = 30.0, max_header_bytes: int = 1 << 20):
        self.run_id = run_id
        self.max_payload_bytes = max_payload_bytes
        self.max_request_bytes = max_request_bytes
        self.max_header_bytes = max_header_bytes
        self.swarm_key = swarm_key
        self.replay_guard = ReplayGuard(max_skew=swarm_key.max_skew if swarm_key else 120.0)
        self.max_open_streams = max_open_streams
        self.header_timeout = header_timeout
        self.open_streams = 0
        # streams closing after their reply (wire.linger_close): at most max_open_streams at once
        self.lingering = Lingering(max_open_streams)
        self.gates: dict[str, Gate] = {}
        self.rejections: OrderedDict[str, Counter] = OrderedDict()  # remote peer -> reason -> count
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-loop", daemon=True)
        self._thread.start()
        key = None
        p2p_identity = None
        if identity_dir is not None:
            ident = Path(identity_dir).expanduser()
            ident.mkdir(parents=True, exist_ok=True)
            key = load_or_create_rsa_key(ident / "dht_rsa.der")
            p2p_identity = str(ident / "p2p.key")
        validators, self.signer = make_validators(run_id, key)
        try:
            self._start(validators, initial_peers, host_maddrs, announce_maddrs, p2p_identity, client_mode, startup_timeout)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)  # no thread left behind when the daemon cannot start
            self._thread.join(timeout=5)
            raise
        self.records = RunRecords(self.dht, run_id, self.signer, swarm_key=swarm_key)
        self.bytes_in = 0
        self.bytes_out = 0
        self._closed = False

    def _start(self, validators, initial_peers, host_maddrs, announce_maddrs, p2p_identity, client_mode, startup_timeout):
        self.p2p: P2P = self.run(P2P.create(
            initial_peers=list(initial_peers), host_maddrs=list(host_maddrs),
            announce_maddrs=list(announce_maddrs) if announce_maddrs else None, identity_path=p2p_identity,
            dht_mode="client" if client_mode else "server", startup_timeout=startup_timeout,
        ), timeout=startup_timeout + 5)
        self.peer_id = str(self.p2p.peer_id)
        try:
            self.dht = hivemind.DHT(p2p=self.p2p, initial_peers=list(initial_peers), start=True,
                                    record_validators=validators, client_mode=client_mode)
        except BaseException:
            self.run(self.p2p.shutdown(), timeout=10)
            raise

    # -- plumbing ---------------------------------------------------------------------------
    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the node's event loop from any other thread and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def child_pids(self) -> list[int]:
        """Processes this node started: the DHT process and p2pd."""
        pids = [self.dht.pid] if self.dht.pid else []
        daemon = p2p_daemon_pid(self.p2p)
        if daemon:
            pids.append(daemon)
        return pids

    def rejoin(self, peer_ids: Sequence[str]):
        """Bring peers back into this node's DHT routing table after a partition: hivemind bans a
        peer that failed for a time that doubles with each failure and drops it from the routing
        table, so a node cut off for a while can find nobody once the link is back. Runs in the
        background; returns a future of how many of ``peer_ids`` answered (None: nobody to ask)."""
        ids = [p for p in dict.fromkeys(peer_ids) if p and p != self.peer_id]
        if not ids:
            return None
        return self.dht.run_coroutine(partial(_ping_into_routing_table, peer_ids=ids), return_future=True)

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def _handler_name(self, name: str) -> str:
        return f"heloco.{self.run_id}.{name}"

    # -- serving ----------------------------------------------------------------------------
    def count_rejection(self, remote: str, reason: str) -> None:
        """Count a refused request from ``remote`` (kept for the ``MAX_TRACKED_PEERS`` most recent senders)."""
        counts = self.rejections.pop(remote, None) or Counter()
        counts[str(reason)] += 1
        self.rejections[remote] = counts
        while len(self.rejections) > MAX_TRACKED_PEERS:
            self.rejections.popitem(last=False)

    def rejection_summary(self, top: int = 16) -> dict[str, dict[str, int]]:
        """The ``top`` peers with the most refused requests: peer id -> reason -> count."""
        worst = sorted(self.rejections.items(), key=lambda kv: -sum(kv[1].values()))[:top]
        return {peer: {reason: int(n) for reason, n in counts.items()} for peer, counts in worst}

    def add_handler(self, name: str, handler: Handler, max_payload_bytes: int | None = None,
                    limits: HandlerLimits | None = None) -> Gate:
        """Serve ``name``: one request message in, one reply message out, through the gates of the
        module docstring. Returns the handler's :class:`Gate` (its limits can be changed live).

        :param max_payload_bytes: shorthand for ``limits.max_payload_bytes``
        """
        limits = limits or HandlerLimits()
        if max_payload_bytes is not None:
            limits.max_payload_bytes = max_payload_bytes
        gate = self.gates[name] = Gate(limits)

        async def _serve(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = str(stream_info.peer_id)
            if self.open_streams >= self.max_open_streams:
                self.count_rejection(remote, "busy")
                try:
                    await write_message(writer, {"status": "rejected", "reason": "busy", "retry_after": 1.0,
                                                 "message": f"{self.open_streams} requests open; retry after 1 s"})
                except (ConnectionError, OSError):
                    pass
                await self.lingering.close(reader, writer)
                return
            self.open_streams += 1
            try:
                reply, data, nonce = await self._serve_one(name, handler, gate, remote, reader, writer)
                if reply.get("status") == "rejected":
                    self.count_rejection(remote, reply.get("reason", "unknown"))
                if nonce is not None:
                    reply = self.swarm_key.sign_reply(self.run_id, name, nonce, reply, data, sender=self.peer_id,
                                                      receiver=remote)
                self.bytes_out += await write_message(writer, reply, data)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                logger.warning("stream %s from %s broke before the reply was sent: %s: %s", name, remote[-8:],
                               type(exc).__name__, exc)
            finally:
                self.open_streams -= 1
                await self.lingering.close(reader, writer)

        self.run(self.p2p.add_binary_stream_handler(self._handler_name(name), _serve))
        return gate

    async def _serve_one(self, name: str, handler: Handler, gate: Gate, remote: str, reader, writer):
        """One request through the gates; returns (reply, data, the request's nonce when the reply must be signed)."""
        limits = gate.limits
        nonce = admitted = None
        try:
            try:
                header, payload_len, wants_continue = await asyncio.wait_for(
                    read_head(reader, self.max_header_bytes), self.header_timeout)
            except asyncio.TimeoutError:
                raise WireError("truncated", f"no complete header within {self.header_timeout:g} s") from None
            auth = None
            if self.swarm_key is not None:
                auth = self.swarm_key.check_request_head(self.run_id, name, header, payload_len, sender=remote,
                                                         receiver=self.peer_id, guard=self.replay_guard)
                nonce = auth["nonce"]  # from here on, replies are signed
            elif "auth" in header:
                raise WireError("unauthenticated", "this peer has no swarm key but the request is authenticated: "
                                                   "every peer of a run must use the same --swarm-key-file (or none)")
            header.pop("auth", None)
            limit = limits.max_payload_bytes or self.max_request_bytes
            if payload_len > limit:
                raise WireError("too_large", f"payload of {payload_len} bytes exceeds the limit of {limit} for {name}")
            gate.admit(remote)
            admitted = True
            if wants_continue and payload_len:
                proof = self.swarm_key.continue_proof(self.run_id, name, nonce) if nonce is not None else b""
                await send_continue(writer, proof)
            try:
                payload = await asyncio.wait_for(read_payload(reader, payload_len), limits.payload_timeout)
            except asyncio.TimeoutError:
                raise WireError("truncated", f"payload not received within {limits.payload_timeout:g} s") from None
            if auth is not None:
                self.swarm_key.check_body(auth, payload)
            self.bytes_in += len(payload)
            try:
                reply, data = await handler(header, payload, remote)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                # the handler's own calls to other peers failed: an answer, not a broken stream
                logger.warning("handler %s for %s: %s: %s", name, remote[-8:], type(exc).__name__, exc)
                reply, data = {"status": "error", "reason": "internal", "message": f"{type(exc).__name__}: {exc}"}, b""
        except WireError as exc:
            reply, data = {"status": "rejected", "reason": exc.code, "message": exc.message}, b""
            if exc.retry_after is not None:
                reply["retry_after"] = exc.retry_after
        except (ConnectionError, asyncio.IncompleteReadError, OSError):
            raise
        except Exception as exc:  # a bug or a bad request must not kill the server
            logger.exception("handler %s failed for %s", name, remote)
            reply, data = {"status": "error", "reason": "internal", "message": f"{type(exc).__name__}: {exc}"}, b""
        finally:
            if admitted:
                gate.release()
        return reply, data, nonce

    # -- calling ----------------------------------------------------------------------------
    async def acall(self, peer_id: str, name: str, header: dict, payload: bytes = b"",
                    max_payload_bytes: int | None = None) -> tuple[dict, bytes]:
        """Send one request and return the reply (see ``call``)."""
        key, nonce, check = self.swarm_key, None, None
        if key is not None:
            header, nonce = key.sign_request(self.run_id, name, header, payload, sender=self.peer_id, receiver=peer_id)

            def check(proof: bytes) -> None:
                key.check_continue(self.run_id, name, nonce, proof)

        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), self._handler_name(name))
        try:
            # the payload goes only after the server's go-ahead: a server that refuses the request from
            # its header (too large) answers instead, and we read its reason rather than a reset stream
            reply, data = await request(reader, writer, header, payload, expect_continue=True,
                                        max_payload_bytes=max_payload_bytes or self.max_payload_bytes,
                                        check_continue=check, continue_proof_len=PROOF_BYTES)
            self.bytes_out += len(payload)
            self.bytes_in += len(data)
            if key is not None:
                reply = key.check_reply(self.run_id, name, nonce, reply, data, sender=peer_id, receiver=self.peer_id)
            return reply, data
        finally:
            writer.close()

    def call(self, peer_id: str, name: str, header: dict, payload: bytes = b"", timeout: float = 60.0,
             max_payload_bytes: int | None = None) -> tuple[dict, bytes]:
        """Send one request to ``peer_id``'s handler ``name`` and wait for its reply.
        Raises ``TimeoutError``, ``WireError`` (``unauthenticated``: the reply is not signed with
        our swarm key) or a connection error when the peer cannot answer."""
        return self.run(asyncio.wait_for(self.acall(peer_id, name, header, payload, max_payload_bytes), timeout),
                        timeout=timeout + 5)

    # -- leaving ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.dht.shutdown()
        except Exception as exc:  # best effort: we are leaving anyway
            logger.debug("dht shutdown: %s", exc)
        # the DHT is a child process: one that did not stop (its shutdown message lost, its own
        # daemon gone) would keep the parent from exiting, so it is ended for certain
        for end in ("terminate", "kill"):
            if not self.dht.is_alive():
                break
            logger.warning("the DHT process %s did not stop; %s", self.dht.pid, end)
            getattr(self.dht, end)()
            self.dht.join(timeout=5)
        try:
            self.run(self.p2p.shutdown(), timeout=10)
        except Exception as exc:
            logger.debug("p2p shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
