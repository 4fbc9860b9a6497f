"""``heloco-peer monitor``: the swarm as its DHT records describe it.

The snapshot is a pure function of records (tested on hand-made ones); one real two-peer swarm
checks that the command finds both peers and the coordinator through one address.
"""
import json
import subprocess
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from heloco_p2p.cli import main
from heloco_p2p.swarm.lifetime import kill_group
from heloco_p2p.swarm.records import LeaseRecord, PeerRecord
from heloco_p2p.tools.launcher import ROOT, LocalSwarm, write_test_config
from heloco_p2p.tools.monitor import (
    COORDINATOR_KEYS,
    NARROWING,
    PEER_KEYS,
    Monitor,
    live_coordinator,
    observe_staleness,
    reachability,
    render,
    snapshot,
)

NOW = 1_800_000_000.0


def peer(name: str, **fields) -> PeerRecord:
    record = dict(peer_id=f"Qm{name}", name=name, region="de", device="cpu", role="training", steps_per_second=5.0,
                  inner_steps=50, version=10, rounds=4, tokens=4096, loss=5.5, staleness=2, accepted=4, rejected=0,
                  bytes_in=100, bytes_out=200, heartbeat=NOW - 1.0, maddrs=["/ip4/127.0.0.1/tcp/1"])
    return PeerRecord(**{**record, **fields})


def claim(holder: str, term: int, renewed: float = NOW - 1.0, **fields) -> LeaseRecord:
    record = dict(peer_id=f"Qm{holder}", term=term, version=10 * term, digest="d", standbys=["Qmb"], maddrs=[],
                  renewed=renewed, commits=3, rejected=0, commits_per_minute=6.0, mean_staleness=1.0, branches={})
    return LeaseRecord(**{**record, **fields})


# ---------------------------------------------------------------------------- the pure snapshot
def test_snapshot_json_has_exactly_the_documented_keys():
    snap = snapshot([peer("a"), peer("b")], [claim("a", 1)], NOW)
    assert set(snap) == {"coordinator", "peers", "credit", "validation", "commit_log"}
    assert tuple(snap["coordinator"]) == COORDINATOR_KEYS == ("peer_id", "term", "version", "commits_per_min", "standbys",
                                                             "min_replicas", "replicas", "waiting_for_standby")
    assert all(tuple(p) == PEER_KEYS for p in snap["peers"])
    assert set(PEER_KEYS) == {"peer_id", "name", "region", "role", "device", "speed", "inner_steps", "staleness_last",
                              "staleness_mean", "tokens", "last_loss", "bytes_in", "bytes_out", "last_seen", "alive",
                              "rejected", "reachability", "client"}
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap
    a = snap["peers"][0]
    assert (a["name"], a["speed"], a["inner_steps"], a["tokens"], a["last_loss"], a["bytes_in"], a["bytes_out"],
            a["last_seen"]) == ("a", 5.0, 50, 4096, 5.5, 100, 200, NOW - 1.0)


def test_refusals_per_peer_come_from_the_lease_and_the_peer_record():
    lease = claim("a", 1, rejections={"Qmb": {"rate_limited": 2, "too_stale": 1}})
    snap = snapshot([peer("a"), peer("b", rejected=1), peer("c", rejected=4)], [lease], NOW)
    rows = {p["name"]: p for p in snap["peers"]}
    assert rows["b"]["rejected"] == {"total": 3, "rate_limited": 2, "too_stale": 1}
    assert rows["c"]["rejected"] == {"total": 4} and rows["a"]["rejected"] == {"total": 0}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(snap, "demo", NOW))
    assert "3 (rate_limited 2, too_stale 1)" in console.export_text()


def test_peers_are_alive_silent_or_left():
    records = [peer("fresh", heartbeat=NOW - 9.0), peer("silent", heartbeat=NOW - 11.0),
               peer("left", role="left", heartbeat=NOW)]
    rows = {p["name"]: p for p in snapshot(records, [], NOW, silent_after=10.0)["peers"]}
    assert rows["fresh"]["alive"] and rows["fresh"]["role"] == "training"
    assert not rows["silent"]["alive"] and rows["silent"]["role"] == "training"
    assert not rows["left"]["alive"] and rows["left"]["role"] == "left"


def test_a_peer_whose_record_left_the_dht_is_not_alive():
    rows = snapshot([peer("a"), peer("gone")], [], NOW, absent=["Qmgone"])["peers"]
    assert [(p["name"], p["alive"]) for p in rows] == [("a", True), ("gone", False)]


