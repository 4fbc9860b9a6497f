"""What a peer sends for its pseudo-gradient, with error feedback for the lossy ``topk`` codec.

The sender keeps a residual e (one float32 tensor per parameter tensor, on the CPU). For each
round's Δ it encodes x = Δ + e and, once the coordinator has *applied* what was sent, keeps
e ← x − decode(encode(x)): what the codec dropped or rounded is added to the next Δ, so nothing is
lost, only delayed (SparseLoCo; /work/shared/ALGORITHMS.md, "Compressing the wire")::

    up = Uplink("topk", TopkCodec(density=0.02, bits=2))
    enc = up.prepare(delta)           # encodes Δ + e; e is not changed yet
    ... send enc.meta / enc.payload ...
    up.settle(accepted=True)          # e ← (Δ + e) − sent; accepted=False: e ← 0

A submission that is not applied (refused, or given up, which may or may not have committed)
clears the residual instead of keeping x: that Δ is dropped as it is with every compression,
and the residual holds parts of Δs measured from θs the peer has since left (it downloads the
state or restarts from the reply's θ). A peer that restarts also starts from e = 0 (the residual
is not checkpointed). Dense compressions (none, fp16, 8bit) keep no residual.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from heloco_p2p.swarm.sparse import TopkCodec
from heloco_p2p.swarm.wire import WIRE_COMPRESSIONS, encode_tensors_sent


@dataclass
class Encoded:
    meta: list[dict]
    payload: bytes
    sent: list[torch.Tensor] | None  # what the receiver decodes (topk only; None for dense)


class Uplink:
    """One peer's (or simulated worker's) sender: the compression and, for topk, the residual.

    :param compression: one of ``WIRE_COMPRESSIONS``
    :param codec: the topk codec (density, bits, chunk); ignored by dense compressions
    :param error_feedback: keep the residual (topk only; False: drop what the codec drops)
    """

    def __init__(self, compression: str, codec: TopkCodec | None = None, error_feedback: bool = True):
        if compression not in WIRE_COMPRESSIONS:
            raise ValueError(f"unknown compression {compression!r}, expected one of {WIRE_COMPRESSIONS}")
        self.compression, self.codec = compression, codec or TopkCodec()
        self.error_feedback = error_feedback and compression == "topk"
        self.residual: list[torch.Tensor] | None = None
        self._pending: list[torch.Tensor] | None = None

    def prepare(self, delta: list[torch.Tensor]) -> Encoded:
        """Encode Δ (+ the residual); the residual changes only with :meth:`settle`."""
        x = [d.detach().float().cpu() for d in delta]
        if self.error_feedback and self.residual is not None:
            x = [a + e for a, e in zip(x, self.residual)]
        meta, payload, sent = encode_tensors_sent(x, self.compression, self.codec, want_sent=self.compression == "topk")
        self._pending = None
        if self.error_feedback:
            pending = [a - s for a, s in zip(x, sent)]
            # a non-finite Δ is refused by the coordinator; it must not poison every later round
            self._pending = pending if all(bool(torch.isfinite(p).all()) for p in pending) else None
        return Encoded(meta, payload, sent)

    def settle(self, accepted: bool) -> None:
        """The outcome of the last :meth:`prepare`: applied (keep its residual) or not (clear it)."""
        self.residual = self._pending if accepted else None
        self._pending = None

    def reset(self) -> None:
        """Forget the residual (the peer downloaded the state)."""
        self.residual = self._pending = None

    def residual_norm(self) -> float:
        if self.residual is None:
            return 0.0
        return float(torch.sqrt(sum((e.double() ** 2).sum() for e in self.residual)))
