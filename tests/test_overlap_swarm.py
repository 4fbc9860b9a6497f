"""Overlapped rounds in a real two-peer swarm: rounds train while submissions travel, each reply
is folded in, and staleness is counted from the version folded in (docs/protocol.md)."""
import uuid

import pytest

from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

pytestmark = pytest.mark.slow


def test_overlapped_rounds_commit_with_staleness_from_the_folded_version(tmp_path):
    cfg = write_test_config(tmp_path / "cfg.yaml", overlap=False)  # the run says blocking; the flag overrides it
    sw = LocalSwarm(tmp_path, f"overlap-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg), "--overlap")
        sw.start("b", "fr", "--overlap")
        sw.wait_until(lambda: len(sw.events("a", "ack")) >= 4 and len(sw.events("b", "ack")) >= 4, 180,
                      "4 accepted submissions from each peer")
        commits = {(c["peer"], c["seq"]): c for c in sw.events("a", "commit")}
        for name in ("a", "b"):
            rounds = sw.events(name, "round")
            # one acknowledgement per round's submission, in order: a resend after a lost reply is
            # acknowledged as a duplicate (it carries no staleness of its own) and still ends its round
            acks, seen = [], set()
            for x in sw.events(name, "ack"):
                if x["seq"] not in seen:
                    seen.add(x["seq"])
                    acks.append(x)
            assert all(r.get("overlap") for r in rounds)
            assert rounds[0]["base_version"] == sw.events(name, "eval")[0]["version"]
            assert sum(not a["duplicate"] for a in acks[:4]) >= 2, acks  # staleness is checked on most
            for i, ack in enumerate(acks[:4]):
                commit = commits[(ack["peer"], ack["seq"])]
                assert ack["version"] == commit["version"] and ack["digest"] == commit["digest"]
                # τ = v − v0: v the version the commit applied to, v0 the round's folded-in base
                if not ack["duplicate"]:
                    assert ack["staleness"] == ack["version"] - 1 - rounds[i]["base_version"]
                    assert commit["staleness"] == ack["staleness"]
                if i:
                    # round i trained while submission i−1 travelled and folded its reply in
                    assert rounds[i]["base_version"] == acks[i - 1]["version"]
                    assert rounds[i]["wait_seconds"] >= 0.0 and rounds[i]["fold_seconds"] >= 0.0
        # both peers' updates are in: the versions are consecutive and each commit is acknowledged once
        versions = sorted(c["version"] for c in commits.values())
        assert versions == list(range(1, len(versions) + 1))
    finally:
        sw.close()
        for name in sw.procs:
            assert not sw.group_alive(name), f"{name} left processes behind"
