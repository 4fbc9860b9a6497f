#!/usr/bin/env python
"""What the poisoning rules cost the coordinator per submission (heloco_p2p/roles/defence.py):
the loss screen (forward passes over the held-out blocks of every language, at θ and at
θ − s·Δ), the replay sketch, and the norm-bound and commit-share rules.

    python scripts/bench_screen.py --config configs/testnet.yaml --regions de,es,fr,ru
    python scripts/bench_screen.py --config configs/gpu-125m.yaml --device cuda --repeat 5

Prints a JSON line per measurement (milliseconds; median of --repeat).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "testnet.yaml"))
    ap.add_argument("--regions", default="de,es,fr,ru")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--synthetic", action="store_true", help="random token blocks instead of the corpora")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from heloco_p2p.config import load_config
    from heloco_p2p.local import build_model
    from heloco_p2p.local.model import trainable_params
    from heloco_p2p.roles.defence import DefenceLimits, DefenceState, LossScreen

    cfg = load_config(args.config)
    d = cfg.swarm.defence
    regions = [r for r in args.regions.split(",") if r]
    if args.synthetic:
        tok = None
        blocks = {r: torch.randint(0, cfg.data.vocab_size, (d.screen_blocks, min(cfg.data.seq_len, d.screen_tokens)))
                  for r in regions}
    else:
        from heloco_p2p.data import load_tokenizer, open_source, validation_blocks
        from heloco_p2p.local.solo import source_spec

        tok = load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)
        blocks = {}
        for r in regions:
            b = validation_blocks(open_source(source_spec(cfg, r)), tok, cfg.data.seq_len,
                                  cfg.data.val_blocks + d.screen_blocks)
            blocks[r] = b[-d.screen_blocks:, :d.screen_tokens]
    if tok is None:
        from heloco_p2p.data import load_tokenizer

        tok = load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)

    def make():
        return build_model(cfg.model, tok, seed=0).to(args.device)

    model = make()
    params = [p.detach().clone() for p in trainable_params(model)]
    n_params = sum(p.numel() for p in params)
    screen = LossScreen(make, lambda r: blocks[r].to(args.device))
    for r in regions:  # every language known, as on a coordinator that saw them all
        screen.score(params, [torch.zeros_like(p) for p in params], r, version=-1)
    g = torch.Generator().manual_seed(0)
    deltas = [[1e-3 * torch.randn(p.shape, generator=g).to(args.device) for p in params] for _ in range(2)]
    times = {"screen_same_version": [], "screen_new_version": [], "sketch": [], "rules": []}
    state = DefenceState(DefenceLimits())
    for peer in range(8):
        for k in range(8):
            state.record(f"Qm{peer}", 1.0 + 0.1 * k, torch.randn(256), 1000.0 + 10 * k + peer)
    for i in range(args.repeat):
        t = time.perf_counter()
        screen.score(params, deltas[i % 2], regions[0], version=0, scale=d.screen_scale)  # loss at θ cached
        sync(args.device)
        times["screen_same_version"].append(time.perf_counter() - t)
        t = time.perf_counter()
        screen.score(params, deltas[i % 2], regions[0], version=i + 1, scale=d.screen_scale)  # θ moved: 2 passes
        sync(args.device)
        times["screen_new_version"].append(time.perf_counter() - t)
        t = time.perf_counter()
        sk = state.sketch([x.cpu() for x in deltas[i % 2]] if args.device != "cpu" else deltas[i % 2])
        state.max_cosine(sk)
        times["sketch"].append(time.perf_counter() - t)
        t = time.perf_counter()
        state.norm_bound("QmX")
        state.share_wait("QmX", 1100.0)
        times["rules"].append(time.perf_counter() - t)
    out = {"config": cfg.name, "params": n_params, "device": args.device, "threads": args.threads,
           "languages": len(regions), "blocks": d.screen_blocks, "tokens_per_block": int(blocks[regions[0]].shape[1]),
           **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}}
    print(json.dumps(out))


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
