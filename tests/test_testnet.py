"""The testnet end to end: three tiny peers for a minute and a half, then a consistent summary."""
import json

import pytest
import yaml

from heloco_p2p.config import ConfigError
from heloco_p2p.tools.launcher import write_test_config
from heloco_p2p.tools.testnet import load_profiles, run_testnet

pytestmark = pytest.mark.slow


def _cast(tmp_path):
    d = tmp_path / "peers"
    d.mkdir()
    for name, region, speed in (("a", "de", 1.0), ("b", "fr", 0.7), ("c", "en", 0.5)):
        (d / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "region": region, "speed": speed,
                                                        "device": "cpu", "batch_size": 8}))
    return str(d / "*.yaml")


def test_testnet_writes_a_consistent_summary(tmp_path):
    cfg = write_test_config(tmp_path / "cfg.yaml")
    out = tmp_path / "out"
    summary = run_testnet(load_profiles(_cast(tmp_path)), str(cfg), minutes=1.5, out=out, live=False, eval_every=20)
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["commits"] >= 10
    # no faults: every commit was acknowledged, except those held back while the peers stopped (the
    # standby left first), which the coordinator's last checkpoint holds: at most one per peer
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    commits = [e for e in events if e.get("event") == "commit"]
    committed = {(e["peer"], e["seq"]) for e in commits}
    checkpointed = {(e["peer"], e["seq"]) for e in commits if e.get("checkpointed")}
    acked = {(e["peer"], e["seq"]) for e in events if e.get("event") == "ack"}
    assert len(committed) == summary["commits"] == len(commits)
    assert acked | checkpointed == committed and not acked & checkpointed
    assert len(checkpointed) <= len(summary["peers"])
    assert summary["accepted_rounds"] <= len(acked)  # a non-duplicate acknowledgement per commit at most
    assert summary["commits"] == sum(1 for line in (out / "metrics.jsonl").read_text().splitlines()
                                     if '"event": "commit"' in line)
    assert summary["rejected"] == 0 and summary["coordinator_changes"] == 0
    names = [p["name"] for p in summary["peers"]]
    assert names == ["a", "b", "c"]
    for p in summary["peers"]:
        assert p["rounds"] >= 1 and p["tokens"] > 0
        assert 0.0 < p["utilization"] <= 1.0
    assert summary["val_loss"]["end"]["mean"] < summary["val_loss"]["start"]["mean"] - 0.3
    assert set(summary["val_loss"]["end"]["per_language"]) == {"de", "fr", "en"}
    assert (out / "checkpoint" / "coordinator.pt").exists() and (out / "checkpoint" / "tokenizer.json").exists()
    report = (out / "report.md").read_text()
    assert "val_loss.png" in report and (out / "val_loss.png").exists() and (out / "staleness.png").exists()


def test_a_sharded_testnet_evaluates_theta_merged_from_every_shard(tmp_path):
    """swarm.shards: 2: the evaluations fetch each shard's part from its holder and merge them, and
    the final evaluation is of θ assembled from each shard's newest checkpoint."""
    cfg = write_test_config(tmp_path / "cfg.yaml", shards=2, defence={"screen": False})
    out = tmp_path / "out"
    summary = run_testnet(load_profiles(_cast(tmp_path)), str(cfg), minutes=1.5, out=out, live=False, eval_every=20)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    commits = [e for e in events if e.get("event") == "commit"]
    assert {e["shard"] for e in commits} == {0, 1}
    vals = [e for e in events if e.get("event") == "val"]
    assert len(vals) >= 3 and any(v["version"] > 0 for v in vals[1:-1])  # fetched from both shards mid-run
    assert summary["val_loss"]["end"]["mean"] < summary["val_loss"]["start"]["mean"] - 0.3
    assert all((out / "checkpoint" / f"shard-{k}" / "coordinator.pt").exists() for k in (0, 1))


def test_profile_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"name": "x", "region": "de", "speed": 2.0}))
    with pytest.raises(ConfigError) as err:
        load_profiles(str(tmp_path / "*.yaml"))
    assert "x.yaml" in str(err.value) and "speed" in str(err.value)
    with pytest.raises(ConfigError, match="no peer profile"):
        load_profiles(str(tmp_path / "none-*.yaml"))
