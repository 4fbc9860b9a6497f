"""``wrap8``: θ̄ in replies at 8 bits per parameter, with a drift bounded by construction.

Every tensor is cut into blocks of :data:`BLOCK` values (the last one shorter). Block j of the
version v being sent has a power-of-two grid step s_j = 2^e_j, chosen by the coordinator once per
version (:class:`DownlinkWindow`). The coordinator's grid index of a value is n = round(θ̄ / s)
and a reply carries only r = n mod 256 per value, e_j per block and two checksums per block. A
peer holding any start point P (its last θ̄, exact or on an earlier grid) computes, per value,

    m = round(P / s),   d = ((r − m + 128) mod 256) − 128,   n' = m + d,   P_new = n' · s

so n' = n exactly whenever |n − m| ≤ 127 for every value of the block; the checksums, recomputed
from n', detect a block where that failed, and the peer then downloads the exact state instead (a
*resync*). A peer that decoded holds P = n · s: |P − θ̄| ≤ s_j / 2 for every value, whatever it held
before, so the drift from θ̄ is bounded per version and never accumulates. P_new is exact in
float32 because |n| < 2^24 (the floor on e_j below).

Choosing e_j (:class:`DownlinkWindow`): the coordinator keeps the previous version's θ̄ (one fp32
copy) and, for the last W versions (``swarm.reply_window``), the per-block max |θ̄_v − θ̄_{v−1}|
and the e of each version (one float and one int8 per block and version). A peer whose start is
the grid of version b (or θ̄_b itself) is at most Σ_{v=b+1..now} maxchange_v + s_b/2 away from θ̄,
hence |n − m| ≤ that / s + 1. Each version takes per block the finest e with that bound ≤
:data:`TARGET_STEPS` (100, under the 127 that decodes) for every b in the window, but no finer
than the floor max(⌊log2 rms⌋ − :data:`GRID_FLOOR_BITS`, ⌈log2 max|θ̄|⌉ − 23): finer steps buy
nothing measurable, and the second term keeps |n| ≤ 2^23. Per reply :meth:`DownlinkWindow.decodable`
checks the same bound for the sender's own base (cheap: W vectors of one float per block); a
sender whose base is older than the window, or that says it holds nothing decodable, gets the
dense fp32 θ̄ (``pack_params``) instead.

Checksums, per block, over the grid indices n_i (i = 0.. the block's length − 1), as unsigned
32-bit integers:

    c1 = Σ n_i mod 2^32,     c2 = Σ w_i · n_i mod 2^32,     w_i = fmix32(i + 1)

(fmix32: MurmurHash3's 32-bit finaliser). A failed value is off by a multiple of 256; c1 catches
every failure whose wrap counts do not cancel, c2 with pseudo-random weights the rest (a linear
weight such as i + 1 would miss patterns like +256, −256, −256, +256 at equal spacing, which
changes of alternating sign produce).

Payload (the reply's payload when its header says ``"params_encoding": "wrap8"``)::

    u32 (big-endian) preamble length | preamble: UTF-8 JSON
        {"encoding": "wrap8", "block": 4096, "version": v, "shapes": [[...], ...]}
    then per tensor, in layout order, with k = ceil(numel / 4096) blocks:
        e: k × int8 | c1: k × uint32 LE | c2: k × uint32 LE | r: numel × uint8

The preamble framing is ``pack_params``'s. :func:`decode_wrap8` checks the preamble, the shapes
against the receiver's layout, the exact body length and every e before decoding anything
(``WireError``: ``truncated``, ``malformed``, ``layout_mismatch``, ``bad_tensor``). 1 byte per
parameter plus 9 bytes per block: 8.018 bits per parameter and the preamble.

Pure functions and one window object; torch only.
"""
from __future__ import annotations

import json
import math
import struct
import time
from collections import deque
from dataclasses import dataclass
from typing import Sequence

import torch

from heloco_p2p.swarm.wire import WireError

