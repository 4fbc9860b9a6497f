"""Which DHT key belongs to which peer: the binding that makes a lease claim its holder's.

Anyone can write a lease record under their own DHT key (the record's owner subkey) and put any
peer id in it. A claim counts only if it is signed by the key of the peer it names
(docs/security.md, "Lease claims are bound to their holder"). ``HolderKeys`` learns each peer's
key from that peer itself: the ``state`` handler's ``meta_only`` answer carries ``record_key``,
and libp2p's secure channel proves which peer id answered.

Asking is never done on the caller's thread: ``get`` starts a request on the node's event loop
and answers None until the key is known (the lease is read every 0.5 s, so a claim is believed
one read after its holder answered). Memory and dials are bounded whatever claims are in the
DHT: at most ``max_peers`` keys, at most ``max_pending`` requests in flight, a failed request is
not repeated for ``retry_after`` seconds. A claim signed by another key never removes the key
already learned: it only makes ``HolderKeys`` ask the peer again in the background (at most every
``recheck_after`` seconds), and the old key stays valid until the answer replaces it.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import Awaitable, Callable, Optional

logger = logging.getLogger(__name__)


class HolderKeys:
    """Peer id → its DHT record key, learned from the peer itself. Thread-safe.

    :param own_id: this peer's id (its own key is known)
    :param own_key: this peer's record key (``RunRecords.owner``)
    :param ask: ``await ask(peer_id)`` → that peer's record key as bytes (raises on failure)
    :param loop: the running event loop the requests are made on (the node's)
    """

    def __init__(self, own_id: str, own_key: bytes, ask: Callable[[str], Awaitable[bytes]],
                 loop: asyncio.AbstractEventLoop, max_peers: int = 1024, max_pending: int = 32,
                 retry_after: float = 5.0, recheck_after: float = 30.0, clock: Callable[[], float] = time.time):
        self.own_id, self.own_key, self.ask, self.loop = own_id, own_key, ask, loop
        self.max_peers, self.max_pending = max_peers, max_pending
        self.retry_after, self.recheck_after, self.clock = retry_after, recheck_after, clock
        self._lock = threading.Lock()
        self._keys: OrderedDict[str, tuple[bytes, float]] = OrderedDict()  # peer id -> (key, learned at)
        self._pending: dict[str, object] = {}  # peer id -> concurrent future of its request
        self._failed: OrderedDict[str, float] = OrderedDict()  # peer id -> when its last request failed
        self._warned: OrderedDict[tuple, None] = OrderedDict()  # (peer id, owner) mismatches already logged

    # -- reading ------------------------------------------------------------------------------
    def get(self, peer_id: str) -> Optional[bytes]:
        """The key of ``peer_id`` if known; otherwise None, and a request is started (not waited for)."""
        if peer_id == self.own_id:
            return self.own_key
        with self._lock:
            self._collect(peer_id)
            entry = self._keys.get(peer_id)
            if entry is not None:
                self._keys.move_to_end(peer_id)
                return entry[0]
            self._start(peer_id)
            return None

    def get_blocking(self, peer_id: str, timeout: float) -> Optional[bytes]:
        """``get``, waiting up to ``timeout`` seconds for the answer (never on the loop's thread)."""
        deadline = self.clock() + timeout
        while True:
            key = self.get(peer_id)
            if key is not None or self.clock() >= deadline:
                return key
            with self._lock:
                future = self._pending.get(peer_id)
            if future is None:  # failed recently: no request to wait for
                return None
            try:
                future.result(max(0.0, deadline - self.clock()))
            except Exception:
                pass

    def signed_by_holder(self, owner: bytes, peer_id: str) -> bool:
        """True when ``owner`` (a record's subkey) is the key of ``peer_id``."""
        key = self.get(peer_id)
        if key is None:
            return False
        if owner == key:
            return True
        with self._lock:
            if (peer_id, owner) not in self._warned:
                self._warned[(peer_id, owner)] = None
                while len(self._warned) > 256:
                    self._warned.popitem(last=False)
                logger.warning("ignoring a lease claim naming %s signed by a key that is not that peer's", peer_id[-8:])
            learned = self._keys.get(peer_id, (None, self.clock()))[1]
            if self.clock() - learned >= self.recheck_after:  # the peer may have a new key: ask it again,
                self._start(peer_id)  # keeping the one we have until the answer replaces it
        return False

    def learn(self, peer_id: str, key: bytes) -> None:
        """A key read from the peer's own authenticated answer by the caller (e.g. a meta_only call)."""
        with self._lock:
            self._remember(peer_id, key)

    # -- under the lock ----------------------------------------------------------------------
    def _remember(self, peer_id: str, key: bytes) -> None:
        self._keys[peer_id] = (key, self.clock())
        self._keys.move_to_end(peer_id)
        self._failed.pop(peer_id, None)
        while len(self._keys) > self.max_peers:
            self._keys.popitem(last=False)

    def _collect(self, peer_id: str) -> None:
        future = self._pending.get(peer_id)
        if future is None or not future.done():
            return
        del self._pending[peer_id]
        try:
            key = future.result()
            if not isinstance(key, bytes) or not key:
                raise ValueError("no record key in the answer")
        except Exception as exc:
            logger.debug("could not learn the record key of %s: %s", peer_id[-8:], exc)
            self._failed[peer_id] = self.clock()
            self._failed.move_to_end(peer_id)
            while len(self._failed) > self.max_peers:
                self._failed.popitem(last=False)
            return
        self._remember(peer_id, key)

    def _start(self, peer_id: str) -> None:
        if peer_id in self._pending:
            return
        failed = self._failed.get(peer_id)
        if failed is not None and self.clock() - failed < self.retry_after:
            return
        if len(self._pending) >= self.max_pending:
            for pid in [p for p, f in self._pending.items() if f.done()]:  # make room: collect finished ones
                self._collect(pid)
            if len(self._pending) >= self.max_pending:
                return
        self._pending[peer_id] = asyncio.run_coroutine_threadsafe(self.ask(peer_id), self.loop)
