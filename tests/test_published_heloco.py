"""HeLoCo as published: Table 3 constants, the λ rules, ρ = 1/√K and its order, the presets, the
one engine factory (simulator and swarm bitwise equal), config rules, the paper's inner loop."""
import json
import math
from dataclasses import replace

import pytest
import torch
import yaml
from click.testing import CliRunner

from heloco_p2p.algorithms import ALGORITHMS, build_dylu, build_outer_engine, resolve_outer
from heloco_p2p.cli import main
from heloco_p2p.config import ConfigError, load_config
from heloco_p2p.data import books_shard, open_source
from heloco_p2p.local import InnerTrainer, build_model
from heloco_p2p.local.inner import lr_at
from heloco_p2p.local.model import param_names, trainable_params
from heloco_p2p.outer import Block, build_engine, registry
from heloco_p2p.roles.commit_state import CommitState
from heloco_p2p.sim import SimSpec, Simulation, load_sim_config, make_spec

from fakes import SEQ, synthetic_streams
from fakes import synthetic_val_blocks as val_blocks


def one(x: float) -> list[torch.Tensor]:
    return [torch.tensor([x], dtype=torch.float64)]


# -- the correction -----------------------------------------------------------------------------
def test_heloco_defaults_are_table_3():
    args = registry.check_args("correction", "heloco", {})
    assert {k: args[k] for k in ("c_ok", "k_s", "k_d", "beta_max", "kappa", "eps", "c_bad", "lambda_rule")} == \
        {"c_ok": 0.2, "k_s": 0.5, "k_d": 1.0, "beta_max": 0.5, "kappa": 3.0, "eps": 1e-8, "c_bad": -0.2,
         "lambda_rule": "normalized"}


@pytest.mark.parametrize("rule,lam", [("normalized", 0.125), ("printed", 0.45)])
def test_reorient_lambda_by_hand(rule, lam):
    # ‖Δ‖ 1, ‖m‖ 1/3, c 0.1: conf = 1/(1 + 3·(1/3) + 1e-8) ≈ 0.5
    #   normalized λ = 1·(0.2 − 0.1)/(0.2 + 0.2)·0.5 = 0.125;  printed λ = 1·(1 − 0.1)·0.5 = 0.45
    corr = registry.build("correction", "heloco", {"lambda_rule": rule})
    d = corr(Block(1.0, 1.0 / 3.0, 0.1, 0))
    u = math.sqrt((1 - lam) ** 2 + lam**2 + 2 * lam * (1 - lam) * 0.1)
    assert d.branch == "reorient"
    assert d.a == pytest.approx((1 - lam) / u, rel=1e-7) and d.s == pytest.approx(lam / u, rel=1e-7)


def test_shrink_beta_by_hand():
    # c −0.5, conf 0.5: β = min(0.5·0.5·0.5, 0.5) = 0.125; Δ̂ = Δ − β c ‖Δ‖ v̂: s = 0.0625
    d = registry.build("correction", "heloco", {})(Block(1.0, 1.0 / 3.0, -0.5, 0))
    assert d.branch == "shrink" and d.a == 1.0 and d.s == pytest.approx(0.0625, rel=1e-7)


def test_normalized_lambda_is_continuous_at_c_ok():
    corr = registry.build("correction", "heloco", {})
    d = corr(Block(1.0, 0.1, 0.2 - 1e-12, 0))
    assert d.branch == "reorient" and d.s < 1e-10 and d.a == pytest.approx(1.0, abs=1e-10)


def test_c_bad_must_be_below_c_ok_and_lambda_rule_is_named():
    with pytest.raises(ValueError, match=r"correction_args\.c_bad: must be < c_ok"):
        registry.check_args("correction", "heloco", {"c_bad": 0.2})
    with pytest.raises(ValueError, match="lambda_rule: must be one of normalized, printed"):
        registry.check_args("correction", "heloco", {"lambda_rule": "linear"})


# -- ρ and its order ---------------------------------------------------------------------------
def test_base_weights_by_hand():
    assert registry.build("staleness_weight", "base").weight(7, num_workers=4) == 0.5
    assert registry.build("staleness_weight", "base_inverse_sqrt").weight(3, num_workers=4) == 0.25
    with pytest.raises(ValueError, match="num_workers"):
        registry.build("staleness_weight", "base").weight(0)


