"""Shared fixtures: the built-in tokenizer is built once per session (cached on disk too)."""
import os

import pytest
import torch

# Tests never reach a hub; make the libraries fail fast instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# One intra-op thread: the tests' tensors are small, and on a shared 2-core machine a second
# OpenMP thread spins for its share (the fast tier under load ~5: 74 s of CPU with two threads,
# 26 s with one). Peers started by the tests get --threads 1 as well (tools/launcher.py).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tokenizer():
    from heloco_p2p.data import load_tokenizer

    return load_tokenizer("builtin", vocab_size=4096)


@pytest.fixture(scope="session")
def tiny_cfg():
    from heloco_p2p.config import load_config

    return load_config("configs/tiny.yaml")


@pytest.fixture(scope="module")
def sim_run_cfg():
    """A tiny run config for simulator tests on synthetic streams (tests/fakes.py)."""
    from heloco_p2p.config import load_config

    from fakes import SEQ

    return load_config("configs/tiny.yaml", overrides={"data.seq_len": SEQ, "inner.batch_size": 2,
                                                        "inner.warmup_steps": 2, "inner.total_steps": 100})
