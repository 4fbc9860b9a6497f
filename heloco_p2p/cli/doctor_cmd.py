"""``heloco-peer doctor``: pre-flight checks before joining a run, each with how to fix it."""
from __future__ import annotations

import json
import logging
import sys

import click

from heloco_p2p.cli import log_level_option

MARKS = {"ok": "ok  ", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


@click.command()
@click.option("--run-id", required=True, help="The run to join.")
@click.option("--initial-peers", multiple=True, required=True, help="Multiaddr of a peer of the run (repeatable).")
@click.option("--host-maddrs", multiple=True, default=["/ip4/127.0.0.1/tcp/0"], show_default=True,
              help="Addresses to listen on: the ones you would give `join` (reachability is checked on them).")
@click.option("--announce-maddrs", multiple=True, help="Addresses others should dial, as for `join`.")
@click.option("--client-mode", is_flag=True, help="Check for a peer that joins with --client-mode.")
@click.option("--swarm-key-file", type=click.Path(dir_okay=False), default=None, help="The run's swarm key, if it has one.")
@click.option("--checkpoint-dir", type=click.Path(file_okay=False), default=".", show_default=True,
              help="Where checkpoints would go (its free space is checked).")
@click.option("--device", default=None, help="The device you would train on (default: the run's, usually auto).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Your inner batch size (default: the run's).")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0: torch's default).")
@click.option("--bench-seconds", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long to time inner steps of the run's model.")
@click.option("--timeout", type=click.FloatRange(min=0), default=15.0, show_default=True,
              help="Seconds to wait for the run's records.")
@click.option("--json", "as_json", is_flag=True, help='Print {"ok": bool, "checks": [{name, status, detail, fix, values}]}.')
@log_level_option
def doctor(run_id, initial_peers, host_maddrs, announce_maddrs, client_mode, swarm_key_file, checkpoint_dir, device,
           batch_size, threads, bench_seconds, timeout, as_json):
    """Check, before joining run RUN-ID, that this machine can: the initial peers answer, peers can
    dial it back, its clock agrees with theirs, the run's protocol matches, the run's files
    arrive, and how fast it downloads θ, uploads, trains the run's model (and the round time and
    staleness that implies), with disk for checkpoints. Each problem comes with how to fix it.

    Exit code 1 when joining with these options would fail, 0 otherwise (warnings included).
    """
    # the doctor trains the run's model: transformers (~2 s to import), only for this command
    from heloco_p2p.tools.doctor import DoctorOptions, exit_code, run_checks, summary_line
    from heloco_p2p.tools.doctor import as_json as checks_json

    logging.getLogger("hivemind").setLevel(max(logging.ERROR, logging.getLogger().level))
    checks = run_checks(DoctorOptions(run_id=run_id, initial_peers=list(initial_peers), host_maddrs=list(host_maddrs),
                                      announce_maddrs=list(announce_maddrs) or None, client_mode=client_mode,
                                      swarm_key_file=swarm_key_file, checkpoint_dir=checkpoint_dir, device=device,
                                      batch_size=batch_size, threads=threads, bench_seconds=bench_seconds,
                                      timeout=timeout))
    if as_json:
        click.echo(json.dumps(checks_json(checks), allow_nan=False))
    else:
        for c in checks:
            click.echo(f"[{MARKS[c.status]}] {c.name}: {c.detail}")
            if c.fix and c.status in ("warn", "fail"):
                click.echo(f"       fix: {c.fix}")
        click.echo(summary_line(checks))
    sys.exit(exit_code(checks))
