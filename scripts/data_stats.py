"""Tokenizer efficiency per language: UTF-8 bytes per token on each validation split.

    .venv/bin/python scripts/data_stats.py [--vocab-size 4096] [--timings]

Prints a Markdown table (the one in docs/results.md, "Data and tokenizer"). Tokens are counted
without the end-of-document separators, so bytes/token is the tokenizer's own compression.
``--timings`` also times, in a fresh temporary cache: building the tokenizer, tokenizing each
default language (train + validation), and opening every stream again from the cache.
"""
from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time

from heloco_p2p.data import (
    TokenBlocks,
    builtin_regions,
    builtin_sources,
    load_tokenizer,
    open_source,
    tokenizer_digest,
    validation_blocks,
)
from heloco_p2p.data import blocks as blocksmod


def timings(vocab_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HELOCO_CACHE_DIR"] = tmp
        t = time.perf_counter()
        tok = load_tokenizer("builtin", vocab_size=vocab_size)
        print(f"- tokenizer build (cold cache): {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        for region in builtin_regions():
            src = open_source(region)
            TokenBlocks(src, tok, seq_len=128)
            validation_blocks(src, tok, 128, 32)
        print(f"- tokenize {len(builtin_regions())} default translations, train + validation "
              f"(cold): {time.perf_counter() - t:.1f} s")
        blocksmod.open_cached.cache_clear()
        t = time.perf_counter()
        streams = [TokenBlocks(open_source(r), tok, seq_len=128) for r in builtin_regions()]
        for r in builtin_regions():
            validation_blocks(open_source(r), tok, 128, 32)
        print(f"- open the same {len(streams)} streams + validation blocks again (cached): "
              f"{(time.perf_counter() - t) * 1e3:.0f} ms")
        it = streams[0].batches(16)
        t = time.perf_counter()
        for _ in range(1000):
            next(it)
        print(f"- 1000 batches [16, 128] from one stream: {(time.perf_counter() - t) * 1e3:.0f} ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--timings", action="store_true", help="also time cold and cached builds")
    args = ap.parse_args()

    t0 = time.perf_counter()
    tok = load_tokenizer("builtin", vocab_size=args.vocab_size)
    backend = tok.backend_tokenizer
    print(f"tokenizer: builtin, vocab {len(tok)}, digest {tokenizer_digest(tok)[:16]}…")
    print()
    print("| region | source | translation | val. MB | val. tokens | bytes/token | chars/token | train bytes/token |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for src in builtin_sources():
        row = []
        for split in ("validation", "train"):
            docs = list(src.documents(split))
            n_bytes = sum(len(d.encode("utf-8")) for d in docs)
            n_chars = sum(len(d) for d in docs)
            n_tok = sum(len(e.ids) for e in backend.encode_batch(docs, add_special_tokens=False))
            row.append((n_bytes, n_chars, n_tok))
        (vb, vc, vt), (tb, _, tt) = row
        print(f"| {src.region} | {src.spec} | {src.translation.label} | {vb / 1e6:.3f} | {vt:,} | "
              f"{vb / vt:.2f} | {vc / vt:.2f} | {tb / tt:.2f} |")
    print()
    if args.timings:
        timings(args.vocab_size)
        print()
    print(f"{platform.machine()}, {os.cpu_count()} CPUs, {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
