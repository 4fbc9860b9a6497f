"""OuterEngine: commit by hand, staleness, rejection, state round trip, sync DiLoCo, CommitInfo."""
from __future__ import annotations

import io
import json
import math

import pytest
import torch

from heloco_p2p.outer import CommitInfo, apply_correction, build_engine, registry

SHAPES = [(3, 4), (5,), (2, 3)]


def _tensors(seed: int, dtype=torch.float64, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(s, generator=g, dtype=dtype) for s in SHAPES]


def _snapshot(engine) -> dict:
    return engine.state_dict()


def _same_state(a: dict, b: dict) -> bool:
    if a["version"] != b["version"] or a["config"] != b["config"]:
        return False
    if not all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])):
        return False
    oa, ob = a["optimizer"], b["optimizer"]
    if oa["steps"] != ob["steps"]:
        return False
    for k in oa["buffers"]:
        x, y = oa["buffers"][k], ob["buffers"][k]
        if (x is None) != (y is None) or (x is not None and not all(torch.equal(p, q) for p, q in zip(x, y))):
            return False
    return True


COMBOS = [
    ("nesterov", {}, "none", {}),
    ("delayed_nesterov", {"buffer_size": 3, "c": 0.2}, "heloco", {}),
    ("lookahead", {}, "heloco", {}),
    ("lookahead", {}, "heloco_smooth", {"k": 2.0}),
    ("lookahead", {}, "pcgrad", {}),
    ("nesterov", {}, "staleness", {"alpha": 1.0}),
]


# ---------------------------------------------------------------- commit by hand
def test_commit_matches_hand_computed_numbers():
    # lookahead η = 1, γ = 1/2; pcgrad; ρ(τ) = (1 + τ)^(−1/2); one block of 2 elements.
    engine = build_engine([torch.tensor([1.0, 2.0], dtype=torch.float64)], "lookahead", {"lr": 1.0, "momentum": 0.5},
                          "pcgrad", {}, "inverse_sqrt")
    info1 = engine.commit([torch.tensor([1.0, 0.0], dtype=torch.float64)], base_version=0)
    # no momentum yet: skip; m = ½·Δ = [½, 0]; θ = θ − (½·m + Δ) = [1 − 1¼, 2]
    assert info1.branches == ["skip"] and info1.staleness == 0 and info1.staleness_weight == 1.0
    assert engine.params[0].tolist() == [-0.25, 2.0]
    assert engine.momentum[0].tolist() == [0.5, 0.0]

    info2 = engine.commit([torch.tensor([-1.0, 1.0], dtype=torch.float64)], base_version=0)
    # τ = 1, ρ = 1/√2; c = −1/√2 < 0: Δ̂ = Δ − (Δ·v̂)v̂ = [0, 1]; G = [0, 1/√2]
    # m = ½[½, 0] + ½G = [¼, 1/(2√2)];  θ = [−¼, 2] − (½m + G) = [−3/8, 2 − 5/(4√2)]
    r = 1 / math.sqrt(2)
    assert info2.version == 2 and info2.staleness == 1 and info2.base_version == 0
    assert info2.staleness_weight == pytest.approx(r, rel=1e-15)
    assert info2.branches == ["project"]
    assert info2.cosines[0] == pytest.approx(-r, rel=1e-15)
    assert info2.norms_before[0] == pytest.approx(math.sqrt(2), rel=1e-15)
    assert info2.norms_after[0] == pytest.approx(1.0, rel=1e-15)
    torch.testing.assert_close(engine.momentum[0], torch.tensor([0.25, r / 2], dtype=torch.float64), rtol=0, atol=1e-15)
    want = torch.tensor([-0.375, 2 - 5 / (4 * math.sqrt(2))], dtype=torch.float64)
    torch.testing.assert_close(engine.params[0], want, rtol=0, atol=1e-15)


def test_nesterov_commit_by_hand_on_three_elements():
    theta = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    engine = build_engine([theta], "nesterov", {"lr": 0.5, "momentum": 0.5})
    engine.commit([torch.tensor([2.0, 0.0, 4.0], dtype=torch.float64)], 0)
    # b = Δ = [2, 0, 4]; θ −= ½(Δ + ½b) = ½·[3, 0, 6]
    assert engine.params[0].tolist() == [-1.5, 1.0, -4.0]
    engine.commit([torch.tensor([0.0, 2.0, -4.0], dtype=torch.float64)], 1)
    # b = ½[2, 0, 4] + [0, 2, −4] = [1, 2, −2]; θ −= ½([0, 2, −4] + ½[1, 2, −2]) = [¼, 1½, −2½]
    assert engine.params[0].tolist() == [-1.75, -0.5, -1.5]
    assert engine.version == 2


