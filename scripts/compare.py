#!/usr/bin/env python
"""Run the same testnet cast for the same minutes under several run-config variants; one table.

    .venv/bin/python scripts/compare.py --minutes 5 --out runs/cmp \\
        --variant "lr0.7:" \\
        --variant "lr0.3:outer.optimizer_args.lr=0.3" \\
        --variant "fair:outer.algorithm=heloco_fair,outer.optimizer_args.lr=0.2"

A variant is ``NAME:KEY=VALUE,...``: dotted keys set on the base config (``--config``; values are
read as YAML, so ``0.3`` is a number and ``heloco`` a string). Each variant runs
``heloco-peer testnet`` into ``OUT/NAME`` with its own config file (``OUT/NAME.yaml``). Variants
run one after the other, so they share the machine's conditions only roughly: run ``--repeat 2``
to run the list twice (the second time in reverse order) and average.

The end of a short run is noisy (the validation loss of a tiny model swings between evaluations),
so the table gives, besides the last evaluation, the mean of the last ``--tail`` evaluations of the
global model and its worst language. ``OUT/compare.md`` and ``OUT/compare.json`` hold the table;
``--table-only`` rebuilds them from the runs already in ``OUT``.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import click
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heloco_p2p.config import ConfigError, load_config  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, sets = text.partition(":")
    if not name or "/" in name:
        raise click.BadParameter(f"{text!r}: a variant is NAME:KEY=VALUE,... with a NAME usable as a directory")
    overrides = {}
    for item in filter(None, (s.strip() for s in sets.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise click.BadParameter(f"{text!r}: {item!r} is not KEY=VALUE")
        overrides[key] = yaml.safe_load(value)
    return name, overrides


def evaluations(run_dir: Path) -> list[dict]:
    """The global model's validations ("val" events) of one testnet run, in time order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    out = [json.loads(line) for line in path.read_text().splitlines() if '"event": "val"' in line]
    return sorted(out, key=lambda e: e["time"])


def summarize(run_dir: Path, tail: int) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    evals = evaluations(run_dir)[1:]  # the first is the untrained model
    last = evals[-tail:]
    langs = sorted(last[0]["val_loss"]["per_language"]) if last else []
    per_lang = {lang: sum(e["val_loss"]["per_language"][lang] for e in last) / len(last) for lang in langs}
    return {
        "minutes": summary["wall_seconds"] / 60, "commits": summary["commits"],
        "start": summary["val_loss"]["start"]["mean"], "end": summary["val_loss"]["end"]["mean"],
        "tail_mean": sum(per_lang.values()) / len(per_lang) if per_lang else float("nan"),
        "tail_worst": max(per_lang.values()) if per_lang else float("nan"),
        "tail_worst_language": max(per_lang, key=per_lang.get) if per_lang else None,
        "tail_evaluations": len(last), "per_language": per_lang,
        "tokens": sum(p["tokens"] for p in summary["peers"]),
        "utilization": min(p["utilization"] for p in summary["peers"]),
    }


def table(out: Path, names: list[str], tail: int) -> str:
    rows = {}
    for name in names:
        runs = sorted(p for p in out.glob(f"{name}*") if p.is_dir() and (p / "summary.json").exists()
                      and (p.name == name or p.name.startswith(f"{name}.r")))
        if runs:
            rows[name] = [summarize(r, tail) for r in runs]
    if not rows:
        raise click.ClickException(f"no finished runs in {out}")

    def mean(name, key):
        vals = [r[key] for r in rows[name]]
        return sum(vals) / len(vals)

    def spread(name, key):
        vals = [r[key] for r in rows[name]]
        return f" ± {(max(vals) - min(vals)) / 2:.2f}" if len(vals) > 1 else ""

    lines = [f"| variant | runs | commits | val loss end | mean of last {tail} evals | worst language (last {tail}) "
             f"| tokens | min utilization |", "|---|---|---|---|---|---|---|---|"]
    for name in rows:
        worst_lang = rows[name][-1]["tail_worst_language"]
        lines.append(f"| {name} | {len(rows[name])} | {mean(name, 'commits'):.0f} | {mean(name, 'end'):.3f}{spread(name, 'end')} "
                     f"| {mean(name, 'tail_mean'):.3f}{spread(name, 'tail_mean')} "
                     f"| {mean(name, 'tail_worst'):.3f} ({worst_lang}) | {mean(name, 'tokens'):,.0f} "
                     f"| {mean(name, 'utilization'):.2f} |")
    text = "\n".join(lines)
    (out / "compare.md").write_text(text + "\n")
    (out / "compare.json").write_text(json.dumps(rows, indent=1))
    return text


@click.command()
@click.option("--variant", "variants", multiple=True, required=True, help="NAME:KEY=VALUE,... (repeatable).")
@click.option("--config", "base", default="configs/testnet.yaml", show_default=True, help="The base run config.")
@click.option("--peers", default="peers/*.yaml", show_default=True, help="Peer profiles (glob).")
@click.option("--minutes", type=float, default=5.0, show_default=True)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True,
              help="Run the list this many times, every other time in reverse order.")
@click.option("--tail", type=click.IntRange(min=1), default=3, show_default=True,
              help="Evaluations at the end to average.")
@click.option("--eval-every", type=float, default=30.0, show_default=True)
@click.option("--table-only", is_flag=True, help="Only rebuild the table from the runs in --out.")
def main(variants, base, peers, minutes, out, repeat, tail, eval_every, table_only):
    parsed = [parse_variant(v) for v in variants]
    names = [n for n, _ in parsed]
    if len(set(names)) != len(names):
        raise click.BadParameter("variant names must differ")
    out.mkdir(parents=True, exist_ok=True)
    if not table_only:
        for name, overrides in parsed:  # every config is checked before anything runs
            try:
                cfg = load_config(base, overrides=overrides)
            except ConfigError as exc:
                raise click.ClickException(f"variant {name}: {exc}") from None
            (out / f"{name}.yaml").write_text(cfg.to_yaml())
        order = []
        for r in range(repeat):
            order += [(name, r) for name, _ in (parsed if r % 2 == 0 else parsed[::-1])]
        for i, (name, r) in enumerate(order):
            run_dir = out / (name if repeat == 1 else f"{name}.r{r}")
            cmd = [str(ROOT / ".venv/bin/heloco-peer"), "testnet", "--peers", peers, "--config", str(out / f"{name}.yaml"),
                   "--minutes", str(minutes), "--out", str(run_dir), "--no-live", "--eval-every", str(eval_every)]
            click.echo(f"[{i + 1}/{len(order)}] {name}: {shlex.join(cmd)}", err=True)
            t0 = time.time()
            subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
            click.echo(f"[{i + 1}/{len(order)}] {name} done in {time.time() - t0:.0f} s", err=True)
    click.echo(table(out, names, tail))
    click.echo(f"\ncommand: {shlex.join([sys.executable, *sys.argv])}")


if __name__ == "__main__":
    main()
