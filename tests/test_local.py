"""The local layer: model sizes, the inner loop's pseudo-gradient, learning, persistence."""
import math
from pathlib import Path

import pytest
import torch

from heloco_p2p.config import load_config
from heloco_p2p.local import InnerTrainer, build_model, count_params, lr_at, validation_loss
from heloco_p2p.local.model import trainable_params

CONFIG_DIR = Path(__file__).parent.parent / "configs"


def random_batches(vocab, batch, seq_len, seed=0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield torch.randint(0, vocab, (batch, seq_len), generator=g)


@pytest.mark.parametrize("name", ["tiny", "small", "base", "gpu-125m"])
def test_param_count_within_20_percent_of_declared(name):
    cfg = load_config(CONFIG_DIR / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    n = count_params(model)
    assert abs(n - cfg.model.nominal_params) / cfg.model.nominal_params <= 0.20, (name, n)


def test_same_seed_same_weights_and_global_rng_untouched(tiny_cfg):
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model(tiny_cfg.model, seed=7)
    after = torch.rand(1)
    b = build_model(tiny_cfg.model, seed=7)
    assert before == after
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_pseudo_grad_is_exactly_start_minus_end(tiny_cfg):
    model = build_model(tiny_cfg.model, seed=0)
    trainer = InnerTrainer(model, tiny_cfg.inner, random_batches(4096, 4, 32))
    start = [p.detach().clone() + 0.01 for p in trainable_params(model)]  # a "global" θ ≠ current
    delta, stats = trainer.run_round(start, H=3)
    end = [p.detach() for p in trainable_params(model)]
    assert stats.steps == 3 and stats.tokens == 3 * 4 * 31
    for d, s, e in zip(delta, start, end):
        assert torch.equal(d, s - e)
    assert any(d.abs().sum() > 0 for d in delta)


def test_inner_optimizer_state_persists_across_rounds(tiny_cfg):
    model = build_model(tiny_cfg.model, seed=0)
    trainer = InnerTrainer(model, tiny_cfg.inner, random_batches(4096, 2, 16))
    theta = [p.detach().clone() for p in trainable_params(model)]
    trainer.run_round(theta, H=2)
    state = trainer.optimizer.state[trainer.params[0]]
    assert int(state["step"]) == 2
    trainer.run_round(theta, H=3)
    assert int(trainer.optimizer.state[trainer.params[0]]["step"]) == 5
    assert trainer.step == 5


def test_lr_schedule_warmup_then_cosine(tiny_cfg):
    inner = tiny_cfg.inner.model_copy(update=dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1))
    assert lr_at(0, inner) == pytest.approx(0.1)
    assert lr_at(9, inner) == pytest.approx(1.0)
    assert lr_at(10, inner) == pytest.approx(1.0)
    assert lr_at(60, inner) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, inner) == pytest.approx(0.1)
    assert lr_at(10_000, inner) == pytest.approx(0.1)


def test_load_params_rejects_wrong_layout(tiny_cfg):
    model = build_model(tiny_cfg.model, seed=0)
    trainer = InnerTrainer(model, tiny_cfg.inner, random_batches(4096, 2, 16))
    params = trainer.current_params()
    with pytest.raises(ValueError, match="parameter tensors"):
        trainer.run_round(params[:-1], H=1)
    with pytest.raises(ValueError, match="shape mismatch"):
        trainer.run_round([torch.zeros(3)] + params[1:], H=1)


def test_adamw8bit_runs_on_cpu(tiny_cfg):
    inner = tiny_cfg.inner.model_copy(update=dict(optimizer="adamw8bit"))
    model = build_model(tiny_cfg.model, seed=0)
    trainer = InnerTrainer(model, inner, random_batches(4096, 2, 16))
    delta, stats = trainer.run_round(None, H=2)
    assert math.isfinite(stats.loss) and all(torch.isfinite(d).all() for d in delta)
    assert type(trainer.optimizer).__name__ == "AdamW8bit"


@pytest.mark.slow
def test_loss_falls_over_200_steps_of_tiny_model(tiny_cfg, tokenizer):
    from heloco_p2p.data import TokenBlocks, open_source, validation_blocks

    src = open_source("bible:de")
    batches = TokenBlocks(src, tokenizer, seq_len=64, split="train", seed=0).batches(8)
    model = build_model(tiny_cfg.model, tokenizer, seed=0)
    val = validation_blocks(src, tokenizer, 64, 16)
    before = validation_loss(model, val)
    trainer = InnerTrainer(model, tiny_cfg.inner.model_copy(update=dict(warmup_steps=20)), batches)
    _, stats = trainer.run_round(None, H=200)
    after = validation_loss(model, val)
    assert before > math.log(4096) - 0.5  # untrained: about uniform over the vocabulary
    assert after < before - 2.0, (before, after)
    assert stats.last_loss < stats.first_loss - 2.0
