#!/usr/bin/env python
"""What one submission costs on the wire: bytes per parameter, error and codec time of each
compression for the tiny and small model layouts, and the time to send it between two hivemind
peers on loopback, framed (``heloco_p2p.swarm.wire``) and as raw bytes on the same kind of stream.

    python scripts/bench_wire.py                      # tiny, small × none, fp16, 8bit
    python scripts/bench_wire.py --configs tiny --reps 3 --json /tmp/wire.json

The pseudo-gradients are Gaussian (std 1e-3), one tensor per trainable parameter in model order.
"message ms" is one framed message (header + payload) sent with ``wire.request`` and answered by a
small ack after the server has read it all; "raw ms" is the same number of bytes written to a
fresh binary stream and acknowledged with one byte. Both include opening the stream over an
existing connection. Times are the best of ``--reps`` (on a shared machine the best run is the
reproducible one). Prints a table; writes no docs.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heloco_p2p.config import load_config  # noqa: E402
from heloco_p2p.local import build_model, trainable_params  # noqa: E402
from heloco_p2p.swarm.wire import (  # noqa: E402
    COMPRESSIONS,
    decode_tensors,
    encode_tensors,
    read_message,
    request,
    write_message,
)


def layout(name: str) -> list[tuple[int, ...]]:
    """Parameter shapes of a config's model, built on the meta device (no memory, no init)."""
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    with torch.device("meta"):
        model = build_model(cfg.model)
    return [tuple(p.shape) for p in trainable_params(model)]


def measure_codec(shapes: list[tuple[int, ...]], compression: str, reps: int) -> dict:
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(s, generator=g) * 1e-3 for s in shapes]
    expected = [(s, torch.float32) for s in shapes]
    # one untimed pass: first-call imports (bitsandbytes) and allocator warm-up are not codec time
    decode_tensors(*encode_tensors(tensors, compression), expected)
    enc, dec = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        meta, payload = encode_tensors(tensors, compression)
        t1 = time.perf_counter()
        out = decode_tensors(meta, payload, expected)
        t2 = time.perf_counter()
        enc.append(t1 - t0)
        dec.append(t2 - t1)
    params = sum(t.numel() for t in tensors)
    header = json.dumps({"op": "submit", "version": 0, "tensors": meta}, separators=(",", ":")).encode()
    frame = 4 + 4 + len(header) + 8 + len(payload)
    err = torch.cat([(a - b).flatten() for a, b in zip(tensors, out)]).norm() / torch.cat(
        [a.flatten() for a in tensors]).norm()
    worst = max(((a - b).norm() / a.norm()).item() for a, b in zip(tensors, out))
    return {"params": params, "compression": compression, "payload_bytes": len(payload), "header_bytes": len(header),
            "bytes_per_param": frame / params, "rel_l2": err.item(), "max_tensor_rel_l2": worst,
            "encode_ms": 1e3 * min(enc), "decode_ms": 1e3 * min(dec),
            "meta": meta, "payload": payload}


async def measure_streams(messages: list[tuple[list[dict], bytes]], reps: int) -> list[tuple[float, float]]:
    """(message seconds, raw seconds) per message, best of reps, between two local peers."""
    from hivemind.p2p import P2P

    async def on_submit(_info, reader, writer):
        try:
            header, payload = await read_message(reader, max_payload_bytes=1 << 30)
            await write_message(writer, {"ok": True, "bytes": len(payload)})
        finally:
            writer.close()

    async def on_raw(_info, reader, writer):
        try:
            remaining = int.from_bytes(await reader.readexactly(8), "big")
            while remaining:
                chunk = await reader.read(min(remaining, 1 << 20))
                if not chunk:
                    break
                remaining -= len(chunk)
            writer.write(b"k")
            await writer.drain()
        finally:
            writer.close()

    server = client = None
    try:
        server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs())
        await server.add_binary_stream_handler("heloco.bench.submit", on_submit)
        await server.add_binary_stream_handler("heloco.bench.raw", on_raw)

        async def framed(meta, payload):
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, "heloco.bench.submit")
            reply, _ = await request(reader, writer, {"op": "submit", "version": 0, "tensors": meta}, payload)
            writer.close()
            assert reply["ok"] and reply["bytes"] == len(payload)

        async def raw(payload):
            _, reader, writer = await client.call_binary_stream_handler(server.peer_id, "heloco.bench.raw")
            writer.write(len(payload).to_bytes(8, "big"))
            writer.write(payload)
            await writer.drain()
            assert await reader.readexactly(1) == b"k"
            writer.close()

        await framed([], b"")  # warm the connection
        results = []
        for meta, payload in messages:
            t_msg, t_raw = [], []
            for _ in range(reps):
                t0 = time.perf_counter()
                await framed(meta, payload)
                t1 = time.perf_counter()
                await raw(payload)
                t2 = time.perf_counter()
                t_msg.append(t1 - t0)
                t_raw.append(t2 - t1)
            results.append((min(t_msg), min(t_raw)))
        return results
    finally:
        for p in (client, server):
            if p is not None:
                await p.shutdown()


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{platform.node()}: {cpu}, {os.cpu_count()} cores, load average {load}; torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,small")
    ap.add_argument("--compressions", default=",".join(COMPRESSIONS))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    rows = []
    for name in args.configs.split(","):
        shapes = layout(name)
        for compression in args.compressions.split(","):
            rows.append({"config": name, **measure_codec(shapes, compression, args.reps)})
    empty = {"config": "(empty)", "params": 0, "compression": "-", "payload_bytes": 0, "meta": [], "payload": b""}
    timings = asyncio.run(measure_streams([(r["meta"], r["payload"]) for r in rows + [empty]], args.reps))
    for row, (t_msg, t_raw) in zip(rows + [empty], timings):
        row["message_ms"], row["raw_ms"] = 1e3 * t_msg, 1e3 * t_raw
        row["raw_mb_s"] = row["payload_bytes"] / 1e6 / t_raw
        del row["meta"], row["payload"]

    print(f"$ python {' '.join(sys.argv)}")
    print(f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z} on {machine()}")
    print(f"best of {args.reps}; {args.threads} torch threads; Gaussian pseudo-gradients; loopback, two p2pd\n")
    cols = ("config", "params", "compression", "MB", "bytes/param", "rel L2", "worst tensor", "encode ms",
            "decode ms", "message ms", "raw ms", "raw MB/s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print(f"| {r['config']} | {r['params']:,} | {r['compression']} | {r['payload_bytes'] / 1e6:.2f} "
              f"| {r['bytes_per_param']:.3f} | {r['rel_l2']:.1e} | {r['max_tensor_rel_l2']:.1e} "
              f"| {r['encode_ms']:.1f} | {r['decode_ms']:.1f} | {r['message_ms']:.1f} | {r['raw_ms']:.1f} "
              f"| {r['raw_mb_s']:.0f} |")
    print(f"| (empty message) | 0 | - | 0 | - | - | - | - | - "
          f"| {empty['message_ms']:.1f} | {empty['raw_ms']:.1f} | - |")
    if args.json:
        args.json.write_text(json.dumps({"command": sys.argv, "machine": machine(), "rows": rows + [empty]}, indent=1))


if __name__ == "__main__":
    main()
