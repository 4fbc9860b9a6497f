"""Validation loss of a model on fixed held-out token blocks, per language and averaged.

    losses = evaluate_regions(model, {"de": de_blocks, "fr": fr_blocks})
    losses["mean"], losses["per_language"]["de"]
"""
from __future__ import annotations

import torch


@torch.no_grad()
def validation_loss(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy over ``blocks`` (LongTensor [n, seq_len]), every predicted
    token weighted equally. The model is put back in the mode it was in."""
    if blocks.numel() == 0:
        raise ValueError("no validation blocks to evaluate on")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for i in range(0, blocks.shape[0], batch_size):
            batch = blocks[i : i + batch_size].to(device)
            logits = model(input_ids=batch).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += batch[:, 1:].numel()
    finally:
        model.train(was_training)
    return total / count


def evaluate_regions(model: torch.nn.Module, blocks_by_region: dict[str, torch.Tensor], batch_size: int = 32) -> dict:
    """``{"mean": float, "per_language": {region: float}}``; the mean is over languages, unweighted,
    so every language counts the same whatever its size."""
    per = {r: validation_loss(model, b, batch_size) for r, b in blocks_by_region.items()}
    return {"mean": sum(per.values()) / len(per), "per_language": per}
