"""Frozen peers in a real swarm (SIGSTOP of a peer's whole process group, then SIGCONT): a frozen
standby stalls the swarm for a bounded time and deposes no one when it wakes; a coordinator
frozen past its lease is replaced and steps down when it wakes; nothing acknowledged is lost and
no version is committed twice (scripts/chaos.py checks the history the same way, at length)."""
import time
import uuid

import pytest

from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

from fakes import load_script

pytestmark = pytest.mark.slow

LEASE = 6.0


def _role(sw, name):
    beats = sw.events(name, "heartbeat")
    return beats[-1]["role"] if beats else None


def commit_times(sw, since, until=float("inf")):
    return sorted(e["time"] for e in sw.all_events("commit") if since <= e["time"] <= until)


def _longest_gap(times, start, end):
    marks = [start] + [t for t in times if start <= t <= end] + [end]
    return max(b - a for a, b in zip(marks, marks[1:]))


def test_frozen_standby_and_frozen_coordinator_lose_nothing_and_fork_nothing(tmp_path):
    chaos = load_script("chaos")
    cfg = write_test_config(tmp_path / "cfg.yaml", lease_seconds=LEASE, num_standbys=1)
    sw = LocalSwarm(tmp_path, f"freeze-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.start("c", "en")
        sw.wait_until(lambda: len(sw.events("a", "commit")) >= 10 and any(_role(sw, n) == "standby" for n in "bc"),
                      240, "10 commits and a standby")
        standby = next(n for n in "bc" if _role(sw, n) == "standby")

        # 1. the standby frozen for 2.5 leases: the coordinator drops it, recruits the other peer and
        #    goes on; on waking, the standby takes nothing over
        frozen_at = time.time()
        sw.freeze(standby)
        time.sleep(2.5 * LEASE)
        sw.thaw(standby)
        thawed_at = time.time()
        sw.wait_until(lambda: len(commit_times(sw, thawed_at + LEASE)) >= 3, 120, "commits after the standby woke")
        assert sw.all_events("takeover") == [], "a standby that woke up took over from a live coordinator"
        stall = _longest_gap(commit_times(sw, frozen_at), frozen_at, thawed_at + LEASE)
        assert stall < 2 * LEASE, f"no commit for {stall:.1f} s while the standby was frozen"

        # 2. the coordinator frozen for 4 leases: its standby takes over; on waking it steps down
        frozen_at = time.time()
        sw.freeze("a")
        time.sleep(4 * LEASE)
        sw.thaw("a")
        thawed_at = time.time()
        took = sw.all_events("takeover")
        assert took and all(frozen_at < t["time"] < thawed_at for t in took), took
        heir = took[0]["name"]
        sw.wait_until(lambda: len([e for e in sw.events(heir, "commit") if e["time"] > thawed_at + LEASE]) >= 3, 120,
                      "commits under the heir after the old coordinator woke")
        late = [e for e in sw.events("a", "commit") if e["time"] > thawed_at]
        assert late == [], f"the woken coordinator kept committing: {late[:3]}"

        for name in sorted(sw.procs, key=lambda n: n == heir):  # the heir last: its checkpoint is final
            sw.stop(name)
        events = sorted((e for n in sw.procs for e in sw.events(n)), key=lambda e: e["time"])
        history = chaos.check_history(events, tmp_path / f"ckpt-{heir}")
        assert history["acks"] > 10
        assert history["acked_but_lost"] == 0, history["lost_examples"]
        assert history["forks"] == [] and history["gaps"] == [] and history["submissions_committed_twice"] == 0
        assert history["ledger"]["peers_behind"] == []
    finally:
        sw.close()
