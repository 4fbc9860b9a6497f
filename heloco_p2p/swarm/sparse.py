"""A sparse low-bit codec for pseudo-gradients (``swarm.compression: topk``), after SparseLoCo
(arXiv 2508.15706): chunk-wise top-k by magnitude, each kept value quantised to ``bits`` bits
with one scale per chunk, indices and codes bit-packed. Pure torch, no I/O.

A tensor of n values is cut into chunks of C values (C a power of two, the last chunk may be
shorter); each chunk keeps its k = round(density × C) largest magnitudes (at least 1, the whole
chunk if it is shorter than k). A kept value v travels as one entry of log2(C) + bits bits:
its index in the chunk and a sign-magnitude code (sign bit, then bits − 1 magnitude bits); the
chunk's scale s is its largest kept magnitude, sent as bfloat16, and a magnitude code j decodes
to s·(j + 1)/M with M = 2^(bits − 1) (so the largest value of a chunk is exact up to the bf16
scale; with 2 bits a kept value decodes to ±s/2 or ±s). Everything not kept decodes to 0.

One tensor's blob::

    b"TK" | u8 bits | u8 log2(C) | u16 k | u64 n | n_chunks × bf16 scale | entries, LSB-first bit-packed

(little-endian), with entries chunk by chunk, in increasing index order inside a chunk. Its size
is exact: 14 + 2·ceil(n/C) + ceil(m·(log2 C + bits)/8) bytes for m = ⌊n/C⌋·k + min(k, n mod C)
entries (:func:`blob_bytes`), i.e. about density·(log2 C + bits) + 16/C bits per value.

:func:`decode_topk` reads untrusted bytes: every header field is range-checked and the length
must be the exact one above before anything is unpacked; indices past the chunk's end and
indices not strictly increasing inside a chunk (duplicates) are refused. It raises
:class:`SparseFormatError`, which the wire turns into ``bad_tensor``.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch

MAGIC = b"TK"
_HEAD = struct.Struct("<2sBBHQ")
MIN_BITS, MAX_BITS = 2, 8
MIN_LOG2_CHUNK, MAX_LOG2_CHUNK = 4, 12  # chunks of 16 .. 4096 values


class SparseFormatError(ValueError):
    """A topk blob that does not decode (wrong size, field out of range, bad index)."""


@dataclass(frozen=True)
class TopkCodec:
    """The codec's parameters: ``density`` (share of values kept per chunk), ``bits`` per kept
    value (sign included), ``chunk`` (values per chunk, a power of two)."""

    density: float = 0.02
    bits: int = 2
    chunk: int = 128

    def __post_init__(self):
        check_params(self.density, self.bits, self.chunk)

    @property
    def k(self) -> int:
        """Values kept per full chunk."""
        return max(1, min(self.chunk, round(self.density * self.chunk)))

    @property
    def log2_chunk(self) -> int:
        return self.chunk.bit_length() - 1

    def blob_bytes(self, numel: int) -> int:
        return blob_bytes(numel, self.bits, self.log2_chunk, self.k)


def check_params(density: float, bits: int, chunk: int) -> None:
    """Raise ValueError with the allowed range for a parameter out of it."""
    if not (isinstance(density, (int, float)) and 0.0 < density <= 1.0):
        raise ValueError(f"topk_density must be in (0, 1], got {density!r}")
    if type(bits) is not int or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"topk_bits must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    if type(chunk) is not int or chunk <= 0 or chunk & (chunk - 1) or \
            not MIN_LOG2_CHUNK <= chunk.bit_length() - 1 <= MAX_LOG2_CHUNK:
        raise ValueError(f"topk_chunk must be a power of two in [{1 << MIN_LOG2_CHUNK}, {1 << MAX_LOG2_CHUNK}], "
                         f"got {chunk!r}")


def _entries(numel: int, chunk: int, k: int) -> int:
    full, tail = divmod(numel, chunk)
    return full * k + min(k, tail)


def blob_bytes(numel: int, bits: int, log2_chunk: int, k: int) -> int:
    """The exact size of one tensor's blob (header, scales, packed entries)."""
    chunk = 1 << log2_chunk
    return _HEAD.size + 2 * (-(-numel // chunk)) + -(-_entries(numel, chunk, k) * (log2_chunk + bits) // 8)


def _pack(values: torch.Tensor, width: int) -> bytes:
    """Non-negative integers < 2^width, LSB-first in one bit stream, zero-padded to whole bytes."""
    shifts = torch.arange(width, dtype=torch.int64)
    bitmat = ((values.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.uint8).flatten()
    pad = -bitmat.numel() % 8
    if pad:
        bitmat = torch.cat([bitmat, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bitmat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8).numpy().tobytes()


def _unpack(data: bytes | bytearray | memoryview, count: int, width: int) -> torch.Tensor:
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.zeros(0, dtype=torch.uint8)
    bits = ((raw.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()[: count * width]
    weights = torch.tensor([1 << i for i in range(width)], dtype=torch.int64)
    return (bits.view(count, width).to(torch.int64) * weights).sum(dim=1)


def _select(rows: torch.Tensor, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of each row: (indices sorted ascending, codes, bf16 scales, decoded values)."""
    _, idx = rows.abs().topk(k, dim=1, sorted=False)
    idx, _ = idx.sort(dim=1)
    vals = rows.gather(1, idx)
    mags = vals.abs()
    scale = mags.amax(dim=1).to(torch.bfloat16)
    s = scale.float().unsqueeze(1)
    levels = 1 << (bits - 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    j = (mags / safe * levels).round().clamp(1, levels).to(torch.int64) - 1
    neg = (vals < 0).to(torch.int64)
    codes = (neg << (bits - 1)) | j
    decoded = torch.where(neg.bool(), -1.0, 1.0) * s * (j + 1).float() / levels
    return idx, codes, scale, decoded


def encode_topk(tensor: torch.Tensor, codec: TopkCodec) -> tuple[bytes, torch.Tensor]:
    """Encode a CPU float32 tensor; returns (blob, what the receiver decodes, same shape)."""
    flat = tensor.detach().reshape(-1).float()
    n, chunk, k, bits = flat.numel(), codec.chunk, codec.k, codec.bits
    if n == 0:
        raise ValueError("topk cannot encode an empty tensor")
    full, tail = divmod(n, chunk)
    parts = []
    if full:
        parts.append((flat[: full * chunk].view(full, chunk), k))
    if tail:
        parts.append((flat[full * chunk:].view(1, tail), min(k, tail)))
    sent = torch.zeros(n, dtype=torch.float32)
    entries, scales, offset = [], [], 0
    for rows, kk in parts:
        idx, codes, scale, dec = _select(rows, kk, bits)
        starts = torch.arange(rows.shape[0], dtype=torch.int64).unsqueeze(1) * rows.shape[1] + offset
        sent[(idx + starts).flatten()] = dec.flatten()
        entries.append((idx | (codes << codec.log2_chunk)).flatten())
        scales.append(scale)
        offset += rows.numel()
    head = _HEAD.pack(MAGIC, bits, codec.log2_chunk, k, n)
    blob = head + torch.cat(scales).view(torch.int16).numpy().tobytes() + \
        _pack(torch.cat(entries), codec.log2_chunk + bits)
    assert len(blob) == codec.blob_bytes(n)
    return blob, sent.view(tensor.shape)


def decode_topk(blob: bytes | bytearray | memoryview, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode an untrusted blob into a float32 tensor of ``shape`` (whose size the caller has
    checked against its model: this allocates ``prod(shape)`` values)."""
    numel = math.prod(shape)
    if len(blob) < _HEAD.size:
        raise SparseFormatError(f"{len(blob)} bytes, shorter than the {_HEAD.size}-byte header")
    magic, bits, log2_chunk, k, n = _HEAD.unpack_from(blob)
    if magic != MAGIC:
        raise SparseFormatError(f"bad magic {magic!r}")
    if not MIN_BITS <= bits <= MAX_BITS:
        raise SparseFormatError(f"bits {bits} outside [{MIN_BITS}, {MAX_BITS}]")
    if not MIN_LOG2_CHUNK <= log2_chunk <= MAX_LOG2_CHUNK:
        raise SparseFormatError(f"log2 chunk {log2_chunk} outside [{MIN_LOG2_CHUNK}, {MAX_LOG2_CHUNK}]")
    chunk = 1 << log2_chunk
    if not 1 <= k <= chunk:
        raise SparseFormatError(f"k {k} outside [1, {chunk}]")
    if n != numel or n == 0:
        raise SparseFormatError(f"{n} values declared, shape {tuple(shape)} has {numel}")
    want = blob_bytes(n, bits, log2_chunk, k)
    if len(blob) != want:
        raise SparseFormatError(f"{len(blob)} bytes, {want} expected for {n} values, chunk {chunk}, k {k}, {bits} bits")
    n_chunks = -(-n // chunk)
    scales = torch.frombuffer(bytearray(blob[_HEAD.size:_HEAD.size + 2 * n_chunks]), dtype=torch.bfloat16).float()
    if not bool(torch.isfinite(scales).all()) or bool((scales < 0).any()):
        raise SparseFormatError("a chunk scale is negative or not finite")
    full, tail = divmod(n, chunk)
    k_tail = min(k, tail)
    m = full * k + k_tail
    entries = _unpack(blob[_HEAD.size + 2 * n_chunks:], m, log2_chunk + bits)
    idx = entries & (chunk - 1)
    codes = entries >> log2_chunk
    # which chunk each entry belongs to, and the chunk's length
    chunk_of = torch.cat([torch.arange(full, dtype=torch.int64).repeat_interleave(k),
                          torch.full((k_tail,), full, dtype=torch.int64)])
    if k_tail and bool((idx[full * k:] >= tail).any()):
        raise SparseFormatError(f"an index of the last chunk is past its {tail} values")
    same_chunk = chunk_of[1:] == chunk_of[:-1]
    if bool((same_chunk & (idx[1:] <= idx[:-1])).any()):
        raise SparseFormatError("indices inside a chunk are not strictly increasing")
    levels = 1 << (bits - 1)
    j = codes & (levels - 1)
    sign = torch.where((codes >> (bits - 1)).bool(), -1.0, 1.0)
    values = sign * scales[chunk_of] * (j + 1).float() / levels
    out = torch.zeros(n, dtype=torch.float32)
    out[chunk_of * chunk + idx] = values
    return out.view(tuple(shape))


def bits_per_param(numels: list[int], codec: TopkCodec, dense: list[int] | None = None) -> float:
    """Bits per parameter of a whole layout: tensors in ``numels`` as topk blobs, those in
    ``dense`` at fp32 (the wire sends 1-D and tiny tensors uncompressed). Blob bytes only: the
    framing and the JSON metadata are extra."""
    dense = dense or []
    total = sum(codec.blob_bytes(n) for n in numels) + sum(4 * n for n in dense)
    return 8 * total / max(1, sum(numels) + sum(dense))
