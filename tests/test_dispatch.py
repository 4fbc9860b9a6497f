"""Look-ahead dispatch (HeLoCo's Eq. 5): rounds start from θ̄ = θ − η·μ·m, Δ is applied to θ.

Values are worked by hand on one-element tensors (lookahead η 0.7, γ 0.9 unless said).
"""
from dataclasses import replace

import pytest
import torch

from heloco_p2p.algorithms import ALGORITHMS
from heloco_p2p.outer import build_engine
from heloco_p2p.sim import SimSpec, Simulation

from fakes import synthetic_streams as streams
from fakes import synthetic_val_blocks as val_blocks


def one(x: float) -> list[torch.Tensor]:
    return [torch.tensor([x], dtype=torch.float64)]


def test_current_dispatch_hands_out_the_live_parameters():
    engine = build_engine(one(1.0), "lookahead", dispatch="current")
    engine.commit(one(1.0), 0)
    out = engine.dispatch_params()
    assert all(a is b for a, b in zip(out, engine.params))  # no copy: documented


def test_lookahead_before_any_momentum_is_theta_itself():
    engine = build_engine(one(2.0), "lookahead", dispatch="lookahead")
    assert engine.dispatch_params()[0] is engine.params[0]


def test_lookahead_dispatch_by_hand():
    engine = build_engine(one(0.0), "lookahead", {"lr": 0.7, "momentum": 0.9}, dispatch="lookahead")
    engine.commit(one(1.0), 0)
    # m = 0.1·1 = 0.1; θ = 0 − 0.7·(0.9·0.1 + 1) = −0.763; θ̄ = θ − 0.7·0.9·m = −0.763 − 0.063 = −0.826
    assert engine.momentum[0].item() == pytest.approx(0.1, abs=1e-15)
    assert engine.params[0].item() == pytest.approx(-0.763, abs=1e-15)
    bar = engine.dispatch_params()
    assert bar[0].item() == pytest.approx(-0.826, abs=1e-15)
    assert bar[0] is not engine.params[0]  # new tensors; θ itself is unchanged
    assert engine.params[0].item() == pytest.approx(-0.763, abs=1e-15)


def test_the_pseudo_gradient_measured_from_theta_bar_is_applied_to_theta():
    engine = build_engine(one(0.0), "lookahead", {"lr": 0.7, "momentum": 0.9}, dispatch="lookahead")
    engine.commit(one(1.0), 0)  # θ = −0.763, m = 0.1, θ̄ = −0.826
    theta_local = engine.dispatch_params()[0] - 0.5  # a worker moved 0.5 from θ̄
    delta = [engine.dispatch_params()[0] - theta_local]  # Δ = θ̄ − θ_local = 0.5
    engine.commit(delta, 1)
    # m = 0.9·0.1 + 0.1·0.5 = 0.14; θ = −0.763 − 0.7·(0.9·0.14 + 0.5) = −1.2012 (from θ, not θ̄)
    assert engine.momentum[0].item() == pytest.approx(0.14, abs=1e-14)
    assert engine.params[0].item() == pytest.approx(-1.2012, abs=1e-14)


def test_nesterov_dispatch_uses_its_own_lr_momentum_and_buffer():
    engine = build_engine(one(0.0), "nesterov", {"lr": 0.07, "momentum": 0.9}, dispatch="lookahead")
    engine.commit(one(1.0), 0)
    # b = 1; θ = −0.07·(1 + 0.9) = −0.133; θ̄ = θ − 0.07·0.9·b = −0.196
    assert engine.dispatch_params()[0].item() == pytest.approx(-0.196, abs=1e-15)


def test_dispatch_is_part_of_the_engine_config_and_an_old_state_loads_as_current():
    engine = build_engine(one(0.0), "lookahead", dispatch="lookahead")
    assert engine.config["dispatch"] == "lookahead" and engine.config["weight_order"] == "after"
    old = build_engine(one(0.0), "lookahead")
    state = old.state_dict()
    for k in ("dispatch", "weight_order"):
        del state["config"][k]  # a state written before these options
    old.load_state_dict(state)
    with pytest.raises(ValueError, match="dispatch"):
        engine.load_state_dict(state)  # strict: lookahead != the state's current


def test_unknown_dispatch_is_refused():
    with pytest.raises(ValueError, match="dispatch: must be one of current, lookahead"):
        build_engine(one(0.0), "lookahead", dispatch="ahead")


