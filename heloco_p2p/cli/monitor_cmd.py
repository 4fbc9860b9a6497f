"""``heloco-peer monitor``: a live view of a run, read only from its DHT records."""
from __future__ import annotations

import contextlib
import json
import logging
import time

import click
from rich.console import Console
from rich.live import Live

from heloco_p2p.cli import log_level_option
from heloco_p2p.cli.train_cmd import fail
from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.swarm.lifetime import guard_children, stop_reaper
from heloco_p2p.swarm.node import SwarmNode, start_error_message
from heloco_p2p.swarm.records import PROTOCOL_VERSION
from heloco_p2p.tools.monitor import Monitor, render, wait_for_genesis


def reader_options(what: str):
    """The options every read-only watcher of a run shares (``monitor``, ``dashboard``)."""
    options = [
        click.option("--silent-after", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
                     help="Show a peer as silent when its last heartbeat is older than this (about 3 x the run's "
                          "swarm.heartbeat_seconds)."),
        click.option("--lease-seconds", type=click.FloatRange(min=0, min_open=True), default=10.0, show_default=True,
                     help="The run's swarm.lease_seconds: a coordinator claim counts until renewed + this."),
        click.option("--timeout", type=click.FloatRange(min=0), default=15.0, show_default=True,
                     help="Seconds to wait for the run's records before saying it was not found."),
        click.option("--host-maddrs", multiple=True, default=["/ip4/127.0.0.1/tcp/0"], show_default=True,
                     help=f"Addresses the {what}'s libp2p daemon listens on (it accepts no DHT requests)."),
    ]

    def apply(f):
        for option in reversed(options):
            f = option(f)
        return f

    return apply


@click.command()
@click.option("--run-id", required=True, help="The run to watch.")
@click.option("--initial-peers", multiple=True, required=True, help="Multiaddr of any peer of the run (repeatable).")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True,
              help="Print snapshots as JSON (one line each): {coordinator: {peer_id, term, version, commits_per_min, "
                   "standbys} or null, peers: [{peer_id, name, region, role, device, speed, inner_steps, "
                   "staleness_last, staleness_mean, tokens, last_loss, bytes_in, bytes_out, last_seen, alive, rejected, "
                   "reachability}]}. last_seen is the heartbeat's unix time; reachability: direct, relayed or none "
                   "(from the addresses the peer announces). A peer record holds only its last staleness: "
                   "staleness_mean is the mean over the submissions this monitor saw, so with --once it equals "
                   "staleness_last. With swarm.shards > 1 also shards: [{shard, coordinator, commit_log}] (shard 0's is "
                   "coordinator too) and placement: {holders, stacked, fewer_peers}.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              help="Seconds between reads of the records.")
@reader_options("monitor")
@log_level_option
def monitor(run_id, initial_peers, once, as_json, interval, silent_after, lease_seconds, timeout, host_maddrs):
    """Watch run RUN-ID: its coordinator (term, version, commits/min, standbys) and every peer
    (region, role, speed, H, staleness, tokens, loss, traffic, last heartbeat).

    Joins the DHT as a client and only reads the run's records: it writes none and calls no
    peer's RPC, so watching never disturbs training. A peer that left shows as left (or, once
    its record expired, silent). Ctrl+C stops it.
    """
    # hivemind's INFO lines would scroll through the live table
    logging.getLogger("hivemind").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        with observe_run(run_id, initial_peers, host_maddrs, timeout, "monitor") as (node, genesis):
            mon = Monitor(node.records, silent_after=silent_after, lease_seconds=lease_seconds,
                          holder_keys=lease_rules.holder_keys(node),
                          shards=max(genesis.shards, default=0) + 1)
            if once:
                _print(mon.poll(), as_json, run_id, genesis)
                return
            if as_json:
                while True:
                    _print(mon.poll(), True, run_id, genesis)
                    time.sleep(interval)
            _live(mon, run_id, genesis, interval)
    except KeyboardInterrupt:
        pass


@contextlib.contextmanager
def observe_run(run_id: str, initial_peers, host_maddrs, timeout: float, what: str):
    """A read-only DHT client of run ``run_id`` (client mode: it serves nothing and writes no
    record), with its children guarded, and the run's genesis record: ``(node, genesis)``.
    Exits with code 2 and a message saying what to fix when no peer answers or the run is not found."""
    try:
        node = SwarmNode(run_id, initial_peers=initial_peers, host_maddrs=host_maddrs, client_mode=True,
                         startup_timeout=30.0)
    except Exception as exc:
        fail(start_error_message(exc, initial_peers))
    reaper = None
    try:
        try:
            reaper = guard_children(node.child_pids())
        except Exception as exc:  # best effort, as in a peer
            logging.getLogger(__name__).debug("could not guard child processes: %s", exc)
        genesis = wait_for_genesis(node.records, timeout)
        if genesis is None:
            fail(f"no run {run_id!r} found through {' '.join(initial_peers)}: the peers there answered but hold no "
                 f"record of it; check --run-id (a run exists once its first peer started with --config)")
        if genesis.protocol_version != PROTOCOL_VERSION:
            click.echo(f"warning: run {run_id!r} speaks protocol {genesis.protocol_version}, this {what} "
                       f"{PROTOCOL_VERSION}: records it cannot read are not shown", err=True)
        yield node, genesis
    finally:
        node.shutdown()
        if reaper is not None:
            stop_reaper(reaper)


def _print(snap: dict, as_json: bool, run_id: str, genesis) -> None:
    if as_json:
        click.echo(json.dumps(snap, allow_nan=False), nl=True)
        return
    Console().print(render(snap, run_id, time.time(), genesis))


def _live(mon, run_id: str, genesis, interval: float) -> None:
    snap, note = mon.poll(), ""
    with Live(render(snap, run_id, time.time(), genesis), auto_refresh=False) as live:
        while True:
            time.sleep(interval)
            try:
                snap, note = mon.poll(), ""
            except Exception as exc:  # a DHT hiccup: keep showing the last snapshot
                note = f"could not read the records ({type(exc).__name__}: {exc}); showing the last snapshot"
            live.update(render(snap, run_id, time.time(), genesis, note=note), refresh=True)