def test_commit_info_norms_after_match_the_applied_correction():
    engine = build_engine(_tensors(0), "lookahead", {}, "heloco", {"k_d": 0.5})
    engine.commit(_tensors(1), 0)
    delta = _tensors(2)
    m = [x.clone() for x in engine.momentum]
    fixed = apply_correction(engine.correction, delta, m, engine.optimizer.momentum_unit, 0)
    info = engine.commit(delta, 1)
    assert info.branches == [d.branch for d in fixed.decisions]
    for got, t in zip(info.norms_after, fixed.tensors):
        assert got == pytest.approx(t.norm().item(), rel=1e-12)


# ---------------------------------------------------------------- staleness and rejection
def test_staleness_is_version_before_commit_minus_base_version():
    engine = build_engine(_tensors(0))
    for _ in range(5):
        engine.commit(_tensors(1), engine.version)
    assert engine.commit(_tensors(2), 2).staleness == 3
    assert engine.version == 6


@pytest.mark.parametrize("bad", [-1, 4, 100, 1.0, "2", None, True])
def test_bad_base_version_raises_and_leaves_state_bitwise_unchanged(bad):
    engine = build_engine(_tensors(0), "delayed_nesterov", {"buffer_size": 2}, "heloco")
    for v in range(3):
        engine.commit(_tensors(v + 1), v)
    before = _snapshot(engine)
    with pytest.raises(ValueError, match="base_version"):
        engine.commit(_tensors(9), bad)
    with pytest.raises(ValueError, match="base_version"):
        engine.sync_commit([_tensors(9)], bad)
    assert _same_state(before, _snapshot(engine))


@pytest.mark.parametrize(
    "bad",
    [
        lambda: _tensors(9)[:2],
        lambda: [torch.zeros(4, 3, dtype=torch.float64)] + _tensors(9)[1:],
        lambda: [torch.full((3, 4), math.nan, dtype=torch.float64)] + _tensors(9)[1:],
        lambda: _tensors(9)[:2] + [torch.full((2, 3), math.inf, dtype=torch.float64)],
        lambda: [torch.zeros(3, 4, dtype=torch.int64)] + _tensors(9)[1:],
        lambda: "not a list",
    ],
)
def test_bad_pseudo_grad_raises_and_leaves_state_bitwise_unchanged(bad):
    engine = build_engine(_tensors(0), "lookahead", {}, "heloco")
    engine.commit(_tensors(1), 0)
    before = _snapshot(engine)
    with pytest.raises(ValueError, match="pseudo_grad"):
        engine.commit(bad(), 1)
    with pytest.raises(ValueError, match="pseudo_grad"):
        engine.sync_commit([_tensors(3), bad()], 1)
    assert _same_state(before, _snapshot(engine))


# ---------------------------------------------------------------- state round trip
@pytest.mark.parametrize("opt,opt_args,corr,corr_args", COMBOS)
def test_state_dict_round_trip_reproduces_later_commits_bitwise(opt, opt_args, corr, corr_args):
    a = build_engine(_tensors(0), opt, opt_args, corr, corr_args, "inverse_sqrt")
    for v in range(4):  # mid-window for delayed_nesterov, so acc matters
        a.commit(_tensors(10 + v), max(0, v - 1))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = build_engine(_tensors(99), opt, opt_args, corr, corr_args, "inverse_sqrt")
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert _same_state(a.state_dict(), b.state_dict())
    for v in range(5):
        delta, base = _tensors(20 + v), a.version - (v % 3)
        ia, ib = a.commit(delta, base), b.commit(delta, base)
        assert ia.to_dict() == ib.to_dict()
    assert _same_state(a.state_dict(), b.state_dict())


def test_state_dict_is_a_copy():
    engine = build_engine(_tensors(0), "nesterov")
    engine.commit(_tensors(1), 0)
    sd = engine.state_dict()
    saved = [p.clone() for p in sd["params"]]
    engine.commit(_tensors(2), 1)
    assert all(torch.equal(x, y) for x, y in zip(sd["params"], saved))


def test_load_state_dict_with_another_config_is_refused_and_changes_nothing():
    a = build_engine(_tensors(0), "lookahead", {}, "heloco")
    a.commit(_tensors(1), 0)
    b = build_engine(_tensors(5), "lookahead", {}, "pcgrad")
    before = _snapshot(b)
    with pytest.raises(ValueError, match="correction"):
        b.load_state_dict(a.state_dict())
    assert _same_state(before, _snapshot(b))
    c = build_engine(_tensors(5), "nesterov")
    with pytest.raises(ValueError, match="optimizer"):
        c.load_state_dict(a.state_dict(), strict=False)
    b.load_state_dict(a.state_dict(), strict=False)  # same optimizer, other correction: allowed
    assert b.version == 1 and all(torch.equal(x, y) for x, y in zip(a.params, b.params))


