"""A real 2-shard swarm: separate peer processes on 127.0.0.1, the tiny model, ``swarm.shards: 2``.

The founder holds both shards until another peer can take one (a handover); then the holder of
shard 1 is SIGKILLed. Shard 0 keeps committing while shard 1 fails over to its standby, and no
acknowledged part of either shard is lost: every part a peer logged as acknowledged is in the
ledger of its shard's final state (the newest checkpoint of that shard, once every peer left).
"""
import json
import time
import uuid

import pytest
import torch
from click.testing import CliRunner

from heloco_p2p.cli import main
from heloco_p2p.local import trainable_params
from heloco_p2p.roles.shards import ShardPlan
from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

from fakes import lone_founder_run


def _holder_by_handover(sw, names, shard):
    for n in names:
        if any(e.get("shard") == shard and e.get("handover") for e in sw.events(n, "takeover")):
            return n
    return None


@pytest.mark.slow  # ~75 s
def test_a_shard_holder_killed_the_other_shard_keeps_committing_and_no_acknowledged_part_is_lost(tmp_path):
    cfg = write_test_config(tmp_path / "cfg.yaml", shards=2, defence={"screen": False})
    sw = LocalSwarm(tmp_path, f"shards-{uuid.uuid4().hex[:8]}")
    names = ["a", "b", "c", "d"]
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.wait_for_maddr("a")
        for name, region in zip(names[1:], ("fr", "en", "es")):
            sw.start(name, region)

        # 1. shard 1 moves to a peer that holds no shard; both shards commit with a standby
        sw.wait_until(lambda: _holder_by_handover(sw, names[1:], 1), 180, "shard 1 handed to another peer")
        holder = _holder_by_handover(sw, names[1:], 1)

        def replicated(name, shard, n):
            return len([e for e in sw.events(name, "commit") if e.get("shard", 0) == shard and e["replicas"] >= 1]) >= n

        sw.wait_until(lambda: replicated(holder, 1, 5) and replicated("a", 0, 5), 180, "replicated commits on both shards")
        assert not any(e.get("shard", 0) == 0 for e in sw.events(holder, "commit"))  # one shard role per peer

        def roles(name):
            beats = sw.events(name, "heartbeat")
            return beats[-1].get("shards") if beats else None

        # the holder of shard 1 stands by for no other shard (free peers are there): its death costs
        # shard 0 no replica
        sw.wait_until(lambda: roles(holder) == {"1": "coordinator"} and roles("a") == {"0": "coordinator"}, 60,
                      "shard holders that stand by for no other shard")

        # 2. SIGKILL shard 1's holder: a standby of shard 1 takes it over
        dead_commits = [e for e in sw.events(holder, "commit") if e.get("shard") == 1]
        sw.kill(holder)
        killed_at = time.time()
        others = [n for n in names if n != holder]

        def takeover():
            found = [(n, e) for n in others for e in sw.events(n, "takeover")
                     if e.get("shard") == 1 and not e.get("handover") and e["time"] > killed_at]
            return found[0] if found else None

        sw.wait_until(takeover, 90, "a standby taking shard 1 over")
        heir, event = takeover()
        dead_commits = [e for e in sw.events(holder, "commit") if e.get("shard") == 1]  # the log is complete now
        assert event["version"] >= max(e["version"] for e in dead_commits)  # the replica holds every logged commit

        # 3. shard 0 committed while shard 1 had no coordinator
        during = [e for n in others for e in sw.events(n, "commit")
                  if e.get("shard", 0) == 0 and killed_at < e["time"] < event["time"]]
        assert during, "shard 0 stopped committing during the failover of shard 1"
        sw.wait_until(lambda: len([e for e in sw.events(heir, "commit") if e.get("shard") == 1
                                   and e["time"] > event["time"]]) >= 5, 120, "commits on shard 1 under its heir")

        # the parts carried through the failover were committed one round each, not refused as too large
        refused = [e for n in names for e in sw.events(n, "rejected") if e.get("reason") == "norm_too_large"]
        assert not refused, refused[:3]

        # 4. stop the others (peers holding no shard first; a holder that leaves hands its shard over
        # or checkpoints it): each shard's newest checkpoint holds every part acknowledged on it
        holding = {n for n in others if "coordinator" in (roles(n) or {}).values()}
        for n in [n for n in others if n not in holding] + sorted(holding):
            assert sw.stop(n) == 0
        for shard in (0, 1):
            found = [torch.load(p, weights_only=False) for p in tmp_path.glob(f"ckpt-*/shard-{shard}/coordinator.pt")]
            final = max(found, key=lambda c: (c["commit_state"]["term"], c["commit_state"]["engine"]["version"]))
            ledger = final["commit_state"]
            assert sum(ledger["applied_count"].values()) == ledger["engine"]["version"]
            for n in names:
                acks = [a for a in sw.events(n, "ack") if a.get("shard", 0) == shard]
                assert acks, f"{n} had no acknowledged part on shard {shard}"
                peer_id = acks[0]["peer"]
                assert max(a["seq"] for a in acks) <= ledger["applied"][peer_id], \
                    f"{n}: an acknowledged part of shard {shard} is missing"
                assert len({a["seq"] for a in acks}) <= ledger["applied_count"][peer_id]
    finally:
        sw.close()
        for name in sw.procs:
            assert not sw.group_alive(name), f"{name} left processes behind"


