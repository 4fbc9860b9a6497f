"""A sparse low-bit codec for pseudo-gradients (``swarm.compression: topk``), after SparseLoCo
(arXiv 2508.15706): chunk-wise top-k by magnitude, each kept value quantised to ``bits`` bits
with one scale per chunk, indices and codes bit-packed. Pure torch, no I/O.

A tensor of n values is cut into chunks of C values (C a power of two, the last chunk may be
shorter); each chunk keeps its k = round(density × C) largest magnitudes (at least 1, the whole
chunk if it is shorter than k). A kept value v travels as one entry: its index in the chunk
(log2(C) bits) and a code of ``bits`` bits. A chunk that keeps *every* one of its values (k = C,
i.e. density 1; or a last chunk of at most k values) sends no indices: its entries are its values
in order, ``bits`` bits each.

* bits ≥ 2: a sign-magnitude code (sign bit, then bits − 1 magnitude bits); the chunk's scale s
  is its largest kept magnitude, sent as bfloat16, and a magnitude code j decodes to
  s·(j + 1)/M with M = 2^(bits − 1) (so the largest value of a chunk is exact up to the bf16
  scale; with 2 bits a kept value decodes to ±s/2 or ±s).
* bits = 1: a sign code (the sign bit only); the chunk's scale s is the *mean* magnitude of its
  kept values, sent as bfloat16, and every kept value decodes to ±s, the scale that minimises
  the chunk's L2 error for a sign code (EF-signSGD, 1-bit Adam). With density 1 and error
  feedback (swarm/uplink.py) this is a dense 1-bit code: 1 + 16/C bits per value.

Everything not kept decodes to 0.

One tensor's blob::

    b"TK" | u8 bits | u8 log2(C) | u16 k | u64 n | n_chunks × bf16 scale | entries, LSB-first bit-packed

(little-endian), with entries chunk by chunk, in increasing index order inside a chunk, all in
one bit stream (index in the low log2(C) bits of an entry, then the code; no index bits in a
chunk that keeps all its values). With ⌊n/C⌋ full chunks and a last chunk of t = n mod C values,
the entry bits are E = ⌊n/C⌋·k·(w_k + bits) + min(k, t)·(w_t + bits), where w_k = 0 if k = C
else log2 C and w_t = 0 if t ≤ k else log2 C; the size is exact (:func:`blob_bytes`)::

    14 + 2·ceil(n/C) + ceil(E/8) bytes

i.e. about density·(log2 C + bits) + 16/C bits per value when k < C, and bits + 16/C when k = C
(bits 1, C 128: 1.125; bits 2: 2.125). The header's k, log2(C) and n tell the decoder which
chunks carry indices.

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
MIN_BITS, MAX_BITS = 1, 8  # 1: a sign code (scale: mean magnitude); 2..8: sign-magnitude
MIN_LOG2_CHUNK, MAX_LOG2_CHUNK = 4, 12  # chunks of 16 .. 4096 values


class SparseFormatError(ValueError):
    """A topk blob that does not decode (wrong size, field out of range, bad index)."""


@dataclass(frozen=True)
class TopkCodec:
    """The codec's parameters: ``density`` (share of values kept per chunk), ``bits`` per kept
    value (sign included; 1: the sign only, scaled by the chunk's mean kept magnitude),
    ``chunk`` (values per chunk, a power of two)."""

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


def _layout(numel: int, log2_chunk: int, k: int) -> tuple[int, int, int, int, int]:
    """(full chunks, last chunk's length t, entries of the last chunk, index bits per entry of a
    full chunk, of the last chunk): no index bits in a chunk whose values are all kept."""
    chunk = 1 << log2_chunk
    full, tail = divmod(numel, chunk)
    return full, tail, min(k, tail), (0 if k >= chunk else log2_chunk), (0 if tail <= k else log2_chunk)


def _entries(numel: int, bits: int, log2_chunk: int, k: int) -> tuple[int, int]:
    """(entries, their bits) of a tensor of ``numel`` values: ⌊n/C⌋·k + min(k, t) kept values,
    each ``bits`` bits plus log2(C) index bits unless its chunk keeps all its values."""
    full, _, k_tail, w_full, w_tail = _layout(numel, log2_chunk, k)
    return full * k + k_tail, full * k * (w_full + bits) + k_tail * (w_tail + bits)


def blob_bytes(numel: int, bits: int, log2_chunk: int, k: int) -> int:
    """The exact size of one tensor's blob (header, scales, packed entries)."""
    chunk = 1 << log2_chunk
    return _HEAD.size + 2 * (-(-numel // chunk)) + -(-_entries(numel, bits, log2_chunk, k)[1] // 8)


def _bits_of(values: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integers < 2^width as a flat LSB-first uint8 bit stream."""
    shifts = torch.arange(width, dtype=torch.int64)
    return ((values.to(torch.int64).unsqueeze(1) >> shifts) & 1).to(torch.uint8).flatten()


def _pack_bits(bitmat: torch.Tensor) -> bytes:
    """A flat uint8 tensor of 0/1, zero-padded to whole bytes, LSB-first."""
    pad = -bitmat.numel() % 8
    if pad:
        bitmat = torch.cat([bitmat, torch.zeros(pad, dtype=torch.uint8)])
    weights = torch.tensor([1 << i for i in range(8)], dtype=torch.uint8)
    return (bitmat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8).numpy().tobytes()


def _pack(values: torch.Tensor, width: int) -> bytes:
    """Non-negative integers < 2^width, LSB-first in one bit stream, zero-padded to whole bytes."""
    return _pack_bits(_bits_of(values, width))


def _from_bits(bits: torch.Tensor, count: int, width: int) -> torch.Tensor:
    """The first ``count`` integers of ``width`` bits of a flat LSB-first bit stream."""
    weights = torch.tensor([1 << i for i in range(width)], dtype=torch.int64)
    return (bits[: count * width].view(count, width).to(torch.int64) * weights).sum(dim=1)


def _stream(data: bytes | bytearray | memoryview) -> torch.Tensor:
    """Bytes as a flat LSB-first uint8 bit stream."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.uint8) if len(data) else torch.zeros(0, dtype=torch.uint8)
    return ((raw.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).flatten()


def _select(rows: torch.Tensor, k: int, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of each row: (indices sorted ascending, codes, bf16 scales, decoded values)."""
    if k >= rows.shape[1]:  # every value kept: all positions, in order
        idx = torch.arange(rows.shape[1], dtype=torch.int64).expand(rows.shape[0], -1)
        vals = rows
    else:
        _, idx = rows.abs().topk(k, dim=1, sorted=False)
        idx, _ = idx.sort(dim=1)
        vals = rows.gather(1, idx)
    mags = vals.abs()
    neg = (vals < 0).to(torch.int64)
    sign = torch.where(neg.bool(), -1.0, 1.0)
    if bits == 1:  # a sign code: ±(mean kept magnitude), the L2-optimal scale
        scale = mags.mean(dim=1).to(torch.bfloat16)
        return idx, neg, scale, sign * scale.float().unsqueeze(1)
    scale = mags.amax(dim=1).to(torch.bfloat16)
    s = scale.float().unsqueeze(1)
    levels = 1 << (bits - 1)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    j = (mags / safe * levels).round().clamp(1, levels).to(torch.int64) - 1
    codes = (neg << (bits - 1)) | j
    decoded = sign * s * (j + 1).float() / levels
    return idx, codes, scale, decoded


def encode_topk(tensor: torch.Tensor, codec: TopkCodec) -> tuple[bytes, torch.Tensor]:
    """Encode a CPU float32 tensor; returns (blob, what the receiver decodes, same shape)."""
    flat = tensor.detach().reshape(-1).float()
    n, chunk, k, bits, log2c = flat.numel(), codec.chunk, codec.k, codec.bits, codec.log2_chunk
    if n == 0:
        raise ValueError("topk cannot encode an empty tensor")
    full, tail, k_tail, w_full, w_tail = _layout(n, log2c, k)
    parts = []
    if full:
        parts.append((flat[: full * chunk].view(full, chunk), k, w_full))
    if tail:
        parts.append((flat[full * chunk:].view(1, tail), k_tail, w_tail))
    sent = torch.zeros(n, dtype=torch.float32)
    stream, scales, offset = [], [], 0
    for rows, kk, width in parts:
        idx, codes, scale, dec = _select(rows, kk, bits)
        if kk == rows.shape[1]:
            sent[offset:offset + rows.numel()] = dec.flatten()
        else:
            starts = torch.arange(rows.shape[0], dtype=torch.int64).unsqueeze(1) * rows.shape[1] + offset
            sent[(idx + starts).flatten()] = dec.flatten()
        entries = (idx | (codes << width)) if width else codes
        stream.append(_bits_of(entries.flatten(), width + bits))
        scales.append(scale)
        offset += rows.numel()
    head = _HEAD.pack(MAGIC, bits, log2c, k, n)
    blob = head + torch.cat(scales).view(torch.int16).numpy().tobytes() + _pack_bits(torch.cat(stream))
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
    full, tail, k_tail, w_full, w_tail = _layout(n, log2_chunk, k)
    stream = _stream(blob[_HEAD.size + 2 * n_chunks:])
    split = full * k * (w_full + bits)
    parts = []  # (entries, chunks, entries per chunk, index bits, values per chunk, their scales)
    if full:
        parts.append((_from_bits(stream[:split], full * k, w_full + bits), full, k, w_full, chunk, scales[:full]))
    if tail:
        parts.append((_from_bits(stream[split:], k_tail, w_tail + bits), 1, k_tail, w_tail, tail, scales[full:]))
    levels = 1 << (bits - 1)  # bits 1: one level, ±s
    out = torch.zeros(n, dtype=torch.float32)
    offset = 0
    for e, rows, kk, width, length, scale in parts:
        e = e.view(rows, kk)
        codes = e >> width
        sign = torch.where((codes >> (bits - 1)).bool(), -1.0, 1.0)
        values = sign * scale.unsqueeze(1) * ((codes & (levels - 1)) + 1).float() / levels
        block = out[offset:offset + rows * length].view(rows, length)
        if width:  # k < the chunk's length: indices, strictly increasing and inside the chunk
            idx = e & (chunk - 1)
            if bool((idx >= length).any()):
                raise SparseFormatError(f"an index of the last chunk is past its {length} values")
            if bool((idx[:, 1:] <= idx[:, :-1]).any()):
                raise SparseFormatError("indices inside a chunk are not strictly increasing")
            block.scatter_(1, idx, values)
        else:  # every value of the chunk kept: no indices, its values in order
            block.copy_(values)
        offset += rows * length
    return out.view(tuple(shape))


def bits_per_param(numels: list[int], codec: TopkCodec, dense: list[int] | None = None) -> float:
    """Bits per parameter of a whole layout: tensors in ``numels`` as topk blobs, those in
    ``dense`` at fp32 (the wire sends 1-D and tiny tensors uncompressed). Blob bytes only: the
    framing and the JSON metadata are extra. Density 1 (no indices) with bits 1 and C = 128:
    1 + 16/128 = 1.125 bits per topk value, plus the 14-byte header per tensor."""
    dense = dense or []
    total = sum(codec.blob_bytes(n) for n in numels) + sum(4 * n for n in dense)
    return 8 * total / max(1, sum(numels) + sum(dense))
