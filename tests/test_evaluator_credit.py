"""A real run watched as its users would: an evaluator peer (``join --evaluator``) publishes the
global model's validation loss per language in the DHT, the coordinator publishes each peer's
contribution credit in its lease, and ``monitor --once --json`` shows both (keys ``validation``
and ``credit``), with the values the peers logged themselves."""
import json
import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent


def _monitor(sw) -> dict:
    out = subprocess.run([sys.executable, "-m", "heloco_p2p", "monitor", "--run-id", sw.run_id, "--initial-peers",
                          sw.maddr, "--once", "--json", "--lease-seconds", "4", "--log-level", "WARNING"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout)


def test_an_evaluator_and_the_credit_are_published_and_shown(tmp_path):
    cfg = write_test_config(tmp_path / "cfg.yaml")
    sw = LocalSwarm(tmp_path, f"eval-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.wait_until(lambda: len(sw.events("b", "ack")) >= 3 and len(sw.events("a", "ack")) >= 3, 180,
                      "acknowledgements of both trainers")
        sw.start("e", "de", "--evaluator", "--eval-every", "3", "--eval-regions", "de,fr")
        sw.wait_until(lambda: len(sw.events("e", "eval")) >= 2, 180, "two evaluations")
        snap = _monitor(sw)
        val = snap["validation"]
        assert val is not None and set(val["per_language"]) == {"de", "fr"}
        logged = {e["version"]: e["val_loss"] for e in sw.events("e", "eval")}
        assert val["version"] in logged  # the record is what the evaluator measured
        assert val["per_language"] == pytest.approx(logged[val["version"]]["per_language"])
        assert val["mean"] == pytest.approx(sum(val["per_language"].values()) / 2)
        assert all(math.isfinite(v) and 0 < v < 12 for v in val["per_language"].values())
        assert [h["version"] for h in val["history"]] == sorted(h["version"] for h in val["history"])
        rows = {p["name"]: p for p in snap["peers"]}
        assert rows["e"]["role"] == "evaluator"
        assert snap["coordinator"]["standbys"] and snap["coordinator"]["standbys"][0] != rows["e"]["peer_id"]

        credit = snap["credit"]["peers"]
        ids = {n: rows[n]["peer_id"] for n in ("a", "b")}
        assert set(credit) == set(ids.values())  # the evaluator submits nothing
        for name, pid in ids.items():
            acked = [a for a in sw.events(name, "ack") if not a["duplicate"]]
            c = credit[pid]
            assert c["region"] == rows[name]["region"] and 0 < c["commits"]
            per_round = {a["tokens"] for a in sw.events(name, "ack")}
            assert len(per_round) == 1  # the same batch and H every round
            assert c["tokens"] == per_round.pop() * c["commits"]
            assert -1.0 <= c["cosine_mean"] <= 1.0 and c["kept"] + c["rotated"] + c["shrunk"] == pytest.approx(1.0)
            assert c["commits"] <= len(acked) + 2  # the lease may lag the peer's own count by a renewal
        assert sum(c["share"] for c in credit.values()) == pytest.approx(1.0)
        regions = snap["credit"]["regions"]
        assert set(regions) == {"de", "fr"} and sum(r["tokens"] for r in regions.values()) == \
            sum(c["tokens"] for c in credit.values())
    finally:
        sw.close()
