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
    """

    def __init__(self, node, cfg, election: Election, service: CoordinatorService, rounds: RoundLoop,
                 tally: SubmitTally, held: Callable[[], tuple], checkpoint: Callable[[], int | None],
                 log_metric: Callable[[dict], None], *, name: str, region: str, device: str, trains: bool,
                 initial_peers: list[str] = ()):
        self.node, self.cfg, self.election, self.service = node, cfg, election, service
        self.rounds, self.tally, self.held, self.checkpoint, self.log_metric = rounds, tally, held, checkpoint, log_metric
        self.name, self.region, self.device, self.trains = name, region, device, trains
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
        last_beat = last_renew = 0.0
        while self.election.tick(0.5):
            now = time.time()
            try:
                if self.service.active:
                    if now - last_renew >= sw.lease_seconds / 3:
                        self.election.choose_standbys()
                        self.publish_log()  # the commit log's newest entries (roles/commit_log.py)
                        last_renew = now
                    self.election.role = "coordinator"
                    if self.service.mode == "sync":
                        self.update_participants(now)
                self.election.watch(now)
                self.checkpoint()
                if now - last_beat >= sw.heartbeat_seconds:
                    self.heartbeat()
                    last_beat = now
                self.election.rejoin_if_alone(self.initial_peers)  # at most once a lease period
            except Exception as exc:  # the DHT can hiccup; keep the peer alive
                logger.warning("maintenance: %s", exc)

    def publish_log(self) -> bool:
        """The newest entries of the commit log that enough standbys hold (the lease's version and
        below), under this peer's signed subkey; kept 10 minutes, so that a reader still sees the
        log of an earlier term beside the current one (a fork shows as two entries of one version)."""
        svc = self.service
        if not svc.active or svc.replication.snapshot is None:
            return False
        term, version, _, _ = svc.replication.snapshot
        entries = svc.state.log.up_to(version)
        if not entries:
            return False
        record = CommitLogRecord(peer_id=self.node.peer_id, term=term, time=time.time(), head=entries[-1].hash,
                                 entries=[LogEntryRecord(**dataclasses.asdict(e)) for e in entries])
        return self.node.records.publish_commit_log(record, ttl=600.0)

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
                            role=self.election.role, steps_per_second=float(rounds.steps_per_second),
                            inner_steps=int(rounds.inner_steps), version=int(self.held()[1]), rounds=int(rounds.rounds),
                            tokens=int(tally.tokens), loss=loss, staleness=int(tally.last_staleness),
                            accepted=int(tally.accepted), rejected=int(tally.rejected), bytes_in=int(node.bytes_in),
                            bytes_out=int(node.bytes_out), heartbeat=time.time(), maddrs=node.visible_maddrs())
        self.record = record
        node.records.publish_peer(record, ttl=4 * self.cfg.swarm.heartbeat_seconds)
        self.log_metric({"event": "heartbeat", **{k: v for k, v in record.dict().items() if k != "maddrs"}})
        return record

    def withdraw(self) -> None:
        """Leaving: overwrite the last heartbeat with role ``left``; it must outlast that one."""
        if self.record is not None:
            self.node.records.withdraw_peer(self.record, ttl=4 * self.cfg.swarm.heartbeat_seconds + 5)
