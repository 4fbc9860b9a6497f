"""scripts/bench.py: the result schema, the steady-state utilization, the commit item on small
shapes, and the report it writes into docs/results.md (the multi-process items run in
``python scripts/bench.py --quick``)."""
import pytest

from heloco_p2p.tools.report import replace_section

from fakes import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench")


def detail():
    peers = {n: {"utilization": u, "rounds": 9, "wait_seconds": 0.0, "fold_seconds": 0.01, "summary_utilization": u}
             for n, u in (("berlin", 0.99), ("paris", 0.98), ("moscow", None))}
    wire = {"tiny": {c: {"params": 920192, "bytes": 1, "bytes_per_param": b, "rel_l2": e, "encode_ms": 1.0,
                         "decode_ms": 1.0, "message_ms": 5.0, "raw_ms": 4.0, "raw_mb_per_s": 300.0, "message_vs_raw": 1.25}
                     for c, b, e in (("none", 4.0, 0.0), ("fp16", 2.0, 2e-4), ("8bit", 1.02, 1.3e-2))}}
    window = {"senders": 1, "seconds": 8.0, "accepted": 16, "other": 0, "submissions_per_s": 2.0, "rtt_ms": 500.0,
              "server_ms": {"decode": 20.0, "commit": 30.0, "replicate": 150.0, "encode_reply": 20.0}, "statuses": ["accepted"]}
    return {
        "utilization": [{"overlap": True, "minutes": 2.5, "peers": peers, "commits": 80, "rejected": 0,
                         "val_loss_start": 8.33, "val_loss_end": 6.5, "val_loss_version": 80}],
        "swarm_vs_solo": {"ratio": 0.98, "swarm_tokens_per_second": {"s0": 4000.0, "s1": 3900.0},
                          "solo_tokens_per_second": {"de": 4050.0, "fr": 4000.0}, "seconds": 120, "steps_per_round": 50,
                          "commits_in_window": 18, "median_rtt_ms": 110.0},
        "commit": {"params": 21_000_000, "param_bytes": 84_000_000, "repeats": 20, "commit_ms": 30.0, "commit_min_ms": 28.0,
                   "add_ms": 3.0, "add_min_ms": 2.8, "traffic_units": 14.6, "commit_gb_per_s": 40.0, "add_gb_per_s": 80.0,
                   "commit_vs_add": 10.0, "check_ms": 8.0, "digest_ms": 120.0},
        "wire": wire,
        "join": {"tiny": {"model": "tiny", "steps_per_round": 2, "batch_size": 8, "ready_s": 9.0,
                          "first_eval_done_s": 10.0, "first_step_s": 10.5, "first_accepted_s": 12.0}},
        "fan_in": {"model": "small", "params": 5_000_000, "payload_bytes": 20_000_000, "reply_bytes": 20_000_000,
                   "windows": [window], "max_submissions_per_s": 2.0, "at_senders": 1,
                   "cpu_cores": {"coordinator": 1.0, "standby": 0.5}, "commit_lock_busy": 0.4, "saturates": "transfer"},
        "meta": {"date": "2026-11-22", "machine": "test", "command": "python scripts/bench.py", "quick": False,
                 "load_before": "1.00, 1.00, 1.00", "load_after": "1.00, 1.00, 1.00", "wall_seconds": 1200.0},
    }


def results_of(d):
    return {"utilization": {n: p["utilization"] for n, p in d["utilization"][0]["peers"].items()},
            "swarm_vs_solo": d["swarm_vs_solo"]["ratio"], "commit": d["commit"], "wire": d["wire"],
            "join": d["join"], "fan_in": d["fan_in"]}


def test_results_schema_is_checked(bench):
    results = results_of(detail())
    bench.validate_results(results)
    assert tuple(results) == ("utilization", "swarm_vs_solo", "commit", "wire", "join", "fan_in")
    with pytest.raises(ValueError, match="keys"):
        bench.validate_results({k: v for k, v in results.items() if k != "join"})
    with pytest.raises(ValueError, match="utilization"):
        bench.validate_results({**results, "utilization": {"berlin": 1.7}})
    with pytest.raises(ValueError, match="swarm_vs_solo"):
        bench.validate_results({**results, "swarm_vs_solo": {"ratio": 0.9}})


def test_steady_utilization_counts_steps_between_the_first_and_last_round_end(bench):
    rounds = [{"time": 10.0, "compute_seconds": 9.0},  # the first round: before the window
              {"time": 15.0, "compute_seconds": 4.0},
              {"time": 20.0, "compute_seconds": 5.0}]
    assert bench.steady_utilization(rounds) == pytest.approx((4.0 + 5.0) / 10.0)
    assert bench.steady_utilization(rounds[:2]) is None


def test_commit_item_measures_against_add_on_the_same_tensors(bench):
    out = bench.measure_commit(repeats=3, warmup=1, shapes=[(256, 64), (64, 64), (64,)])
    assert out["params"] == 256 * 64 + 64 * 64 + 64 and out["param_bytes"] == 4 * out["params"]
    for key in ("commit_ms", "add_ms", "check_ms", "digest_ms", "commit_gb_per_s", "add_gb_per_s"):
        assert out[key] > 0, key
    assert out["traffic_units"] >= 13.0  # 4 P of block scalars + 9 P of lookahead, more if blocks were corrected
    assert out["commit_vs_add"] == pytest.approx(out["commit_ms"] / out["add_ms"])


def test_report_replaces_only_its_subsection(bench):
    text = bench.render(detail())
    for item in ("1. Utilization", "2. Swarm vs solo", "3. Commit", "4. Wire", "5. Join", "6. Fan-in"):
        assert item in text
    assert "swarm_vs_solo = 0.980" in text and "| berlin | 1.0 | 0.990 (9 rounds) |" in text
    doc = "# Results\n\n## Swarm\n\nkeep me\n\n## Benchmarks\n\n### Benchmark suite\n\nold\n\n### Other\n\nkeep too\n"
    new = replace_section(doc, bench.RESULTS_HEADING, text)
    assert "old" not in new and "keep me" in new and "keep too" in new and "2. Swarm vs solo" in new
