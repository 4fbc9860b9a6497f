"""Role placement across shards (which peers stand by for which shard). The plan itself — which
tensors each shard owns, split and merge — is heloco_p2p/swarm/shard_plan.py (pure, below every
layer that uses it: the simulator too); its names are re-exported here."""
from __future__ import annotations

from heloco_p2p.swarm.shard_plan import ShardError, ShardPlan, scalar_version  # noqa: F401  (re-exported)


def standby_rank(shard_roles: dict) -> tuple[int, int]:
    """Which peers a shard recruits as standby first (lower first), from the roles a peer's record
    lists (``PeerRecord.shards``: shard → "coordinator" | "standby"): peers that coordinate no
    shard before those that do (one holder's death then costs no other shard its replica), and
    among them those standing by for the fewest shards, so that the replication of S shards is
    spread over the free peers instead of landing on one (the first by peer id took every shard's
    forwarded commits, a whole model per round on its one link)."""
    roles = list(shard_roles.values())
    return int("coordinator" in roles), sum(1 for r in roles if r == "standby")


def spread(order: list, key, shard: int) -> list:
    """``order`` (sorted by ``key``) with its first group of equal keys rotated by ``shard``: S
    shards that recruit at the same moment, from peer records that do not show each other's
    choices yet, then take different peers of that group instead of all the first one."""
    if not order or shard == 0:
        return list(order)
    first = key(order[0])
    n = next((i for i, p in enumerate(order) if key(p) != first), len(order))
    i = shard % n
    return order[i:n] + order[:i] + order[n:]