BLOCK = 4096
GRID_FLOOR_BITS = 12  # no step finer than 2^(⌊log2 rms⌋ − 12) of its block
TARGET_STEPS = 100  # the window's bound on |n − m|, with margin under the 127 that decodes
DECODABLE_STEPS = 127.0  # |n − m| ≤ 127 decodes (d spans [−128, 127]); the per-reply bound must stay below
E_MIN, E_MAX = -126, 103  # 2^e normal in float32, and |n|·2^e < 2^24·2^103 finite
CHUNK = 256 * BLOCK  # values processed at once: the temporaries stay a few MB whatever the tensor
HELD = ("wrap8", "exact", "none")  # what a submitter says it holds (the submission's ``held``)
_MASK32 = 0xFFFFFFFF
_BLOCK_BYTES = 9  # e (1) + c1 (4) + c2 (4)


def _fmix32(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _MASK32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


_W = [_fmix32(i + 1) for i in range(BLOCK)]
# Σ n, Σ (w mod 2^16)·n, Σ (w >> 16)·n per block as one float64 product: each sum is an exact
# integer (|n| ≤ 2^23, so |Σ| < 2^51 < 2^53) whatever order the BLAS adds in
_WMAT = torch.tensor([[1, w & 0xFFFF, w >> 16] for w in _W], dtype=torch.float64)
MAX_GRID_INDEX = 1 << 23  # |n| on the coordinator's grid (the floor on e); a decoded index beyond it is wrong


def num_blocks(numel: int) -> int:
    return -(-numel // BLOCK)


def payload_bytes(shapes: Sequence[Sequence[int]]) -> int:
    """The body size of a wrap8 payload of this layout (without the preamble)."""
    return sum(math.prod(s) + _BLOCK_BYTES * num_blocks(math.prod(s)) for s in shapes)


def _chunks(numel: int):
    """(start, stop, blocks) of whole-block chunks of a flat tensor of ``numel`` values."""
    for start in range(0, numel, CHUNK):
        stop = min(numel, start + CHUNK)
        yield start, stop, num_blocks(stop - start)


def _blocked(x: torch.Tensor, nb: int) -> torch.Tensor:
    """A flat chunk as (blocks, BLOCK), zero-padded at the end."""
    if x.numel() < nb * BLOCK:
        x = torch.cat([x, x.new_zeros(nb * BLOCK - x.numel())])
    return x.view(nb, BLOCK)


def _checksums(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """c1, c2 (int64 in [0, 2^32)) of blocks of grid indices ``n`` (integers as floats, |n| ≤ 2^23,
    shape (blocks, BLOCK))."""
    sums = (n.double() @ _WMAT).to(torch.int64)  # exact: see _WMAT
    c1 = sums[:, 0] & _MASK32
    c2 = (((sums[:, 2] & 0xFFFF) << 16) + sums[:, 1]) & _MASK32  # Σ w·n = 2^16·Σ w_hi·n + Σ w_lo·n
    return c1, c2


def _floor_log2(x: torch.Tensor) -> torch.Tensor:
    """⌊log2 x⌋ for x > 0 (exact, from the float's exponent); E_MIN where x is 0 or not finite."""
    mant, ex = torch.frexp(x)
    out = ex.to(torch.int64) - 1
    return torch.where((x > 0) & torch.isfinite(x), out, torch.full_like(out, E_MIN))


def _ceil_log2(x: torch.Tensor) -> torch.Tensor:
    mant, ex = torch.frexp(x)
    out = ex.to(torch.int64) - (mant == 0.5).to(torch.int64)
    return torch.where((x > 0) & torch.isfinite(x), out, torch.full_like(out, E_MIN))


def _steps(e: torch.Tensor) -> torch.Tensor:
    """2^e as float32 (exact for E_MIN ≤ e ≤ E_MAX)."""
    return torch.ldexp(torch.ones(e.shape, dtype=torch.float32), e.to(torch.int32))


def block_stats(x: torch.Tensor, prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per block of ``x``: the finest grid exponent (``grid_floor``'s rule) and, with ``prev``,
    max |x − prev| (one pass over the tensor for both)."""
    flat = x.detach().reshape(-1)
    old = prev.detach().reshape(-1) if prev is not None else None
    floors, changes = [], []
    for a, b, nb in _chunks(flat.numel()):
        blk = _blocked(flat[a:b], nb)
        lengths = torch.full((nb,), float(BLOCK))
        lengths[-1] = (b - a) - (nb - 1) * BLOCK
        rms = (blk.square().sum(1) / lengths).sqrt()
        floors.append(torch.maximum(_floor_log2(rms) - GRID_FLOOR_BITS, _ceil_log2(blk.abs().amax(1)) - 23))
        if old is not None:
            changes.append(_blocked(flat[a:b] - old[a:b], nb).abs().amax(1))
    floor = torch.cat(floors).clamp(E_MIN, E_MAX) if floors else torch.zeros(0, dtype=torch.int64)
    if old is None:
        return floor, None
    return floor, torch.cat(changes) if changes else torch.zeros(0)


def grid_floor(x: torch.Tensor) -> torch.Tensor:
    """The finest e of each block of ``x``: max(⌊log2 rms⌋ − GRID_FLOOR_BITS, ⌈log2 max|x|⌉ − 23)."""
    return block_stats(x)[0]


def choose_steps(floor: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
    """Per block, the finest e ≥ ``floor`` such that ``distance`` (a bound on |θ̄ − P|) plus the
    two roundings fits in TARGET_STEPS grid steps: distance / 2^e + 1 ≤ TARGET_STEPS."""
    need = _ceil_log2((distance.double() / (TARGET_STEPS - 1)).float())
    return torch.maximum(floor, need).clamp(E_MIN, E_MAX).to(torch.int8)


@dataclass
class Encoded:
    """One tensor on its grid: r, e, c1, c2, and the grid's squared distance from the tensor."""

    r: torch.Tensor  # uint8, numel
    e: torch.Tensor  # int8, blocks
    c1: torch.Tensor  # int64, blocks
    c2: torch.Tensor  # int64, blocks
    err_sq: float  # Σ (n·s − x)²
    norm_sq: float  # Σ x²


def encode_tensor(x: torch.Tensor, e: torch.Tensor) -> Encoded:
    """``x`` on the grid of steps 2^e (one e per block). All in float32, exactly: x / 2^e is a
    power-of-two scaling, its rounding an integer below 2^24, and so are n mod 256 and n · 2^e."""
    flat = x.detach().reshape(-1).to(torch.float32)
    s_all = _steps(e)
    r = torch.empty(flat.numel(), dtype=torch.uint8)
    c1s, c2s, err_sq, norm_sq = [], [], 0.0, 0.0
    for a, b, nb in _chunks(flat.numel()):
        s = s_all[a // BLOCK:a // BLOCK + nb, None]
        blk = _blocked(flat[a:b], nb)
        n = torch.round(blk / s)
        r[a:b] = torch.remainder(n, 256).to(torch.uint8).reshape(-1)[:b - a]
        c1, c2 = _checksums(n)
        c1s.append(c1)
        c2s.append(c2)
        err_sq += float((n * s - blk).square().sum(dtype=torch.float64))
        norm_sq += float(blk.square().sum(dtype=torch.float64))
    empty = torch.zeros(0, dtype=torch.int64)
    return Encoded(r, e.to(torch.int8), torch.cat(c1s) if c1s else empty, torch.cat(c2s) if c2s else empty,
                   err_sq, norm_sq)


def grid_values(x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """n · s: the values a peer that decodes ``x``'s grid holds (float32, shape of ``x``)."""
    flat = x.detach().reshape(-1).to(torch.float32)
    s_all, out = _steps(e), torch.empty_like(flat)
    for a, b, nb in _chunks(flat.numel()):
        s = s_all[a // BLOCK:a // BLOCK + nb, None]
        out[a:b] = (torch.round(_blocked(flat[a:b], nb) / s) * s).reshape(-1)[:b - a]
    return out.view(x.shape)


def decode_tensor(ref: torch.Tensor, r: torch.Tensor, e: torch.Tensor, c1: torch.Tensor,
                  c2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """P_new = n' · s from the receiver's start point ``ref`` and the sent r (uint8, flat), and
    which blocks' checksums do not match (bool, one per block: those values are wrong). In
    float32 like the encoder: every quantity is an integer below 2^25 or a power-of-two scaling."""
    flat = ref.detach().reshape(-1).to(torch.float32)
    s_all, out = _steps(e), torch.empty_like(flat)
    bad = []
    for a, b, nb in _chunks(flat.numel()):
        s = s_all[a // BLOCK:a // BLOCK + nb, None]
        p = torch.nan_to_num(_blocked(flat[a:b], nb), nan=0.0, posinf=0.0, neginf=0.0)
        m = torch.round(p / s).clamp_(-2 * MAX_GRID_INDEX, 2 * MAX_GRID_INDEX)
        n = m + torch.remainder(_blocked(r[a:b], nb).to(torch.float32) - m + 128, 256) - 128
        # the padding decodes to 0, as it was encoded; an index beyond the grid's range is wrong
        outside = n.abs().amax(1) > MAX_GRID_INDEX
        n = torch.where(outside[:, None], torch.zeros_like(n), n)  # keeps the checksum sums exact
        g1, g2 = _checksums(n)
        blk = slice(a // BLOCK, a // BLOCK + nb)
        bad.append(outside | (g1 != c1[blk]) | (g2 != c2[blk]))
        out[a:b] = (n * s).reshape(-1)[:b - a]
    return out.view(ref.shape), (torch.cat(bad) if bad else torch.zeros(0, dtype=torch.bool))


# -- the payload ------------------------------------------------------------------------------------
def pack_wrap8(encoded: Sequence[Encoded], shapes: Sequence[Sequence[int]], version: int) -> bytes:
    pre = json.dumps({"encoding": "wrap8", "block": BLOCK, "version": version,
                      "shapes": [list(s) for s in shapes]}, separators=(",", ":")).encode()
    parts = [struct.pack(">I", len(pre)), pre]
    for enc in encoded:
        parts += [enc.e.to(torch.int8).numpy().tobytes(), _u32(enc.c1), _u32(enc.c2), enc.r.numpy().tobytes()]
    return b"".join(parts)


def _u32(c: torch.Tensor) -> bytes:
    signed = torch.where(c >= 1 << 31, c - (1 << 32), c).to(torch.int32)  # the same 32 bits
    return signed.numpy().astype("<i4").tobytes()


def _read_u32(view: memoryview, k: int) -> torch.Tensor:
    return torch.frombuffer(bytearray(view[:4 * k]), dtype=torch.int32).to(torch.int64) & _MASK32


def read_wrap8(payload: bytes, expected: Sequence[Sequence[int]]) -> tuple[int, list[tuple]]:
    """Check a wrap8 payload against the layout ``expected`` (shapes); returns its version and,
    per tensor, (r, e, c1, c2).

    :raises WireError: ``truncated``, ``malformed``, ``layout_mismatch`` or ``bad_tensor``
    """
    if len(payload) < 4:
        raise WireError("truncated", "wrap8 payload shorter than its preamble")
    n = int.from_bytes(payload[:4], "big")
    if n > len(payload) - 4 or n > 1 << 24:
        raise WireError("truncated", "wrap8 payload shorter than its preamble")
    try:
        pre = json.loads(bytes(payload[4:4 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError("malformed", f"wrap8 preamble is not JSON ({type(exc).__name__})") from None
    if not isinstance(pre, dict) or pre.get("encoding") != "wrap8" or pre.get("block") != BLOCK:
        raise WireError("malformed", f"not a wrap8 preamble with block {BLOCK}")
    version, shapes = pre.get("version"), pre.get("shapes")
    if type(version) is not int or version < 0:
        raise WireError("malformed", "wrap8 preamble: version must be a non-negative integer")
    want = [list(s) for s in expected]
    if shapes != want:
        raise WireError("layout_mismatch", f"wrap8 payload of {len(shapes) if isinstance(shapes, list) else '?'} "
                                           f"tensors does not have the layout of {len(want)} expected")
    body = memoryview(payload)[4 + n:]
    if len(body) != payload_bytes(want):
        raise WireError("truncated" if len(body) < payload_bytes(want) else "malformed",
                        f"wrap8 body of {len(body)} bytes, the layout needs {payload_bytes(want)}")
    out, off = [], 0
    for i, shape in enumerate(want):
        numel = math.prod(shape)
        k = num_blocks(numel)
        if numel == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            out.append((torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int8), empty, empty))
            continue
        e = torch.frombuffer(bytearray(body[off:off + k]), dtype=torch.int8)
        off += k
        if (int(e.min()) < E_MIN or int(e.max()) > E_MAX):
            raise WireError("bad_tensor", f"tensor {i}: a grid exponent outside [{E_MIN}, {E_MAX}]")
        c1 = _read_u32(body[off:], k)
        off += 4 * k
        c2 = _read_u32(body[off:], k)
        off += 4 * k
        r = torch.frombuffer(bytearray(body[off:off + numel]), dtype=torch.uint8)
        off += numel
        out.append((r, e, c1, c2))
    return version, out


def decode_wrap8(payload: bytes, start: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], int]:
    """The parameters a wrap8 reply brings, decoded against the receiver's start point ``start``
    (its current parameters, whose shapes are the layout); returns (params, mismatched blocks).
    With any mismatched block the params are not θ̄'s grid: fetch the exact state instead.

    :raises WireError: a malformed or truncated payload (``read_wrap8``)
    """
    _, parts = read_wrap8(payload, [tuple(p.shape) for p in start])
    params, bad = [], 0
    for ref, (r, e, c1, c2) in zip(start, parts):
        p, mism = decode_tensor(ref, r, e, c1, c2)
        params.append(p)
        bad += int(mism.sum())
    return params, bad


# -- the coordinator's window -----------------------------------------------------------------------
@dataclass
class VersionGrid:
    """What the window remembers of one version: per block, max |θ̄_v − θ̄_{v−1}| (None for the
    first version the window saw) and the grid exponents its payload used."""

    version: int
    change: torch.Tensor | None  # float32, all blocks of the layout
    e: torch.Tensor | None  # int8, all blocks; None: no payload of this version was built in this window


@dataclass
class Wrap8Payload:
    """One version's reply payload, sent as is to every decodable sender of that version."""

    version: int
    term: int
    data: bytes
    e: torch.Tensor
    drift_rel_l2: float  # ‖n·s − θ̄‖ / ‖θ̄‖ over all parameters
    seconds: float = 0.0  # to build it


class DownlinkWindow:
    """The coordinator's wrap8 state: the previous version's θ̄, the last ``window`` versions'
    per-block changes and grid exponents, and the current version's payload. One owner: the
    coordinator's event loop, under the commit lock (the work runs in executor jobs it awaits).

    :param window: W, the versions back a sender's base may be and still be sent wrap8
    """

    def __init__(self, window: int = 16):
        if window < 1:
            raise ValueError(f"reply_window must be >= 1, got {window}")
        self.window = window
        self.prev: list[torch.Tensor] | None = None
        self.term: int | None = None
        self.grids: deque[VersionGrid] = deque(maxlen=window + 1)  # bases b = now − W .. now
        self.payload: Wrap8Payload | None = None

    def _grid(self, version: int) -> VersionGrid | None:
        for g in self.grids:
            if g.version == version:
                return g
        return None

    def follows(self, version: int, term: int) -> bool:
        """Whether the window's last version is ``version`` of ``term`` (the next can be measured from it)."""
        return self.prev is not None and self.term == term and bool(self.grids) and self.grids[-1].version == version

    def clear(self) -> None:
        """Forget the window (its θ̄ copy, grids and payload): the next commit starts it again."""
        self.grids.clear()
        self.prev, self.term, self.payload = None, None, None

    def start(self, params: Sequence[torch.Tensor], version: int, term: int) -> None:
        """Start the window at ``version`` (θ̄ = ``params``, before a commit): the next version's
        change is measured from it, so senders at this base get wrap8 from the first commit on."""
        self.grids.clear()
        self.grids.append(VersionGrid(version, None, None))
        self.prev = [p.detach().clone() for p in params]
        self.term, self.payload = term, None

    def advance(self, params: Sequence[torch.Tensor], version: int, term: int) -> Wrap8Payload:
        """The payload of ``version`` (θ̄ = ``params``), which follows the last one seen; a gap
        in versions or a new term starts the window again (older bases are then sent dense).
        Reads ``params`` only (they may be the engine's live θ: call it under the commit lock)."""
        t0 = time.perf_counter()
        if self.payload is not None and self.payload.version == version and self.payload.term == term:
            return self.payload
        follows = self.follows(version - 1, term)
        if not follows:
            self.grids.clear()
        stats = [block_stats(p, q if follows else None) for p, q in zip(params, self.prev or [None] * len(params))]
        floor = torch.cat([f for f, _ in stats])
        change = torch.cat([c for _, c in stats]) if follows else None
        changes = [change] if change is not None else []
        changes += [g.change for g in self.grids if g.change is not None and g.version > version - self.window]
        distance = torch.stack(changes).sum(0) if changes else torch.zeros(floor.shape)
        rounding = [_steps(g.e) / 2 for g in self.grids if g.version >= version - self.window and g.e is not None]
        if rounding:
            distance = distance + torch.stack(rounding).amax(0)
        e = choose_steps(floor, distance)
        encoded, off = [], 0
        for p in params:
            k = num_blocks(p.numel())
            encoded.append(encode_tensor(p, e[off:off + k]))
            off += k
        data = pack_wrap8(encoded, [tuple(p.shape) for p in params], version)
        norm_sq = sum(x.norm_sq for x in encoded)
        drift = math.sqrt(sum(x.err_sq for x in encoded) / norm_sq) if norm_sq > 0 else 0.0
        self.grids.append(VersionGrid(version, change, e))
        if self.prev is None or [tuple(p.shape) for p in self.prev] != [tuple(p.shape) for p in params]:
            self.prev = [p.detach().clone() for p in params]
        else:
            for dst, src in zip(self.prev, params):
                dst.copy_(src.detach())
        self.term = term
        self.payload = Wrap8Payload(version, term, data, e, drift, time.perf_counter() - t0)
        return self.payload

    def bound_steps(self, base: int, held: str) -> float | None:
        """The largest |n − m| (in grid steps of the current payload) a sender whose start is
        version ``base``'s (``held``: "exact" θ̄_b or its "wrap8" grid) can have, or None when the
        window cannot bound it (an older base, nothing decodable held, no payload yet)."""
        p = self.payload
        if p is None or held not in ("wrap8", "exact") or base > p.version or base < p.version - self.window:
            return None
        distance = torch.zeros(p.e.shape)
        for v in range(base + 1, p.version + 1):
            g = self._grid(v)
            if g is None or g.change is None:
                return None
            distance += g.change
        if held == "wrap8" and base < p.version:
            g = self._grid(base)
            if g is None or g.e is None:
                return None
            distance += _steps(g.e) / 2
        return float((distance / _steps(p.e)).max()) + 1.0 if distance.numel() else 1.0

    def decodable(self, base: int, held: str) -> bool:
        """Whether the current payload decodes exactly on a sender whose start is version ``base``'s."""
        bound = self.bound_steps(base, held)
        return bound is not None and bound < DECODABLE_STEPS
