"""``heloco-peer doctor``: its judgements as pure functions, and the command against a dead
address (tests/test_watch_swarm.py runs it against a live swarm)."""
import json

import pytest
from click.testing import CliRunner

from heloco_p2p.cli import main
from heloco_p2p.config import load_config
from heloco_p2p.tools.doctor import (
    FAIL,
    OK,
    SKIP,
    WARN,
    Check,
    exit_code,
    judge_clock,
    judge_disk,
    judge_reachability,
    judge_throughput,
    summary_line,
)

DEAD = "/ip4/127.0.0.1/tcp/9/p2p/QmYGQ8u9QGd9jVtGDz4AVz16ubyECCp7yYZztcy3bse6u9"  # nothing listens on port 9


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml", overrides={"inner.steps_per_round": 100, "swarm.max_staleness": 8})


def test_clock_skew_beyond_hivemind_tolerance_fails():
    assert judge_clock({"p": 0.2, "q": -0.4}, {"p": 1.0}, 3.0).status == OK
    assert judge_clock({"p": 2.0}, {}, 3.0).status == WARN
    behind = judge_clock({"p": 5.0}, {}, 3.0)
    assert behind.status == FAIL and "5.0 s behind" in behind.detail and "timedatectl" in behind.fix
    assert judge_clock({}, {"p": -30.0}, 3.0).status == WARN  # a heartbeat from the future
    assert judge_clock({}, {}, 3.0).status == SKIP


def test_disk_needs_room_for_a_checkpoint_written_beside_the_last():
    assert judge_disk(free_bytes=5 * 2**20, param_bytes=1 * 2**20, path="/x").status == FAIL
    assert judge_disk(free_bytes=10 * 2**20, param_bytes=1 * 2**20, path="/x").status == WARN
    ok = judge_disk(free_bytes=100 * 2**20, param_bytes=1 * 2**20, path="/x")
    assert ok.status == OK and ok.values["needed_bytes"] == 6 * 2**20


def test_throughput_implies_a_round_time_and_the_staleness_it_would_arrive_with(cfg):
    # 100 steps at 10 steps/s = 10 s compute; 4 MB each way at 1 MB/s = 8 s transfer: an 18 s round
    c = judge_throughput(10.0, cfg, batch_size=8, param_bytes=4_000_000, down_bps=1e6, up_bps=1e6, commits_per_min=20.0)
    assert c.values["round_seconds"] == pytest.approx(18.0)
    assert c.values["expected_staleness"] == pytest.approx(6.0) and c.status == WARN  # above max_staleness / 2
    too_slow = judge_throughput(1.0, cfg, 8, 4_000_000, 1e6, 1e6, commits_per_min=20.0)  # a 108 s round: 36 stale
    assert too_slow.status == FAIL and "too_stale" in too_slow.detail and too_slow.fix
    assert judge_throughput(10.0, cfg, 8, 4_000_000, None, None, commits_per_min=None).status == OK
    assert c.values["tokens_per_second"] == pytest.approx(10.0 * 8 * (cfg.data.seq_len - 1))


def test_reachability_needs_one_peer_that_dialed_back():
    assert judge_reachability({"p": {"available": True, "skew": 0.0, "rtt": 0.01}}, False).status == OK
    closed = judge_reachability({"p": {"available": False, "skew": 0.0, "rtt": 0.01}}, False)
    assert closed.status == FAIL and "--client-mode" in closed.fix
    assert judge_reachability({"p": {"error": "timeout"}}, False).status == WARN
    assert judge_reachability({}, True).status == SKIP


def test_exit_code_is_one_only_when_a_check_failed():
    assert exit_code([Check("a", OK, ""), Check("b", WARN, ""), Check("c", SKIP, "")]) == 0
    assert exit_code([Check("a", OK, ""), Check("b", FAIL, "")]) == 1
    assert summary_line([Check("a", OK, ""), Check("b", FAIL, ""), Check("c", WARN, "")]) == \
        "joining would fail: b (warnings: c)"


@pytest.mark.slow
def test_doctor_against_a_dead_address_fails_and_says_how_to_fix_it(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--run-id", "x", "--initial-peers", DEAD, "--json",
                                       "--checkpoint-dir", str(tmp_path), "--log-level", "WARNING"])
    assert result.exit_code == 1
    report = json.loads(result.stdout.strip().splitlines()[-1])
    checks = {c["name"]: c for c in report["checks"]}
    assert not report["ok"] and checks["initial peers"]["status"] == FAIL
    assert f"no peer answered at {DEAD}" in checks["initial peers"]["detail"]
    assert "firewalls/NAT" in checks["initial peers"]["detail"]
    # what can be checked without the run still is
    assert checks["device"]["status"] == OK and checks["disk"]["status"] == OK
    assert checks["throughput"]["status"] == SKIP


@pytest.mark.slow
def test_doctor_text_output_marks_each_check_and_ends_with_a_verdict(tmp_path):
    result = CliRunner().invoke(main, ["doctor", "--run-id", "x", "--initial-peers", DEAD,
                                       "--checkpoint-dir", str(tmp_path), "--log-level", "WARNING"])
    lines = result.stdout.strip().splitlines()
    assert result.exit_code == 1
    assert lines[0].startswith("[FAIL] initial peers: no peer answered")
    assert lines[-1] == "joining would fail: initial peers"
