"""A peer's presence in the swarm: its libp2p daemon, its DHT, its RPC handlers and client calls.

hivemind is the engine: ``P2P`` (a p2pd daemon: NAT traversal, relays, TLS) and ``DHT`` (a
Kademlia DHT in a child process). The P2P is created in *this* process and handed to the DHT,
so p2pd is our child, and both can be guarded (``lifetime.guard_children``) so that a killed
peer leaves nothing running. Async work runs on one event-loop thread; the training thread calls
in through ``run``.

    node = SwarmNode("demo", identity_dir="~/.heloco/peer1", initial_peers=[...])
    node.add_handler("submit", handle)                          # async (header, payload, remote) -> (header, payload)
    reply, data = node.call(peer_id, "submit", {"v": 1}, payload)
"""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Awaitable, Callable, Sequence

import hivemind
from hivemind.p2p import P2P, PeerID
from hivemind.utils.crypto import RSAPrivateKey

from heloco_p2p.swarm.records import RunRecords, make_validators
from heloco_p2p.swarm.lifetime import p2p_daemon_pid
from heloco_p2p.swarm.wire import WireError, linger_close, read_message, request, write_message

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


def load_or_create_rsa_key(path: Path) -> RSAPrivateKey:
    """The RSA key that signs this peer's DHT records, persisted so a restarted peer still owns them."""
    from cryptography.hazmat.primitives import serialization

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
    :param max_payload_bytes: cap on any incoming message body, checked before reading it
    """

    def __init__(self, run_id: str, identity_dir: str | os.PathLike | None = None,
                 initial_peers: Sequence[str] = (), host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",),
                 announce_maddrs: Sequence[str] | None = None, client_mode: bool = False,
                 max_payload_bytes: int = 1 << 30, startup_timeout: float = 60.0):
        self.run_id = run_id
        self.max_payload_bytes = max_payload_bytes
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
        self.records = RunRecords(self.dht, run_id, self.signer)
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

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def _handler_name(self, name: str) -> str:
        return f"heloco.{self.run_id}.{name}"

    # -- serving ----------------------------------------------------------------------------
    def add_handler(self, name: str, handler: Handler, max_payload_bytes: int | None = None) -> None:
        """Serve ``name``: one request message in, one reply message out. A malformed or oversized
        request is answered with ``{"status": "rejected", "reason": code, "message": ...}``."""
        limit = max_payload_bytes or self.max_payload_bytes

        async def _serve(stream_info, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            remote = str(stream_info.peer_id)
            try:
                try:
                    header, payload = await read_message(reader, max_payload_bytes=limit, writer=writer)
                    self.bytes_in += len(payload)
                    reply, data = await handler(header, payload, remote)
                except WireError as exc:
                    reply, data = {"status": "rejected", "reason": exc.code, "message": str(exc)}, b""
                except Exception as exc:  # a bug or a bad request must not kill the server
                    logger.exception("handler %s failed for %s", name, remote)
                    reply, data = {"status": "error", "reason": "internal", "message": f"{type(exc).__name__}: {exc}"}, b""
                self.bytes_out += await write_message(writer, reply, data)
            except (ConnectionError, asyncio.IncompleteReadError, OSError) as exc:
                logger.debug("stream %s from %s broke: %s", name, remote, exc)
            finally:
                await linger_close(reader, writer)

        self.run(self.p2p.add_binary_stream_handler(self._handler_name(name), _serve))

    # -- calling ----------------------------------------------------------------------------
    async def acall(self, peer_id: str, name: str, header: dict, payload: bytes = b"",
                    max_payload_bytes: int | None = None) -> tuple[dict, bytes]:
        _, reader, writer = await self.p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), self._handler_name(name))
        try:
            # the payload goes only after the server's go-ahead: a server that refuses the request from
            # its header (too large) answers instead, and we read its reason rather than a reset stream
            reply, data = await request(reader, writer, header, payload, expect_continue=True,
                                        max_payload_bytes=max_payload_bytes or self.max_payload_bytes)
            self.bytes_out += len(payload)
            self.bytes_in += len(data)
            return reply, data
        finally:
            writer.close()

    def call(self, peer_id: str, name: str, header: dict, payload: bytes = b"", timeout: float = 60.0,
             max_payload_bytes: int | None = None) -> tuple[dict, bytes]:
        """Send one request to ``peer_id``'s handler ``name`` and wait for its reply.
        Raises ``TimeoutError``, ``WireError`` or a connection error when the peer cannot answer."""
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
        try:
            self.run(self.p2p.shutdown(), timeout=10)
        except Exception as exc:
            logger.debug("p2p shutdown: %s", exc)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
