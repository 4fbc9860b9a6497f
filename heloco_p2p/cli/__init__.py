"""The ``heloco-peer`` command: a click group; each subcommand lives in its own module."""
from __future__ import annotations

import logging

import click

from heloco_p2p import __version__
from heloco_p2p.swarm.lifetime import one_malloc_arena

one_malloc_arena()  # before any thread of a command starts (swarm/lifetime.py says why)

LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False)


def log_level_option(f):
    """``--log-level`` for every command."""

    def _set(ctx, param, value):
        setup_logging(value)
        return value

    return click.option(
        "--log-level", type=LOG_LEVELS, default="INFO", show_default=True, expose_value=False,
        is_eager=True, callback=_set, help="Logging verbosity.",
    )(f)


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    # Libraries below us are chatty at INFO.
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, getattr(logging, level.upper())))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="heloco-peer")
@log_level_option
def main() -> None:
    """heloco-p2p: train a language model together with volunteers, asynchronously, with HeLoCo."""


def _register() -> None:
    # a real cycle: every subcommand module imports log_level_option from this one, defined above
    from heloco_p2p.cli import (
        algorithms_cmd,
        dashboard_cmd,
        data_cmd,
        doctor_cmd,
        export_cmd,
        join_cmd,
        keygen_cmd,
        monitor_cmd,
        sim_cmd,
        testnet_cmd,
        train_cmd,
    )

    main.add_command(algorithms_cmd.algorithms)
    main.add_command(data_cmd.data)
    main.add_command(train_cmd.train)
    main.add_command(train_cmd.eval_cmd)
    main.add_command(sim_cmd.simulate)
    main.add_command(join_cmd.join)
    main.add_command(monitor_cmd.monitor)
    main.add_command(dashboard_cmd.dashboard)
    main.add_command(doctor_cmd.doctor)
    main.add_command(export_cmd.export)
    main.add_command(export_cmd.generate)
    main.add_command(testnet_cmd.testnet)
    main.add_command(keygen_cmd.keygen)


_register()
