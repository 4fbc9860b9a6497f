"""``heloco-peer testnet``: a local multi-peer swarm of peer profiles, watched live, with a report."""
from __future__ import annotations

import sys
from pathlib import Path

import click
import yaml

from heloco_p2p.cli import log_level_option
from heloco_p2p.config import ConfigError, load_config


@click.command()
@click.option("--peers", "peers_glob", default="peers/*.yaml", show_default=True, help="Peer profiles (glob); the first is the bootstrap.")
@click.option("--config", "config_path", default="configs/testnet.yaml", show_default=True, help="The run config.")
@click.option("--minutes", type=click.FloatRange(min=0, min_open=True), default=5.0, show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Output directory.")
@click.option("--algorithm", default=None, help="Override the config's outer.algorithm (e.g. heloco, sync_diloco).")
@click.option("--run-id", default=None, help="The run's id (default: a fresh one).")
@click.option("--eval-every", type=click.FloatRange(min=1), default=30.0, show_default=True,
              help="Seconds between validations of the global model.")
@click.option("--no-live", is_flag=True, help="No live view (log lines only).")
@click.option("--swarm-key-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Run a keyed swarm: every peer uses this swarm key (heloco-peer keygen FILE).")
@click.option("--dashboard-port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True,
              help="Serve the dashboard on this port while the testnet runs (taken or 0: any free port).")
@click.option("--dashboard-host", default="127.0.0.1", show_default=True, help="Address the dashboard listens on.")
@click.option("--no-dashboard", is_flag=True, help="Serve no dashboard.")
@log_level_option
def testnet(peers_glob, config_path, minutes, out_dir, algorithm, run_id, eval_every, no_live, swarm_key_file,
            dashboard_port, dashboard_host, no_dashboard):
    """Run the peer profiles as separate processes for --minutes, then write summary.json,
    metrics.jsonl, report.md with plots and the final checkpoint into --out. While it runs, the
    dashboard (heloco-peer dashboard) serves the swarm and its validation curve; its URL is printed."""
    from heloco_p2p.tools.testnet import load_profiles, run_testnet  # loads transformers (~2 s): only for this command

    out = Path(out_dir)
    try:
        profiles = load_profiles(peers_glob)
        cfg = load_config(config_path, overrides={"outer.algorithm": algorithm} if algorithm else None)
    except ConfigError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    out.mkdir(parents=True, exist_ok=True)
    run_cfg = out / "run.yaml"
    run_cfg.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    summary = run_testnet(profiles, str(run_cfg), minutes, out, run_id=run_id, live=not no_live, eval_every=eval_every,
                          swarm_key_file=swarm_key_file, dashboard_host=dashboard_host,
                          dashboard_port=None if no_dashboard else dashboard_port)
    v = summary["val_loss"]
    click.echo(f"\nreport: {out / 'report.md'}")
    click.echo(f"{summary['wall_seconds'] / 60:.1f} min, {len(summary['peers'])} peers, {summary['commits']} commits, "
               f"{summary['rejected']} rejected, {summary['coordinator_changes']} coordinator changes")
    click.echo(f"validation loss {v['start']['mean']:.3f} -> {v['end']['mean']:.3f} (mean over "
               f"{len(v['end']['per_language'])} languages)")
    click.echo("tokens per peer: " + ", ".join(f"{p['name']} {p['tokens']:,} (util {p['utilization']:.2f})" for p in summary["peers"]))
