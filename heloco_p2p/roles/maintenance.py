"""A peer's maintenance thread: the periodic work beside training and serving. The election's
part of it is ``roles/election.py`` (``watch``, ``choose_standbys``); the lease itself is
renewed on its own thread (``Election.renew_loop``), so that nothing here can delay it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from typing import Callable

from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.election import Election
from heloco_p2p.roles.rounds import RoundLoop
from heloco_p2p.roles.shards import scalar_version, spread
from heloco_p2p.roles.tally import SubmitTally
from heloco_p2p.swarm.records import CommitLogRecord, LogEntryRecord, PeerRecord

logger = logging.getLogger(__name__)


class Maintenance:
    """Every half second (``Election.tick``, until the peer stops):

    - as coordinator: recruit standbys (every third of a lease period), hold the role, and in
      sync mode tell the barrier which peers it waits for (``update_participants``);
    - follow the lease (``Election.watch``: a standby claims a lapsed lease);
    - write a checkpoint when one is due (``checkpoint()``);
    - every ``swarm.heartbeat_seconds``: publish this peer's ``PeerRecord`` (``heartbeat``).

    A failure (the DHT can hiccup) is logged and the loop goes on.

    :param rounds: the peer's ``RoundLoop`` (what the heartbeat says of its rounds)
    :param tally: the peer's ``SubmitTally`` (what its submissions came to)
    :param held: ``() -> (θ, version)``: the global θ the peer holds
    :param checkpoint: ``() -> version | None``: checkpoint if due (``Checkpoints.maybe_write``)
    :param trains: whether this peer trains (a sync barrier then waits for it too)
    :param initial_peers: the multiaddrs the peer joined through (``Election.rejoin_if_alone``)
    :param shards: with ``swarm.shards`` > 1, the (election, service) of shards 1..S-1 (``election``
        and ``service`` are shard 0's): each gets the same duties, and ``place_shards`` moves the
        roles of a peer holding several shards to peers that hold none
    """

    def __init__(self, node, cfg, election: Election, service: CoordinatorService, rounds: RoundLoop,
                 tally: SubmitTally, held: Callable[[], tuple], checkpoint: Callable[[], int | None],
                 log_metric: Callable[[dict], None], *, name: str, region: str, device: str, trains: bool,
                 initial_peers: list[str] = (), shards: list[tuple[Election, CoordinatorService]] = (),
                 client: bool = False):
        self.node, self.cfg, self.election, self.service = node, cfg, election, service
        self.stacks = [(election, service), *shards]  # one (election, service) per shard
        self.rounds, self.tally, self.held, self.checkpoint, self.log_metric = rounds, tally, held, checkpoint, log_metric
        self.name, self.region, self.device, self.trains = name, region, device, trains
        self.client = client  # --client-mode: the record says so, and no coordinator recruits this peer
        self.initial_peers = list(initial_peers)  # asked again when this peer reads no live peer
        self.record: PeerRecord | None = None  # the last heartbeat published (``withdraw`` overwrites it)
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="maintenance", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def run(self) -> None:
        sw = self.cfg.swarm
        last_beat = last_placed = 0.0
        last_renew = [0.0] * len(self.stacks)
        while self.election.tick(0.5):
            now = time.time()
            try:
                for k, (election, service) in enumerate(self.stacks):
                    if service.active:
                        if now - last_renew[k] >= sw.lease_seconds / 3:
                            election.choose_standbys()
                            self.publish_log(election, service)  # the commit log's newest entries (roles/commit_log.py)
                            last_renew[k] = now
                        election.role = "coordinator"
                        if service.mode == "sync":
                            self.update_participants(now)
                    election.watch(now)
                if len(self.stacks) > 1 and now - last_placed >= sw.lease_seconds:
                    self.place_shards()
                    last_placed = now
                self.checkpoint()
                if now - last_beat >= sw.heartbeat_seconds:
                    self.heartbeat()
                    last_beat = now
                self.election.rejoin_if_alone(self.initial_peers)  # at most once a lease period
            except Exception as exc:  # the DHT can hiccup; keep the peer alive
                logger.warning("maintenance: %s", exc)

    def publish_log(self, election: Election | None = None, service: CoordinatorService | None = None) -> bool:
        """The newest entries of the commit log that enough standbys hold (the lease's version and
        below), under this peer's signed subkey; kept 10 minutes, so that a reader still sees the
        log of an earlier term beside the current one (a fork shows as two entries of one version).
        With shards: the log of ``service``'s shard, under its key (``election.node.records``)."""
        svc = service or self.service
        records = (election or self.election).node.records
        if not svc.active or svc.replication.snapshot is None:
            return False
        term, version, _, _ = svc.replication.snapshot
        entries = svc.state.log.up_to(version)
        if not entries:
            return False
        record = CommitLogRecord(peer_id=self.node.peer_id, term=term, time=time.time(), head=entries[-1].hash,
                                 entries=[LogEntryRecord(**dataclasses.asdict(e)) for e in entries])
        return records.publish_commit_log(record, ttl=600.0)

    def update_participants(self, now: float) -> None:
        """Sync mode: the barrier waits for every live training peer that has trained before."""
        sw = self.cfg.swarm
        live = {p.peer_id for p in self.node.records.peers()
                if p.role in ("training", "standby", "coordinator") and p.rounds > 0
                and p.heartbeat + 3 * sw.heartbeat_seconds > now}
        if self.trains:
            live.add(self.node.peer_id)
        self.service.barrier.participants = live
        self.node.run(self.service.barrier.check(), timeout=60)

    def heartbeat(self) -> PeerRecord:
        """Publish this peer's record (its expiry: 4 heartbeat periods) and log it."""
        node, rounds, tally = self.node, self.rounds, self.tally
        loss = float(rounds.last_loss) if math.isfinite(rounds.last_loss) else -1.0
        record = PeerRecord(peer_id=node.peer_id, name=self.name, region=self.region, device=self.device,
                            role=self.role(), steps_per_second=float(rounds.steps_per_second),
                            inner_steps=int(rounds.inner_steps), version=scalar_version(self.held()[1]),
                            rounds=int(rounds.rounds),
                            tokens=int(tally.tokens), loss=loss, staleness=int(tally.last_staleness),
                            accepted=int(tally.accepted), rejected=int(tally.rejected), bytes_in=int(node.bytes_in),
                            bytes_out=int(node.bytes_out), heartbeat=time.time(), maddrs=node.visible_maddrs(),
                            shards=self.shard_roles(), client=self.client)
        self.record = record
        node.records.publish_peer(record, ttl=4 * self.cfg.swarm.heartbeat_seconds)
        self.log_metric({"event": "heartbeat", **{k: v for k, v in record.dict().items() if k != "maddrs"}})
        return record

    def role(self) -> str:
        """The role the heartbeat publishes: with shards, coordinator of any, else standby of any."""
        if len(self.stacks) == 1:
            return self.election.role
        roles = [e.role for e, _ in self.stacks]
        return next((r for r in ("coordinator", "standby") if r in roles), roles[0])

    def shard_roles(self) -> dict[str, str]:
        """Shard -> this peer's role there, for the shards it coordinates or stands by for (S > 1)."""
        if len(self.stacks) == 1:
            return {}
        return {str(k): e.role for k, (e, _) in enumerate(self.stacks) if e.role in ("coordinator", "standby")}

    def place_shards(self) -> str | None:
        """A peer coordinating several shards hands one of them (the highest) to a standby of it
        that coordinates no shard and is alive: no peer holds two shard roles while another peer
        could hold one (docs/protocol.md, "Sharded coordinators"). At most one handover a call;
        returns the heir, or None. The handover is the leaving coordinator's (``hand_over``).
        And each shard this peer coordinates swaps a standby that coordinates another shard for a
        free peer (``free_standbys``), so that one holder's death costs no other shard its replica."""
        for election, service in self.stacks:
            if service.active:
                self.free_standbys(election, service)
        held = [k for k, (_, s) in enumerate(self.stacks) if s.active]
        if len(held) < 2:
            return None
        election, service = self.stacks[held[-1]]
        holders = {p.peer_id for p in election.live_peers() if "coordinator" in p.shards.values()}
        live = {p.peer_id for p in election.live_peers()}
        free = [s for s in service.replication.standbys if s in live and s not in holders]
        if not free:
            return None
        rep = service.replication
        rep.standbys = free[:1] + [s for s in rep.standbys if s != free[0]]  # the free one is asked first
        heir = self.node.run(rep.hand_over(), timeout=30)
        logger.info("shard %d handed to %s: this peer holds %d shards", held[-1], (heir or "nobody")[-8:], len(held))
        if heir is None:  # nobody took it: coordinate on (the lease is still this peer's)
            service.term.active = True
        else:
            election.role = "training"
        return heir

    def free_standbys(self, election: Election, service: CoordinatorService) -> str | None:
        """One standby of ``service``'s shard that coordinates another shard is replaced by a live
        peer that coordinates none (recruited first, so the shard never has fewer replicas);
        returns the peer recruited, or None."""
        live = election.live_peers()
        holders = {p.peer_id for p in live if "coordinator" in p.shards.values()}
        rep = service.replication
        stacked = [s for s in rep.standbys if s in holders]
        # the free peer standing by for the fewest shards first (roles/shards.py standby_rank): every
        # shard swapping to the same first free peer put all S shards' forwarded commits on its link
        free = [p for p in sorted(live, key=lambda p: (election.standby_rank(p), p.peer_id))
                if p.peer_id not in rep.standbys and p.peer_id not in holders
                and p.role in ("training", "standby") and election.may_stand_by(p)]
        # shards swapping at the same moment (their records not yet showing each other's choice) take
        # different peers of the best-ranked group
        free = [p.peer_id for p in spread(free, election.standby_rank, getattr(election, "shard", 0))]
        if not stacked or not free:
            return None

        async def swap():
            await rep.recruit(free[0])
            async with rep.lock:
                if free[0] in rep.standbys and stacked[0] in rep.standbys:
                    rep.standbys.remove(stacked[0])  # still an heir of this term (it held every commit so far)
                    return free[0]
            return None

        try:
            taken = self.node.run(swap(), timeout=None)
        except Exception as exc:
            logger.warning("could not swap standby %s for %s: %s", stacked[0][-8:], free[0][-8:], exc)
            return None
        if taken:
            logger.info("standby %s (it coordinates another shard) replaced by %s", stacked[0][-8:], taken[-8:])
        return taken

    def withdraw(self) -> None:
        """Leaving: overwrite the last heartbeat with role ``left``; it must outlast that one."""
        if self.record is not None:
            self.node.records.withdraw_peer(self.record, ttl=4 * self.cfg.swarm.heartbeat_seconds + 5)