# -- the simulator starts every round from the dispatch point --------------------------------------
def spec(algo, overlap=False, comm=(0.0, 0.0)):
    preset = ALGORITHMS[algo]
    return SimSpec(algorithm=preset, lr=preset.lr, heterogeneity="test", slowness=[1.0, 2.0], data="non-iid", seed=0,
                   steps_per_round=2, step_time=1.0, comm_seconds=list(comm), token_budget=1, time_budget=8.5,
                   eval_points=2, overlap=overlap)


def _spy(sim):
    """Record, in order, θ̄ the engine gives out and what each worker's trainer loads or folds in."""
    handed, loaded = [], []
    real = sim.engine.dispatch_params

    def dispatch():
        out = real()
        handed.append([t.clone() for t in out])
        return out

    sim.engine.dispatch_params = dispatch
    for w in sim.workers:
        load = w.trainer.load_params

        def spy(params, load=load):
            loaded.append([t.detach().clone() for t in params])
            load(params)

        w.trainer.load_params = spy
    return handed, loaded


@pytest.mark.parametrize("algo", ["mla_dispatch", "heloco"])
def test_simulated_rounds_start_from_theta_bar(sim_run_cfg, algo):
    regions = ["a", "b"]
    sim = Simulation(sim_run_cfg, spec(algo), regions, streams, val_blocks(regions))
    handed, loaded = _spy(sim)
    res = sim.run()
    assert len(res.commits) >= 6 and len(loaded) == len(handed) >= 6
    for h, l in zip(handed, loaded):
        assert all(torch.equal(a, b) for a, b in zip(h, l))
    # after the first commit the momentum exists: θ̄ ≠ θ from then on
    assert not all(torch.equal(a, b) for a, b in zip(sim.engine.dispatch_params(), sim.engine.params))


def test_current_dispatch_in_the_simulator_loads_theta(sim_run_cfg):
    regions = ["a", "b"]
    sim = Simulation(sim_run_cfg, spec("async_mla"), regions, streams, val_blocks(regions))
    handed, loaded = _spy(sim)
    sim.run()
    final = [p.clone() for p in sim.engine.params]
    assert all(torch.equal(a, b) for a, b in zip(handed[-1], loaded[-1]))
    assert all(torch.equal(a, b) for a, b in zip(sim.engine.dispatch_params(), final))


def test_overlapped_rounds_fold_in_theta_bar_after_each_commit(sim_run_cfg):
    regions = ["a", "b"]
    sim = Simulation(sim_run_cfg, spec("mla_dispatch", overlap=True, comm=(1.0, 1.0)), regions, streams,
                     val_blocks(regions))
    folds = []
    real_commit = sim.engine.commit

    def commit(*args, **kwargs):
        info = real_commit(*args, **kwargs)
        folds.append([t.clone() for t in sim.engine.dispatch_params()])
        return info

    sim.engine.commit = commit
    sim.run()
    assert len(folds) >= 3
    last_worker = sim.commits[-1]["worker"]
    # the reply the worker folds into its next round is θ̄ right after its commit, bitwise
    assert all(torch.equal(a, b) for a, b in zip(sim.workers[last_worker].fold_params, folds[-1]))
    assert not all(torch.equal(a, b) for a, b in zip(folds[-1], sim.engine.params))


def test_overlap_with_free_communication_equals_blocking_mode_under_lookahead_dispatch(sim_run_cfg):
    regions = ["a", "b"]
    runs = [Simulation(sim_run_cfg, spec("heloco", overlap=o), regions, streams, val_blocks(regions)).run()
            for o in (False, True)]
    assert runs[0].commits == runs[1].commits
    assert runs[0].at_time["val_loss"] == runs[1].at_time["val_loss"]


def test_a_preset_with_current_dispatch_matches_its_lookahead_twin_until_momentum_exists():
    # mla_dispatch differs from async_mla only in dispatch and ρ: with ρ none and one commit,
    # both hand out θ before the first commit
    a = replace(ALGORITHMS["mla_dispatch"], staleness_weight="none").build_engine(one(1.0), num_workers=2)
    b = ALGORITHMS["async_mla"].build_engine(one(1.0), num_workers=2)
    assert torch.equal(a.dispatch_params()[0], b.dispatch_params()[0])
    a.commit(one(0.5), 0)
    b.commit(one(0.5), 0)
    assert torch.equal(a.params[0], b.params[0])
    assert not torch.equal(a.dispatch_params()[0], b.dispatch_params()[0])