# ---------------------------------------------------------------- sync DiLoCo
@pytest.mark.parametrize("opt,opt_args,corr,corr_args", COMBOS)
@pytest.mark.parametrize("k", [1, 3, 4])
def test_sync_commit_of_k_identical_pseudo_grads_equals_commit_of_one(opt, opt_args, corr, corr_args, k):
    a = build_engine(_tensors(0, torch.float32), opt, opt_args, corr, corr_args)
    b = build_engine(_tensors(0, torch.float32), opt, opt_args, corr, corr_args)
    for v in range(4):
        delta = _tensors(30 + v, torch.float32)
        ia = a.commit(delta, v)
        ib = b.sync_commit([[x.clone() for x in delta] for _ in range(k)], v)
        assert ib.num_pseudo_grads == k
        assert {**ia.to_dict(), "num_pseudo_grads": k} == ib.to_dict()
    assert all(torch.equal(x, y) for x, y in zip(a.params, b.params))


def test_sync_commit_steps_on_the_mean():
    deltas = [_tensors(40 + i) for i in range(3)]
    mean = [sum(ds) / 3 for ds in zip(*deltas)]
    a = build_engine(_tensors(0), "nesterov")
    b = build_engine(_tensors(0), "nesterov")
    a.sync_commit(deltas, 0)
    b.commit(mean, 0)
    for x, y in zip(a.params, b.params):
        torch.testing.assert_close(x, y, rtol=1e-14, atol=1e-14)
    assert a.version == 1


# ---------------------------------------------------------------- ownership, dtypes, CommitInfo
def test_engine_owns_copies_of_params_and_keeps_their_dtype():
    params = _tensors(0, torch.float32)
    engine = build_engine(params, "lookahead")
    params[0].add_(1.0)
    assert not torch.equal(engine.params[0], params[0])
    engine.commit([x.half() for x in _tensors(1, torch.float32)], 0)  # converted to float32
    assert all(p.dtype == torch.float32 for p in engine.params)


def test_pseudo_grad_is_not_modified_by_a_commit():
    engine = build_engine(_tensors(0), "lookahead", {}, "heloco")
    engine.commit(_tensors(1), 0)
    delta = [-x for x in engine.momentum]  # opposed: every block corrected
    copy = [x.clone() for x in delta]
    info = engine.commit(delta, 1)
    assert set(info.branches) == {"shrink"}
    assert all(torch.equal(x, y) for x, y in zip(delta, copy))


def test_commit_info_is_json_friendly():
    engine = build_engine(_tensors(0), "lookahead", {}, "heloco", {}, names=["wq", "bias", "norm"])
    first = engine.commit(_tensors(1), 0)
    info = engine.commit(_tensors(2), 0)
    for i in (first, info):
        json.dumps(i.to_dict(), allow_nan=False)
        json.dumps(i.summary(), allow_nan=False)
    s = info.summary()
    assert sum(s["branches"].values()) == len(SHAPES)
    assert s["mean_cosine"] == pytest.approx(sum(info.cosines) / len(SHAPES))
    assert s["total_norm_before"] == pytest.approx(math.sqrt(sum(x * x for x in info.norms_before)))
    assert [b["name"] for b in info.to_dict()["blocks"]] == ["wq", "bias", "norm"]
    assert first.summary()["mean_cosine"] is None and first.branch_counts() == {"skip": 3}


def test_commit_info_global_cosine_is_the_cosine_of_the_flattened_vectors():
    engine = build_engine(_tensors(0), "lookahead")
    engine.commit(_tensors(1), 0)
    delta = _tensors(2)
    d = torch.cat([x.flatten() for x in delta])
    m = torch.cat([x.flatten() for x in engine.momentum])
    info: CommitInfo = engine.commit(delta, 1)
    assert info.global_cosine() == pytest.approx((d @ m / d.norm() / m.norm()).item(), rel=1e-12)


def test_build_engine_accepts_every_registered_combination():
    for opt in registry.names("optimizer"):
        for corr in registry.names("correction"):
            for w in registry.names("staleness_weight"):
                engine = build_engine(_tensors(0), opt, {}, corr, {}, w, num_workers=4)
                engine.commit(_tensors(1), 0)
                info = engine.commit(_tensors(2), 0)
                assert all(torch.isfinite(p).all() for p in engine.params)
                assert engine.config["optimizer"] == opt and info.correction == corr


@pytest.mark.parametrize("corr", ["none", "heloco", "heloco_smooth", "pcgrad"])
@pytest.mark.parametrize("scale", [0.0, 1e-30, 1e30])
def test_commits_of_zero_tiny_or_huge_float32_pseudo_grads_stay_finite(corr, scale):
    engine = build_engine(_tensors(0, torch.float32), "lookahead", {}, corr)
    engine.commit(_tensors(1, torch.float32), 0)  # a momentum of ordinary size
    for v in range(1, 4):
        info = engine.commit(_tensors(1 + v, torch.float32, scale=scale * (-1) ** v), v)
        json.dumps(info.to_dict(), allow_nan=False)
        assert all(math.isfinite(x) for x in info.norms_before + info.norms_after)
    assert all(torch.isfinite(p).all() for p in engine.params)
    assert all(torch.isfinite(m).all() for m in engine.momentum)
