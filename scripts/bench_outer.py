#!/usr/bin/env python
"""Benchmark of one outer commit on a ~21M-parameter Llama-shaped list of tensors.

Measures ms per ``engine.commit`` (median of --repeats after --warmup) for the optimizer ×
correction combinations that matter, beside torch's own ``p.add_(d)`` over the same tensors in
the same run, and an effective bandwidth.

Byte counting rule: a commit's traffic is the number of whole-tensor reads and writes it does,
times the parameter bytes P (float32: 4 bytes × numel). ``p.add_(d)`` is 3 P (read p, read d,
write p). Per commit:
  block scalars   4 P once a momentum exists (‖Δ‖: read Δ; ‖m‖: read m; Δ·m: read both), else 1 P
  nesterov        9 P  (b ← μb + Δ in one pass: 3; θ −= ηΔ: 3; θ −= ημb: 3)
  lookahead       9 P  (m.lerp_(Δ): 3; θ −= ηγm: 3; θ −= ηΔ: 3)
  delayed_nest.   6 P  (acc += Δ: 3; θ −= ηΔ/N: 3) + on 1 commit in N: m ← βm + acc/N (2 + 3),
                        acc ← 0 (1), θ −= η…βm (3): 9 P / N on average (c = 0)
  correction, per corrected block of size B: shrink/project/pull 3 B (read Δ, read m, write Δ̂),
                  reorient 5 B (Δ̂ = aΔ: 2; Δ̂ += b·m: 3), scale 2 B; keep/skip 0.
Effective GB/s = mean traffic / mean time (delayed_nesterov alternates cheap commits with one
dearer commit per N; the timed commits cover whole windows).

Each commit's Δ is one of three random sets with a random sign per block (prepared outside the
timed region), so about half the blocks oppose the momentum and the corrections fire on a mix
of branches (listed per row); the row with c_ok = 1 corrects every block (the worst case).
On a shared machine other processes' load shows up as outliers (mean above median); min is the
uncontended best, and the 1-minute load average at the start is printed with the machine.

Usage::

    python scripts/bench_outer.py [--repeats 20] [--warmup 3] [--threads 2] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from heloco_p2p.outer import build_engine  # noqa: E402
from heloco_p2p.outer.stats import block_stats  # noqa: E402

COMBOS = [
    ("nesterov", {}, "none", {}),
    ("delayed_nesterov", {"buffer_size": 4, "c": 0.0}, "none", {}),
    ("lookahead", {}, "none", {}),
    ("lookahead", {}, "heloco", {}),
    ("lookahead", {}, "heloco_smooth", {}),
    ("lookahead", {}, "pcgrad", {}),
    ("lookahead", {}, "heloco", {"c_ok": 1.0}),
]
OPT_UNITS = {"nesterov": 9.0, "lookahead": 9.0}
BRANCH_UNITS = {"keep": 0, "skip": 0, "shrink": 3, "project": 3, "pull": 3, "reorient": 5, "scale": 2}


def llama_shapes(hidden: int = 512, layers: int = 6, vocab: int = 4096, intermediate: int = 1376) -> list[tuple]:
    """Parameter shapes of a LlamaForCausalLM with tied embeddings."""
    shapes: list[tuple[int, ...]] = [(vocab, hidden)]
    for _ in range(layers):
        shapes += [(hidden, hidden)] * 4  # q, k, v, o
        shapes += [(intermediate, hidden), (intermediate, hidden), (hidden, intermediate)]  # gate, up, down
        shapes += [(hidden,), (hidden,)]  # input / post-attention RMSNorm
    shapes.append((hidden,))  # final norm
    return shapes


def timed(fn, repeats: int, warmup: int, sync, prepare=lambda: None) -> list[float]:
    """ms of ``fn()`` for each of ``repeats`` calls after ``warmup`` calls; ``prepare()`` is untimed."""
    for _ in range(warmup):
        prepare()
        fn()
    out = []
    for _ in range(repeats):
        prepare()
        sync()
        t = time.perf_counter()
        fn()
        sync()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def dn_units(n: int) -> float:
    return 6.0 + 9.0 / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--json", type=Path, default=None, help="write the figures to this JSON file")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize()) if device.type == "cuda" else (lambda: None)
    shapes = llama_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [(0.02 * torch.randn(s, generator=gen)).to(device) for s in shapes]
    pool = [[(1e-3 * torch.randn(s, generator=gen)).to(device) for s in shapes] for _ in range(3)]
    signs = torch.randint(0, 2, (64, len(shapes)), generator=gen).mul(2).sub(1).tolist()
    delta = [torch.empty_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    p_bytes = numel * params[0].element_size()

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    print(f"# {command}")
    print(f"# {machine}")
    print(f"# {len(shapes)} tensors, {numel / 1e6:.2f}M params, P = {p_bytes / 1e6:.1f} MB (float32)")

    rows = []
    counter = {"k": 0}

    def next_delta():  # untimed: Δ = ±(one of three random sets), sign drawn per block
        k = counter["k"]
        counter["k"] = k + 1
        for d, src, sgn in zip(delta, pool[k % len(pool)], signs[k % len(signs)]):
            torch.mul(src, sgn, out=d)

    def row(name: str, ms: list[float], units: float, branches: dict) -> None:
        rows.append({"combo": name, "median_ms": statistics.median(ms), "mean_ms": statistics.fmean(ms),
                     "min_ms": min(ms), "units": units, "branches": branches, "samples_ms": ms})

    add_params = [p.clone() for p in params]

    def add_baseline():
        for p, d in zip(add_params, delta):
            p.add_(d)

    row("torch p.add_(d) (reference)", timed(add_baseline, args.repeats, args.warmup, sync, next_delta), 3.0, {})

    sizes = [p.numel() for p in params]
    for opt, opt_args, corr, corr_args in COMBOS:
        engine = build_engine(params, opt, opt_args, corr, corr_args)
        infos = []
        # warm-up of at least one DN window, so every timed commit has a momentum
        ms = timed(lambda engine=engine, infos=infos: infos.append(engine.commit(delta, engine.version)), args.repeats,
                   max(args.warmup, opt_args.get("buffer_size", 1)), sync, next_delta)
        infos = infos[-args.repeats:]
        units = 4.0 + (dn_units(opt_args["buffer_size"]) if opt == "delayed_nesterov" else OPT_UNITS[opt])
        units += statistics.fmean(  # correction traffic, averaged over the timed commits
            sum(BRANCH_UNITS[b] * s for b, s in zip(i.branches, sizes)) / numel for i in infos)
        branches: dict[str, int] = {}
        for i in infos:
            for b, c in i.branch_counts().items():
                branches[b] = branches.get(b, 0) + c
        extra = "".join(f", {k} = {v:g}" for k, v in corr_args.items())
        row(f"{opt} + {corr}{extra}", ms, units, {b: round(c / len(infos), 1) for b, c in branches.items()})
        del engine

    # where the time goes: the block scalars alone (norms of Δ and m, one dot per block)
    m = [torch.randn_like(p) for p in params]
    row("block scalars alone (‖Δ‖, ‖m‖, Δ·m per block)",
        timed(lambda: block_stats(delta, m), args.repeats, args.warmup, sync, next_delta), 4.0, {})

    base_ms = rows[0]["median_ms"]
    for r in rows:
        r["gb_per_s"] = r["units"] * p_bytes / (r["mean_ms"] * 1e-3) / 1e9
        r["vs_add"] = r["median_ms"] / base_ms

    header = ("| combination | ms/commit median | mean | min | traffic (× P) | GB/s (mean) | × p.add_ (median) "
              "| branches (blocks per commit, mean) |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        br = ", ".join(f"{k} {v:g}" for k, v in r["branches"].items())
        lines.append(f"| {r['combo']} | {r['median_ms']:.1f} | {r['mean_ms']:.1f} | {r['min_ms']:.1f} | "
                     f"{r['units']:.2f} | {r['gb_per_s']:.1f} | {r['vs_add']:.1f} | {br} |")
    print("\n".join(lines))

    if args.json:
        args.json.write_text(json.dumps({
            "date": dt.date.today().isoformat(), "command": command, "machine": machine,
            "numel": numel, "param_bytes": p_bytes, "repeats": args.repeats, "warmup": args.warmup, "rows": rows,
        }, indent=2))
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