def test_latest_heartbeat_of_a_peer_wins():
    rows = snapshot([peer("a", tokens=1, heartbeat=NOW - 5), peer("a", tokens=2, heartbeat=NOW - 2)], [], NOW)["peers"]
    assert [p["tokens"] for p in rows] == [2]


def test_coordinator_is_the_highest_live_term():
    claims = [claim("a", 1), claim("b", 3, renewed=NOW - 11.0), claim("c", 2, standbys=["Qma"])]
    c = snapshot([], claims, NOW, lease_seconds=10.0)["coordinator"]
    assert c == {"peer_id": "Qmc", "term": 2, "version": 20, "commits_per_min": 6.0, "standbys": ["Qma"],
                 "min_replicas": 0, "replicas": 0, "waiting_for_standby": False}
    # equal terms: the most recently renewed claim
    assert live_coordinator([claim("a", 2, renewed=NOW - 3), claim("b", 2, renewed=NOW - 1)], NOW, 10.0).peer_id == "Qmb"


def test_no_live_lease_means_no_coordinator():
    assert snapshot([peer("a")], [claim("a", 4, renewed=NOW - 10.5)], NOW, lease_seconds=10.0)["coordinator"] is None
    assert snapshot([peer("a")], [], NOW)["coordinator"] is None


def test_staleness_mean_is_over_the_submissions_seen_and_equals_last_once():
    once = snapshot([peer("a", staleness=3)], [], NOW)["peers"][0]
    assert once["staleness_last"] == once["staleness_mean"] == 3
    history = {}
    for accepted, staleness in [(1, 0), (1, 0), (2, 4), (5, 2)]:  # the repeated read counts once
        history = observe_staleness(history, [peer("a", accepted=accepted, staleness=staleness)])
    row = snapshot([peer("a", accepted=5, staleness=2)], [], NOW, staleness_history=history)["peers"][0]
    assert row["staleness_last"] == 2 and row["staleness_mean"] == pytest.approx(2.0)


def test_before_its_first_submission_a_peer_has_no_staleness_and_no_loss():
    row = snapshot([peer("new", accepted=0, staleness=0, loss=-1.0)], [], NOW)["peers"][0]
    assert row["staleness_last"] is None and row["staleness_mean"] is None and row["last_loss"] is None


def test_the_table_shows_each_peer_its_state_and_the_coordinator():
    from rich.console import Console

    snap = snapshot([peer("a", role="coordinator"), peer("b", heartbeat=NOW - 60), peer("c", role="left"),
                     peer("d", accepted=0, loss=-1.0)], [claim("a", 2, standbys=["Qmd"])], NOW)
    console = Console(record=True, width=100)
    console.print(render(snap, "demo", NOW))
    text = console.export_text()
    assert "coordinator a  term 2  version 20  6.0 commits/min  standbys: d" in text
    assert "2 of 4 peers alive" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.split() and line.split()[0] in "abcd"}
    assert rows["a"][2] == "coordinator" and rows["b"][2] == "silent" and rows["c"][2] == "left"
    assert rows["d"][6] == "-" and rows["a"][6] == "2/2.0"
    console.print(render(snapshot([], [], NOW), "demo", NOW))
    assert "coordinator: none" in console.export_text()


def table_lines(snap: dict, width: int) -> list[str]:
    from rich.console import Console

    console = Console(record=True, width=width)
    console.print(render(snap, "demo", NOW))
    return console.export_text().splitlines()


