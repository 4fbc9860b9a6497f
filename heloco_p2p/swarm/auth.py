"""The swarm key: who may take part in a run (optional; ``--swarm-key-file``).

A swarm key is a random secret shared by the peers of a run. With one configured, a peer
authenticates every request it sends, every reply it serves and every DHT record it writes with
an HMAC-SHA256 under that secret, and refuses what does not carry a valid one. Without the key a
peer cannot submit, download the state or the run's files, replicate, hand over, or claim the
coordinator role. What is and is not protected: docs/security.md.

Requests and replies (``swarm/node.py``) carry an ``auth`` object in their JSON header::

    "auth": {"ts": 1763712000.25, "nonce": "<32 hex>", "len": 1048576, "body": "<sha256 of payload>",
             "mac": "<HMAC-SHA256 hex>"}

The MAC covers a domain tag, the direction (request, reply), the run id, the handler name, the
sender's and the receiver's peer ids, the timestamp, the nonce, the payload's length and hash,
and every other header field (canonical JSON: sorted keys, no spaces); a reply's MAC also covers
the request's nonce, so a reply cannot be replayed to another request. The receiver checks the
MAC and the length from the header *before* reading the payload, and the hash after.
A request whose timestamp is more than ``max_skew`` seconds from the receiver's clock, or whose
nonce it has seen, is refused as ``replayed``; nonces are remembered in a bounded cache (see
:class:`ReplayGuard`). Before a client sends a large payload it checks that the server's
go-ahead carries :meth:`SwarmKey.continue_proof`, so an impostor never receives the payload.

DHT records carry a ``mac`` field over their other fields, the run id, the record kind and the
owner's public key (the DHT subkey), so a record of a peer without the key, or a keyed record
copied under another owner, is ignored by keyed readers (:meth:`SwarmKey.sign_record`).

    key = generate_key_file("swarm.key")            # or: heloco-peer keygen swarm.key
    key = load_swarm_key("swarm.key")
    header = key.sign_request("demo", "submit", {"seq": 1}, payload, sender=me, receiver=them)
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import math
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from heloco_p2p.swarm.wire import WireError

logger = logging.getLogger(__name__)

KEY_BYTES = 32
MIN_KEY_BYTES = 16
DOMAIN = "heloco-p2p/auth/v1"
MAKE_KEY_HELP = ("make one with `heloco-peer keygen FILE` (or `python -c \"import secrets; "
                 "print(secrets.token_hex(32))\" > FILE`) and copy the same file to every peer of the run")
_HEX = frozenset("0123456789abcdef")


class SwarmKeyError(ValueError):
    """A swarm key file that cannot be used; the message says what to do."""


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=True).encode()


def _is_hex(s: Any, length: int) -> bool:
    return isinstance(s, str) and len(s) == length and set(s) <= _HEX


class SwarmKey:
    """A run's shared secret and the MACs made with it. Stateless: the replay cache of a server
    is a :class:`ReplayGuard` of its own.

    :param secret: at least 16 random bytes (32 from :func:`generate_key_file`)
    :param max_skew: seconds a request's timestamp may differ from the receiver's clock
    """

    def __init__(self, secret: bytes, max_skew: float = 120.0):
        if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_KEY_BYTES:
            raise SwarmKeyError(f"a swarm key needs at least {MIN_KEY_BYTES} bytes; {MAKE_KEY_HELP}")
        self._secret = bytes(secret)
        self.max_skew = max_skew

    @property
    def fingerprint(self) -> str:
        """A short public name of the key (safe to log and compare between peers)."""
        return hashlib.sha256(DOMAIN.encode() + b"/fingerprint/" + self._secret).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"SwarmKey({self.fingerprint})"

    def _mac(self, *parts: Any) -> str:
        return hmac.new(self._secret, _canonical([DOMAIN, *parts]), hashlib.sha256).hexdigest()

    # -- requests and replies ---------------------------------------------------------------------
    def _message_mac(self, direction: str, run_id: str, handler: str, sender: str, receiver: str,
                     request_nonce: str, header: dict, auth: dict) -> str:
        fields = {k: v for k, v in header.items() if k != "auth"}
        return self._mac(direction, run_id, handler, sender, receiver, request_nonce, auth["ts"], auth["nonce"],
                         auth["len"], auth["body"], fields)

    def _sign(self, direction: str, run_id: str, handler: str, header: dict, payload: bytes, sender: str,
              receiver: str, request_nonce: str) -> dict:
        # the MAC is over the header as the receiver will parse it (JSON), not over Python objects
        plain = json.loads(_canonical({k: v for k, v in header.items() if k != "auth"}))
        auth = {"ts": time.time(), "nonce": secrets.token_hex(16), "len": len(payload),
                "body": hashlib.sha256(payload).hexdigest()}
        auth["mac"] = self._message_mac(direction, run_id, handler, sender, receiver, request_nonce, plain, auth)
        return {**plain, "auth": auth}

    def sign_request(self, run_id: str, handler: str, header: dict, payload: bytes, sender: str,
                     receiver: str) -> tuple[dict, str]:
        """The header with its ``auth`` object added, and the request's nonce (to check the reply)."""
        signed = self._sign("request", run_id, handler, header, payload, sender, receiver, "")
        return signed, signed["auth"]["nonce"]

    def sign_reply(self, run_id: str, handler: str, request_nonce: str, header: dict, payload: bytes, sender: str,
                   receiver: str) -> dict:
        """A reply header with its ``auth`` object, bound to the request's nonce."""
        return self._sign("reply", run_id, handler, header, payload, sender, receiver, request_nonce)

    @staticmethod
    def _auth_fields(header: dict) -> dict | None:
        auth = header.get("auth")
        if not isinstance(auth, dict):
            return None
        ts, n = auth.get("ts"), auth.get("len")
        if not (isinstance(ts, float) and math.isfinite(ts)) or type(n) is not int or n < 0:
            return None
        if not (_is_hex(auth.get("nonce"), 32) and _is_hex(auth.get("body"), 64) and _is_hex(auth.get("mac"), 64)):
            return None
        return auth

    def check_request_head(self, run_id: str, handler: str, header: dict, payload_len: int, sender: str,
                           receiver: str, guard: "ReplayGuard", now: float | None = None) -> dict:
        """Check a request's MAC, length, timestamp and nonce from its header alone (before its
        payload is read); returns its ``auth`` object for :meth:`check_body`.

        :raises WireError: ``unauthenticated`` (no or bad MAC), ``replayed`` (old, future or seen nonce)
        """
        auth = self._auth_fields(header)
        if auth is None:
            raise WireError("unauthenticated", "this run requires the swarm key: start the peer with "
                                               "--swarm-key-file (the run's key file)")
        want = self._message_mac("request", run_id, handler, sender, receiver, "", header, auth)
        if not hmac.compare_digest(want, auth["mac"]):
            raise WireError("unauthenticated", "the request's MAC does not verify: the sender has another swarm "
                                               "key than this peer (check --swarm-key-file)")
        if auth["len"] != payload_len:
            raise WireError("unauthenticated", f"the frame carries {payload_len} payload bytes, the MAC covers "
                                               f"{auth['len']}")
        now = time.time() if now is None else now
        if abs(now - auth["ts"]) > self.max_skew:
            raise WireError("replayed", f"the request's timestamp is {now - auth['ts']:+.0f} s from this peer's "
                                        f"clock (at most {self.max_skew:.0f} s allowed): check both clocks (NTP)")
        guard.check_and_remember(auth["nonce"], auth["ts"], now)
        return auth

    @staticmethod
    def check_body(auth: dict, payload: bytes) -> None:
        """The payload read after :meth:`check_request_head` is the one its MAC covers."""
        if not hmac.compare_digest(hashlib.sha256(payload).hexdigest(), auth["body"]):
            raise WireError("unauthenticated", "the payload differs from the one the request's MAC covers")

    def check_reply(self, run_id: str, handler: str, request_nonce: str, header: dict, payload: bytes, sender: str,
                    receiver: str) -> dict:
        """The reply header without its ``auth`` object, if the reply is authentic.

        :raises WireError: ``unauthenticated`` with what the peer said, when the reply is not signed
            with this key; ``busy`` (with ``retry_after``) for an unsigned "busy" (harmless: only
            makes us retry later)
        """
        auth = self._auth_fields(header)
        plain = {k: v for k, v in header.items() if k != "auth"}
        said = f"{plain.get('status')}: {plain.get('reason', '')} {plain.get('message', '')}".strip()
        if auth is None:
            if plain.get("status") == "rejected" and plain.get("reason") == "busy":
                retry = plain.get("retry_after")
                raise WireError("busy", str(plain.get("message", "busy")),
                                retry_after=float(retry) if isinstance(retry, (int, float)) else None)
            raise WireError("unauthenticated", f"the reply carries no MAC (it said {said!r}): the peer has no swarm key "
                                               "or another one than ours")
        want = self._message_mac("reply", run_id, handler, sender, receiver, request_nonce, header, auth)
        if not hmac.compare_digest(want, auth["mac"]) or auth["len"] != len(payload):
            raise WireError("unauthenticated", f"the reply's MAC does not verify (it said {said!r}): the peer uses "
                                               "another swarm key than ours")
        self.check_body(auth, payload)
        return plain

    def continue_proof(self, run_id: str, handler: str, request_nonce: str) -> bytes:
        """32 bytes a server sends after the go-ahead byte: proof that it holds the key, so that
        a client never sends its payload to an impostor."""
        return bytes.fromhex(self._mac("continue", run_id, handler, request_nonce))

    def check_continue(self, run_id: str, handler: str, request_nonce: str, proof: bytes) -> None:
        if not hmac.compare_digest(self.continue_proof(run_id, handler, request_nonce), proof):
            raise WireError("unauthenticated", "the peer's go-ahead does not prove the swarm key: not sending "
                                               "the payload to it")

    # -- DHT records --------------------------------------------------------------------------------
    def sign_record(self, run_id: str, kind: str, owner: bytes, fields: dict) -> str:
        """The ``mac`` of a DHT record: over its fields (except ``mac``), the run, the record kind
        and the owner's subkey, so that a copy under another owner does not verify."""
        plain = {k: v for k, v in fields.items() if k != "mac"}
        return self._mac("record", run_id, kind, owner.hex(), json.loads(_canonical(plain)))

    def verify_record(self, run_id: str, kind: str, owner: bytes, fields: dict) -> bool:
        mac = fields.get("mac")
        if not _is_hex(mac, 64):
            return False
        try:
            want = self.sign_record(run_id, kind, owner, fields)
        except (TypeError, ValueError):  # not JSON-able (NaN, bytes): not ours
            return False
        return hmac.compare_digest(want, mac)


