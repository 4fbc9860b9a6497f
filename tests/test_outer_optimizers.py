"""Outer optimizers against hand-written reference loops (float64, several steps)."""
from __future__ import annotations

import pytest
import torch

from heloco_p2p.outer import registry

STEPS = 7
SHAPES = [(3, 4), (5,), (2, 2, 2)]


def _deltas(seed: int, steps: int = STEPS) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES] for _ in range(steps)]


def _params(seed: int = 123) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]


def _run(name: str, args: dict, deltas, scales=None) -> tuple[list[torch.Tensor], object]:
    opt = registry.build("optimizer", name, args)
    params = _params()
    for t, d in enumerate(deltas):
        opt.step(params, d, scale=1.0 if scales is None else scales[t])
    return params, opt


def _close(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- nesterov
def test_nesterov_matches_reference_loop():
    lr, mu = 0.7, 0.9
    deltas = _deltas(0)
    got, _ = _run("nesterov", {"lr": lr, "momentum": mu}, deltas)
    theta, buf = _params(), [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for d in deltas:
        for i in range(len(SHAPES)):
            buf[i] = mu * buf[i] + d[i]
            theta[i] = theta[i] - lr * (d[i] + mu * buf[i])
    _close(got, theta)


def test_nesterov_matches_torch_sgd_nesterov():
    lr, mu = 0.7, 0.9
    deltas = _deltas(1)
    got, opt = _run("nesterov", {"lr": lr, "momentum": mu}, deltas)
    ref = [p.clone().requires_grad_(True) for p in _params()]
    sgd = torch.optim.SGD(ref, lr=lr, momentum=mu, nesterov=True)
    for d in deltas:
        for p, g in zip(ref, d):
            p.grad = g.clone()
        sgd.step()
    _close(got, [p.detach() for p in ref])
    _close(opt.momentum, [sgd.state[p]["momentum_buffer"] for p in ref])


# ---------------------------------------------------------------- lookahead
def test_lookahead_matches_reference_loop_in_ema_form():
    lr, gamma = 0.5, 0.8
    deltas = _deltas(2)
    got, opt = _run("lookahead", {"lr": lr, "momentum": gamma}, deltas)
    theta, m = _params(), [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for d in deltas:
        for i in range(len(SHAPES)):
            m[i] = gamma * m[i] + (1 - gamma) * d[i]
            theta[i] = theta[i] - lr * (gamma * m[i] + d[i])
    _close(got, theta)
    _close(opt.momentum, m)


def test_lookahead_long_run_step_is_about_1_33_delta():
    # ALGORITHMS.md: constant Δ moves θ by η(1 + γ)Δ per step once m has converged
    opt = registry.build("optimizer", "lookahead", {})
    p = [torch.zeros(1, dtype=torch.float64)]
    for _ in range(300):
        before = p[0].clone()
        opt.step(p, [torch.ones(1, dtype=torch.float64)])
    assert (before - p[0]).item() == pytest.approx(0.7 * 1.9, rel=1e-9)


# ---------------------------------------------------------------- delayed nesterov
@pytest.mark.parametrize("n,c", [(3, 0.0), (3, 0.2), (2, 0.5), (4, 0.25)])
def test_delayed_nesterov_matches_reference_loop(n, c):
    lr, beta = 0.6, 0.85
    deltas = _deltas(3, steps=2 * n + 2)
    got, opt = _run("delayed_nesterov", {"lr": lr, "momentum": beta, "buffer_size": n, "c": c}, deltas)
    theta = _params()
    m = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    acc = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t, d in enumerate(deltas):
        for i in range(len(SHAPES)):
            acc[i] = acc[i] + d[i]
        if (t + 1) % n == 0:
            for i in range(len(SHAPES)):
                m[i] = beta * m[i] + acc[i] / n
                theta[i] = theta[i] - lr * ((1 - c * n + c) * beta * m[i] + d[i] / n)
                acc[i] = torch.zeros_like(acc[i])
        else:
            for i in range(len(SHAPES)):
                theta[i] = theta[i] - lr * (c * beta * m[i] + d[i] / n)
    _close(got, theta)
    _close(opt.momentum, m)
    assert opt.steps == len(deltas)


@pytest.mark.parametrize("c", [0.0, 0.7, 1.0])
def test_delayed_nesterov_with_buffer_1_is_nesterov_bitwise(c):
    # N = 1: every step updates m and (1 − cN + c) = 1, so DN is b ← βb + Δ; θ ← θ − η(Δ + βb),
    # i.e. torch SGD(nesterov=True), whatever c is.
    deltas = _deltas(4)
    dn, dn_opt = _run("delayed_nesterov", {"lr": 0.7, "momentum": 0.9, "buffer_size": 1, "c": c}, deltas)
    nes, nes_opt = _run("nesterov", {"lr": 0.7, "momentum": 0.9}, deltas)
    for a, b in zip(dn + dn_opt.momentum, nes + nes_opt.momentum):
        assert torch.equal(a, b)


def test_delayed_nesterov_leaves_momentum_unset_until_the_buffer_fills():
    opt = registry.build("optimizer", "delayed_nesterov", {"buffer_size": 3})
    params = _params()
    deltas = _deltas(5, steps=3)
    opt.step(params, deltas[0])
    opt.step(params, deltas[1])
    assert opt.momentum is None
    opt.step(params, deltas[2])
    mean = [(a + b + c) / 3 for a, b, c in zip(*deltas)]
    _close(opt.momentum, mean)  # β·0 + acc/N


# ---------------------------------------------------------------- common behaviour
@pytest.mark.parametrize(
    "name,args",
    [("nesterov", {}), ("lookahead", {}), ("delayed_nesterov", {"buffer_size": 2, "c": 0.3})],
)
def test_scale_enters_before_the_momentum(name, args):
    # step(Δ, scale=ρ) must equal step(ρ·Δ): the weight is remembered by the momentum
    deltas = _deltas(6)
    scales = [1.0, 0.5, 0.25, 1.0, 0.7, 0.3, 0.9]
    got, _ = _run(name, args, deltas, scales)
    want, _ = _run(name, args, [[s * x for x in d] for s, d in zip(scales, deltas)])
    _close(got, want)


@pytest.mark.parametrize("name", ["nesterov", "lookahead", "delayed_nesterov"])
def test_momentum_is_none_before_the_first_step_and_pseudo_grad_is_not_modified(name):
    opt = registry.build("optimizer", name, {"buffer_size": 1} if name == "delayed_nesterov" else {})
    assert opt.momentum is None
    params, d = _params(), _deltas(7, steps=1)[0]
    copy = [x.clone() for x in d]
    opt.step(params, d)
    assert opt.momentum is not None
    assert all(torch.equal(a, b) for a, b in zip(d, copy))


def test_momentum_unit_expresses_sum_buffers_in_pseudo_gradient_units():
    assert registry.build("optimizer", "lookahead", {"momentum": 0.9}).momentum_unit == 1.0
    assert registry.build("optimizer", "nesterov", {"momentum": 0.9}).momentum_unit == pytest.approx(0.1)
    assert registry.build("optimizer", "delayed_nesterov", {"momentum": 0.8}).momentum_unit == pytest.approx(0.2)


def test_float32_params_stay_float32():
    opt = registry.build("optimizer", "lookahead", {})
    p = [torch.ones(4)]
    opt.step(p, [torch.full((4,), 0.5)])
    assert p[0].dtype == torch.float32 and opt.momentum[0].dtype == torch.float32
