"""The simulator's shard model (sim/engine.py, "Sharded coordinators"): S = 1 is today's run
bitwise, S > 1 without delays is the S = 1 run bitwise (the commit splits exactly), and with
delays each part's staleness follows its own shard's commit order, on schedules computed by hand."""
from dataclasses import replace

import pytest
import torch
import yaml

from heloco_p2p.algorithms import ALGORITHMS
from heloco_p2p.config import ConfigError
from heloco_p2p.sim import SimSpec, Simulation, load_sim_config, make_spec
from heloco_p2p.sim.runner import _spec_key, run_config

from fakes import synthetic_streams as streams
from fakes import synthetic_val_blocks as val_blocks

COMMON = ("t", "worker", "region", "staleness", "version", "steps", "loss", "branches", "cosine",
          "fairness_weight", "staleness_weight")


@pytest.fixture(scope="module")
def cfg(sim_run_cfg):
    return sim_run_cfg


def spec(algo, slowness, H=2, tokens=1, time=12.0, seed=0, **kw):
    return SimSpec(algorithm=ALGORITHMS[algo], lr=ALGORITHMS[algo].lr, heterogeneity="test", slowness=slowness,
                   data="non-iid", seed=seed, steps_per_round=H, step_time=1.0, comm_seconds=[0.0] * len(slowness),
                   token_budget=tokens, time_budget=time, eval_points=2, **kw)


def run(cfg, s, regions=("a", "b")):
    sim = Simulation(cfg, s, list(regions), streams, val_blocks(list(regions)))
    return sim, sim.run()


def no_delay(shards, workers=2):
    return {"latency_s": [[0.0] * shards for _ in range(workers)], "jitter_s": 0.0, "link_seconds": None}


def assert_same_run(a, b):
    (sim_a, res_a), (sim_b, res_b) = a, b
    assert all(torch.equal(x, y) for x, y in zip(sim_a.engine.params, sim_b.engine.params))
    assert [p["val_loss"] for p in res_a.curve] == [p["val_loss"] for p in res_b.curve]
    assert [(p["tokens"], p["virtual_seconds"], p["version"]) for p in res_a.curve] == \
        [(p["tokens"], p["virtual_seconds"], p["version"]) for p in res_b.curve]
    assert [{k: c[k] for k in COMMON} for c in res_a.commits] == [{k: c[k] for k in COMMON} for c in res_b.commits]
    assert res_a.at_tokens["val_loss"] == res_b.at_tokens["val_loss"]
    assert res_a.at_time["val_loss"] == res_b.at_time["val_loss"]


@pytest.mark.parametrize("algo", ["heloco_dylu", "heloco_fair"])
def test_one_shard_without_delays_is_todays_run_bitwise(cfg, algo):
    today = run(cfg, spec(algo, [1.0, 2.0], time=10))
    assert not today[0].sharded and "shard_staleness" not in today[1].commits[0]
    # the shard model's own loop with one shard and no delays
    one = run(cfg, spec(algo, [1.0, 2.0], time=10, shards=1, shard_delay=no_delay(1)))
    assert one[0].sharded and one[1].commits[0]["shard_staleness"] == [one[1].commits[0]["staleness"]]
    assert_same_run(today, one)


@pytest.mark.parametrize("algo", ["heloco_dylu", "heloco_fair"])
def test_more_shards_without_delays_split_the_commit_exactly(cfg, algo):
    # ties in time (t = 2, 4, ...: both workers finish together) commit in the same order on every shard
    one = run(cfg, spec(algo, [1.0, 2.0], time=10))
    S = 3
    sharded = run(cfg, spec(algo, [1.0, 2.0], time=10, shards=S))
    assert sharded[0].engine.plan.count == S
    assert_same_run(one, sharded)
    assert all(c["shard_staleness"] == [c["staleness"]] * S for c in sharded[1].commits)
    assert sharded[1].curve[-1]["shard_versions"] == [one[0].engine.version] * S


def test_a_single_worker_with_shards_is_the_unsharded_worker_bitwise(cfg):
    one = run(cfg, spec("heloco", [1.0], time=6), regions=("a",))
    four = run(cfg, spec("heloco", [1.0], time=6, shards=4), regions=("a",))
    assert_same_run(one, four)


