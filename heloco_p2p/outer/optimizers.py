"""Outer optimizers: how θ moves given one (corrected) pseudo-gradient Δ.

Each is a short class whose docstring gives its update and source. All work in place on lists
of tensors with ``torch._foreach_*`` (or one-pass per-tensor) ops, and treat Δ like a gradient:
θ moves against it. ``step(params, pseudo_grad, scale)`` applies G = scale · Δ: the scale enters
*before* the momentum, so it weights this Δ in every later step too (see corrections.Staleness).

Every optimizer exposes the momentum that corrections use as the reference direction
(``momentum``: list of tensors, None before the first step that creates it) and
``momentum_unit``, the factor that expresses that buffer in pseudo-gradient units: an EMA buffer
is already a weighted mean of Δs (unit 1); a sum buffer m ← μm + Δ grows to ≈ Δ/(1−μ) (unit 1−μ).
Corrections compare ‖Δ‖ with ‖m‖·unit so their constants mean the same under every optimizer.

``dispatch_coefficient`` is η·μ, the step along the momentum a look-ahead dispatch takes:
θ̄ = θ − η·μ·m with the optimizer's own η, μ and momentum buffer m (HeLoCo's Eq. 5).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .registry import Arg, Registered, register

_LR = Arg(0.7, "outer learning rate η", min=0.0, min_open=True)
_MOMENTUM = Arg(0.9, "momentum coefficient", min=0.0, max=1.0, max_open=True)


def _decay_add_(buf: list[Tensor], other: list[Tensor], decay: float, weight: float) -> None:
    """buf ← decay·buf + weight·other, in place; one pass over memory when weight is 1."""
    if weight == 1.0:
        for b, o in zip(buf, other):
            torch.add(o, b, alpha=decay, out=b)
    else:
        torch._foreach_mul_(buf, decay)
        torch._foreach_add_(buf, other, alpha=weight)


class OuterOptimizer(Registered):
    """Base class: per-tensor buffers created at the first step, a step counter, state_dict.

    Subclasses implement ``_step`` and list their buffer names in ``BUFFERS``; a buffer is
    None until the step that first needs it.
    """

    BUFFERS: tuple[str, ...] = ()

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.steps = 0  # outer steps taken (= commits applied)
        self.buffers: dict[str, list[Tensor] | None] = {name: None for name in self.BUFFERS}

    @property
    def momentum(self) -> list[Tensor] | None:
        """The momentum buffers corrections use as reference direction (None before any)."""
        return self.buffers.get("momentum")

    @property
    def momentum_unit(self) -> float:
        """Multiply ‖momentum‖ by this to express it in pseudo-gradient units."""
        return 1.0

    @property
    def dispatch_coefficient(self) -> float:
        """η·μ: a look-ahead dispatch hands out θ − η·μ·m (0 for an optimizer without momentum)."""
        return self.args.get("lr", 0.0) * self.args.get("momentum", 0.0)

    def step(self, params: list[Tensor], pseudo_grad: list[Tensor], scale: float = 1.0) -> None:
        """Apply one outer update to ``params`` in place; ``pseudo_grad`` is only read.

        :param params: the global parameters θ (modified in place)
        :param pseudo_grad: Δ per tensor, same shapes and dtypes as ``params``
        :param scale: G = scale · Δ enters the update (a staleness weight ρ(τ), or 1)
        """
        self._step(params, pseudo_grad, float(scale))
        self.steps += 1

    def _step(self, params: list[Tensor], g: list[Tensor], scale: float) -> None:
        raise NotImplementedError

    def drop_buffers(self) -> None:
        """Hold no buffers (they are made again on the next step, or come with ``load_state_dict``)."""
        self.buffers = {name: None for name in self.BUFFERS}

    def _buffer(self, name: str, like: list[Tensor]) -> list[Tensor]:
        if self.buffers[name] is None:
            self.buffers[name] = [torch.zeros_like(p) for p in like]
        return self.buffers[name]

    def state_dict(self, copy: bool = True) -> dict[str, Any]:
        """Step count and buffers (cloned, so later steps do not change the returned dict; with
        ``copy`` False the live buffers themselves)."""
        return {
            "steps": self.steps,
            "buffers": {k: None if v is None else [t.detach().clone() if copy else t.detach() for t in v]
                        for k, v in self.buffers.items()},
        }

    def load_state_dict(self, state: dict[str, Any], like: list[Tensor]) -> None:
        """Restore from ``state_dict()``; shapes and dtypes must match ``like`` (θ)."""
        check_optimizer_state(self, state, like)
        self.steps = int(state["steps"])
        for k in self.BUFFERS:
            v, mine = state["buffers"][k], self.buffers[k]
            if v is not None and mine is not None:  # written into the buffers there are: no second copy meanwhile
                for dst, t in zip(mine, v):
                    dst.copy_(t.detach())
            else:
                self.buffers[k] = None if v is None else [t.detach().to(p.device).clone() for t, p in zip(v, like)]


def check_optimizer_state(opt: OuterOptimizer, state: Any, like: list[Tensor]) -> None:
    """Raise ValueError if ``state`` cannot be loaded into ``opt`` (checked before any change)."""
    if not isinstance(state, dict) or set(state) != {"steps", "buffers"}:
        raise ValueError("optimizer state: expected keys {'steps', 'buffers'}")
    if not isinstance(state["steps"], int) or state["steps"] < 0:
        raise ValueError(f"optimizer state: steps must be an int >= 0, got {state['steps']!r}")
    buffers = state["buffers"]
    if not isinstance(buffers, dict) or set(buffers) != set(opt.BUFFERS):
        raise ValueError(f"optimizer state: buffers must be {sorted(opt.BUFFERS)} for {opt.name!r}")
    for k, v in buffers.items():
        if v is None:
            continue
        if not isinstance(v, (list, tuple)) or len(v) != len(like):
            raise ValueError(f"optimizer state: buffer {k!r} must be a list of {len(like)} tensors")
        for i, (t, p) in enumerate(zip(v, like)):
            if not isinstance(t, Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                raise ValueError(
                    f"optimizer state: buffer {k!r}[{i}] must be a {p.dtype} tensor of shape {tuple(p.shape)}"
                )


@register("optimizer", "nesterov")
class Nesterov(OuterOptimizer):
    """SGD with Nesterov momentum, the pseudo-gradient taken as the gradient (DiLoCo's outer step).

        b ← μ b + G ;   θ ← θ − η (G + μ b)          (G = scale · Δ)

    the update of ``torch.optim.SGD(lr=η, momentum=μ, nesterov=True)`` (dampening 0, no weight
    decay). Long-run step ≈ η(1 + μ/(1−μ))·Δ ≈ 7·Δ at η 0.7, μ 0.9.
    Source: Douillard et al. 2023, DiLoCo (arXiv 2311.08105): η 0.7, μ 0.9.
    """

    ARGS = {"lr": _LR, "momentum": _MOMENTUM}
    BUFFERS = ("momentum",)

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.lr, self.mu = self.args["lr"], self.args["momentum"]

    @property
    def momentum_unit(self) -> float:
        return 1.0 - self.mu

    def _step(self, params: list[Tensor], g: list[Tensor], scale: float) -> None:
        b = self._buffer("momentum", params)
        _decay_add_(b, g, self.mu, scale)
        torch._foreach_add_(params, g, alpha=-self.lr * scale)
        torch._foreach_add_(params, b, alpha=-self.lr * self.mu)


@register("optimizer", "delayed_nesterov")
class DelayedNesterov(OuterOptimizer):
    """Delayed Nesterov (DN): momentum refreshed once per N pseudo-gradients, Δ applied at once.

    On each G = scale · Δ, with step counter t:
        acc ← acc + G
        if (t+1) mod N = 0:  m ← β m + acc/N ;  θ ← θ − η((1 − cN + c) β m + G/N) ;  acc ← 0
        else:                θ ← θ − η(c β m + G/N)
    With N = 1 every step takes the first branch and (1 − cN + c) = 1, so DN(N=1) is exactly
    ``nesterov`` (b ← βb + G; θ ← θ − η(G + βb)) whatever c is. η is per pseudo-gradient divided
    by N (papers often quote η·N).
    Source: Liu, Douillard et al. 2024, Asynchronous Local-SGD Training for Language Modeling
    (arXiv 2401.09135): N = number of workers, c ∈ [0, 1/N].
    """

    ARGS = {
        "lr": _LR,
        "momentum": _MOMENTUM,
        "buffer_size": Arg(
            4, "N: pseudo-gradients per momentum update (set it to the number of workers)", min=1, integer=True
        ),
        "c": Arg(0.0, "share of the momentum applied between updates, in [0, 1/N]", min=0.0, max=1.0),
    }
    BUFFERS = ("momentum", "acc")

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.lr, self.beta = self.args["lr"], self.args["momentum"]
        self.n, self.c = self.args["buffer_size"], self.args["c"]

    @classmethod
    def check_combined(cls, args: dict[str, Any]) -> None:
        if args["c"] > 1.0 / args["buffer_size"]:
            bound = 1.0 / args["buffer_size"]
            raise ValueError(f"c: must be in [0, 1/buffer_size] = [0, {bound:.6g}], got {args['c']!r}")

    @property
    def momentum_unit(self) -> float:
        return 1.0 - self.beta

    def _step(self, params: list[Tensor], g: list[Tensor], scale: float) -> None:
        n, beta = self.n, self.beta
        if n == 1:
            acc, acc_weight = g, scale  # the sum of one G is G: no buffer needed
        else:
            acc, acc_weight = self._buffer("acc", params), 1.0
            torch._foreach_add_(acc, g, alpha=scale)
        if (self.steps + 1) % n == 0:
            m = self._buffer("momentum", params)
            _decay_add_(m, acc, beta, acc_weight / n)
            if n > 1:
                torch._foreach_zero_(acc)
            torch._foreach_add_(params, g, alpha=-self.lr * scale / n)
            # 1 − cN + c written as 1 − c(N−1): exactly 1 when N = 1
            torch._foreach_add_(params, m, alpha=-self.lr * (1.0 - self.c * (n - 1)) * beta)
        else:
            torch._foreach_add_(params, g, alpha=-self.lr * scale / n)
            m = self.momentum
            if m is not None and self.c != 0.0:
                torch._foreach_add_(params, m, alpha=-self.lr * self.c * beta)


@register("optimizer", "lookahead")
class Lookahead(OuterOptimizer):
    """Momentum look-ahead (MLA), EMA form: θ extrapolated along the momentum.

        m ← γ m + (1 − γ) G ;   θ ← θ − η (γ m + G)          (G = scale · Δ)

    Long-run step ≈ η(1 + γ)·Δ ≈ 1.33·Δ at η 0.7, γ 0.9: not the scale of ``nesterov`` (≈ 7·Δ);
    tune η per optimizer. Source: Ajanthan et al., momentum look-ahead for asynchronous
    distributed training (ICLR 2025 workshop); η 0.7, γ 0.9 in a public toy implementation.
    """

    ARGS = {"lr": _LR, "momentum": _MOMENTUM}
    BUFFERS = ("momentum",)

    def __init__(self, **args: Any) -> None:
        super().__init__(**args)
        self.lr, self.gamma = self.args["lr"], self.args["momentum"]

    def _step(self, params: list[Tensor], g: list[Tensor], scale: float) -> None:
        m = self._buffer("momentum", params)
        if scale == 1.0:
            torch._foreach_lerp_(m, g, 1.0 - self.gamma)  # m + (1−γ)(G − m): one pass
        else:
            _decay_add_(m, g, self.gamma, (1.0 - self.gamma) * scale)
        torch._foreach_add_(params, m, alpha=-self.lr * self.gamma)
        torch._foreach_add_(params, g, alpha=-self.lr * scale)
