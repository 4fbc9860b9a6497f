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


@pytest.fixture(autouse=True)
def _no_child_process_outlives_its_test(request):
    """A child process (a DHT, a multiprocessing worker) left running by a test would keep pytest
    from exiting at the end of the suite (it joins its children): name the test and end it."""
    import multiprocessing
    import time
    import warnings

    before = {p.pid for p in multiprocessing.active_children()}
    yield
    deadline = time.monotonic() + 5.0
    while True:
        left = [p for p in multiprocessing.active_children() if p.pid not in before]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    for p in left:
        warnings.warn(f"{request.node.nodeid} left child process {p.pid} ({p.name}) running; killed", stacklevel=2)
        p.kill()
        p.join(timeout=5)
