"""One node serving S shard coordinators: the ``shard`` field of the wire, on both sides.

With ``swarm.shards`` > 1 a peer runs the one-coordinator roles once per shard (a
``CoordinatorService``, ``Election``, ``SubmitClient`` and ``StateServer`` each, over that shard's
tensors). Each of them is given a ``ShardNode``: the peer's ``SwarmNode`` as seen by one shard.

- Requests it sends (``call``/``acall``: submit, replicate, handover, state) carry
  ``"shard": k`` in their header (shard 0 leaves it out: an unsharded run's wire is unchanged).
- Handlers it registers (``add_handler``) go into a ``ShardRouter``, which serves each name once
  on the real node and hands a request to the handler of the shard its header names (absent: 0;
  another value, or a shard this peer does not serve: ``unknown_shard``). The field is removed
  before the handler sees the header, so the role code is the one-coordinator code, unchanged.
- ``records`` are the run's records with that shard's lease and commit-log keys
  (``RunRecords.for_shard``).

Everything else is the node itself. Not used at all when S = 1.
"""
from __future__ import annotations

from heloco_p2p.roles import messages
from heloco_p2p.swarm.records import MAX_SHARDS


def shard_of(header: dict) -> int | None:
    """The shard a request names (absent: 0), or None when the field is not a shard index."""
    shard = header.get("shard", 0)
    return shard if type(shard) is int and 0 <= shard < MAX_SHARDS else None


class ShardRouter:
    """Serves each handler name once on ``node`` and routes requests by their ``shard`` field.

    The node's gate (payload limit, in-flight limit, rate) is shared by the shards of a name:
    its payload limit is the largest any shard asked for, its in-flight limit the sum (each shard
    keeps the room it would have alone); the per-peer rate is the first shard's."""

    def __init__(self, node):
        self.node = node
        self.handlers: dict[str, dict[int, object]] = {}
        self.gates: dict[str, object] = {}

    def add(self, name: str, shard: int, handler, limits=None, max_payload_bytes: int | None = None):
        table = self.handlers.get(name)
        if table is None:
            table = self.handlers[name] = {}

            async def route(header: dict, payload: bytes, remote: str, _name=name):
                k = shard_of(header)
                served = self.handlers[_name].get(k) if k is not None else None
                if served is None:
                    return messages.rejected("unknown_shard", f"this peer serves {_name} for shards "
                                                              f"{sorted(self.handlers[_name])}, not {str(header.get('shard'))[:20]}")
                header = {key: v for key, v in header.items() if key != "shard"}
                return await served(header, payload, remote)

            kwargs = {"limits": limits} if limits is not None else {}
            if max_payload_bytes is not None:
                kwargs["max_payload_bytes"] = max_payload_bytes
            self.gates[name] = self.node.add_handler(name, route, **kwargs)
        else:
            gate = self.gates[name]
            wanted = max_payload_bytes or (limits.max_payload_bytes if limits is not None else None)
            current = getattr(getattr(gate, "limits", None), "max_payload_bytes", None)
            if wanted and current is not None and wanted > current:
                gate.limits.max_payload_bytes = wanted
            if limits is not None and hasattr(gate, "max_inflight"):
                gate.max_inflight += limits.max_inflight
        table[shard] = handler
        return self.gates[name]


class ShardNode:
    """The peer's node as shard ``shard``'s roles see it (module docstring)."""

    def __init__(self, node, router: ShardRouter, shard: int):
        self._node, self.router, self.shard = node, router, shard
        records = getattr(node, "records", None)
        self.records = records.for_shard(shard) if records is not None else None

    def __getattr__(self, name):
        return getattr(self._node, name)

    def _tag(self, header: dict) -> dict:
        return header if self.shard == 0 else {**header, "shard": self.shard}

    def add_handler(self, name: str, handler, max_payload_bytes: int | None = None, limits=None):
        return self.router.add(name, self.shard, handler, limits=limits, max_payload_bytes=max_payload_bytes)

    async def acall(self, peer_id: str, name: str, header: dict, payload: bytes = b"", **kwargs):
        return await self._node.acall(peer_id, name, self._tag(header), payload, **kwargs)

    def call(self, peer_id: str, name: str, header: dict, payload: bytes = b"", timeout: float = 60.0, **kwargs):
        return self._node.call(peer_id, name, self._tag(header), payload, timeout=timeout, **kwargs)