def test_per_shard_staleness_follows_each_shards_own_order(cfg):
    """Two workers of speed 1, H = 1, S = 2; latency[w][k]: A = [0, 0.5], B = [0.25, 0].
    By hand (v_k: shard k's version; a reply comes back after the same latency):
      t=1     A and B send. Shard 0: A0 at 1.00 (τ 0, v0 1), B0 at 1.25 (τ 1, v0 2).
                             Shard 1: B1 at 1.00 (τ 0, v1 1), A1 at 1.50 (τ 1, v1 2).
              B's replies are in at max(1.25+0.25, 1+0) = 1.5, base (2, 1); A's at max(1+0, 1.5+0.5) = 2, base (1, 2).
      B sends at 2.5: B1 at 2.50 (τ 2−1 = 1, v1 3), B0 at 2.75 (τ 2−2 = 0, v0 3); replies in at 3.0, base (3, 3).
      A sends at 3.0: A0 at 3.00 (τ 3−1 = 2, v0 4), A1 at 3.50 (τ 3−2 = 1, v1 4); replies in at 4.0, base (4, 4).
      B sends at 4.0: B1 at 4.00 (τ 4−3 = 1, v1 5), B0 at 4.25 (τ 4−3 = 1, v0 5).
    """
    delay = {"latency_s": [[0.0, 0.5], [0.25, 0.0]], "jitter_s": 0.0, "link_seconds": None}
    _, res = run(cfg, spec("async_diloco", [1.0, 1.0], H=1, time=4.6, shards=2, shard_delay=delay))
    got = [(c["worker"], c["t"], c["shard_t"], c["shard_staleness"], c["shard_version"], c["staleness"])
           for c in res.commits]
    assert got == [
        (1, 1.25, [1.25, 1.0], [1, 0], [2, 1], 1),
        (0, 1.5, [1.0, 1.5], [0, 1], [1, 2], 1),
        (1, 2.75, [2.75, 2.5], [0, 1], [3, 3], 1),
        (0, 3.5, [3.0, 3.5], [2, 1], [4, 4], 2),
        (1, 4.25, [4.25, 4.0], [1, 1], [5, 5], 1),
    ]
    # the curve's point at the time budget: versions (5, 5), each shard's parts' staleness so far
    last = res.curve[-1]
    assert last["virtual_seconds"] == 4.6 and last["shard_versions"] == [5, 5]
    assert last["shard_staleness"] == {"mean": [4 / 5, 4 / 5], "max": [2, 1]}
    w = {d["worker"]: d for d in res.workers}
    assert w[0]["shard_staleness_mean"] == [1.0, 1.0] and w[0]["shard_staleness_max"] == [2, 1]
    assert w[1]["shard_staleness_mean"] == [2 / 3, 2 / 3] and w[1]["shard_staleness_max"] == [1, 1]


def test_a_holders_link_serves_parts_first_come_first_served(cfg):
    """S = 2, no latency; part 0 takes 1.0 s on its holder's link, part 1 0.25 s. Both workers
    (speed 1, H = 1) send at t = 1: A0 crosses by 2.0, B0 waits for it and crosses by 3.0;
    A1 by 1.25, B1 by 1.5. A's round is in at 2.0 (base (1, 1)): it sends at 3.0, where B0 has
    just committed (v0 2): A0 crosses by 4.0 (τ0 = 1), A1 at 3.25 (τ1 = 1: B1 came after A1)."""
    delay = {"latency_s": [[0.0, 0.0], [0.0, 0.0]], "jitter_s": 0.0, "link_seconds": [1.0, 0.25]}
    _, res = run(cfg, spec("async_diloco", [1.0, 1.0], H=1, time=4.1, shards=2, shard_delay=delay))
    got = [(c["worker"], c["shard_t"], c["shard_staleness"]) for c in res.commits]
    assert got[:3] == [(0, [2.0, 1.25], [0, 0]), (1, [3.0, 1.5], [1, 1]), (0, [4.0, 3.25], [1, 1])]


