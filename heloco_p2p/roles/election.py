"""The election, as one peer lives it: which lease it believes (THE rule, roles/lease.py), the
coordinator's lease renewal on its own thread, the standbys it recruits, and the takeover of a
lapsed lease by a standby. The ``CoordinatorService`` (roles/coordinator.py) owns the commit
state and its replication; this object decides when that service holds the role.

Threads: ``renew_loop`` runs on its own thread (the renewal never waits for anything else);
``watch`` and ``choose_standbys`` run on the peer's maintenance thread; ``refresh`` is also
called by the submit thread and, through ``CoordinatorService.verify_lease``, by handlers (one
lock serialises the reads). ``role`` and ``lease`` are written here only (one assignment each).
"""
from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
from typing import Callable

from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.shards import spread
from heloco_p2p.swarm.records import LeaseRecord, PeerRecord

logger = logging.getLogger(__name__)

# roles of peers that can hold a replica (an evaluator or a peer that left cannot)
REPLICA_ROLES = ("training", "standby", "catching_up")


class Election:
    """One peer's view of the lease and its part in the election.

    :param node: the peer's ``SwarmNode``
    :param cfg: the run config (its ``swarm`` section: lease, heartbeat, standbys)
    :param service: this peer's ``CoordinatorService``
    :param stop_event: set when the peer leaves
    :param log_metric: ``log_metric(record)`` for takeover events
    :param role: the role the peer has so far (``joining``, ``catching_up`` ...)
    """

    def __init__(self, node, cfg, service: CoordinatorService, stop_event: threading.Event,
                 log_metric: Callable[[dict], None], role: str = "joining"):
        self.node, self.cfg, self.service = node, cfg, service
        self.stop_event, self.log_metric = stop_event, log_metric
        self.role = role
        self.lease: LeaseRecord | None = None
        self.lease_seen_at = 0.0
        self.run_tokens = 0  # tokens committed in the whole run, as the lease (or a reply) last said
        # the DHT key each peer signs its records with, learned from the peer itself: a lease claim
        # counts only if signed by the peer it names (swarm/holders.py)
        self.holder_keys = lease_rules.holder_keys(node)
        self._lease_lock = threading.Lock()  # the maintenance, renewal, submit and handler threads all read the lease
        self._woke_at = -math.inf  # time.monotonic() when this process last found it had not run for a while
        self._holder_answered_since: float | None = None  # a lapsed lease whose holder still answers as coordinator
        self._recruit_failed: dict[str, float] = {}  # peer id -> when making it a standby last failed
        self._paused_since: float | None = None  # a coordinator whose lease may have lapsed, re-confirming it
        self.seen_peers: dict[str, float] = {}  # peer id -> when it was last seen alive (rejoin_if_alone)
        self._last_rejoin = -math.inf
        service.term.verify_lease = self.refresh
        service.standby.on_handover = self.took_over_by_handover
        replication = getattr(service, "replication", None)  # (test doubles of a service may have none)
        if replication is not None:
            replication.announce = self.publish  # a recruited standby counts once a claim names it

    # which live peers may hold a replica, and which first (lower rank); a sharded run sets its own
    # per shard (peer.py: a peer coordinating another shard may stand by for this one, after free peers)
    def may_stand_by(self, p: PeerRecord) -> bool:
        return p.role in REPLICA_ROLES

    def standby_rank(self, p: PeerRecord) -> int | tuple[int, ...]:
        return 0

    def replica_holders(self) -> list[PeerRecord]:
        """Live peers that could hold a replica: ``may_stand_by``, and dialable (a --client-mode
        peer is not). Their count is ``others_alive``: a coordinator with none is lone."""
        return [p for p in self.live_peers() if not p.client and self.may_stand_by(p)]

    serves = True  # False for a --client-mode peer: nobody can dial it, so it never claims the lease
    shard = 0  # a sharded run's shard index: equally ranked candidates are taken in an order rotated by it

    def refresh(self) -> LeaseRecord | None:
        """Read the lease claims from the DHT and believe one by THE rule (roles/lease.py). A later
        term believed here is the only thing that makes this peer's coordinator step down."""
        with self._lease_lock:
            claims = self.node.records.lease_claims_by_owner()
            now, svc = time.time(), self.service
            heirs = None
            if svc.active and self.lease is not None:  # a coordinator may have dropped the standby that took over
                heirs = set(self.lease.standbys) | svc.replication.heirs()
            claim = lease_rules.believe(self.lease, claims, now, self.cfg.swarm.lease_seconds,
                                        self.holder_keys.signed_by_holder, heirs)
            if claim is not None:
                if self.lease is None or claim.term != self.lease.term:
                    logger.info("coordinator: %s (term %d, version %d)", claim.peer_id[-8:], claim.term, claim.version)
                self.lease, self.lease_seen_at = claim, now
                self.run_tokens = max(self.run_tokens, claim.tokens)
                svc.term.note_term(claim.term)  # a coordinator of an earlier term steps down here
                if not svc.active:
                    svc.term.believed = (claim.peer_id, claim.term)
            if self.lease is not None:  # learn the standbys' keys before they claim, so a failover waits for no probe
                for pid in self.lease.standbys:
                    self.holder_keys.get(pid)
            return self.lease

    def wait_for_lease(self, seconds: float) -> LeaseRecord | None:
        """Read the lease until one is believed or ``seconds`` passed (none may exist: a new run)."""
        end = time.time() + seconds
        while self.refresh() is None and time.time() < end and self.node.records.lease_claims():
            time.sleep(0.25)
        return self.lease

    def publish(self) -> bool:
        """Write (renew) this coordinator's claim. Reads the last commit's snapshot, never the commit
        lock, so a slow replication cannot stop the renewal; acknowledging goes on only while the
        renewed lease surely holds (``CoordinatorService.lease_valid``)."""
        svc = self.service
        started = time.monotonic()
        term, version, digest, run_tokens = svc.replication.snapshot
        credit = self.service.state.credit_summary()
        stale = list(svc.staleness_recent)
        record = LeaseRecord(peer_id=self.node.peer_id, term=term, version=version,
                             digest=digest, standbys=svc.replication.announced(),
                             maddrs=self.node.visible_maddrs(), renewed=time.time(), commits=svc.commits_this_term,
                             tokens=run_tokens,
                             rejected=svc.rejected_this_term, commits_per_minute=svc.commits_per_minute(),
                             mean_staleness=float(sum(stale) / len(stale)) if stale else 0.0,
                             branches={str(k): int(v) for k, v in svc.branches.items()},
                             rejections=self.node.rejection_summary(), min_replicas=svc.replication.min_replicas,
                             replicas=len(svc.replication.standbys), waiting_for_standby=svc.replication.waiting_for_standby(),
                             credit={p: {k: v for k, v in c.items() if k != "region"} for p, c in credit.items()},
                             credit_regions={p: c["region"] for p, c in credit.items()})
        stored = self.node.records.publish_lease(record, ttl=self.cfg.swarm.lease_seconds)
        took = time.monotonic() - started
        if took > self.cfg.swarm.lease_seconds / 4:
            logger.warning("renewing the lease took %.1f s", took)
        if not stored:
            logger.warning("could not renew the lease in the DHT")
            return False
        if term == svc.state.term and svc.active:
            svc.term.renewed(started)
        self.lease, self.lease_seen_at = record, time.time()
        return True

    def live_peers(self) -> list[PeerRecord]:
        """Other peers whose heartbeat is fresh (3 heartbeat periods) and that have not left."""
        now, sw = time.time(), self.cfg.swarm
        live = [p for p in self.node.records.peers() if p.peer_id != self.node.peer_id and p.role != "left"
                and p.heartbeat + 3 * sw.heartbeat_seconds > now]
        for p in live:
            self.seen_peers[p.peer_id] = now
        if len(self.seen_peers) > 256:
            for old in sorted(self.seen_peers, key=self.seen_peers.get)[:-256]:
                del self.seen_peers[old]
        return live

    def rejoin_if_alone(self, initial_peers: list[str]) -> bool:
        """A peer that reads no live peer (cut off, or the others' records unreachable) pings the
        peers it knew and its initial peers, at most once a lease period, so that its DHT finds the
        swarm again once the link is back (``SwarmNode.rejoin``). True if it asked."""
        now = time.monotonic()
        if now - self._last_rejoin < self.cfg.swarm.lease_seconds or self.live_peers():
            return False
        self._last_rejoin = now
        ids = [m.rsplit("/p2p/", 1)[-1] for m in initial_peers if "/p2p/" in m] + list(self.seen_peers)
        if self.node.rejoin(ids) is None:
            return False
        logger.info("no live peer in the DHT: pinging %d known peers to find the swarm again", len(set(ids)))
        return True

    def choose_standbys(self) -> None:
        """Keep ``num_standbys`` standbys: a live training peer gets the full state, then the commits.
        A standby dropped for a failed replication is tried again only once it heartbeats after the
        drop (a frozen peer cannot), and after every peer dropped less recently (a cut one can);
        a failed recruitment counts as a drop (the same two rules) and is not repeated for a lease
        period, so a frozen peer does not block the others and a peer whose link was cut is tried
        again soon after it heals, when it may be the only candidate left."""
        svc, want = self.service, self.cfg.swarm.num_standbys
        rep = svc.replication
        live = self.replica_holders()
        rep.others_alive = len(live)
        if rep.waiting_for_standby():
            logger.warning("waiting for a standby: %d of %d hold the state; submissions are answered busy",
                           len(rep.standbys), rep.required())
        elif svc.active and not rep.standbys and rep.min_replicas > 0 and not live:
            logger.warning("no other peer is alive: commits are acknowledged with no replica")
        if len(rep.standbys) >= want:
            return
        now = time.time()
        candidates = [p for p in live if p.peer_id not in rep.standbys and p.role != "catching_up"
                      and now - self._recruit_failed.get(p.peer_id, -math.inf) > self.cfg.swarm.lease_seconds
                      and p.heartbeat > rep.dropped_at.get(p.peer_id, -math.inf)]  # alive since it was dropped
        # the least recently dropped first: a standby dropped because its link to this peer is cut
        # still heartbeats (others relay its records), and trying it first blocks the recruitment
        # of a reachable peer until the cut heals
        rank = (lambda p: (self.standby_rank(p), rep.dropped_at.get(p.peer_id, -math.inf)))
        order = spread(sorted(candidates, key=lambda p: (rank(p), p.peer_id)), rank, self.shard)
        for p in order[: want - len(rep.standbys)]:
            if not svc.active:  # stepped down meanwhile: recruit no one
                break
            try:
                self.node.run(rep.recruit(p.peer_id), timeout=None)
                logger.info("standby %s holds a replica at version %d", p.peer_id[-8:], self.service.state.version)
            except Exception as exc:
                self._recruit_failed[p.peer_id] = rep.dropped_at[p.peer_id] = time.time()
                logger.warning("could not make %s a standby: %s", p.peer_id[-8:], exc if str(exc) else type(exc).__name__)

    def renew_loop(self) -> None:
        """The coordinator's lease renewal, on its own thread so that nothing else delays it. A
        process that notices it did not run for a while (frozen, swapped out) refreshes its view
        before acting on it: as coordinator it re-confirms the lease before renewing it."""
        sw = self.cfg.swarm
        last_start = -math.inf
        in_flight: list[concurrent.futures.Future] = []
        with concurrent.futures.ThreadPoolExecutor(max_workers=3, thread_name_prefix="renew") as pool:
            while self.tick(0.25):
                tick = time.monotonic()
                in_flight = [f for f in in_flight if not f.done()]
                svc = self.service
                if not svc.active:
                    continue
                try:
                    if not svc.term.lease_valid() and not in_flight and not self._reconfirm():
                        continue
                    # a DHT store can wait for an unresponsive node's RPC timeout: renewals overlap (up to
                    # 3), and each successful one extends the lease from the moment it started
                    if svc.active and tick - last_start >= sw.lease_seconds / 3 and len(in_flight) < 3:
                        in_flight.append(pool.submit(self._publish_logged))
                        last_start = tick
                except Exception as exc:  # the DHT can hiccup; the next tick retries
                    logger.warning("lease renewal: %s", exc)

    def _publish_logged(self) -> None:
        try:
            self.publish()
        except Exception as exc:
            logger.warning("lease renewal: %s", exc)

    def tick(self, period: float) -> bool:
        """Wait ``period`` seconds (False: the peer is stopping). A wait that took much longer means
        this process did not run (frozen, swapped out): note it, so that its view is refreshed
        before it acts on the lease."""
        t0 = time.monotonic()
        if self.stop_event.wait(period):
            return False
        late = time.monotonic() - t0 - period
        if late > max(1.0, self.cfg.swarm.lease_seconds / 3):
            self._woke_at = time.monotonic()
            logger.warning("this process did not run for %.1f s; refreshing the lease before acting", late + period)
        return True

    def _reconfirm(self) -> bool:
        """The lease may have lapsed under this coordinator (it was frozen, or could not renew):
        re-read it from the DHT (stepping down on a believed later claim) and ask the heirs whether
        one of them coordinates a later term; go on only if nobody does. An heir's answer alone
        deposes no one: it only waits, for at most ``STALE_LEASES`` lease periods, for its claim."""
        svc, sw = self.service, self.cfg.swarm
        t0 = time.monotonic()
        self.refresh()
        logger.info("the lease may have lapsed: re-reading it took %.1f s", time.monotonic() - t0)
        if not svc.active:
            self.role = "training"
            return False
        if self._paused_since is None:
            self._paused_since = time.monotonic()
        if time.monotonic() - self._paused_since < lease_rules.STALE_LEASES * sw.lease_seconds:
            for pid in svc.replication.heirs():
                header = self.ask_meta(pid, timeout=min(2.0, sw.lease_seconds / 2))
                if header and header.get("coordinating") is True and isinstance(header.get("term"), int) \
                        and header["term"] > svc.state.term:
                    logger.warning("%s says it coordinates term %d; waiting for its lease claim", pid[-8:], header["term"])
                    return False
        self._paused_since = None
        return True

    def ask_meta(self, peer_id: str, timeout: float) -> dict | None:
        """A peer's ``state`` headers (what it holds, its role), or None when it does not answer."""
        try:
            header, _ = self.node.call(peer_id, "state", {"run_id": self.node.run_id, "meta_only": True}, timeout=timeout)
            return header if isinstance(header, dict) else None
        except Exception:
            return None

    def watch(self, now: float) -> None:
        """Follow the lease (a coordinator steps down in ``_refresh_lease`` on a believed later
        claim), and claim the next term as a standby when it lapsed: only from a fresh read of the
        DHT, not just after this process was frozen, and only if the holder itself does not answer
        as the live coordinator of its term (docs/protocol.md, "Election and failover")."""
        lease = self.refresh()
        svc, sw = self.service, self.cfg.swarm
        if not svc.active:
            self.role = "standby" if lease is not None and self.node.peer_id in lease.standbys else (
                "training" if self.role in ("coordinator", "standby") else self.role)
        if lease is None or svc.active:
            return
        expired_for = lease_rules.lapsed_for(lease, now, sw.lease_seconds)
        if expired_for < 0 or self.node.peer_id not in lease.standbys or not self.serves:
            self._holder_answered_since = None
            return
        rank = lease.standbys.index(self.node.peer_id)
        if expired_for < rank * sw.lease_seconds / 2 or self.service.state.version < lease.version or \
                self.service.state.engine.hollow:  # no replica loaded yet: nothing to coordinate from
            return
        if time.monotonic() - self._woke_at < sw.lease_seconds:
            return  # just woke up: the lease read may be older than the swarm; look again for a lease period
        if self._holder_still_coordinates(lease):
            return
        term = max(lease.term, svc.term.highest_seen) + 1
        svc.replication.others_alive = len(self.replica_holders())
        svc.replication.standbys = [s for s in lease.standbys if s != self.node.peer_id]
        svc.activate(term)
        self.role = "coordinator"
        self.publish()
        self.log_metric({"event": "takeover", "term": term, "version": self.service.state.version,
                         "lease_expired_for": expired_for})
        logger.warning("took over as coordinator: term %d at version %d (lease lapsed %.1fs ago)",
                       term, self.service.state.version, expired_for)

    def _holder_still_coordinates(self, lease: LeaseRecord) -> bool:
        """Ask the holder of a lapsed lease directly: a holder that answers as the coordinator of
        that term is alive and will renew (its DHT write may be late), so no one claims; but not
        for longer than ``STALE_LEASES`` lease periods, after which the swarm must go on."""
        sw = self.cfg.swarm
        header = self.ask_meta(lease.peer_id, timeout=min(2.0, sw.lease_seconds / 2))
        alive = bool(header) and header.get("coordinating") is True and header.get("term") == lease.term
        if not alive:
            self._holder_answered_since = None
            return False
        if self._holder_answered_since is None:
            self._holder_answered_since = time.monotonic()
            logger.info("the lease of term %d lapsed but its holder %s answers as coordinator; not claiming",
                        lease.term, lease.peer_id[-8:])
        return time.monotonic() - self._holder_answered_since < lease_rules.STALE_LEASES * sw.lease_seconds

    def took_over_by_handover(self, term: int) -> None:
        self.role = "coordinator"
        self.publish()
        self.log_metric({"event": "takeover", "term": term, "version": self.service.state.version, "handover": True})
        logger.warning("took over as coordinator by handover: term %d at version %d", term, self.service.state.version)