def test_the_table_fits_the_terminal_by_dropping_columns_not_cutting_cells():
    lease = claim("madrid", 3, rejections={"Qmmadrid": {"rate_limited": 2, "too_stale": 1}})
    snap = snapshot([peer("madrid", region="es", role="standby", tokens=123456, loss=5.4321),
                     peer("paris", region="fr", role="coordinator")], [lease], NOW)
    wide = table_lines(snap, 200)
    header = next(line for line in wide if line.split()[:1] == ["peer"])
    assert header.split() == ["peer", "reg", "role", "dev", "st/s", "H", "stale", "tokens", "loss", "rej", "in/out",
                              "seen", "net"]
    for width in (80, 60, 40):
        lines = table_lines(snap, width)
        row = next(line for line in lines if line.split()[:1] == ["madrid"])
        assert "…" not in row and len(row.rstrip()) <= width  # no cell is cut; whole columns went instead
        assert "123.5k" in row  # tokens are never dropped
        header = next(line for line in lines if line.split()[:1] == ["peer"])
        assert header.split()[0] == "peer" and "tokens" in header
        assert "not shown, to fit: " in " ".join(" ".join(lines).split())
    at80 = next(line for line in table_lines(snap, 80) if line.split()[:1] == ["madrid"]).split()
    assert at80[:3] == ["madrid", "es", "standby"] and "5.432" in at80
    at40 = next(line for line in table_lines(snap, 40) if line.split()[:1] == ["madrid"]).split()
    assert at40[:2] == ["madrid", "stby"]  # the role is abbreviated and the region dropped before the loss
    # the narrowing order is a list of known columns, each dropped at most once
    drops = [col for action, col in NARROWING if action == "drop"]
    assert len(drops) == len(set(drops)) and {"peer", "role", "tokens"}.isdisjoint(drops)


def test_reachability_comes_from_the_announced_addresses():
    assert reachability(["/ip4/1.2.3.4/tcp/1/p2p/QmA"]) == "direct"
    assert reachability(["/ip4/1.2.3.4/tcp/1/p2p/QmR/p2p-circuit/p2p/QmA"]) == "relayed"
    assert reachability([]) == "none"
    assert snapshot([peer("a", maddrs=[])], [], NOW)["peers"][0]["reachability"] == "none"


def test_a_client_mode_peer_is_marked_client_and_the_others_are_not():
    rows = {p["name"]: p for p in snapshot([peer("a"), peer("phone", client=True, maddrs=[])], [], NOW)["peers"]}
    assert rows["phone"]["client"] is True and rows["phone"]["reachability"] == "none"
    assert rows["a"]["client"] is False and rows["a"]["reachability"] == "direct"
    assert all(tuple(p) == PEER_KEYS for p in rows.values())


class FakeRecords:
    def __init__(self):
        self.peer_records, self.claims = [], []

    def peers(self):
        return list(self.peer_records)

    def lease_claims(self):
        return list(self.claims)


@pytest.mark.slow
def test_monitor_keeps_peers_whose_records_expired_as_not_alive():
    records = FakeRecords()
    mon = Monitor(records, silent_after=10.0, forget_after=60.0)
    records.peer_records = [peer("a"), peer("b")]
    assert [p["alive"] for p in mon.poll(now=NOW)["peers"]] == [True, True]
    records.peer_records = [peer("a", heartbeat=NOW + 1)]
    assert [(p["name"], p["alive"]) for p in mon.poll(now=NOW + 2)["peers"]] == [("a", True), ("b", False)]
    records.peer_records = [peer("a", heartbeat=NOW + 100)]
    assert [p["name"] for p in mon.poll(now=NOW + 100)["peers"]] == ["a"]  # forgotten after forget_after


