#!/usr/bin/env python
"""Time for a joiner to download a run's state: from 1 or several peers at once, in fp32 or fp16.

    nice -n 15 python scripts/bench_join.py --params 5e6
    python scripts/bench_join.py --params 125e6 --sources 1 3 --compressions none fp16 --json /tmp/join.json

Servers are in-process ``SwarmNode``s on 127.0.0.1 (real p2pd daemons and streams), each with the
peer's ``StateServer`` over one shared commit state of ``--params`` float32 values (tensors of
1024 × 1024 and a remainder, θ̄ ≠ θ after one commit); the first plays the coordinator, the others
standbys. The joiner calls ``download_state`` exactly as a peer does. "seconds" is the whole
call (plan, parts, checks); "parts s" the part transfers alone; a server copies and hashes the
version on the first plan, so each measurement starts with no version kept anywhere. On loopback
the bottleneck is CPU (p2pd, encoding, hashing), not a link: with a home link the time is about
bytes / the joiner's downlink, and several sources help when the servers' uplinks are the limit.

Memory: the shared state (θ and momentum, 8 bytes/param) plus, per server, the kept copy (4) and
its fp16 form (2), plus the joiner's result (4): about 3.3 GB at 125M with 3 servers.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heloco_p2p.outer import build_engine  # noqa: E402
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits  # noqa: E402
from heloco_p2p.roles.coordinator import CoordinatorService  # noqa: E402
from heloco_p2p.roles.joining import JOIN_PART_MB, StateServer, download_state  # noqa: E402
from heloco_p2p.swarm.node import SwarmNode  # noqa: E402

RUN = "benchjoin"
BLOCK = 1 << 20


def synthetic_shapes(numel: int) -> list[tuple[int, ...]]:
    """``numel`` values as 1024 × 1024 matrices and one 1-D remainder."""
    shapes = [(1024, 1024)] * (numel // BLOCK)
    return shapes + ([(numel % BLOCK,)] if numel % BLOCK else [])


def shared_state(shapes: list[tuple[int, ...]]) -> CommitState:
    g = torch.Generator().manual_seed(0)
    state = CommitState(build_engine([torch.randn(s, generator=g) * 0.02 for s in shapes], "lookahead",
                                     {"lr": 0.7, "momentum": 0.9}, dispatch="lookahead"))
    state.apply([torch.full(s, 1e-3) for s in shapes], 0, "QmBench", 0, 1, 1.0)
    return state


class LoopbackServers:
    """``n`` state servers on loopback over one commit state, and a joiner node."""

    def __init__(self, n: int, shapes: list[tuple[int, ...]]):
        self.shapes, self.state = shapes, shared_state(shapes)
        self.nodes, self.servers = [], []
        try:
            for i in range(n):
                node = SwarmNode(RUN, initial_peers=self.nodes[0].visible_maddrs() if self.nodes else ())
                self.nodes.append(node)
                role = "coordinator" if i == 0 else "standby"
                svc = CoordinatorService(node, self.state, shapes, SubmissionLimits(submit_rate=0.0), lease_seconds=3600.0)
                if i == 0:
                    svc.replication.others_alive = 0
                    svc.activate(1)
                server = StateServer("name: bench\n", b"{}", svc, lambda role=role: role, lambda: (None, 0), b"k")
                # looked up at each request, so that a test can make a server fail
                node.add_handler("state", lambda h, p, r, s=server: s.serve_state(h, p, r))
                self.servers.append(server)
            self.joiner = SwarmNode(RUN, initial_peers=self.nodes[0].visible_maddrs())
        except BaseException:
            self.close()
            raise

    def election(self, sources: int) -> SimpleNamespace:
        ids = [n.peer_id for n in self.nodes[:sources]]
        lease = SimpleNamespace(peer_id=ids[0], standbys=ids[1:])
        return SimpleNamespace(wait_for_lease=lambda s: lease, refresh=lambda: lease)

    def download(self, sources: int, compression: str, part_mb: float = JOIN_PART_MB, timeout: float = 600.0):
        for s in self.servers:
            s.pinned.clear()  # every measurement pays for the servers' copy of the version
        expected = [(s, torch.float32) for s in self.shapes]
        t0 = time.perf_counter()
        params, header, _ = download_state(self.joiner, self.election(sources), expected, threading.Event(),
                                           timeout=timeout, compression=compression, sources=sources, part_mb=part_mb)
        return params, header, time.perf_counter() - t0

    def close(self) -> None:
        for node in [getattr(self, "joiner", None), *reversed(self.nodes)]:
            if node is not None:
                node.shutdown()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=5e6, help="values in the state (e.g. 125e6)")
    ap.add_argument("--sources", type=int, nargs="+", default=[1, 3], help="peers to download from at once")
    ap.add_argument("--compressions", nargs="+", default=["none", "fp16"], choices=["none", "fp16"])
    ap.add_argument("--part-mb", type=float, default=JOIN_PART_MB)
    ap.add_argument("--reps", type=int, default=1, help="runs per setting (the best is printed)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    numel = int(args.params)
    shapes = synthetic_shapes(numel)
    command = "python scripts/bench_join.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    swarm = LoopbackServers(max(args.sources), shapes)
    rows = []
    try:
        want = [p.clone() for p in swarm.state.engine.dispatch_params()]
        for compression in args.compressions:
            for sources in args.sources:
                best = None
                for _ in range(args.reps):
                    params, header, seconds = swarm.download(sources, compression, args.part_mb)
                    exact = all(torch.equal(a, b) for a, b in zip(params, want))
                    # fp16 rounds to nearest: within half a unit in the last place (2^-11 relative)
                    rounding = all(bool(((a - b).abs() <= b.abs() * 2 ** -11 + 2 ** -25).all()) for a, b in zip(params, want))
                    err = max(float((a - b).abs().max()) for a, b in zip(params, want))
                    del params
                    join = header["join"]
                    row = {"params": numel, "compression": compression, "sources": sources, "parts": join["parts"],
                           "mb": round(join["bytes"] / 1e6, 1), "seconds": round(seconds, 2),
                           "parts_seconds": join["seconds"], "mb_per_s": round(join["bytes"] / 1e6 / seconds, 1),
                           "served_by": sorted(join["sources"].values(), reverse=True), "exact": exact,
                           "within_fp16_rounding": rounding,
                           "max_abs_err": err, "retried": join["retried"]}
                    best = row if best is None or row["seconds"] < best["seconds"] else best
                rows.append(best)
    finally:
        swarm.close()
    print(f"\n$ {command}")
    print(f"state: {numel:,} values in {len(shapes)} tensors; {platform.node()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'compression':>11} {'sources':>7} {'parts':>5} {'MB':>8} {'seconds':>8} {'parts s':>8} {'MB/s':>7} "
          f"{'parts per peer':>16} {'max |err|':>10}")
    for r in rows:
        print(f"{r['compression']:>11} {r['sources']:>7} {r['parts']:>5} {r['mb']:>8.1f} {r['seconds']:>8.2f} "
              f"{r['parts_seconds']:>8.2f} {r['mb_per_s']:>7.1f} {str(r['served_by']):>16} {r['max_abs_err']:>10.2e}")
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "rows": rows}, indent=1))
    assert all(r["exact"] for r in rows if r["compression"] == "none")
    assert all(r["within_fp16_rounding"] for r in rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
