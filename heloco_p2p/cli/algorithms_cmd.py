"""``heloco-peer algorithms``: every named preset with its resolved components and arguments."""
from __future__ import annotations

import json

import click

from heloco_p2p.algorithms import ALGORITHMS
from heloco_p2p.cli import log_level_option


def _args(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items()) or "-"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON list: name, optimizer, dispatch, correction, "
                                                    "correction_args, staleness_weight, weight_order, dylu, fairness, lr.")
@log_level_option
def algorithms(as_json):
    """List the presets ``outer.algorithm`` accepts, as the simulator and the swarm build them."""
    rows = [p.describe() for p in ALGORITHMS.values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for preset, r in zip(ALGORITHMS.values(), rows):
        click.echo(f"{r['name']}  ({preset.mode}) {preset.description}")
        click.echo(f"    optimizer   {r['optimizer']['name']}: {_args(r['optimizer']['args'])}")
        click.echo(f"    dispatch    {r['dispatch']}")
        click.echo(f"    correction  {r['correction']}: {_args(r['correction_args'])}")
        click.echo(f"    ρ           {r['staleness_weight']['name']} {_args(r['staleness_weight']['args'])}, "
                   f"{r['weight_order']} the correction")
        click.echo(f"    dylu        {'on, min_steps ' + str(r['dylu']['min_steps']) if r['dylu']['enabled'] else 'off'}")
        click.echo(f"    fairness    {r['fairness']['name']}: {_args(r['fairness']['args'])}")
