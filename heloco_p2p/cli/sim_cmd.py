"""``heloco-peer simulate``: compare algorithms on a virtual-clock heterogeneous swarm."""
from __future__ import annotations

import shlex
import sys

import click

from heloco_p2p.cli import log_level_option
from heloco_p2p.config import ConfigError


@click.command()
@click.option("--config", "config_path", required=True, help="Simulator config, e.g. configs/sim-quick.yaml.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--processes", type=click.IntRange(min=1), default=None, help="Parallel runs (default: the config's).")
@click.option("--seed", "seeds", type=int, multiple=True, help="Override the config's seeds (repeatable).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option("--resume", is_flag=True,
              help="Reuse the runs already finished in --out (runs.jsonl) whose specification is unchanged; "
                   "run only the rest. Without it, runs.jsonl is started afresh.")
@log_level_option
def simulate(config_path, out_dir, processes, seeds, no_progress, resume):
    """Run every algorithm × heterogeneity × data × seed of a simulator config; write results.json,
    curves.jsonl, commits.jsonl, results.md and plots into --out."""
    # the simulator trains models (transformers, ~2 s to import) and the report plots (matplotlib): only here
    from heloco_p2p.sim import load_sim_config, run_config
    from heloco_p2p.tools.report import write_sim_report

    try:
        cfg = load_sim_config(config_path)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    if processes:
        cfg.processes = processes
    if seeds:
        cfg.seeds = list(seeds)
    run_config(cfg, out_dir, progress=not no_progress, resume=resume)
    command = "heloco-peer " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    md = write_sim_report(out_dir, command=command)
    click.echo(md.read_text())
    click.echo(f"wrote {out_dir}/results.json and {md}")
