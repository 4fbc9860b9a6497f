"""The coordinator role sharded by parameter blocks: which tensors each shard owns (pure).

HeLoCo's correction, the look-ahead dispatch point and the outer optimizers are all per
parameter tensor ("block", ALGORITHMS.md), so one commit of Δ equals S commits of its parts on S
engines that each hold a fixed subset of the blocks. ``ShardPlan`` is that subset assignment:
fixed at genesis (``swarm.shards``), recorded in the genesis record (``GenesisRecord.shards``, the
shard of each tensor in ``trainable_params`` order), and the one place that splits a list of
tensors by shard and merges parts back.

The split balances bytes: blocks are taken largest first and each goes to the shard with the
fewest bytes so far (ties: the lower shard index; equal sizes keep their tensor order), so every
shard holds at most one largest block more than the lightest. Deterministic: the plan depends on
the tensor sizes and S only. Within a shard, tensors keep their ``trainable_params`` order.

Versions: with S > 1 every shard has its own version counter. What a peer holds is then a
``tuple`` of S versions (``Peer.held``); ``scalar_version`` is the one number a budget, a
heartbeat or a log line needs (the lowest shard version: every shard has at least that many
commits). docs/protocol.md, "Sharded coordinators".
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, TypeVar

from heloco_p2p.swarm.records import MAX_SHARDS  # the DHT schema names a lease key per shard up to this many

T = TypeVar("T")


class ShardError(ValueError):
    """A plan that cannot be: S < 1, S > the number of tensors (or MAX_SHARDS), a bad assignment."""


@dataclass(frozen=True)
class ShardPlan:
    """``assignment[i]``: the shard that owns tensor ``i``; ``sizes[i]`` its bytes (fp32)."""

    assignment: tuple[int, ...]
    sizes: tuple[int, ...]

    # -- building ------------------------------------------------------------------------------
    @classmethod
    def balanced(cls, sizes: Sequence[int], shards: int) -> "ShardPlan":
        """Split tensors of ``sizes`` bytes into ``shards`` shards of about equal bytes (greedy,
        largest first; see the module docstring). Every shard gets at least one tensor.

        :raises ShardError: shards < 1, shards > len(sizes), or shards > MAX_SHARDS
        """
        n = len(sizes)
        if type(shards) is not int or shards < 1:
            raise ShardError(f"swarm.shards must be an integer >= 1, got {shards!r}")
        if shards > min(n, MAX_SHARDS):
            raise ShardError(f"swarm.shards ({shards}) exceeds the number of parameter tensors ({n})"
                             if shards > n else f"swarm.shards ({shards}) exceeds the most supported ({MAX_SHARDS})")
        load = [0] * shards
        assignment = [0] * n
        for i in sorted(range(n), key=lambda i: (-sizes[i], i)):
            k = min(range(shards), key=lambda k: (load[k], k))
            assignment[i] = k
            load[k] += sizes[i]
        return cls(tuple(assignment), tuple(int(s) for s in sizes))

    @classmethod
    def for_shapes(cls, shapes: Sequence[Sequence[int]], shards: int, bytes_per_value: int = 4) -> "ShardPlan":
        return cls.balanced([bytes_per_value * math.prod(s) for s in shapes], shards)

    @classmethod
    def from_record(cls, assignment: Sequence[int], shapes: Sequence[Sequence[int]]) -> "ShardPlan":
        """The plan a genesis record names (empty: one shard). Checked: one entry per tensor,
        shards 0..S-1 each owning at least one tensor.

        :raises ShardError: an assignment that does not fit the layout
        """
        sizes = tuple(4 * math.prod(s) for s in shapes)
        if not assignment:
            return cls((0,) * len(sizes), sizes)
        if len(assignment) != len(sizes) or not all(type(k) is int and k >= 0 for k in assignment):
            raise ShardError(f"the genesis shard plan names {len(assignment)} tensors, the model has {len(sizes)}")
        count = max(assignment) + 1
        if count > MAX_SHARDS or set(assignment) != set(range(count)):
            raise ShardError("the genesis shard plan must give every shard 0..S-1 at least one tensor")
        return cls(tuple(assignment), sizes)

    # -- reading -------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        """S, the number of shards."""
        return max(self.assignment) + 1 if self.assignment else 1

    def indices(self, shard: int) -> list[int]:
        """The tensors of ``shard``, in ``trainable_params`` order."""
        return [i for i, k in enumerate(self.assignment) if k == shard]

    def shard_bytes(self) -> list[int]:
        out = [0] * self.count
        for k, s in zip(self.assignment, self.sizes):
            out[k] += s
        return out

    def record(self) -> list[int]:
        """What the genesis record stores: the shard of each tensor, or [] for one shard (the
        record of an unsharded run stays as it was)."""
        return [] if self.count == 1 else list(self.assignment)

    # -- splitting and merging -----------------------------------------------------------------
    def split(self, items: Sequence[T]) -> list[list[T]]:
        """``items`` (one per tensor: tensors, shapes, names) as S lists, one per shard. The
        tensors themselves, not copies."""
        if len(items) != len(self.assignment):
            raise ShardError(f"expected {len(self.assignment)} items to split, got {len(items)}")
        parts: list[list[T]] = [[] for _ in range(self.count)]
        for item, k in zip(items, self.assignment):
            parts[k].append(item)
        return parts

    def part(self, items: Sequence[T], shard: int) -> list[T]:
        return [items[i] for i in self.indices(shard)]

    def merge(self, parts: Sequence[Sequence[T]]) -> list[T]:
        """The inverse of ``split``: one list in ``trainable_params`` order (the same objects)."""
        if len(parts) != self.count:
            raise ShardError(f"expected {self.count} parts to merge, got {len(parts)}")
        for k, p in enumerate(parts):
            if len(p) != len(self.indices(k)):
                raise ShardError(f"part {k} has {len(p)} items, the plan gives shard {k} {len(self.indices(k))}")
        cursors = [iter(p) for p in parts]
        return [next(cursors[k]) for k in self.assignment]


def scalar_version(version) -> int:
    """One number for a held version: itself (one shard), or the lowest of S shard versions."""
    return min(version) if isinstance(version, (tuple, list)) else int(version)
