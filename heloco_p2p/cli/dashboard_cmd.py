"""``heloco-peer dashboard``: a web page, JSON and Prometheus metrics of a run, read from its DHT records."""
from __future__ import annotations

import logging
import time

import click

from heloco_p2p.cli import log_level_option
from heloco_p2p.cli.monitor_cmd import observe_run, reader_options
from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.tools.monitor import Monitor


@click.command()
@click.option("--run-id", required=True, help="The run to watch.")
@click.option("--initial-peers", multiple=True, required=True, help="Multiaddr of any peer of the run (repeatable).")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the web server listens on (0.0.0.0: every interface, e.g. to open it from a phone).")
@click.option("--port", type=click.IntRange(min=0, max=65535), default=8080, show_default=True,
              help="TCP port of the web server (0: any free port).")
@click.option("--interval", type=click.FloatRange(min=0.5), default=5.0, show_default=True,
              help="Seconds between reads of the records (one history sample each).")
@click.option("--history", "max_samples", type=click.IntRange(min=10), default=720, show_default=True,
              help="History samples kept for the charts (720 at 5 s: one hour).")
@reader_options("dashboard")
@log_level_option
def dashboard(run_id, initial_peers, host, port, interval, max_samples, silent_after, lease_seconds, timeout,
              host_maddrs):
    """Serve a dashboard of run RUN-ID: / (a page that refreshes itself), /api/swarm.json (the
    keys of `monitor --json` plus the history) and /metrics (Prometheus text format).

    Like `monitor`, it joins the DHT as a client and only reads the run's records, so it never
    disturbs training. Ctrl+C stops it.
    """
    from heloco_p2p.tools.dashboard import Dashboard, DashboardServer  # its web server (aiohttp), only for this command

    logging.getLogger("hivemind").setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        with observe_run(run_id, initial_peers, host_maddrs, timeout, "dashboard") as (node, genesis):
            mon = Monitor(node.records, silent_after=silent_after, lease_seconds=lease_seconds,
                          holder_keys=lease_rules.holder_keys(node),
                          shards=max(genesis.shards, default=0) + 1)
            dash = Dashboard(mon, run_id, genesis, interval=interval, max_samples=max_samples)
            dash.poll_once()  # the first page shows the swarm, not an empty table
            dash.start()
            try:
                server = DashboardServer(dash, host, port).start()
            except OSError as exc:
                dash.stop()
                click.echo(f"error: cannot listen on {host}:{port}: {exc}; choose another --port (0: any free one)",
                           err=True)
                raise SystemExit(2) from None
            click.echo(f"dashboard of run {run_id}: {server.url}  (JSON {server.url}api/swarm.json, "
                       f"Prometheus {server.url}metrics)")
            try:
                while True:
                    time.sleep(3600)
            finally:
                server.stop()
                dash.stop()
    except KeyboardInterrupt:
        pass
