"""One peer's inner loop: H optimizer steps from the global parameters, returning the
pseudo-gradient Δ = θ_start − θ_end (DiLoCo, Douillard et al. 2023, arXiv 2311.08105).

The inner optimizer is AdamW (or bitsandbytes' 8-bit AdamW), with linear warmup then cosine
decay, gradient clipping and autocast (bf16, or fp16 with loss scaling) on CUDA. Its state
persists across rounds (a round only resets the parameters to the new global ones), unless
``inner.fresh_optimizer`` asks for a new optimizer at the start of every round (HeLoCo's paper).
Knows nothing of the network::

    trainer = InnerTrainer(model, cfg.inner, batches)
    pseudo_grad, stats = trainer.run_round(global_params, H=50)

Overlapped rounds (docs/protocol.md, "Overlapped rounds") start from the local parameters and
take in a newer global θ mid-round with ``fold_in``: the round's progress is kept and its
starting point becomes that θ, so Δ is measured from a real global version.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from heloco_p2p.local.model import trainable_params


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting; None means plain fp32. Autocast only on CUDA."""
    if device.type != "cuda" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def lr_at(step: int, inner_cfg) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine to the floor at ``total_steps``
    and flat after it. The floor is the absolute ``min_lr`` when set (HeLoCo's paper: 1e-6, no
    warm-up), else ``min_lr_ratio·lr``. ``step`` counts from 0: the trainer's own inner steps."""
    base = inner_cfg.lr
    if step < inner_cfg.warmup_steps:
        return base * (step + 1) / inner_cfg.warmup_steps
    span = max(1, inner_cfg.total_steps - inner_cfg.warmup_steps)
    progress = min(1.0, (step - inner_cfg.warmup_steps) / span)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    if inner_cfg.min_lr is not None:
        return inner_cfg.min_lr + (base - inner_cfg.min_lr) * cosine
    floor = inner_cfg.min_lr_ratio
    return base * (floor + (1 - floor) * cosine)


