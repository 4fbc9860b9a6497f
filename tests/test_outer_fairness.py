"""Region-fair weights ρ_w (outer/fairness.py) against their formulas, and in the engine."""
from __future__ import annotations

import math

import pytest
import torch

from heloco_p2p.algorithms import ALGORITHMS, resolve_outer
from heloco_p2p.config import ConfigError, load_config
from heloco_p2p.outer import build_engine, registry


def _fair(name, **args):
    return registry.build("fairness", name, args)


def test_compute_time_alpha1_is_rescaled_asgd_by_hand():
    # round times 1 (fast) and 15 (three slow workers), no smoothing:
    # c = Σ 1/T / Σ T^0 = (1 + 3/15) / 4 = 0.3 ; ρ_fast = 0.3 · 1, ρ_slow = 0.3 · 15 = 4.5
    f = _fair("compute_time", decay=0.0)
    v = 0
    for w, t in [("a", 1.0), ("b", 15.0), ("c", 15.0), ("d", 15.0)]:
        f.weight(w, t, v)
        v += 1
    assert f.weight("a", 1.0, v) == pytest.approx(0.3)
    assert f.weight("b", 15.0, v + 1) == pytest.approx(4.5)
    # every worker contributes the same weight per unit of time: ρ_w / T_w equal
    assert 0.3 / 1.0 == pytest.approx(4.5 / 15.0)
    # and the commit-rate-weighted mean of ρ is 1 (the total step per unit of time is unchanged)
    rates = [1.0, 1 / 15, 1 / 15, 1 / 15]
    rhos = [0.3, 4.5, 4.5, 4.5]
    assert sum(r * p for r, p in zip(rates, rhos)) / sum(rates) == pytest.approx(1.0)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 1.5])
def test_compute_time_general_alpha_formula(alpha):
    times = {"a": 2.0, "b": 3.0, "c": 11.0}
    f = _fair("compute_time", decay=0.0, alpha=alpha, rho_max=1e6)
    for i, (w, t) in enumerate(times.items()):
        f.weight(w, t, i)
    c = sum(1 / t for t in times.values()) / sum(t ** (alpha - 1) for t in times.values())
    for w, t in times.items():
        assert f.weight(w, t, 10) == pytest.approx(c * t ** alpha)
    if alpha == 0.0:
        assert f.weight("a", 2.0, 11) == pytest.approx(1.0)


def test_compute_time_ema_and_clip():
    f = _fair("compute_time", decay=0.5, rho_max=2.0)
    f.weight("a", 1.0, 0)
    f.weight("a", 3.0, 1)
    assert f.values["a"] == pytest.approx(2.0)  # 0.5·1 + 0.5·3
    f.weight("b", 100.0, 2)  # c·T_b = (1/2 + 1/100)/2 · 100 = 25.5 → clipped to 2
    assert f.weight("b", 100.0, 3) == 2.0


def test_inactive_workers_are_forgotten():
    f = _fair("compute_time", decay=0.0, forget=5)
    f.weight("slow", 10.0, 0)
    for v in range(1, 8):
        rho = f.weight("fast", 1.0, v)
    assert "slow" not in f.values  # last seen at version 0 < 7 − 5
    assert rho == pytest.approx(1.0)  # alone: c = 1/T, ρ = 1


def test_commit_share_alpha1_equalises_contributions():
    f = _fair("commit_share", rate=0.02, rho_max=100.0)
    pattern = ["a"] * 15 + ["b", "c", "d"]  # a commits 15 times per commit of each slow worker
    rho = {}
    for v in range(18 * 60):
        w = pattern[v % len(pattern)]
        rho[w] = f.weight(w, None, v)
    shares = {w: f.values[w] / sum(f.values.values()) for w in f.values}
    assert shares["a"] == pytest.approx(15 / 18, abs=0.05)
    # ρ_w · share_w is the same for every worker (= 1/W): equal contribution per unit of time
    contrib = [rho[w] * shares[w] for w in "abcd"]
    for x in contrib:
        assert x == pytest.approx(0.25, rel=0.15)