class ReplayGuard:
    """The nonces a server has accepted, for as long as their timestamps are acceptable.

    Bounded: past ``max_nonces`` the oldest are forgotten, and the guard then refuses every
    request not newer than the newest forgotten one (it could be a replay of it). Only requests
    whose MAC verified reach the guard, so a stranger cannot fill it.

    :param max_skew: the key's ``max_skew``: a nonce is kept until its timestamp is this old
    :param max_nonces: most nonces remembered
    """

    def __init__(self, max_skew: float = 120.0, max_nonces: int = 65536):
        self.max_skew, self.max_nonces = max_skew, max_nonces
        self._seen: dict[str, float] = {}
        self._order: collections.deque[tuple[float, str]] = collections.deque()
        self.floor = -math.inf  # timestamps at or below this may be replays of forgotten nonces

    def __len__(self) -> int:
        return len(self._seen)

    def check_and_remember(self, nonce: str, ts: float, now: float) -> None:
        # forget nonces whose timestamps have left the acceptance window: they cannot come back
        while self._order and self._order[0][0] < now - self.max_skew:
            _, old = self._order.popleft()
            self._seen.pop(old, None)
        if nonce in self._seen:
            raise WireError("replayed", "this request was already received (same nonce)")
        if ts <= self.floor:
            raise WireError("replayed", "the request is older than what this peer can still check for replays; "
                                        "send it again (a new nonce)")
        while len(self._seen) >= self.max_nonces:
            old_ts, old = self._order.popleft()
            self._seen.pop(old, None)
            self.floor = max(self.floor, old_ts)
        self._seen[nonce] = ts
        # Arrival order, roughly timestamp order. Whatever the order, every nonce forgotten for
        # room has a timestamp <= floor, so its replay is refused.
        self._order.append((ts, nonce))


