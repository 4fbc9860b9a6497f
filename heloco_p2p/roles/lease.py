"""Which lease claim a reader believes: the one rule, as pure functions (docs/protocol.md, "Lease").

Anyone can write a lease claim under their own DHT key. A reader holding ``current`` (the lease
it believes, or None) believes a live ``claim`` when

- it is the current holder's own renewal (same term, same peer), or
- it is of a later term and its claimant is an *heir* of the current lease (a standby named in
  it; a coordinator also counts every standby it named during its term, since it may have dropped
  the one that took over while it was frozen), or the current lease has not been renewed for
  ``STALE_LEASES`` lease periods (the reader lost track: any claim may be the swarm's now), or
- the reader believes nothing yet,

and in every case only when the claim is signed by the DHT key of the peer it names (its holder;
``swarm/holders.py``). A number in a message is never a claim: terms are believed from the DHT only.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Iterable, Optional

from heloco_p2p.swarm.holders import HolderKeys
from heloco_p2p.swarm.records import LeaseRecord

STALE_LEASES = 3  # a lease not renewed for this many periods no longer decides who may follow it


def is_live(claim: LeaseRecord, now: float, lease_seconds: float) -> bool:
    """A claim counts only until its lease lapses."""
    return claim.renewed + lease_seconds > now


def lapsed_for(claim: LeaseRecord, now: float, lease_seconds: float) -> float:
    """Seconds since the claim's lease lapsed (negative while it holds)."""
    return now - (claim.renewed + lease_seconds)


def follows(current: Optional[LeaseRecord], claim: LeaseRecord, now: float, lease_seconds: float,
            heirs: Optional[Iterable[str]] = None) -> bool:
    """Whether a reader that believes ``current`` may believe ``claim`` (holder binding aside).

    :param heirs: the peers that may claim the next term; default: ``current.standbys``
    """
    if current is None:
        return True
    if claim.term == current.term:
        return claim.peer_id == current.peer_id
    if claim.term < current.term:
        return False
    allowed = set(current.standbys if heirs is None else heirs)
    return claim.peer_id in allowed or current.renewed + STALE_LEASES * lease_seconds < now


def believe(current: Optional[LeaseRecord], claims: Iterable[tuple[bytes, LeaseRecord]], now: float,
            lease_seconds: float, signed_by_holder: Callable[[bytes, str], bool],
            heirs: Optional[Iterable[str]] = None) -> Optional[LeaseRecord]:
    """The claim a reader believes among ``claims`` ((owner key, record) pairs), or None when none
    may be believed. The highest term wins; within a term, the latest renewal.

    :param signed_by_holder: ``(owner, peer_id) -> bool``: the claim's signer is the peer it names
    """
    heirs = None if heirs is None else set(heirs)
    live = [(o, c) for o, c in claims if is_live(c, now, lease_seconds)]
    for owner, claim in sorted(live, key=lambda oc: (-oc[1].term, -oc[1].renewed)):
        if follows(current, claim, now, lease_seconds, heirs) and signed_by_holder(owner, claim.peer_id):
            return claim
    return None


def holder_keys(node) -> HolderKeys:
    """The ``HolderKeys`` of a ``SwarmNode``: each peer's record key is asked from the peer itself
    (``state`` with ``meta_only`` answers ``record_key``; libp2p proves who answered). Peers and
    read-only clients (monitor, dashboard) alike."""

    async def ask(peer_id: str) -> bytes:
        header, _ = await asyncio.wait_for(node.acall(peer_id, "state", {"run_id": node.run_id, "meta_only": True}), 10)
        return bytes.fromhex(header["record_key"])

    return HolderKeys(node.peer_id, node.records.owner, ask, node.loop)
