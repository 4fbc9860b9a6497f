#!/usr/bin/env python
"""Inner-loop throughput: tokens/s of ``InnerTrainer`` for the named model sizes, with 1 and 2
torch threads, each at its config's batch size and sequence length.

    python scripts/bench_inner.py                     # tiny, small, base × 1, 2 threads
    python scripts/bench_inner.py --configs tiny --threads 1 --steps 30 --write-results

Prints a table; ``--write-results`` replaces the "Inner loop" section of docs/results.md and
``--json PATH`` writes the figures. Random tokens are used: throughput does not depend on text.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heloco_p2p.config import load_config  # noqa: E402
from heloco_p2p.local import InnerTrainer, build_model, count_params  # noqa: E402
from heloco_p2p.tools.report import replace_section  # noqa: E402


def measure(name: str, threads: int, steps: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    B, L = cfg.inner.batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: torch.randint(0, cfg.model.vocab_size, (B, L), generator=g), None)
    model = build_model(cfg.model, seed=0)
    trainer = InnerTrainer(model, cfg.inner, batches)
    trainer.run_round(None, warmup)
    _, stats = trainer.run_round(None, steps)
    return {"config": name, "params": count_params(model), "threads": threads, "batch_size": B, "seq_len": L,
            "steps": steps, "tokens_per_second": stats.tokens_per_second, "steps_per_second": stats.steps_per_second}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="tiny,small,base")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    rows = [measure(c, int(t), args.steps, args.warmup) for c in args.configs.split(",") for t in args.threads.split(",")]
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}, torch {torch.__version__}"
    lines = [f"{datetime.date.today()} · {machine} · `{command}`", "",
             "| config | parameters | threads | batch × seq | tokens/s | steps/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['params'] / 1e6:.2f}M | {r['threads']} | {r['batch_size']} × {r['seq_len']} "
                     f"| {r['tokens_per_second']:,.0f} | {r['steps_per_second']:.2f} |")
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    if args.write_results:
        path = ROOT / "docs" / "results.md"
        path.write_text(replace_section(path.read_text(), "## Inner loop", "Inner-loop throughput (`InnerTrainer.run_round`, fp32 AdamW, CPU):\n\n" + table))


if __name__ == "__main__":
    main()