def build_inner_optimizer(params: list[torch.nn.Parameter], inner_cfg) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains and biases are not decayed)."""
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": inner_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs = dict(lr=inner_cfg.lr, betas=tuple(inner_cfg.betas), eps=inner_cfg.eps)
    if inner_cfg.optimizer == "adamw8bit":
        import bitsandbytes as bnb  # imported lazily: only this optimizer needs it

        return bnb.optim.AdamW8bit(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


@dataclass
class RoundStats:
    """What one round of H inner steps did; JSON-friendly via ``asdict``."""

    steps: int
    tokens: int
    loss: float  # mean training loss over the round's steps
    first_loss: float
    last_loss: float
    seconds: float
    steps_per_second: float
    tokens_per_second: float
    lr: float  # learning rate of the last step
    grad_norm: float  # mean pre-clipping gradient norm

    def to_dict(self) -> dict:
        return asdict(self)


class InnerTrainer:
    """Runs inner steps on a model; ``step`` is the global inner step that sets the learning rate.

    :param model: a causal LM returning ``.loss`` when called with ``labels``
    :param inner_cfg: an ``InnerConfig`` (optimizer, lr schedule, clipping, precision, device)
    :param batches: an endless iterator of LongTensor [B, seq_len] token blocks
    :param start_step: the schedule position to start from (a late joiner uses the run's progress)
    """

    def __init__(self, model: torch.nn.Module, inner_cfg, batches: Iterator[torch.Tensor], start_step: int = 0):
        self.cfg = inner_cfg
        self.device = pick_device(inner_cfg.device)
        self.model = model.to(self.device)
        self.model.train()
        self.params = trainable_params(self.model)
        self.optimizer = build_inner_optimizer(self.params, inner_cfg)
        self.batches = batches
        self.step = start_step
        self.amp_dtype = autocast_dtype(inner_cfg.precision, self.device)
        self._round_start: list[torch.Tensor] | None = None  # θ_start of the round in progress
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    # -- one step ---------------------------------------------------------------------------
    def train_step(self) -> tuple[float, float, int]:
        """One optimizer step on the next batch; returns (loss, grad norm before clipping, tokens)."""
        loss, grad_norm, tokens = self._step()
        return float(loss), float(grad_norm), tokens

    def _step(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """One optimizer step; loss and grad norm stay 0-dim tensors on the device, because
        reading them as Python floats every step would synchronise CUDA every step."""
        batch = next(self.batches).to(self.device, non_blocking=True)
        lr = lr_at(self.step, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else nullcontext()
        with ctx:
            loss = self.model(input_ids=batch, labels=batch).loss
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        # Targets are the inputs shifted by one inside the model: seq_len - 1 predicted tokens per row.
        tokens = batch.shape[0] * (batch.shape[1] - 1)
        return loss.detach(), grad_norm.detach(), tokens

    # -- one round --------------------------------------------------------------------------
    @torch.no_grad()
    def load_params(self, global_params: list[torch.Tensor]) -> None:
        """Overwrite the model's parameters with the global ones (layout = ``trainable_params``)."""
        if len(global_params) != len(self.params):
            raise ValueError(f"expected {len(self.params)} parameter tensors, got {len(global_params)}")
        for p, g in zip(self.params, global_params):
            if p.shape != g.shape:
                raise ValueError(f"parameter shape mismatch: model {tuple(p.shape)} vs given {tuple(g.shape)}")
            p.copy_(g)

    @torch.no_grad()
    def current_params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params]

    def run_round(
        self,
        global_params: list[torch.Tensor] | None,
        H: int,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
        before_delta: Callable[[], None] | None = None,
    ) -> tuple[list[torch.Tensor], RoundStats]:
        """Start from ``global_params`` (None: from the current parameters), run ``H`` inner
        steps, and return Δ = θ_start − θ_end (fp32, on the training device) and the stats.
        θ_start is the round's starting point, moved by ``fold_in`` if that is called mid-round.

        :param on_step: called after each step with (step index in round, loss as a 0-dim tensor:
            reading it as a float synchronises CUDA)
        :param before_delta: called after the last step, before Δ is taken (an overlapped round
            folds in the reply to the previous submission there); not counted in ``seconds``
        """
        if H < 1:
            raise ValueError(f"H must be >= 1, got {H}")
        if global_params is not None:
            self.load_params(global_params)
        if self.cfg.fresh_optimizer:
            self.optimizer = build_inner_optimizer(self.params, self.cfg)  # no moments from earlier rounds
        self._round_start = self.current_params()
        losses, norms, tokens = [], [], 0
        t0 = time.perf_counter()
        try:
            for i in range(H):
                loss, gnorm, ntok = self._step()
                losses.append(loss)
                norms.append(gnorm)
                tokens += ntok
                if on_step is not None:
                    on_step(i, loss)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            seconds = time.perf_counter() - t0
            if before_delta is not None:
                before_delta()
            with torch.no_grad():
                pseudo_grad = [s.sub_(p.detach()) for s, p in zip(self._round_start, self.params)]
        finally:
            self._round_start = None
        losses_cpu = torch.stack(losses).float().cpu().tolist()  # one device read per round
        norms_cpu = torch.stack(norms).float().cpu().tolist()
        stats = RoundStats(
            steps=H,
            tokens=tokens,
            loss=sum(losses_cpu) / H,
            first_loss=losses_cpu[0],
            last_loss=losses_cpu[-1],
            seconds=seconds,
            steps_per_second=H / seconds if seconds > 0 else float("inf"),
            tokens_per_second=tokens / seconds if seconds > 0 else float("inf"),
            lr=self.optimizer.param_groups[0]["lr"],
            grad_norm=sum(norms_cpu) / H,
        )
        return pseudo_grad, stats

    @torch.no_grad()
    def fold_in(self, global_params: list[torch.Tensor]) -> None:
        """Mid-round, between steps: take in a newer global θ without losing the round's progress.

        θ_local += θ_new − θ_start, then θ_start = θ_new. The progress so far, θ_start − θ_local,
        is unchanged, and the Δ the round returns is measured from θ_new (derivation in
        docs/protocol.md, "Overlapped rounds"). The inner optimizer state is kept as it is.
        """
        if self._round_start is None:
            raise RuntimeError("fold_in is only valid during run_round (call it from on_step or before_delta)")
        if len(global_params) != len(self.params):
            raise ValueError(f"expected {len(self.params)} parameter tensors, got {len(global_params)}")
        for p, s, g in zip(self.params, self._round_start, global_params):
            if p.shape != g.shape:
                raise ValueError(f"parameter shape mismatch: model {tuple(p.shape)} vs given {tuple(g.shape)}")
            g = g.to(p.device, non_blocking=True)
            p.add_(g - s)
            s.copy_(g)

    # -- persistence ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"step": self.step, "optimizer": self.optimizer.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