def test_fairness_args_are_checked():
    with pytest.raises(ValueError, match=r"^fairness_args.alpha: must be a number in \[0, 2\]"):
        registry.check_args("fairness", "compute_time", {"alpha": 3})
    with pytest.raises(ValueError, match="rho_min"):
        registry.check_args("fairness", "commit_share", {"rho_min": 5.0, "rho_max": 2.0})
    with pytest.raises(ValueError, match="unknown fairness 'fair'"):
        registry.get("fairness", "fair")


def _engine(fairness="compute_time", **args):
    theta = [torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)]
    if fairness == "compute_time":
        args = {"decay": 0.0, **args}
    return build_engine(theta, "nesterov", {"lr": 1.0, "momentum": 0.0}, "none",
                        fairness=fairness, fairness_args=args)


def test_engine_scales_the_step_by_rho_by_hand():
    e = _engine()
    d = [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    e.commit(d, 0, worker="fast", seconds=1.0)  # alone: ρ = 1 → θ = −1
    assert torch.equal(e.params[0], -torch.ones(3, dtype=torch.float64))
    info = e.commit(d, 1, worker="slow", seconds=3.0)  # c = (1 + 1/3)/2 = 2/3, ρ_slow = 2
    assert info.fairness_weight == pytest.approx(2.0)
    assert info.summary()["fairness_weight"] == pytest.approx(2.0)
    assert torch.allclose(e.params[0], torch.full((3,), -3.0, dtype=torch.float64))
    info = e.commit(d, 2, worker="fast", seconds=1.0)  # ρ_fast = 2/3
    assert info.fairness_weight == pytest.approx(2 / 3)
    assert torch.allclose(e.params[1], torch.full((2, 2), -3.0 - 2 / 3, dtype=torch.float64))


def test_engine_without_worker_is_unweighted():
    e = _engine()
    info = e.commit([torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)], 0)
    assert info.fairness_weight == 1.0 and e.fairness.values == {}


def test_bad_seconds_leave_state_bitwise_unchanged():
    e = _engine()
    d = [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    e.commit(d, 0, worker="a", seconds=1.0)
    before = e.state_dict()
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(ValueError, match="seconds"):
            e.commit(d, 1, worker="b", seconds=bad)
    after = e.state_dict()
    assert after["version"] == before["version"] and after["fairness"] == before["fairness"]
    assert all(torch.equal(x, y) for x, y in zip(after["params"], before["params"]))


def test_state_round_trip_reproduces_later_commits_bitwise():
    g = torch.Generator().manual_seed(0)

    def delta():
        return [torch.randn(3, generator=g, dtype=torch.float64), torch.randn(2, 2, generator=g, dtype=torch.float64)]

    a = build_engine([torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)], "lookahead",
                     correction="heloco", fairness="compute_time")
    for k in range(5):
        a.commit(delta(), a.version, worker=str(k % 2), seconds=1.0 + 4 * (k % 2))
    b = build_engine([torch.zeros(3, dtype=torch.float64), torch.zeros(2, 2, dtype=torch.float64)], "lookahead",
                     correction="heloco", fairness="compute_time")
    b.load_state_dict(a.state_dict())
    for k in range(4):
        d = delta()
        ia = a.commit(d, a.version - 1, worker=str(k % 3), seconds=2.0 + k)
        ib = b.commit(d, b.version - 1, worker=str(k % 3), seconds=2.0 + k)
        assert ia.fairness_weight == ib.fairness_weight
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))


def test_a_state_written_before_fairness_existed_still_loads():
    e = _engine("none")
    e.commit([torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)], 0)
    old = e.state_dict()
    del old["fairness"]
    old["config"] = {k: v for k, v in old["config"].items() if not k.startswith("fairness")}
    fresh = _engine("none")
    fresh.load_state_dict(old)
    assert fresh.version == 1


