"""Test doubles shared by several test modules (importable: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import asyncio
import importlib.util
import zlib
from pathlib import Path
from types import SimpleNamespace

import torch

SEQ = 16  # block length of the synthetic streams (and of the sim_run_cfg fixture in conftest.py)


class FakeNode:
    """Just what CoordinatorService uses: handlers are recorded, replicate calls are answered."""

    run_id = "fenced"  # the run the fake serves
    peer_id = "QmCoordinator"
    max_payload_bytes = 1 << 20

    def __init__(self, replicate_reply: dict):
        self.replicate_reply = replicate_reply
        self.calls = []
        self.headers = []  # every header sent, in order

    def add_handler(self, name, handler, **kwargs):
        return SimpleNamespace()

    async def acall(self, peer_id, name, header, payload=b"", **kwargs):
        self.calls.append((peer_id, name, header.get("kind")))
        self.headers.append(header)
        return self.replicate_reply, b""


class ScriptedNode(FakeNode):
    """A FakeNode whose replicate answers are scripted per standby: a dict reply, or a number of
    seconds to hang (a frozen standby), or an exception to raise (a dead one)."""

    def __init__(self, script: dict, peer_id: str = "QmCoordinator"):
        super().__init__({"status": "ok"})
        self.script, self.peer_id = script, peer_id

    async def acall(self, peer_id, name, header, payload=b"", **kwargs):
        self.calls.append((peer_id, name, header.get("kind")))
        self.headers.append(header)
        answer = self.script.get(peer_id, {"status": "ok"})
        if isinstance(answer, BaseException):
            raise answer
        if isinstance(answer, (int, float)):
            await asyncio.sleep(answer)
            return {"status": "ok"}, b""
        return answer, b""


def synthetic_streams(region: str, seed: int):
    """Endless synthetic token blocks for the simulator: a region-specific deterministic pattern
    (seeded by a stable hash of the region, the same in every process), so runs are cheap."""
    g = torch.Generator().manual_seed(zlib.crc32(region.encode()) % 10_000 + seed)
    while True:
        yield torch.randint(0, 64, (SEQ,), generator=g)


def synthetic_val_blocks(regions: list[str]) -> dict:
    return {r: torch.stack([next(synthetic_streams(r, 99)) for _ in range(2)]) for r in regions}


def load_script(name: str):
    """A module of scripts/ (they are not a package), e.g. ``load_script("bench")``."""
    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lone_founder_run(tmp, cfg, prefix: str, rounds: int = 2):
    """A founder alone in a run of ``cfg`` that commits ``rounds`` rounds and leaves (it
    checkpoints on leaving); returns its --checkpoint-dir."""
    import uuid

    from heloco_p2p.tools.launcher import LocalSwarm

    sw = LocalSwarm(tmp, f"{prefix}-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg), "--max-rounds", str(rounds))
        assert sw.procs["a"].wait(180) == 0, (tmp / "a.log").read_text()[-3000:]
    finally:
        sw.close()
    return tmp / "ckpt-a"
