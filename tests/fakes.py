"""Test doubles shared by several test modules (importable: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from types import SimpleNamespace


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
