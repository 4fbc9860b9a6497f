"""Corrections of a pseudo-gradient against the momentum: values, invariants, edge cases."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heloco_p2p.outer import apply_correction, registry

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


def _pair(c: float, nd: float = 1.0, nm: float = 1.0, n: int = 8, seed: int = 0, dtype=torch.float64):
    """Δ with ‖Δ‖ = nd and m with ‖m‖ = nm such that cos(Δ, m) = c (built in float64)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v /= v.norm()
    w = torch.randn(n, generator=g, dtype=torch.float64)
    w -= (w @ v) * v
    w /= w.norm()
    delta = nd * (c * v + math.sqrt(max(0.0, 1.0 - c * c)) * w)
    return delta.to(dtype), (nm * v).to(dtype)


def _correct(name: str, delta, m, args=None, unit: float = 1.0, staleness: int = 0):
    corr = registry.build("correction", name, args or {})
    out = apply_correction(corr, [delta], None if m is None else [m], unit, staleness)
    return out.tensors[0], out.decisions[0], out.stats


def _along(x: torch.Tensor, m: torch.Tensor) -> float:
    return (x.double() @ m.double() / m.double().norm()).item()


def _ortho(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    v = m.double() / m.double().norm()
    return x.double() - (x.double() @ v) * v


HELOCO = registry.check_args("correction", "heloco", {})


# ---------------------------------------------------------------- heloco (Table 3 defaults)
@pytest.mark.parametrize("c", [0.2 + 1e-9, 0.35, 0.99, 1.0])
def test_heloco_keeps_an_aligned_pseudo_grad_bitwise(c):
    delta, m = _pair(c)
    out, dec, _ = _correct("heloco", delta, m)
    assert dec.branch == "keep"
    assert out is delta  # not even copied


@pytest.mark.parametrize("c,nd,nm", [(-0.3, 1.0, 1.0), (-0.9, 2.0, 0.5), (-0.05, 1.0, 3.0)])
def test_heloco_shrink_removes_share_beta_of_the_opposing_component(c, nd, nm):
    delta, m = _pair(c, nd, nm)
    out, dec, stats = _correct("heloco", delta, m)
    c_meas = stats.cosines[0]
    conf = nd / (nd + HELOCO["kappa"] * nm + HELOCO["eps"])
    beta = min(HELOCO["k_s"] * -c_meas * conf, HELOCO["beta_max"])
    assert dec.branch == "shrink"
    assert _along(out, m) == pytest.approx((1 - beta) * c_meas * nd, rel=1e-12, abs=1e-14)
    torch.testing.assert_close(_ortho(out, m), _ortho(delta, m), rtol=0, atol=1e-14)
    torch.testing.assert_close(out, delta - beta * c_meas * nd * m / m.norm(), rtol=0, atol=1e-15)


def test_heloco_shrink_with_beta_max_1_is_pcgrads_projection():
    delta, m = _pair(-0.8, 1.0, 0.2)  # κ 1: conf ≈ 0.83, k_s·0.8·conf > 1: β capped at β_max = 1
    shrunk, dec, _ = _correct("heloco", delta, m, {"beta_max": 1.0, "k_s": 2.0, "kappa": 1.0})
    projected, _, _ = _correct("pcgrad", delta, m)
    assert dec.s == pytest.approx(0.8, rel=1e-12)  # s = −β c with β = 1
    torch.testing.assert_close(shrunk, projected, rtol=0, atol=0)


@pytest.mark.parametrize("rule", ["normalized", "printed"])
@pytest.mark.parametrize("c", [1e-9, 0.02, 0.2 - 1e-9])
def test_heloco_reorient_keeps_the_norm_and_follows_the_formula(c, rule):
    nd, nm = 1.5, 0.7
    delta, m = _pair(c, nd, nm)
    out, dec, stats = _correct("heloco", delta, m, {"lambda_rule": rule})
    c_meas = stats.cosines[0]
    conf = nd / (nd + HELOCO["kappa"] * nm + HELOCO["eps"])
    if rule == "normalized":
        lam = min(HELOCO["k_d"] * (HELOCO["c_ok"] - c_meas) / (HELOCO["c_ok"] - HELOCO["c_bad"]) * conf, 1.0)
    else:
        lam = min(HELOCO["k_d"] * (1 - c_meas) * conf, 1.0)
    u = (1 - lam) * delta / nd + lam * m / nm
    assert dec.branch == "reorient"
    assert out.norm().item() == pytest.approx(nd, rel=1e-12)
    torch.testing.assert_close(out, nd * u / u.norm(), rtol=0, atol=1e-14)
    assert _along(out, m) > _along(delta, m)  # bent towards m


def test_heloco_jumps_at_zero_cosine():
    # documented discontinuity: just below 0, β ≈ 0; just above, λ ≈ k_d·c_ok/(c_ok − c_bad)·conf
    below, _, _ = _correct("heloco", *_pair(-1e-9))
    above, _, _ = _correct("heloco", *_pair(1e-9))
    conf = 1.0 / (1.0 + HELOCO["kappa"] + HELOCO["eps"])
    lam = HELOCO["k_d"] * HELOCO["c_ok"] / (HELOCO["c_ok"] - HELOCO["c_bad"]) * conf
    assert (above - below).norm().item() > 0.5 * lam


@given(
    c=st.floats(-1.0, 1.0),
    log_nd=st.floats(-30, 30),
    log_ratio=st.floats(-5, 5),
    n=st.integers(2, 12),
    seed=st.integers(0, 2**16),
)
@SETTINGS
def test_heloco_invariants(c, log_nd, log_ratio, n, seed):
    nd = 10.0**log_nd
    nm = nd * 10.0**log_ratio
    delta, m = _pair(c, nd, nm, n, seed)
    out, dec, stats = _correct("heloco", delta, m)
    c_meas = stats.cosines[0]
    assert torch.isfinite(out).all()
    assert dec.branch == ("keep" if c_meas >= HELOCO["c_ok"] else "shrink" if c_meas < 0 else "reorient")
    if dec.branch == "keep":
        assert out is delta
    elif dec.branch == "shrink":
        # the opposing component shrinks, never flips sign; the rest is untouched
        assert _along(delta, m) - 1e-9 * nd <= _along(out, m) <= 1e-9 * nd
        assert (_ortho(out, m) - _ortho(delta, m)).norm().item() <= 1e-9 * nd
    else:
        assert out.norm().item() == pytest.approx(nd, rel=1e-9)
        assert _along(out, m) >= _along(delta, m) - 1e-9 * nd


# ---------------------------------------------------------------- heloco_smooth
SMOOTH = registry.check_args("correction", "heloco_smooth", {})


def test_heloco_smooth_formula():
    nd, nm, c = 2.0, 1.0, -0.4
    delta, m = _pair(c, nd, nm)
    out, dec, stats = _correct("heloco_smooth", delta, m)
    c_meas = stats.cosines[0]
    beta = min(SMOOTH["k"] * nd / (nd + SMOOTH["kappa"] * nm + SMOOTH["eps"]), SMOOTH["beta_max"])
    assert dec.branch == "pull"
    torch.testing.assert_close(out, delta + beta * (SMOOTH["c_ok"] - c_meas) * nd * m / nm, rtol=0, atol=1e-14)
    assert _along(out, m) == pytest.approx(((1 - beta) * c_meas + beta * SMOOTH["c_ok"]) * nd, rel=1e-12)
    torch.testing.assert_close(_ortho(out, m), _ortho(delta, m), rtol=0, atol=1e-14)


@pytest.mark.parametrize("c0", [0.0, SMOOTH["c_ok"]])
def test_heloco_smooth_is_continuous_at_zero_and_at_c_ok(c0):
    # f(c) = Δ̂ for the unit Δ at cosine c; |f(c0 + h) − f(c0 − h)| must vanish with h
    gaps = []
    for h in (1e-3, 1e-5, 1e-7):
        lo, _, _ = _correct("heloco_smooth", *_pair(c0 - h))
        hi, _, _ = _correct("heloco_smooth", *_pair(c0 + h))
        gaps.append((hi - lo).norm().item())
        assert gaps[-1] <= 10 * h
    assert gaps[0] > gaps[1] > gaps[2]


def test_heloco_smooth_with_full_strength_and_no_margin_is_pcgrad():
    delta, m = _pair(-0.6, 1.0, 1.0)
    smooth, _, _ = _correct("heloco_smooth", delta, m, {"c_ok": 0.0, "k": 1e9, "beta_max": 1.0})
    projected, _, _ = _correct("pcgrad", delta, m)
    torch.testing.assert_close(smooth, projected, rtol=0, atol=1e-15)


@given(c=st.floats(-1.0, 1.0), log_nd=st.floats(-30, 30), log_ratio=st.floats(-5, 5), seed=st.integers(0, 2**16))
@SETTINGS
def test_heloco_smooth_invariants(c, log_nd, log_ratio, seed):
    nd = 10.0**log_nd
    delta, m = _pair(c, nd, nd * 10.0**log_ratio, 6, seed)
    out, dec, stats = _correct("heloco_smooth", delta, m)
    assert torch.isfinite(out).all()
    if stats.cosines[0] >= SMOOTH["c_ok"]:
        assert out is delta
    else:
        # moves the along-m component up, at most to c_ok·‖Δ‖; the orthogonal part is untouched
        assert _along(delta, m) - 1e-9 * nd <= _along(out, m) <= SMOOTH["c_ok"] * nd + 1e-9 * nd
        assert (_ortho(out, m) - _ortho(delta, m)).norm().item() <= 1e-9 * nd


# ---------------------------------------------------------------- pcgrad
@given(c=st.floats(-1.0, 1.0), log_nd=st.floats(-30, 30), log_ratio=st.floats(-5, 5), seed=st.integers(0, 2**16))
@SETTINGS
def test_pcgrad_is_exactly_the_projection_and_orthogonal_to_m(c, log_nd, log_ratio, seed):
    nd = 10.0**log_nd
    delta, m = _pair(c, nd, nd * 10.0**log_ratio, 6, seed)
    out, dec, stats = _correct("pcgrad", delta, m)
    if stats.cosines[0] >= 0:
        assert dec.branch == "keep" and out is delta
    else:
        assert dec.branch == "project"
        v = m / m.norm()
        torch.testing.assert_close(out, delta - (delta @ v) * v, rtol=0, atol=1e-12 * nd)
        assert abs(_along(out, m)) <= 1e-12 * nd


# ---------------------------------------------------------------- staleness
def test_staleness_correction_scales_by_power_of_one_plus_tau():
    delta, m = _pair(0.3)
    out, dec, _ = _correct("staleness", delta, m, {"alpha": 0.5}, staleness=3)
    assert dec.branch == "scale"
    torch.testing.assert_close(out, delta * 4**-0.5, rtol=0, atol=0)
    fresh, dec0, _ = _correct("staleness", delta, None, staleness=0)
    assert dec0.branch == "keep" and fresh is delta


# ---------------------------------------------------------------- no reference, edge cases
@pytest.mark.parametrize("name", ["heloco", "heloco_smooth", "pcgrad"])
def test_zero_or_missing_momentum_leaves_the_pseudo_grad_unchanged(name):
    delta, _ = _pair(-0.5)
    for m in (None, torch.zeros_like(delta), 1e-9 * _pair(-0.5)[1]):  # last: below momentum_floor·‖Δ‖
        out, dec, _ = _correct(name, delta, m)
        assert dec.branch == "skip" and out is delta


@pytest.mark.parametrize("name", ["none", "heloco", "heloco_smooth", "pcgrad", "staleness"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "nd,nm",
    [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0), (1e30, 1e30), (1e-30, 1e-30), (1e30, 1e-30), (1e-30, 1e30), (1e30, 1.0)],
)
def test_no_nan_for_zero_huge_or_tiny_norms(name, dtype, nd, nm):
    delta, m = _pair(-0.6, nd, nm, n=5, dtype=dtype)
    out, dec, stats = _correct(name, delta, m, unit=0.1, staleness=2)
    assert torch.isfinite(out).all(), (dec, stats)
    assert all(math.isfinite(x) for x in stats.delta_norms)
    assert stats.delta_norms[0] == pytest.approx(nd, rel=1e-5)
    if nd > 0 and nm > 0:
        assert stats.cosines[0] == pytest.approx(-0.6, abs=1e-5)
    assert out.double().norm().item() <= 1.01 * nd


def test_rules_see_the_momentum_norm_in_pseudo_gradient_units():
    # a sum-form buffer b with unit 0.1 must be judged like an EMA buffer 0.1·b
    delta, m = _pair(0.05, 1.0, 10.0)
    as_sum, _, _ = _correct("heloco", delta, m, unit=0.1)
    as_ema, _, _ = _correct("heloco", delta, 0.1 * m, unit=1.0)
    torch.testing.assert_close(as_sum, as_ema, rtol=1e-12, atol=1e-15)


def test_corrections_never_modify_their_inputs():
    delta, m = _pair(-0.7)
    d0, m0 = delta.clone(), m.clone()
    for name in registry.names("correction"):
        _correct(name, delta, m, staleness=1)
    assert torch.equal(delta, d0) and torch.equal(m, m0)