def test_a_commit_without_k_is_refused_and_changes_nothing():
    engine = build_engine(one(1.0), "lookahead", staleness_weight="base")
    before = engine.state_dict()
    with pytest.raises(ValueError, match="num_workers"):
        engine.commit(one(1.0), 0)
    assert engine.version == 0 and torch.equal(engine.params[0], before["params"][0])
    info = engine.commit(one(1.0), 0, num_workers=4)  # K given with the commit
    assert info.staleness_weight == 0.5


@pytest.mark.parametrize("order", ["before", "after"])
def test_rho_base_through_lookahead_by_hand(order):
    # no correction: both orders give G = 0.5·Δ. m = 0.1·0.5 = 0.05; θ = 0 − 0.7·(0.9·0.05 + 0.5) = −0.3815
    engine = build_engine(one(0.0), "lookahead", staleness_weight="base", weight_order=order, num_workers=4)
    engine.commit(one(1.0), 0)
    assert engine.momentum[0].item() == pytest.approx(0.05, abs=1e-15)
    assert engine.params[0].item() == pytest.approx(-0.3815, abs=1e-15)


def test_weight_before_corrects_rho_delta_bitwise():
    # "before" is the correction of ρΔ applied with scale 1: bit for bit, feeding ρΔ to an engine with ρ = 1
    g = torch.Generator().manual_seed(0)
    m0, deltas = torch.randn(64, generator=g), [torch.randn(64, generator=g) for _ in range(6)]
    a = build_engine([torch.zeros(64)], "lookahead", correction="heloco", staleness_weight="base",
                     weight_order="before", num_workers=5)
    b = build_engine([torch.zeros(64)], "lookahead", correction="heloco")
    for e in (a, b):
        e.optimizer.buffers["momentum"] = [m0.clone()]  # a momentum to correct against
    rho = 5 ** -0.5
    branches = set()
    for d in deltas:
        ia = a.commit([d], a.version)
        ib = b.commit([torch.mul(d, rho)], b.version)
        branches |= set(ia.branches)
        assert ia.branches == ib.branches
        assert torch.equal(a.params[0], b.params[0]) and torch.equal(a.momentum[0], b.momentum[0])
        assert ia.norms_before[0] == pytest.approx(d.norm().item(), rel=1e-5)  # reported without ρ
    assert branches - {"keep"}  # the correction acted


def test_weight_order_changes_the_correction():
    m = torch.tensor([1.0, 0.0])
    d = torch.tensor([0.05, 1.0])  # c ≈ 0.05 < c_ok: reorient, λ ∝ conf, which ρ lowers before
    out = {}
    for order in ("before", "after"):
        e = build_engine([torch.zeros(2)], "lookahead", correction="heloco", staleness_weight="base",
                         weight_order=order, num_workers=4)
        e.optimizer.buffers["momentum"] = [m.clone()]
        e.commit([d], 0)
        out[order] = e.params[0].clone()
    assert not torch.equal(out["before"], out["after"])


# -- presets ------------------------------------------------------------------------------------
def test_published_heloco_preset():
    h = ALGORITHMS["heloco"]
    assert (h.mode, h.optimizer, h.optimizer_args, h.correction, h.dispatch, h.staleness_weight, h.weight_order) == \
        ("async", "lookahead", {"lr": 0.7, "momentum": 0.9}, "heloco", "lookahead", "base", "before")
    assert h.correction_args == {} and not h.dylu  # Table 3 are the class defaults


def test_the_ablation_presets_differ_from_heloco_in_one_part_each():
    h = ALGORITHMS["heloco"]
    assert ALGORITHMS["heloco_correction_only"] == replace(h, name="heloco_correction_only", dispatch="current",
                                                           description=ALGORITHMS["heloco_correction_only"].description)
    assert ALGORITHMS["mla_dispatch"] == replace(h, name="mla_dispatch", correction="none",
                                                 description=ALGORITHMS["mla_dispatch"].description)
    mla = ALGORITHMS["async_mla"]
    assert (mla.correction, mla.dispatch, mla.staleness_weight, mla.weight_order) == ("none", "current", "none", "after")


