"""One peer's local training: model factory, inner loop, evaluation. Knows nothing of the network."""
from heloco_p2p.local.evaluate import evaluate_regions, validation_loss
from heloco_p2p.local.inner import InnerTrainer, RoundStats, lr_at, pick_device
from heloco_p2p.local.model import build_model, count_params, param_names, trainable_params

__all__ = [
    "InnerTrainer", "RoundStats", "lr_at", "pick_device", "build_model", "count_params",
    "param_names", "trainable_params", "validation_loss", "evaluate_regions",
]
