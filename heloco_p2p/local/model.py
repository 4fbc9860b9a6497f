"""Model factory: transformers ``LlamaForCausalLM`` built from a named size in configs/.

No hub download: the model is always built from its config (``from_config``), and a saved run
is a ``save_pretrained`` directory that ``AutoModelForCausalLM.from_pretrained`` loads.

    model = build_model(cfg.model, seed=0)
    count_params(model)   # embeddings included, tied weights counted once
"""
from __future__ import annotations

import logging

import torch
from transformers import LlamaConfig, LlamaForCausalLM

logger = logging.getLogger(__name__)


def llama_config(model_cfg, tokenizer=None) -> LlamaConfig:
    """The transformers config for a ``ModelConfig``; special token ids come from the tokenizer."""
    special = {}
    if tokenizer is not None:
        special = dict(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    return LlamaConfig(
        vocab_size=model_cfg.vocab_size,
        hidden_size=model_cfg.hidden_size,
        intermediate_size=model_cfg.intermediate_size,
        num_hidden_layers=model_cfg.num_layers,
        num_attention_heads=model_cfg.num_heads,
        num_key_value_heads=model_cfg.num_kv_heads or model_cfg.num_heads,
        max_position_embeddings=model_cfg.max_seq_len,
        tie_word_embeddings=model_cfg.tie_embeddings,
        rope_theta=model_cfg.rope_theta,
        use_cache=False,
        **special,
    )


def build_model(model_cfg, tokenizer=None, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised model; the same seed gives bitwise the same weights."""
    devices = []  # fork_rng isolates the global RNG so building a model does not shift data order
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(llama_config(model_cfg, tokenizer))
    logger.debug("built llama: %d parameters", count_params(model))
    return model


def count_params(model: torch.nn.Module) -> int:
    """Number of parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters())


def trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameter list whose order defines the pseudo-gradient layout."""
    return [p for p in model.parameters() if p.requires_grad]


def param_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
