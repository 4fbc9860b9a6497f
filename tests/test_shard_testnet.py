"""scripts/shard_testnet.py --tiny for real: four --no-train nodes and four trainers, each in a
network namespace of its own on tbf-shaped links, with swarm.shards 1 and 2, and a SIGKILL of a
shard holder at S = 2. Per round the busiest veth carries fewer bytes at S = 2 than at S = 1,
every shard commits, a shard's holder is a --no-train node, no acknowledged part of the killed
shard is lost, and bench/results.json keeps its other keys."""
import json

import pytest

from heloco_p2p.tools import netns

from fakes import load_script

pytestmark = pytest.mark.slow

KEYS = ("1", "2", "failover", "cast", "command", "date", "machine", "load")


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
