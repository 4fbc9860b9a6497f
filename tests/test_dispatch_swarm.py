"""HeLoCo as published in a real swarm: the coordinator hands out the look-ahead point
θ̄ = θ − η·μ·m (replies and state downloads), applies each Δ to θ, counts K for ρ = 1/√K and
forwards it with each commit; peers start their rounds from θ̄; standbys stay bitwise equal."""
import uuid

import pytest
import yaml

from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

from fakes import load_script

pytestmark = pytest.mark.slow


def test_peers_start_from_the_look_ahead_point_and_standbys_stay_exact(tmp_path):
    chaos = load_script("chaos")
    cfg = write_test_config(tmp_path / "cfg.yaml")
    tree = yaml.safe_load(cfg.read_text())
    tree["outer"] = {"algorithm": "heloco"}  # the published method: dispatch lookahead, Table 3, ρ = 1/√K before
    cfg.write_text(yaml.safe_dump(tree))
    sw = LocalSwarm(tmp_path, f"dispatch-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.start("c", "en")
        def standby_named():
            return "standby" in {e["role"] for n in "bc" for e in sw.events(n, "heartbeat")}

        sw.wait_until(lambda: standby_named() and all(sw.events(n, "ack") for n in "bc"), 240,
                      "a standby and acknowledgements of b and c")
        start = len(sw.all_events("commit"))
        sw.wait_until(lambda: len(sw.all_events("commit")) >= start + 15, 240, "15 commits replicated to the standby")
        commits = {e["version"]: e for e in sw.all_events("commit")}
        moved = [c for c in commits.values() if c["dispatch_digest"] != c["digest"]]
        assert moved, "θ̄ never differed from θ: look-ahead dispatch did not happen"
        assert max(c["num_workers"] for c in commits.values()) == 3  # K counts the three senders
        for name in "bc":  # what a peer received (and trains from) is θ̄ of that version, not θ
            acks = [a for a in sw.events(name, "ack") if a["version"] in commits]
            assert acks and all(a["digest"] == commits[a["version"]]["dispatch_digest"] for a in acks)
        logs = "".join((tmp_path / f"{n}.log").read_text() for n in "abc")
        assert "digest differs" not in logs  # every forwarded commit left the standby bitwise equal
        for name in ("b", "c", "a"):
            sw.stop(name)
        events = sorted((e for n in sw.procs for e in sw.events(n)), key=lambda e: e["time"])
        history = chaos.check_history(events, tmp_path / "ckpt-a")
        assert history["acked_but_lost"] == 0 and history["forks"] == [] and history["gaps"] == []
    finally:
        sw.close()