def load_swarm_key(path: str | os.PathLike, max_skew: float = 120.0) -> SwarmKey:
    """Read a key file written by :func:`generate_key_file` (hex on the first non-empty line).

    :raises SwarmKeyError: missing, unreadable, or not a key, with what to do
    """
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="ascii")
    except FileNotFoundError:
        raise SwarmKeyError(f"swarm key file {p} does not exist; {MAKE_KEY_HELP}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SwarmKeyError(f"cannot read swarm key file {p} ({exc}); {MAKE_KEY_HELP}") from None
    line = next((ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")), "")
    try:
        secret = bytes.fromhex(line)
    except ValueError:
        raise SwarmKeyError(f"{p} is not a swarm key (expected hex, e.g. 64 hex digits); {MAKE_KEY_HELP}") from None
    if len(secret) < MIN_KEY_BYTES:
        raise SwarmKeyError(f"{p}: a swarm key needs at least {MIN_KEY_BYTES} bytes ({2 * MIN_KEY_BYTES} hex digits), "
                            f"got {len(secret)}; {MAKE_KEY_HELP}")
    try:
        mode = p.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("swarm key file %s is readable by other users; chmod 600 %s", p, p)
    except OSError:
        pass
    return SwarmKey(secret, max_skew=max_skew)


def generate_key_file(path: str | os.PathLike, overwrite: bool = False) -> SwarmKey:
    """Write a new random key (32 bytes, hex) readable only by its owner; returns it.

    :raises SwarmKeyError: the file exists and ``overwrite`` is False
    """
    p = Path(path).expanduser()
    if p.exists() and not overwrite:
        raise SwarmKeyError(f"{p} exists; a run's key must not change under its peers (pass --force to replace it)")
    secret = secrets.token_bytes(KEY_BYTES)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"# heloco-p2p swarm key: give this file to every peer of the run, and to no one else\n{secret.hex()}\n")
    os.replace(tmp, p)
    return SwarmKey(secret)
