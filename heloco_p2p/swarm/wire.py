"""Tensors and messages on hivemind binary streams, with the project's own framing and limits.

hivemind's protobuf handlers parse a length-prefixed message before project code runs, have no
size cap of their own and answer malformed input by closing the stream. A submission needs the
opposite: its size is capped from the length fields before the body is read, and the sender is
told why it was refused. So the coordinator serves ``P2P.add_binary_stream_handler`` and frames
messages itself::

    b"HLC1" | u32 header_len | header: UTF-8 JSON object | u64 payload_len | payload

(lengths big-endian). The header carries the metadata of the tensors in the payload (from
:func:`encode_tensors`) and whatever the RPC layer needs (run, version, stats, a signature); the
payload is the tensors, each a serialized ``hivemind.proto.runtime_pb2.Tensor`` (hivemind's
compressions: NONE, FLOAT16, BLOCKWISE_8BIT), or for ``topk`` (pseudo-gradients only) the
project's own sparse low-bit blob (``swarm/sparse.py``). Tensors travel as float32 whatever the
model's dtype.

Usage (client, then server)::

    meta, payload = encode_tensors(pseudo_grads, "8bit")
    reply, params_payload = await request(reader, writer, {"op": "submit", "tensors": meta}, payload)

    try:
        header, payload = await read_message(reader, max_payload_bytes=64 << 20)
        tensors = decode_tensors(header["tensors"], payload, expected=[(p.shape, torch.float32) for p in params])
    except WireError as e:
        await write_message(writer, {"ok": False, "code": e.code, "reason": e.message})

Every malformed input raises :class:`WireError`, whose ``code`` is short and meant to be sent back
to the peer: ``closed``, ``truncated``, ``bad_magic``, ``too_large``, ``malformed``, ``bad_tensor``,
``layout_mismatch``. Reads have no timeout of their own: wrap them in ``asyncio.wait_for``.

A server that must decide from the header before the payload is read (authentication, flood
control: ``swarm/node.py``) uses the two halves of :func:`read_message`: :func:`read_head`, then
:func:`send_continue` and :func:`read_payload`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import struct
from typing import Any, Callable, Sequence

import torch
from google.protobuf.message import DecodeError
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.proto import runtime_pb2

from heloco_p2p.swarm.sparse import SparseFormatError, TopkCodec, decode_topk, encode_topk

logger = logging.getLogger(__name__)

COMPRESSIONS = ("none", "fp16", "8bit")  # dense: any tensor (pseudo-gradients and θ)
# and what pseudo-gradients may also use: "topk", sparse and lossy (swarm/sparse.py), sent with
# error feedback by the peer (swarm/uplink.py); decoded only against a known layout
WIRE_COMPRESSIONS = COMPRESSIONS + ("topk",)
MAGIC = b"HLC1"
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_PROTO_COMPRESSION = {
    "none": runtime_pb2.CompressionType.NONE,
    "fp16": runtime_pb2.CompressionType.FLOAT16,
    "8bit": runtime_pb2.CompressionType.BLOCKWISE_8BIT,
}
# hivemind's BlockwiseQuantization (bitsandbytes): absmax per block of 4096 values and a
# 256-entry float32 codebook sent with every tensor, so 1 KiB of overhead per tensor.
BLOCK_SIZE_8BIT = 4096
CODEBOOK_SIZE_8BIT = 256
# Below one quantization block the 1 KiB codebook costs about as much as the fp32 tensor itself,
# and 1-D tensors (norm gains, biases) are few values that the model is sensitive to: quantizing
# them saves nothing and loses precision, so "8bit" sends them uncompressed.
MIN_NUMEL_8BIT = BLOCK_SIZE_8BIT
_READ_CHUNK = 1 << 20
# dtypes a sender could mean (a wrong one is a layout error); any other string is garbage
TENSOR_DTYPES = frozenset({"float16", "bfloat16", "float32", "float64", "int8", "uint8", "int16", "int32", "int64", "bool"})


class WireError(ValueError):
    """Bytes from a peer that cannot be accepted; ``code`` is the machine-readable reason.

    :param code: short reason sent back to the peer (``too_large``, ``malformed``, ...)
    :param message: human-readable detail
    :param retry_after: for ``busy`` and ``rate_limited``: seconds after which a retry may succeed
    """

    def __init__(self, code: str, message: str, retry_after: float | None = None):
        # all in args so that the exception survives pickling (multiprocessing, hivemind MPFuture)
        super().__init__(code, message, retry_after)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def wire_compression(tensor: torch.Tensor, compression: str, topk: TopkCodec | None = None) -> str:
    """The compression a tensor is actually sent with when ``compression`` is requested.

    :param tensor: the tensor to send
    :param compression: one of :data:`WIRE_COMPRESSIONS`
    :param topk: the codec for ``topk`` (its chunk size decides which tensors are too small)
    """
    if compression == "8bit" and (tensor.dim() < 2 or tensor.numel() < MIN_NUMEL_8BIT):
        return "none"
    # norm gains and biases are few values the model is sensitive to: topk sends them as fp32
    if compression == "topk" and (tensor.dim() < 2 or tensor.numel() < (topk or TopkCodec()).chunk):
        return "none"
    return compression


def encode_tensors(tensors: Sequence[torch.Tensor], compression: str,
                   topk: TopkCodec | None = None) -> tuple[list[dict], bytes]:
    """Serialize CPU float32 tensors into per-tensor metadata and one concatenated payload.

    fp16 clamps to ±65504; 8bit is hivemind's blockwise quantization (bitsandbytes), used only
    for tensors with at least 2 dimensions and :data:`MIN_NUMEL_8BIT` values (see
    :func:`wire_compression`); topk (``swarm/sparse.py``, codec ``topk``, default
    :class:`TopkCodec`) only for tensors with at least 2 dimensions and one chunk of values;
    the compression actually used is recorded per tensor.

    :param tensors: CPU float32 tensors (pseudo-gradients or parameters), in layout order
    :param compression: one of :data:`WIRE_COMPRESSIONS`
    :returns: (metadata: a JSON-friendly list of ``{shape, dtype, nbytes, compression}``, payload)
    """
    meta, payload, _ = encode_tensors_sent(tensors, compression, topk, want_sent=False)
    return meta, payload


def encode_tensors_sent(tensors: Sequence[torch.Tensor], compression: str, topk: TopkCodec | None = None,
                        want_sent: bool = True) -> tuple[list[dict], bytes, list[torch.Tensor] | None]:
    """:func:`encode_tensors`, and what the receiver will decode from it (for error feedback):
    ``(meta, payload, sent)``, ``sent`` None unless ``want_sent``."""
    if compression not in WIRE_COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}, expected one of {WIRE_COMPRESSIONS}")
    codec = topk or TopkCodec()
    meta, parts, sent = [], [], []
    for i, tensor in enumerate(tensors):
        if tensor.dtype != torch.float32 or tensor.device.type != "cpu":
            raise TypeError(f"tensor {i}: expected a CPU float32 tensor, got {tensor.dtype} on {tensor.device}")
        used = wire_compression(tensor, compression, codec)
        if used == "topk":
            blob, dec = encode_topk(tensor, codec)
        else:
            blob = serialize_torch_tensor(tensor.detach(), _PROTO_COMPRESSION[used]).SerializeToString()
            dec = None
            if want_sent:
                dec = tensor.detach().clone() if used == "none" else \
                    _decode_one(i, memoryview(blob), tuple(tensor.shape), used)
        meta.append({"shape": list(tensor.shape), "dtype": "float32", "nbytes": len(blob), "compression": used})
        parts.append(blob)
        sent.append(dec)
    return meta, b"".join(parts), (sent if want_sent else None)


def _check_meta(meta: Any) -> list[tuple[tuple[int, ...], str, int]]:
    """Type-check untrusted metadata; returns (shape, compression, nbytes) per tensor."""
    if not isinstance(meta, list):
        raise WireError("malformed", "tensor metadata is not a list")
    checked = []
    for i, entry in enumerate(meta):
        if not isinstance(entry, dict):
            raise WireError("malformed", f"tensor {i}: metadata is not an object")
        shape, nbytes, comp = entry.get("shape"), entry.get("nbytes"), entry.get("compression")
        # bool is an int subclass: reject it explicitly so that `true` is not a dimension of 1
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise WireError("malformed", f"tensor {i}: shape must be a list of non-negative integers")
        if type(nbytes) is not int or nbytes < 0:
            raise WireError("malformed", f"tensor {i}: nbytes must be a non-negative integer")
        if comp not in WIRE_COMPRESSIONS:
            raise WireError("malformed", f"tensor {i}: unknown compression {comp!r}")
        dtype = entry.get("dtype")
        if dtype != "float32":
            # a dtype the wire could name but does not carry is a layout error, anything else is garbage
            code = "layout_mismatch" if isinstance(dtype, str) and dtype in TENSOR_DTYPES else "malformed"
            raise WireError(code, f"tensor {i}: dtype must be float32 (tensors travel as float32), got {dtype!r}")
        checked.append((tuple(shape), comp, nbytes))
    return checked


def _expected_buffer_len(numel: int, compression: str) -> int:
    if compression == "none":
        return 4 * numel
    if compression == "fp16":
        return 2 * numel
    nblocks = -(-numel // BLOCK_SIZE_8BIT)
    return 16 + 4 * nblocks + 4 * CODEBOOK_SIZE_8BIT + numel


def _dequantize_blockwise(buffer: bytearray, numel: int, n_absmax: int) -> torch.Tensor:
    """Decode hivemind's BLOCKWISE_8BIT buffer: value = codebook[code] * absmax[block].

    Bitwise the same as hivemind's ``BlockwiseQuantization.extract`` (bitsandbytes), which this
    replaces because it converts 1-element arrays to ints, an error from numpy 2.4 on; here the
    block table is read with ``struct`` and the lookup is plain torch.
    """
    off_code = 16 + 4 * n_absmax
    absmax = torch.frombuffer(buffer, dtype=torch.float32, count=n_absmax, offset=16)
    code = torch.frombuffer(buffer, dtype=torch.float32, count=CODEBOOK_SIZE_8BIT, offset=off_code)
    indices = torch.frombuffer(buffer, dtype=torch.uint8, count=numel, offset=off_code + 4 * CODEBOOK_SIZE_8BIT)
    out = code.index_select(0, indices.int())
    full = numel - numel % BLOCK_SIZE_8BIT
    out[:full].view(-1, BLOCK_SIZE_8BIT).mul_(absmax[: full // BLOCK_SIZE_8BIT, None])
    if full < numel:
        out[full:].mul_(absmax[-1])
    return out


def _decode_one(i: int, blob: memoryview, shape: tuple[int, ...], compression: str,
                known_layout: bool = True) -> torch.Tensor:
    if compression == "topk":
        # a sparse blob decodes to prod(shape) values from few bytes: only against a layout the
        # receiver knows (its model), never for a shape the sender alone declares
        if not known_layout:
            raise WireError("bad_tensor", f"tensor {i}: topk is accepted only against a known layout")
        try:
            return decode_topk(blob, shape)
        except SparseFormatError as e:
            raise WireError("bad_tensor", f"tensor {i}: topk: {e}") from None
    try:
        proto = runtime_pb2.Tensor.FromString(blob)
    except (DecodeError, ValueError, TypeError) as e:
        raise WireError("bad_tensor", f"tensor {i}: protobuf does not parse ({e})") from None
    if proto.compression != _PROTO_COMPRESSION[compression]:
        raise WireError("bad_tensor", f"tensor {i}: compression differs from its metadata")
    if tuple(proto.size) != shape or proto.dtype != "float32":
        raise WireError("bad_tensor", f"tensor {i}: shape/dtype {tuple(proto.size)}/{proto.dtype} "
                                      f"differ from metadata {shape}/float32")
    numel = math.prod(shape)
    # The buffer length is checked against the shape before any decoder sees it, so that a
    # length field cannot make a decoder read past the data or allocate for a claimed size.
    if len(proto.buffer) != _expected_buffer_len(numel, compression):
        raise WireError("bad_tensor", f"tensor {i}: {len(proto.buffer)} data bytes do not fit shape {shape} "
                                      f"with {compression}")
    if compression == "8bit":
        if numel == 0:
            raise WireError("bad_tensor", f"tensor {i}: empty tensor sent as 8bit")
        n_absmax, n_code = struct.unpack_from("<qq", proto.buffer)
        if n_absmax != -(-numel // BLOCK_SIZE_8BIT) or n_code != CODEBOOK_SIZE_8BIT:
            raise WireError("bad_tensor", f"tensor {i}: 8bit block table ({n_absmax}, {n_code}) does not fit shape")
        return _dequantize_blockwise(bytearray(proto.buffer), numel, n_absmax).reshape(shape)
    try:
        tensor = deserialize_torch_tensor(proto)
    except Exception as e:  # a decoder failure on checked input is still the peer's bytes: report, don't crash
        raise WireError("bad_tensor", f"tensor {i}: {compression} does not decode ({type(e).__name__}: {e})") from None
    return tensor.detach().to(torch.float32).reshape(shape).contiguous()


def decode_tensors(
    meta: Any, payload: bytes, expected: Sequence[tuple[Sequence[int], torch.dtype]] | None = None
) -> list[torch.Tensor]:
    """Rebuild float32 CPU tensors from :func:`encode_tensors` output received from a peer.

    Everything is checked except the values themselves (finiteness and norms are the
    coordinator's validator's job): metadata types, lengths summing to ``len(payload)``, each
    protobuf against its metadata, and the layout against ``expected`` before anything is decoded.

    :param meta: the metadata list as received (untrusted JSON)
    :param payload: the concatenated serialized tensors
    :param expected: if given, the (shape, dtype) of each tensor the receiver's model needs
    :raises WireError: ``malformed`` (metadata, lengths), ``layout_mismatch`` (vs ``expected``),
        ``bad_tensor`` (a tensor's bytes)
    """
    checked = _check_meta(meta)
    total = sum(nbytes for _, _, nbytes in checked)
    if total != len(payload):
        raise WireError("malformed", f"tensor sizes sum to {total} bytes, payload has {len(payload)}")
    if expected is not None:
        if len(expected) != len(checked):
            raise WireError("layout_mismatch", f"{len(checked)} tensors sent, {len(expected)} expected")
        for i, ((shape, _, _), (want_shape, want_dtype)) in enumerate(zip(checked, expected)):
            if shape != tuple(want_shape) or want_dtype != torch.float32:
                raise WireError("layout_mismatch", f"tensor {i}: float32{list(shape)} sent, "
                                                   f"{want_dtype}{list(want_shape)} expected")
    view, offset, tensors = memoryview(payload), 0, []
    for i, (shape, compression, nbytes) in enumerate(checked):
        tensors.append(_decode_one(i, view[offset:offset + nbytes], shape, compression, expected is not None))
        offset += nbytes
    return tensors


def _dump_header(header: dict) -> bytes:
    if not isinstance(header, dict):
        raise TypeError("header must be a dict")
    # strict JSON both ways: NaN/Infinity are not JSON and a non-Python receiver would choke
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def _reject_constant(name: str):
    raise ValueError(f"{name} is not JSON")


async def write_message(writer: asyncio.StreamWriter, header: dict, payload: bytes = b"") -> int:
    """Write one framed message and wait until the transport has taken it (``drain``).

    :param writer: the stream's writer (from a hivemind binary stream or asyncio)
    :param header: a JSON-serializable dict (no NaN or infinities)
    :param payload: raw bytes, e.g. from :func:`encode_tensors`
    :returns: the number of bytes written
    """
    head = _dump_header(header)
    prefix = MAGIC + _U32.pack(len(head)) + head + _U64.pack(len(payload))
    writer.write(prefix)
    await write_payload(writer, payload)
    return len(prefix) + len(payload)


_WRITE_CHUNK = 1 << 20


async def write_payload(writer: asyncio.StreamWriter, payload: bytes) -> None:
    """Write ``payload`` in chunks of 1 MiB, each taken by the transport before the next (``drain``):
    the bytes a socket cannot take at once are copied into the transport's buffer, so a payload
    written whole (a full state, θ in a reply: hundreds of MB at 125M) was held twice until sent."""
    view = memoryview(payload)
    for start in range(0, len(view), _WRITE_CHUNK):
        writer.write(view[start:start + _WRITE_CHUNK])
        await writer.drain()
    await writer.drain()


async def _read_exactly(reader: asyncio.StreamReader, n: int, what: str) -> bytes:
    try:
        return await reader.readexactly(n)
    except asyncio.IncompleteReadError as e:
        raise WireError("truncated", f"stream ended after {len(e.partial)} of {n} bytes of {what}") from None


async def _read_payload(reader: asyncio.StreamReader, n: int) -> bytes:
    """``n`` bytes: one chunk as it came (bytes), or a bytearray grown as the chunks arrive (memory
    grows with what actually arrives, not with what the length field claims, and a large payload
    is never held twice, as chunks and joined)."""
    first = await reader.read(min(n, _READ_CHUNK)) if n else b""
    if len(first) == n:
        return first
    if not first:
        raise WireError("truncated", f"stream ended after 0 of {n} payload bytes")
    buf = bytearray(first)
    del first
    while len(buf) < n:
        chunk = await reader.read(min(n - len(buf), _READ_CHUNK))
        if not chunk:
            raise WireError("truncated", f"stream ended after {len(buf)} of {n} payload bytes")
        buf += chunk
    return buf


CONTINUE = b"\x01"  # "send the payload": a server's answer to a request header it accepts


async def read_head(reader: asyncio.StreamReader, max_header_bytes: int = 1 << 20) -> tuple[dict, int, bool]:
    """The first half of :func:`read_message`: magic, header and the payload's declared length.

    :returns: (header without ``_continue``, payload length, whether the sender waits for the go-ahead)
    :raises WireError: ``closed``, ``truncated``, ``bad_magic``, ``too_large`` (header), ``malformed``
    """
    magic = await reader.read(len(MAGIC))
    if not magic:
        raise WireError("closed", "stream ended before a message")
    if len(magic) < len(MAGIC):
        magic += await _read_exactly(reader, len(MAGIC) - len(magic), "magic")
    if magic != MAGIC:
        raise WireError("bad_magic", f"expected {MAGIC!r}, got {magic!r}")
    (header_len,) = _U32.unpack(await _read_exactly(reader, _U32.size, "header length"))
    if header_len > max_header_bytes:
        raise WireError("too_large", f"header of {header_len} bytes exceeds the limit of {max_header_bytes}")
    raw = await _read_exactly(reader, header_len, "header")
    try:
        header = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise WireError("malformed", f"header is not UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WireError("malformed", f"header is a JSON {type(header).__name__}, not an object")
    (payload_len,) = _U64.unpack(await _read_exactly(reader, _U64.size, "payload length"))
    wants_continue = header.pop("_continue", False) is True
    return header, payload_len, wants_continue


async def send_continue(writer: asyncio.StreamWriter, proof: bytes = b"") -> None:
    """The go-ahead for a sender that waits for it, optionally followed by a fixed-length proof
    (the swarm key's :meth:`~heloco_p2p.swarm.auth.SwarmKey.continue_proof`)."""
    writer.write(CONTINUE + proof)
    await writer.drain()


async def read_payload(reader: asyncio.StreamReader, n: int) -> bytes:
    """The second half of :func:`read_message`: ``n`` payload bytes, read in chunks as they arrive.

    :raises WireError: ``truncated``
    """
    return await _read_payload(reader, n)


async def read_message(
    reader: asyncio.StreamReader, max_header_bytes: int = 1 << 20, max_payload_bytes: int = 1 << 30,
    writer: asyncio.StreamWriter | None = None,
) -> tuple[dict, bytes]:
    """Read one framed message; sizes are checked from the length fields before the body is read.

    A request whose header carries ``"_continue": true`` (sent by ``request(...,
    expect_continue=True)``) waits for the server's go-ahead before sending its payload, like
    HTTP's 100-continue: pass ``writer`` and the go-ahead is written once the header and the
    lengths have passed the checks. A refused request then never sends its body, and its sender
    is sure to read the reason (a reply racing a large upload can be lost to a reset stream).

    :param reader: the stream's reader
    :param max_header_bytes: largest header accepted
    :param max_payload_bytes: largest payload accepted
    :param writer: the same stream's writer, to answer a request that expects the go-ahead
    :returns: (header dict, payload bytes)
    :raises WireError: ``closed`` (the stream ended cleanly before a message), ``truncated``,
        ``bad_magic``, ``too_large``, ``malformed`` (header not a UTF-8 JSON object)
    """
    header, payload_len, wants_continue = await read_head(reader, max_header_bytes)
    if payload_len > max_payload_bytes:
        raise WireError("too_large", f"payload of {payload_len} bytes exceeds the limit of {max_payload_bytes}")
    if wants_continue and payload_len and writer is not None:
        await send_continue(writer)
    return header, await _read_payload(reader, payload_len)


async def request(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    header: dict,
    payload: bytes = b"",
    max_header_bytes: int = 1 << 20,
    max_payload_bytes: int = 1 << 30,
    expect_continue: bool = False,
    check_continue: Callable[[bytes], None] | None = None,
    continue_proof_len: int = 0,
) -> tuple[dict, bytes]:
    """Send one message and read the reply, reading while still sending.

    With ``expect_continue`` (the server reads with ``read_message(..., writer=writer)``) the
    payload is sent only after the server's go-ahead; a refusal arrives instead of it. With
    ``check_continue``, the go-ahead must be followed by ``continue_proof_len`` bytes that
    ``check_continue`` accepts (it raises otherwise, and the payload is never sent).

    A server that refuses a message from its header (too large, wrong run) answers at once and
    stops reading; a client that only reads after sending everything would then block in
    ``drain`` and never see the reason. Here the reply wins: once it has arrived, an unfinished
    send is cancelled.

    :param reader: the stream's reader
    :param writer: the stream's writer
    :param header: the request header
    :param payload: the request payload
    :param max_header_bytes: largest reply header accepted
    :param max_payload_bytes: largest reply payload accepted
    :returns: the reply (header, payload)
    """
    _dump_header(header)  # a header that cannot be sent must fail here, not leave us awaiting a reply
    if expect_continue and payload:
        head = _dump_header({**header, "_continue": True})
        writer.write(MAGIC + _U32.pack(len(head)) + head + _U64.pack(len(payload)))
        await writer.drain()
        first = await reader.read(1)
        if first != CONTINUE:  # the server answered instead: a refusal (or an error) with its reason
            rest = await read_message(_Prepend(first, reader), max_header_bytes, max_payload_bytes)
            return rest
        if check_continue is not None:
            check_continue(await _read_exactly(reader, continue_proof_len, "go-ahead proof"))
        await write_payload(writer, payload)
        return await read_message(reader, max_header_bytes, max_payload_bytes)
    send = asyncio.ensure_future(write_message(writer, header, payload))
    try:
        reply = await read_message(reader, max_header_bytes, max_payload_bytes)
    finally:
        if not send.done():
            send.cancel()
        # a send that failed because the server hung up early is expected; any other error with
        # no reply to show is re-raised by read_message above
        await asyncio.gather(send, return_exceptions=True)
    if send.done() and not send.cancelled() and send.exception() is not None:
        logger.debug("request: send ended with %r after the reply arrived", send.exception())
    return reply


async def linger_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float = 10.0,
                       max_bytes: int = 256 << 20) -> None:
    """Close a server stream without destroying the reply that was just written.

    The server closes only once the client has: it reads and discards (never buffers) what the
    client still sends until the client's end of stream, for at most ``timeout`` seconds and
    ``max_bytes``. Closing earlier loses replies: p2pd turns the end of our side into a full
    libp2p ``Close`` (write *and* read), and a stream closed for reading while the remote still
    writes (a request refused from its header, its payload still arriving) or has not yet read
    what is buffered is *reset*; a reset discards the reply bytes the client's daemon had not
    yet passed on, so the client saw "stream ended before a message" for a reply the server had
    sent. A half-close (``write_eof``) triggers the same ``Close`` in p2pd and is not used.
    """
    try:
        deadline = asyncio.get_running_loop().time() + timeout
        seen = 0
        while seen < max_bytes:
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                break
            chunk = await asyncio.wait_for(reader.read(1 << 16), timeout=left)
            if not chunk:
                break
            seen += len(chunk)
    except (asyncio.TimeoutError, ConnectionError, OSError):
        pass
    finally:
        writer.close()


class Lingering:
    """Server streams closing after their reply (``linger_close``), bounded: a stream lingers only
    while fewer than ``limit`` do, else it is closed at once. A peer that never closes its side
    holds a lingering stream for ``linger_close``'s timeout; without the bound, streams opened
    faster than they linger out (each one refused ``busy`` at once) would grow without limit."""

    def __init__(self, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.limit = limit
        self.count = 0  # streams lingering now
        self.closed_at_once = 0  # streams closed without lingering because ``limit`` were

    async def close(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, **kwargs) -> None:
        if self.count >= self.limit:
            self.closed_at_once += 1
            writer.close()
            return
        self.count += 1
        try:
            await linger_close(reader, writer, **kwargs)
        finally:
            self.count -= 1


class _Prepend:
    """A reader that yields ``first`` before the rest of ``reader`` (to re-read a peeked byte)."""

    def __init__(self, first: bytes, reader: asyncio.StreamReader):
        self._first, self._reader = first, reader

    async def read(self, n: int = -1) -> bytes:
        if self._first:
            if n < 0:
                out, self._first = self._first + await self._reader.read(n), b""
                return out
            out, self._first = self._first[:n], self._first[n:]
            return out
        return await self._reader.read(n)

    async def readexactly(self, n: int) -> bytes:
        if self._first:
            head = self._first[:n]
            self._first = self._first[len(head):]
            return head + (await self._reader.readexactly(n - len(head)) if n > len(head) else b"")
        return await self._reader.readexactly(n)


def pack_params(meta: list[dict], data: bytes) -> bytes:
    """Tensor metadata travels in the payload's own small JSON preamble so that replies stay one
    message: u32 length | JSON | tensor bytes."""
    blob = json.dumps(meta).encode()
    return len(blob).to_bytes(4, "big") + blob + data


def unpack_params(payload: bytes, expected=None) -> list[torch.Tensor]:
    if len(payload) < 4:
        raise WireError("truncated", "parameter payload shorter than its preamble")
    n = int.from_bytes(payload[:4], "big")
    if n > len(payload) - 4:
        raise WireError("truncated", "parameter payload shorter than its metadata")
    try:
        meta = json.loads(payload[4:4 + n])
    except ValueError as exc:
        raise WireError("malformed", f"parameter metadata is not JSON: {exc}") from None
    return decode_tensors(meta, memoryview(payload)[4 + n:], expected)  # a view: no copy of θ's bytes