# ---------------------------------------------------------------------------- the command
def run_monitor(tmp_path, *args: str, timeout: float = 90) -> tuple[int, str, str]:
    """Run ``heloco-peer monitor`` as its own process. Output goes to files: a grandchild
    (torch_shm_manager) keeps pipes open for seconds after the monitor exits."""
    tag = uuid.uuid4().hex[:6]
    out, err = tmp_path / f"monitor-{tag}.out", tmp_path / f"monitor-{tag}.err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, "-m", "heloco_p2p", "monitor", *args], stdout=o, stderr=e, cwd=ROOT,
                                start_new_session=True)
        try:
            code = proc.wait(timeout)
        finally:
            kill_group(proc.pid)  # whatever it left (nothing, normally)
    return code, out.read_text(), err.read_text()


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    """Two peers of one run, each with at least one accepted submission."""
    tmp = tmp_path_factory.mktemp("monitor-swarm")
    cfg = write_test_config(tmp / "cfg.yaml")
    sw = LocalSwarm(tmp, f"mon-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.wait_until(lambda: sw.events("a", "ack") and sw.events("b", "ack"), 180, "both peers' first acknowledgement")
        yield sw
    finally:
        sw.close()


@pytest.mark.slow
def test_monitor_once_json_shows_both_peers_and_the_coordinator(swarm, tmp_path):
    code, out, err = run_monitor(tmp_path, "--run-id", swarm.run_id, "--initial-peers", swarm.maddr, "--once", "--json",
                                 "--log-level", "WARNING")
    assert code == 0, err
    snap = json.loads(out)
    assert set(snap) == {"coordinator", "peers", "credit", "validation", "commit_log"}
    rows = {p["name"]: p for p in snap["peers"]}
    assert set(rows) == {"a", "b"}
    assert all(p["alive"] and tuple(p) == PEER_KEYS for p in rows.values())
    assert rows["a"]["region"] == "de" and rows["b"]["region"] == "fr"
    assert all(p["tokens"] > 0 and p["speed"] > 0 and p["inner_steps"] == 10 for p in rows.values())
    assert all(p["staleness_mean"] == p["staleness_last"] for p in rows.values())
    c = snap["coordinator"]
    assert c["term"] >= 1 and c["version"] >= 1
    assert c["peer_id"] in {rows["a"]["peer_id"], rows["b"]["peer_id"]}
    assert time.time() - min(p["last_seen"] for p in rows.values()) < 30


@pytest.mark.slow
def test_monitor_says_when_the_run_is_not_found(swarm, tmp_path):
    code, out, err = run_monitor(tmp_path, "--run-id", "no-such-run", "--initial-peers", swarm.maddr, "--once",
                                 "--timeout", "1", "--log-level", "WARNING")
    assert code == 2 and out == ""
    assert "no run 'no-such-run' found" in err and "--run-id" in err


@pytest.mark.slow
def test_monitor_says_when_no_peer_answers():
    dead = "/ip4/127.0.0.1/tcp/9/p2p/QmYGQ8u9QGd9jVtGDz4AVz16ubyECCp7yYZztcy3bse6u9"  # nothing listens on port 9
    result = CliRunner().invoke(main, ["monitor", "--run-id", "x", "--initial-peers", dead, "--once", "--json",
                                       "--log-level", "WARNING"])
    assert result.exit_code == 2 and result.stdout == ""
    assert f"no peer answered at {dead}" in result.stderr and "firewalls/NAT" in result.stderr


@pytest.mark.slow
def test_monitor_says_when_the_address_is_not_a_multiaddr():
    result = CliRunner().invoke(main, ["monitor", "--run-id", "x", "--initial-peers", "127.0.0.1:31337", "--once",
                                       "--log-level", "WARNING"])
    assert result.exit_code == 2
    assert "not a valid peer address: 127.0.0.1:31337" in result.stderr


# ---------------------------------------------------------------------------- credit and validation
def test_credit_from_the_lease_is_shown_per_peer_and_summed_per_region():
    credit = {"Qma": {"commits": 3.0, "tokens": 600.0, "share": 0.75, "cosine_mean": 0.4, "kept": 0.5, "rotated": 0.25,
                      "shrunk": 0.25, "norm_ratio": 0.9},
              "Qmb": {"commits": 1.0, "tokens": 200.0, "share": 0.25, "cosine_mean": -0.2, "kept": 0.0, "rotated": 0.0,
                      "shrunk": 1.0, "norm_ratio": 0.5}}
    lease = claim("a", 1, credit=credit, credit_regions={"Qma": "de", "Qmb": "de"},
                  rejections={"Qmb": {"norm_too_large": 2}})
    snap = snapshot([peer("a"), peer("b")], [lease], NOW)
    a, b = snap["credit"]["peers"]["Qma"], snap["credit"]["peers"]["Qmb"]
    assert (a["name"], a["commits"], a["tokens"], a["share"], a["rejected"]) == ("a", 3, 600, 0.75, 0)
    assert (b["rejected"], b["shrunk"], b["cosine_mean"]) == (2, 1.0, -0.2)
    assert snap["credit"]["regions"] == {"de": {"peers": 2, "commits": 4, "tokens": 800, "share": 1.0, "rejected": 2}}


def test_validation_is_the_newest_evaluator_record_with_its_history():
    from heloco_p2p.swarm.records import EvalRecord

    old = EvalRecord(peer_id="Qme1", name="e1", version=3, time=NOW - 100, mean=7.0, losses={"de": 7.0})
    new = EvalRecord(peer_id="Qme2", name="e2", version=9, time=NOW - 5, mean=6.0, losses={"de": 5.5, "ru": 6.5},
                     history_versions=[4, 9], history_times=[NOW - 65, NOW - 5], history_means=[6.5, 6.0],
                     history_losses=[{"de": 6.0, "ru": 7.0}, {"de": 5.5, "ru": 6.5}])
    v = snapshot([], [], NOW, evals=[old, new])["validation"]
    assert (v["evaluator"], v["version"], v["mean"], v["per_language"]) == ("Qme2", 9, 6.0, {"de": 5.5, "ru": 6.5})
    assert [h["version"] for h in v["history"]] == [4, 9] and v["history"][0]["per_language"]["ru"] == 7.0
    assert snapshot([], [], NOW)["validation"] is None


def test_monitor_believes_only_claims_bound_to_their_holder():
    class Records:
        def peers(self):
            return []

        def lease_claims_by_owner(self):
            return [(b"Qmz", claim("z", 9)), (b"Qma", claim("a", 1))]  # z's claim signed by z; a forged one names... a

    class Keys:
        def signed_by_holder(self, owner, peer_id):
            return owner == peer_id.encode()

        def get(self, peer_id):
            return None

    class Forged(Records):
        def lease_claims_by_owner(self):
            return [(b"Qmx", claim("z", 9)), (b"Qma", claim("a", 1))]  # a claim of term 9 signed by someone else

    assert Monitor(Records(), lease_seconds=10.0, holder_keys=Keys()).poll(NOW)["coordinator"]["peer_id"] == "Qmz"
    assert Monitor(Forged(), lease_seconds=10.0, holder_keys=Keys()).poll(NOW)["coordinator"]["peer_id"] == "Qma"


class ShardedRecords(FakeRecords):
    """Records of a 2-shard run: shard 1's lease claims under its own key (``for_shard``)."""

    def __init__(self, shard_claims: dict):
        super().__init__()
        self.shard_claims = shard_claims

    def for_shard(self, shard):
        view = FakeRecords()
        view.peers = self.peers
        view.claims = self.shard_claims[shard]
        return view


def test_the_monitor_shows_every_shards_holder_term_version_and_standbys_and_says_why_one_peer_holds_two():
    records = ShardedRecords({1: [claim("c", 3, version=7, standbys=["Qmd"])]})
    records.peer_records = [peer("a", role="coordinator", shards={"0": "coordinator"}), peer("b"),
                            peer("c", role="coordinator", shards={"1": "coordinator"}), peer("d")]
    records.claims = [claim("a", 1)]
    snap = Monitor(records, lease_seconds=10.0, shards=2).poll(NOW)
    assert [(v["shard"], v["coordinator"]["peer_id"], v["coordinator"]["term"], v["coordinator"]["version"],
             v["coordinator"]["standbys"]) for v in snap["shards"]] == [(0, "Qma", 1, 10, ["Qmb"]), (1, "Qmc", 3, 7, ["Qmd"])]
    assert snap["placement"] == {"holders": {"Qma": [0], "Qmc": [1]}, "stacked": {}, "fewer_peers": False}
    assert [p.get("shards") for p in snap["peers"]] == [{"0": "coordinator"}, None, {"1": "coordinator"}, None]
    assert json.loads(json.dumps(snap, allow_nan=False)) == snap
    # one peer left: the other holds both shards, because no third peer could take one
    records = ShardedRecords({1: [claim("a", 2, version=9)]})
    records.peer_records, records.claims = [peer("a", role="coordinator")], [claim("a", 1)]
    snap = Monitor(records, lease_seconds=10.0, shards=2).poll(NOW)
    assert snap["placement"] == {"holders": {"Qma": [0, 1]}, "stacked": {"Qma": [0, 1]}, "fewer_peers": True}
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render(snap, "demo", NOW))
    text = console.export_text()
    assert "shard 1 coordinator a" in text and "a holds shards 0, 1 (fewer peers that accept connections than shards)" in text


def test_a_metrics_line_still_being_written_is_left_for_the_next_read(tmp_path):
    """A peer appends its events while tests and tools read them: a last line without its newline
    is not parsed (it would fail as JSON) and is returned whole once it is complete."""
    from heloco_p2p.tools.launcher import LocalSwarm

    sw = LocalSwarm(tmp_path, "partial")
    path = tmp_path / "a.jsonl"
    path.write_text('{"event": "ack", "seq": 1}\n{"event": "ack", "se')
    assert [e["seq"] for e in sw.events("a", "ack")] == [1]
    with open(path, "a") as f:
        f.write('q": 2}\n')
    assert [e["seq"] for e in sw.events("a", "ack")] == [1, 2]
    path.write_text("")
    assert sw.events("a") == []