def test_jittered_runs_reproduce_and_reorder_the_shards(cfg):
    delay = {"latency_s": [[0.05] * 3] * 2, "jitter_s": 0.4, "link_seconds": None}
    s = spec("heloco_dylu", [1.0, 1.3], H=2, time=12, shards=3, shard_delay=delay)
    a, b = run(cfg, s)[1], run(cfg, s)[1]
    assert a.commits == b.commits and a.curve == b.curve
    assert any(len(set(c["shard_staleness"])) > 1 for c in a.commits)  # some round's parts saw different orders
    other = run(cfg, replace(s, seed=1))[1]
    assert [c["shard_t"] for c in other.commits] != [c["shard_t"] for c in a.commits]


def _config(tmp_path, **extra):
    tree = {
        "name": "shards", "base": "configs/tiny.yaml",
        "overrides": {"data.seq_len": 32, "data.val_blocks": 2, "inner.batch_size": 2, "inner.warmup_steps": 2,
                      "inner.total_steps": 50},
        "regions": ["de", "fr"], "steps_per_round": 2, "step_time": 1.0,
        "experiments": [{"algorithms": ["heloco_dylu", "heloco_dylu_s4"], "heterogeneity": ["h"]}],
        "heterogeneity_levels": {"h": [1.0, 2.0]},
        "variants": {"heloco_dylu_s4": {"base": "heloco_dylu", "shards": 4}},
        "seeds": [0], "token_budget": 300, "time_budget": 6, "eval_points": 1, "processes": 1, **extra,
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_config_keys_one_shard_keeps_the_identity_and_bad_plans_are_refused(tmp_path):
    plain = load_sim_config(_config(tmp_path))
    s1 = make_spec(plain, "heloco_dylu", "h", "non-iid", 0, None)
    explicit = load_sim_config(_config(tmp_path, shards=1))
    assert make_spec(explicit, "heloco_dylu", "h", "non-iid", 0, None) == s1
    assert _spec_key(explicit, s1) == _spec_key(plain, s1) and '"shards"' not in _spec_key(plain, s1)
    s4 = make_spec(plain, "heloco_dylu_s4", "h", "non-iid", 0, None)
    assert s4.shards == 4 and s4.shard_delay is None
    # a link: each part's bytes (fp32 here) over the holder's link; one latency for every worker and shard
    linked = load_sim_config(_config(tmp_path, shard_delay={"latency_s": 0.02, "jitter_s": 0.1, "link": 6.25e6}))
    d = make_spec(linked, "heloco_dylu_s4", "h", "non-iid", 0, None).shard_delay
    assert d["latency_s"] == [[0.02] * 4] * 2 and d["jitter_s"] == 0.1
    from heloco_p2p.local import build_model
    from heloco_p2p.local.model import trainable_params
    with torch.device("meta"):
        n = sum(p.numel() for p in trainable_params(build_model(linked.run_config().model)))
    assert sum(d["link_seconds"]) == pytest.approx(4 * n / 6.25e6)
    for extra, needle in (({"shards": 2, "experiments": [{"algorithms": ["sync_diloco"], "heterogeneity": ["h"]}]},
                           "asynchronous"),
                          ({"shards": 999}, "exceeds"),
                          ({"shard_delay": {"latency_s": [0.1, 0.2]}}, "latency_s"),
                          ({"overlap": True}, "overlapped")):
        with pytest.raises(ConfigError, match=needle):
            load_sim_config(_config(tmp_path, **extra))


def test_results_and_curves_carry_the_per_shard_staleness(tmp_path):
    path = _config(tmp_path, shard_delay={"latency_s": 0.05, "jitter_s": 0.3})
    results = run_config(load_sim_config(path), tmp_path / "out", progress=False)
    by_algo = {r["algorithm"]: r for r in results["runs"]}
    assert by_algo["heloco_dylu"]["shards"] == 1 and by_algo["heloco_dylu_s4"]["shards"] == 4
    st = by_algo["heloco_dylu_s4"]["shard_staleness"]
    assert len(st["mean"]) == len(st["max"]) == 4 and st["all_max"] == max(st["max"])
    curves = (tmp_path / "out" / "curves.jsonl").read_text().splitlines()
    assert all('"shard_staleness"' in line for line in curves)