def test_config_and_presets_carry_fairness():
    cfg = load_config("configs/tiny.yaml", overrides={"outer.algorithm": "heloco", "outer.fairness": "compute_time",
                                                      "outer.fairness_args": {"alpha": 0.5}})
    _, preset = resolve_outer(cfg.outer)
    assert preset.fairness == "compute_time" and preset.fairness_args == {"alpha": 0.5}
    engine = preset.build_engine([torch.zeros(2)], num_workers=2)
    assert engine.fairness.name == "compute_time" and engine.fairness.args["alpha"] == 0.5
    with pytest.raises(ConfigError, match="outer.fairness"):
        load_config("configs/tiny.yaml", overrides={"outer.fairness": "bogus"})
    assert all(p.fairness in registry.names("fairness") for p in ALGORITHMS.values())
    assert math.isfinite(ALGORITHMS["heloco"].lr)


def test_region_memory_applies_the_mean_of_latest_slots_by_hand():
    e = _engine("region_memory")
    one = lambda x: [torch.full((3,), x, dtype=torch.float64), torch.full((2, 2), x, dtype=torch.float64)]  # noqa: E731
    e.commit(one(1.0), 0, worker="a")  # G = Δa = 1 → θ = −1
    assert torch.equal(e.params[0], torch.full((3,), -1.0, dtype=torch.float64))
    e.commit(one(3.0), 1, worker="b")  # G = (1 + 3)/2 = 2 → θ = −3
    assert torch.equal(e.params[0], torch.full((3,), -3.0, dtype=torch.float64))
    e.commit(one(5.0), 2, worker="a")  # a's slot replaced: G = (5 + 3)/2 = 4 → θ = −7
    assert torch.equal(e.params[1], torch.full((2, 2), -7.0, dtype=torch.float64))
    info = e.commit(one(2.0), 3)  # no worker: Δ alone, not stored
    assert torch.equal(e.params[0], torch.full((3,), -9.0, dtype=torch.float64)) and info.fairness_weight == 1.0
    assert sorted(e.fairness.slots) == ["a", "b"]


def test_region_memory_forgets_and_round_trips():
    e = _engine("region_memory", forget=2)
    d = [torch.ones(3, dtype=torch.float64), torch.ones(2, 2, dtype=torch.float64)]
    e.commit(d, 0, worker="gone")
    for v in range(1, 5):
        e.commit([2 * t for t in d], v, worker="here")
    assert list(e.fairness.slots) == ["here"]
    f = _engine("region_memory", forget=2)
    f.load_state_dict(e.state_dict())
    e.commit(d, 5, worker="new")
    f.commit(d, 5, worker="new")
    assert all(torch.equal(x, y) for x, y in zip(e.params, f.params))


def test_coordinator_keys_fairness_by_region_and_reported_seconds():
    from heloco_p2p.roles.messages import fairness_inputs

    assert fairness_inputs({"region": "de", "stats": {"seconds": 12.5}}, "Qm1") == ("region:de", 12.5)
    assert fairness_inputs({"stats": {"seconds": 0.0}}, "Qm1") == ("peer:Qm1", None)
    assert fairness_inputs({"region": 7, "stats": {"seconds": float("nan")}}, "Qm2") == ("peer:Qm2", None)
    assert fairness_inputs({"region": "x" * 500, "stats": {"seconds": 1e12}}, "Qm3") == ("region:" + "x" * 64, 86400.0)
    assert fairness_inputs({"region": "fr", "stats": "bad"}, "Qm4") == ("region:fr", None)


def test_replicas_applying_the_same_fair_commits_stay_bitwise_equal():
    from heloco_p2p.roles.commit_state import CommitState

    def state():
        return CommitState(build_engine([torch.zeros(4), torch.zeros(2, 3)], "lookahead", correction="heloco",
                                        fairness="compute_time"))

    a, b = state(), state()
    g = torch.Generator().manual_seed(1)
    for k in range(6):
        d = [torch.randn(4, generator=g), torch.randn(2, 3, generator=g)]
        w, sec = ("region:de", 1.0) if k % 3 else ("region:ru", 9.0)
        ia = a.apply(d, a.version, f"p{k % 3}", k, 20, 1.0, w, sec)
        b.apply(d, b.version, f"p{k % 3}", k, 20, 1.0, w, sec)
    assert ia.fairness_weight != 1.0
    assert all(torch.equal(x, y) for x, y in zip(a.engine.params, b.engine.params))
    c = state()
    c.load_bytes(a.to_bytes())
    assert c.engine.fairness.values == a.engine.fairness.values
