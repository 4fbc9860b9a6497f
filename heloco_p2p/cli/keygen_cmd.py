"""``heloco-peer keygen``: make a swarm key file (docs/security.md)."""
from __future__ import annotations

import sys

import click

from heloco_p2p.cli import log_level_option
from heloco_p2p.swarm.auth import SwarmKeyError, generate_key_file


@click.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Replace an existing file (peers holding the old key are then shut out).")
@log_level_option
def keygen(path, force):
    """Write a new random swarm key to PATH (32 bytes, hex, readable only by you).

    Give the same file to every peer of the run (`heloco-peer join --swarm-key-file PATH`) over
    a channel you trust, and to no one else: whoever holds it can take part in the run."""
    try:
        key = generate_key_file(path, overwrite=force)
    except (SwarmKeyError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"wrote swarm key {key.fingerprint} to {path}; start every peer of the run with --swarm-key-file {path}")
