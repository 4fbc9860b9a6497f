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
    # no faults: every acknowledgement is a commit; a commit without one is at most one per peer, made
    # while the peers stopped (its standby left first: held back, then made durable by the lone coordinator)
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    committed = {(e["peer"], e["seq"]) for e in events if e.get("event") == "commit"}
    acked = {(e["peer"], e["seq"]) for e in events if e.get("event") == "ack"}
    assert acked <= committed and len(committed) == summary["commits"]
    assert summary["accepted_rounds"] <= summary["commits"] <= summary["accepted_rounds"] + 3
    assert len(committed - acked) <= 3
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


def test_profile_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "x.yaml").write_text(yaml.safe_dump({"name": "x", "region": "de", "speed": 2.0}))
    with pytest.raises(ConfigError) as err:
        load_profiles(str(tmp_path / "*.yaml"))
    assert "x.yaml" in str(err.value) and "speed" in str(err.value)
    with pytest.raises(ConfigError, match="no peer profile"):
        load_profiles(str(tmp_path / "none-*.yaml"))