def test_async_nesterov_is_async_diloco_at_lr_0_07():
    a, d = ALGORITHMS["async_nesterov"], ALGORITHMS["async_diloco"]
    assert a.optimizer_args == {"lr": 0.07, "momentum": 0.9}
    assert replace(a, name=d.name, optimizer_args=d.optimizer_args, description=d.description) == d


@pytest.mark.parametrize("name,fairness", [("heloco_dylu", "none"), ("heloco_fair", "compute_time"),
                                           ("heloco_region", "region_memory")])
def test_dylu_fair_and_region_are_built_on_the_published_heloco(name, fairness):
    p = ALGORITHMS[name]
    assert (p.correction, p.correction_args, p.dispatch, p.staleness_weight, p.weight_order, p.dylu, p.fairness) == \
        ("heloco", {}, "lookahead", "base", "before", True, fairness)


def test_algorithms_cli_json_keys():
    res = CliRunner().invoke(main, ["algorithms", "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == list(ALGORITHMS)
    keys = {"name", "optimizer", "dispatch", "correction", "correction_args", "staleness_weight", "weight_order",
            "dylu", "fairness", "lr"}
    assert all(set(r) == keys for r in rows)
    h = next(r for r in rows if r["name"] == "heloco")
    assert h["dispatch"] == "lookahead" and h["correction_args"]["kappa"] == 3.0 and h["lr"] == 0.7
    assert h["staleness_weight"] == {"name": "base", "args": {}} and h["weight_order"] == "before"
    dn = next(r for r in rows if r["name"] == "async_dn")
    assert dn["optimizer"]["args"]["buffer_size"] == "num_workers"
    text = CliRunner().invoke(main, ["algorithms"])
    assert text.exit_code == 0 and "heloco_correction_only" in text.output


# -- config -------------------------------------------------------------------------------------
def test_preset_correction_args_are_checked_against_the_presets_correction():
    cfg = load_config("configs/tiny.yaml", overrides={"outer.algorithm": "heloco", "outer.correction": "none",
                                                       "outer.correction_args": {"c_ok": 0.3}})
    _, preset = resolve_outer(cfg.outer)
    assert preset.correction_args == {"c_ok": 0.3}  # was refused: checked against correction "none"
    engine = build_outer_engine(cfg.outer, one(0.0), num_workers=5)
    assert engine.correction.args["c_ok"] == 0.3 and engine.correction.args["kappa"] == 3.0
    with pytest.raises(ConfigError, match="correction_args.c_ok: unexpected argument for correction 'none'"):
        load_config("configs/tiny.yaml", overrides={"outer.algorithm": "async_mla",
                                                    "outer.correction_args": {"c_ok": 0.3}})


def test_outer_fields_override_the_preset_and_default_to_it():
    cfg = load_config("configs/tiny.yaml", overrides={"outer.algorithm": "heloco_dylu", "outer.dispatch": "current",
                                                       "outer.staleness_weight": "none", "outer.dylu_min_steps": 3})
    _, p = resolve_outer(cfg.outer)
    assert (p.dispatch, p.staleness_weight, p.weight_order, p.dylu_min_steps) == ("current", "none", "before", 3)
    _, custom = resolve_outer(load_config("configs/tiny.yaml").outer)  # no preset: current, none, after
    assert (custom.dispatch, custom.staleness_weight, custom.weight_order) == ("current", "none", "after")
    with pytest.raises(ConfigError, match="staleness_weight: unknown staleness_weight 'bogus'"):
        load_config("configs/tiny.yaml", overrides={"outer.staleness_weight": "bogus"})


def test_testnet_config_runs_in_the_swarm_as_it_is():
    # the swarm refuses look-ahead dispatch and K-dependent ρ (Peer.start): the testnet opts out of both
    _, p = resolve_outer(load_config("configs/testnet.yaml").outer)
    assert p.name == "heloco_dylu" and p.dispatch == "current" and p.staleness_weight == "none"
    assert p.correction == "heloco" and p.dylu


def test_min_lr_and_min_lr_ratio_are_exclusive():
    with pytest.raises(ConfigError, match="min_lr .* and min_lr_ratio .* are both set"):
        load_config("configs/tiny.yaml", overrides={"inner.min_lr": 1.0e-6})  # tiny.yaml sets min_lr_ratio
    with pytest.raises(ConfigError, match="must be <= lr"):
        load_config("configs/heloco-paper.yaml", overrides={"inner.min_lr": 1.0})


def _paper_inner():
    cfg = load_config("configs/heloco-paper.yaml")
    return cfg.inner


def test_paper_cosine_to_an_absolute_floor_without_warmup():
    inner = _paper_inner()
    assert (inner.lr, inner.min_lr, inner.warmup_steps, inner.total_steps) == (2e-4, 1e-6, 0, 2000)
    assert lr_at(0, inner) == 2e-4
    assert lr_at(1000, inner) == pytest.approx((2e-4 + 1e-6) / 2, rel=1e-12)  # half-way: the mean
    assert lr_at(2000, inner) == pytest.approx(1e-6, rel=1e-12)
    assert lr_at(7000, inner) == lr_at(2000, inner)  # held at the floor after total_steps


def test_paper_inner_settings():
    cfg = load_config("configs/heloco-paper.yaml")
    i = cfg.inner
    assert (i.betas, i.weight_decay, i.grad_clip, i.fresh_optimizer, i.batch_size, i.steps_per_round) == \
        ((0.9, 0.999), 0.01, 0.0, True, 2, 20)
    assert (cfg.data.seq_len, cfg.model.num_layers, cfg.model.hidden_size, cfg.model.num_heads,
            cfg.model.tie_embeddings) == (128, 8, 128, 4, False)


def test_fresh_optimizer_starts_every_round_without_moments(sim_run_cfg):
    inner = sim_run_cfg.inner.model_copy(update={"fresh_optimizer": True})
    model = build_model(sim_run_cfg.model, seed=0)
    g = torch.Generator().manual_seed(0)
    trainer = InnerTrainer(model, inner, iter(lambda: torch.randint(0, 64, (2, SEQ), generator=g), None))
    trainer.run_round(None, 3)
    first = trainer.optimizer
    trainer.run_round(None, 2)
    assert trainer.optimizer is not first
    steps = {int(s["step"]) for s in trainer.optimizer.state.values()}
    assert steps == {2}  # AdamW's own step counter: only this round's steps
    assert trainer.step == 5  # the lr schedule keeps counting the worker's steps


# -- one factory: simulator and swarm ------------------------------------------------------------
def _sim_spec(preset, slowness=(1.0, 2.0)):
    return SimSpec(algorithm=preset, lr=preset.lr, heterogeneity="test", slowness=list(slowness), data="non-iid",
                   seed=0, steps_per_round=2, step_time=1.0, comm_seconds=[0.0] * len(slowness), token_budget=1,
                   time_budget=8.5, eval_points=2)


@pytest.mark.parametrize("algo", ["heloco", "heloco_fair", "async_dn_dylu", "mla_dispatch"])
def test_simulator_and_coordinator_engines_are_bitwise_equal(sim_run_cfg, algo):
    """The same run config and the same Δs give bitwise-equal engine states through the
    simulator's engine and through a CommitState built the swarm's way (resolve_outer + the factory)."""
    regions = ["a", "b"]
    cfg = sim_run_cfg.model_copy(update={"outer": sim_run_cfg.outer.model_copy(
        update={"algorithm": algo, "optimizer_args": {}, "correction_args": {}})})
    _, preset = resolve_outer(cfg.outer)  # the swarm's path from the run config
    sim = Simulation(cfg, _sim_spec(preset), regions, synthetic_streams, val_blocks(regions))
    log = []
    real = sim.engine.commit

    def commit(pseudo_grad, base_version, worker=None, seconds=None, num_workers=None):
        log.append(([t.clone() for t in pseudo_grad], base_version, worker, seconds, num_workers))
        return real(pseudo_grad, base_version, worker=worker, seconds=seconds, num_workers=num_workers)

    sim.engine.commit = commit
    sim.run()
    assert len(log) >= 6

    model = build_model(cfg.model, seed=0)  # the swarm builds θ0 like this (Peer._build_local)
    theta0 = [p.detach().clone() for p in trainable_params(model)]
    state = CommitState(build_outer_engine(preset, theta0, names=param_names(model), num_workers=len(regions)))
    for seq, (delta, base, worker, seconds, k) in enumerate(log):  # K as the coordinator forwards it with each commit
        state.apply(delta, base, peer=f"peer-{worker}", seq=seq, steps=2, norm=1.0, worker=worker, seconds=seconds,
                    num_workers=k or len(regions))

    a, b = sim.engine.state_dict(), state.engine.state_dict()
    assert a["version"] == b["version"] == len(log) and a["config"] == b["config"]
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    for name, bufs in a["optimizer"]["buffers"].items():
        other = b["optimizer"]["buffers"][name]
        assert (bufs is None) == (other is None)
        assert bufs is None or all(torch.equal(x, y) for x, y in zip(bufs, other))
    assert a["fairness"].keys() == b["fairness"].keys()
    if algo == "async_dn_dylu":
        assert sim.engine.optimizer.n == state.engine.optimizer.n == 2  # DN's buffer is K in both
    assert sim.dylu is None or sim.dylu.min_steps == build_dylu(preset).min_steps


def test_the_swarm_factory_refuses_dn_without_k_or_a_buffer_size():
    with pytest.raises(ValueError, match="buffer_size"):
        build_outer_engine(ALGORITHMS["async_dn"], one(0.0), num_workers=None)
    engine = build_outer_engine(ALGORITHMS["async_dn"].with_args({"buffer_size": 3}), one(0.0))
    assert engine.optimizer.n == 3


def test_the_simulator_honours_the_staleness_weight_and_dylu_floor(tmp_path):
    sim_yaml = tmp_path / "sim.yaml"
    sim_yaml.write_text(yaml.safe_dump({
        "name": "t", "base": "configs/tiny.yaml", "overrides": {"outer.dylu_min_steps": 3},
        "regions": ["de", "fr"], "steps_per_round": 4, "experiments": [
            {"algorithms": ["async_mla", "sync_diloco", "heloco_dylu", "mla_base"], "heterogeneity": ["none"],
             "data": ["non-iid-disjoint"]}],
        "heterogeneity_levels": {"none": [1.0, 1.0]}, "staleness_weight": "base",
        "variants": {"mla_base": {"base": "async_mla", "staleness_weight": "inverse_sqrt"}},
        "seeds": [0], "token_budget": 10, "time_budget": 10.0}))
    cfg = load_sim_config(sim_yaml)
    algos = cfg.algorithms()
    assert algos["async_mla"].staleness_weight == "base"  # every async rule gets ρ = base
    assert algos["sync_diloco"].staleness_weight == "none"
    assert algos["mla_base"].staleness_weight == "inverse_sqrt"  # a variant's own choice wins
    spec = make_spec(cfg, "heloco_dylu", "none", "non-iid-disjoint", 0, None)
    assert spec.algorithm.dylu_min_steps == 3 and build_dylu(spec.algorithm).min_steps == 3


# -- non-iid-disjoint ---------------------------------------------------------------------------
def test_books_shards_are_disjoint_cover_the_train_books_and_keep_validation():
    src = open_source("bible:it")
    shards = [books_shard(src, i, 5) for i in range(5)]
    books = [set(b for b, _ in s.chapter_ids("train")) for s in shards]
    assert all(not (books[i] & books[j]) for i in range(5) for j in range(i + 1, 5))
    assert set().union(*books) == set(src.train_book_ids()) and len(src.train_book_ids()) == 55
    assert all(s.chapter_ids("validation") == src.chapter_ids("validation") for s in shards)
    assert len({json.dumps(s.fingerprint(), sort_keys=True) for s in shards}) == 5  # separate token caches
    # the same positions in every language: worker w gets the same books whatever its language
    assert books_shard(open_source("bible:de"), 2, 5).train_books == shards[2].train_books


def test_disjoint_split_in_the_simulator_passes_each_worker_its_share(sim_run_cfg):
    seen = []

    def streams(region, seed, shard=None):
        seen.append((region, shard))
        return synthetic_streams(region, seed)

    regions = ["a", "b"]
    spec = replace(_sim_spec(ALGORITHMS["async_mla"]), data="non-iid-disjoint")
    Simulation(sim_run_cfg, spec, regions, streams, val_blocks(regions))
    assert seen == [("a", (0, 2)), ("b", (1, 2))]