def test_export_assembles_theta_from_every_shards_checkpoint_bitwise(tmp_path):
    """A lone founder of a 2-shard run commits two rounds and leaves: each shard's checkpoint is
    in its own directory, and ``export`` merges them at the cut (2, 2), bitwise."""
    from transformers import AutoModelForCausalLM  # heavy: only where it is used

    cfg = write_test_config(tmp_path / "cfg.yaml", shards=2, defence={"screen": False})
    ckpt = lone_founder_run(tmp_path, cfg, "shards")
    parts = [torch.load(ckpt / f"shard-{k}" / "coordinator.pt", weights_only=True) for k in (0, 1)]
    assert [p["commit_state"]["engine"]["version"] for p in parts] == [2, 2]
    out = tmp_path / "model"
    result = CliRunner().invoke(main, ["export", "--checkpoint", str(tmp_path / "ckpt-a"), "--out", str(out),
                                       "--log-level", "WARNING"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "heloco_export.json").read_text())
    assert meta["shard_versions"] == [2, 2] and meta["version"] == 2
    model = AutoModelForCausalLM.from_pretrained(out)
    loaded = trainable_params(model)
    plan = ShardPlan.for_shapes([tuple(p.shape) for p in loaded], 2)
    theta = plan.merge([p["commit_state"]["engine"]["params"] for p in parts])
    assert all(torch.equal(p.detach(), t) for p, t in zip(loaded, theta))
    assert plan.merge([p["param_names"] for p in parts]) == [n for n, _ in model.named_parameters()]


@pytest.mark.slow
def test_an_evaluator_of_a_sharded_run_evaluates_theta_merged_from_every_shard(tmp_path):
    cfg = write_test_config(tmp_path / "cfg.yaml", shards=2, defence={"screen": False})
    sw = LocalSwarm(tmp_path, f"shards-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.wait_for_maddr("a")
        sw.start("b", "fr")
        sw.wait_until(lambda: len([x for x in sw.events("b", "ack") if x["shard"] == 1]) >= 3, 180,
                      "acknowledged parts of shard 1")
        sw.start("e", "de", "--evaluator", "--eval-every", "3", "--eval-regions", "de,fr")
        def evaluations():  # the evaluator role's (per language), not the peer's own first one
            return [x for x in sw.events("e", "eval") if isinstance(x["val_loss"], dict) and x["version"] > 0]

        sw.wait_until(lambda: len(evaluations()) >= 2, 180, "two evaluations of a trained θ")
        evals = evaluations()
        assert all(0 < v < 12 for x in evals for v in x["val_loss"]["per_language"].values())
        assert not any(x.get("shard") is not None for x in sw.events("e", "ack"))  # it submits nothing
    finally:
        sw.close()
        for name in sw.procs:
            assert not sw.group_alive(name), f"{name} left processes behind"
