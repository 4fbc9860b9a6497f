"""A partition for real: 3 peers, each in a network namespace of its own (heloco_p2p/tools/netns.py),
the link coordinator↔standby cut for 2 leases while the third peer reaches both, then healed.
Nothing acknowledged is lost, no version is committed twice, the swarm keeps committing in one
lineage (scripts/chaos.py runs the longer partition scenarios with the same checks)."""
import subprocess
import sys
import time
import uuid

import pytest

from heloco_p2p.tools import netns
from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

from fakes import load_script

pytestmark = pytest.mark.slow

LEASE = 6.0


def _skip_without_namespaces():
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces cannot be created here: {why}")


def test_testnet_cuts_heals_isolates_and_leaves_nothing_behind():
    _skip_without_namespaces()
    server = "import socket\ns=socket.socket();s.bind(('0.0.0.0',5555));s.listen()\nwhile True:\n c,_=s.accept();c.close()"

    def connects(net, src, dst):
        code = f"import socket;socket.create_connection(('{net.address(dst)}',5555),timeout=1.5)"
        return subprocess.run(net.exec_args(src, [sys.executable, "-c", code]), capture_output=True).returncode == 0

    with netns.NetnsTestnet(["a", "b", "c"], rates={"c": (20, 50)}) as net:
        prefix = net.prefix
        proc = subprocess.Popen(net.exec_args("b", [sys.executable, "-c", server]))
        try:
            time.sleep(1.0)
            assert connects(net, "a", "b") and connects(net, "c", "b")
            net.cut("a", "b")
            assert not connects(net, "a", "b") and connects(net, "c", "b")
            net.heal("a", "b")
            assert connects(net, "a", "b")
            net.isolate("b")
            assert not connects(net, "a", "b") and not connects(net, "c", "b")
            net.rejoin("b")
            assert connects(net, "c", "b")
            assert "tbf" in net.run("c", "tc", "qdisc", "show").stdout
        finally:
            proc.kill()
            proc.wait()
    left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    left += subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert prefix not in left


def test_cut_coordinator_standby_then_heal_loses_nothing_and_forks_nothing(tmp_path):
    _skip_without_namespaces()
    chaos = load_script("chaos")
    cfg = write_test_config(tmp_path / "cfg.yaml", lease_seconds=LEASE, num_standbys=1)
    with netns.NetnsTestnet() as net:
        sw = LocalSwarm(tmp_path, f"partition-{uuid.uuid4().hex[:8]}", netns=net)
        try:
            sw.start("a", "de", "--config", str(cfg))
            sw.start("b", "fr")
            sw.start("c", "en")
            sw.wait_until(lambda: len(sw.all_events("commit")) >= 10 and chaos.roles_now(sw, 3 * LEASE)[1], 240,
                          "10 commits and a standby")
            coordinator, standby, _ = chaos.roles_now(sw, 3 * LEASE)
            assert coordinator and standby
            cut_at = time.time()
            net.cut(coordinator, standby)
            time.sleep(2 * LEASE)
            net.heal(coordinator, standby)
            healed_at = time.time()
            sw.wait_until(lambda: len([e for e in sw.all_events("commit") if e["time"] > healed_at + 2 * LEASE]) >= 5, 120,
                          "commits after the heal")
            stop_at, last = time.time(), chaos.roles_now(sw, 3 * LEASE)[0]
            for name in sorted(sw.procs, key=lambda n: n == last):
                sw.stop(name)  # the coordinator last: its checkpoint is the final state
            events = sorted((e for n in sw.procs for e in sw.events(n)), key=lambda e: e["time"])
            history = chaos.check_history(events, chaos.newest_checkpoint(sw))
            assert history["acks"] > 10
            assert history["acked_but_lost"] == 0, history["lost_examples"]
            assert history["forks"] == [] and history["gaps"] == [] and history["submissions_committed_twice"] == 0
            assert history["ledger"]["peers_behind"] == []
            settled = [e for e in events if e["event"] == "commit" and healed_at + 2 * LEASE < e["time"] < stop_at]
            assert settled and len({e["term"] for e in settled}) == 1, "more than one lineage after the heal"
            takeovers = chaos.classify_takeovers(events, [], LEASE, until=stop_at)
            print("takeovers", takeovers, "stall", chaos.longest_stall(chaos.commit_times(events), cut_at, healed_at))
        finally:
            sw.close()
