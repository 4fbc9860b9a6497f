"""scripts/shard_testnet.py --tiny for real: four --no-train nodes and four trainers, each in a
network namespace of its own on tbf-shaped links, with swarm.shards 1 and 2, and a SIGKILL of a
shard holder at S = 2. Per round the busiest veth carries fewer bytes at S = 2 than at S = 1,
every shard commits, a shard's holder is a --no-train node, no acknowledged part of the killed
shard is lost, and bench/results.json keeps its other keys."""
import json

import pytest

from heloco_p2p.tools import netns

from fakes import load_script

KEYS = ("1", "2", "failover", "cast", "command", "date", "machine", "load")


def test_the_failover_check_finds_lost_parts_and_counts_a_standbys_replica_as_held():
    """failover_summary's verdict is only worth something if it can say otherwise; a part whose
    holder was killed after the standby applied it (no commit event of it, the heir's 'duplicate'
    ack) is held, not lost."""
    shardnet = load_script("shard_testnet")
    commit = lambda v, term, seq, peer="t1", t=None: {"event": "commit", "shard": 1, "version": v, "term": term,  # noqa: E731
                                                      "peer": peer, "seq": seq, "time": float(v) if t is None else t}
    ack = lambda v, seq, dup=False: {"event": "ack", "shard": 1, "version": v, "peer": "t1", "seq": seq,  # noqa: E731
                                     "name": "berlin", "time": v + 0.5, "duplicate": dup}
    marks = {"killed_shard": 1, "killed_at": 3.2, "heir_first_commit_at": 6.0, "killed": "node-c", "heir": "node-b",
             "failover_end": 20.0, "takeover_at": 5.0, "placement_at_kill": {}, "placement_after_failover": {},
             "load_end": 0.0, "load_after_failover": 0.0}
    trainers = {n: [] for n, _ in shardnet.TRAINERS}
    base = {**trainers, "node-c": [commit(v, 1, v) for v in (1, 2, 3)],
            "berlin": [ack(v, v) for v in (1, 2, 3)] + [ack(5, 4, dup=True)]}
    heir = [{"event": "takeover", "shard": 1, "time": 5.0, "term": 2}, commit(5, 2, 1, peer="t2", t=6.0)]
    replica = {"event": "replica", "shard": 1, "version": 4, "term": 1, "peer": "t1", "seq": 4, "time": 3.1}
    held = shardnet.failover_summary(2, {**base, "node-b": heir + [replica]}, marks)
    assert (held["acknowledged_parts_checked"], held["acknowledged_parts_lost"], held["chain_gaps"]) == (4, 0, [])
    assert held["unnecessary_failovers"] == 0
    lost = shardnet.failover_summary(2, {**base, "node-b": heir}, marks)
    assert lost["acknowledged_parts_lost"] == 1 and lost["lost"][0]["seq"] == 4 and lost["chain_gaps"] == [4]
    # version 3 committed again in the heir's term by another submission: its acknowledgement is lost
    forked = shardnet.failover_summary(2, {**base, "node-b": heir + [replica, commit(3, 2, 7, peer="t2", t=5.5)]}, marks)
    assert [x["seq"] for x in forked["lost"]] == [3]


@pytest.mark.slow
def test_tiny_sharded_cast_spreads_the_hub_and_a_killed_holder_loses_no_acknowledged_part(tmp_path):
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces cannot be created here: {why}")
    shardnet = load_script("shard_testnet")
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"wan": {"model_params": 1}}))  # another benchmark's key: kept
    out = shardnet.main(["--tiny", "--shards", "1,2", "--minutes", "0.15", "--failover-shards", "2",
                         "--failover-tail", "0.05", "--out", str(tmp_path / "runs"), "--results", str(results)])
    one, two, fo = out["1"], out["2"], out["failover"]
    servers = {n for n, _ in shardnet.SERVERS}

    for run, shards in ((one, 1), (two, 2)):
        assert run["rounds"] > 0, run
        assert set(run["commits_per_minute"]["per_shard"]) == {str(k) for k in range(shards)}
        assert all(v > 0 for v in run["commits_per_minute"]["per_shard"].values()), run["commits_per_minute"]
        place = run["placement"]["placement_start"]
        assert {p["holder"] for p in place.values()} <= servers, place
        assert len({p["holder"] for p in place.values()}) == shards, place
        assert set(run["bytes_per_veth_per_round"]) == servers | {n for n, _ in shardnet.TRAINERS}
        assert not run["takeovers_in_window"], run["takeovers_in_window"]
        for name, link in run["link_bytes"].items():
            for way in ("up", "down"):
                assert link["peak_mbit"][way] <= 1.1 * out["cast"]["links"][name][f"{way}_mbit"], (name, link)
    # the hub at S = 1 carries every submission, reply and forwarded commit; at S = 2 about half
    assert one["busiest_link"] in servers
    assert two["busiest_link_bytes_per_round"] < 0.85 * one["busiest_link_bytes_per_round"], \
        (one["busiest_link_bytes_per_round"], two["busiest_link_bytes_per_round"])

    assert fo["killed"] in servers and fo["heir"] != fo["killed"]
    assert fo["acknowledged_parts_checked"] > 0
    assert fo["acknowledged_parts_lost"] == 0, fo["lost"]
    assert not fo["chain_gaps"], fo["chain_gaps"]
    assert fo["other_shards_commits_during_failover"] > 0, fo
    assert fo["unnecessary_failovers"] == 0, fo["takeovers"]

    saved = json.loads(results.read_text())
    assert saved["wan"] == {"model_params": 1}
    assert set(KEYS) <= set(saved["shards"])
    assert saved["shards"]["cast"]["reply_compression"] == "8bit"
