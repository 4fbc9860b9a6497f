"""The web dashboard of a run: a page, its JSON and Prometheus metrics, all from the DHT records.

Like ``heloco-peer monitor`` it is a read-only DHT client: it writes no record and calls no
peer. One background thread polls the records every ``interval`` seconds (``Monitor.poll``) and
keeps a bounded history; the HTTP handlers (aiohttp, on their own event-loop thread) only read
the last result under a lock, so a slow DHT never blocks a page load or a scrape::

    dash = Dashboard(Monitor(node.records, ...), run_id, genesis)
    dash.start()                                   # the poll thread
    server = DashboardServer(dash, "127.0.0.1", 8080).start()
    print(server.url)                              # /  /api/swarm.json  /metrics
    ...
    server.stop(); dash.stop()

``/api/swarm.json`` holds the keys of ``monitor --json`` (``coordinator``, ``peers``; ``shards``
and ``placement`` in a sharded run) plus ``history`` (see ``History.export``) and ``run`` (run
id, genesis, poll time and error).
``/metrics`` is the Prometheus text format with one series per peer (labels ``peer_id``,
``name``, ``region``) and per language (label ``region``); ``METRICS`` lists every name.
Validation losses enter through ``Dashboard.record_validation`` (the testnet's evaluator calls
it; a DHT evaluation record would be read in the poll loop and passed the same way).
"""
from __future__ import annotations

import asyncio
import html
import json
import logging
import math
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Iterable, Optional

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily

from heloco_p2p.swarm.records import GenesisRecord, LeaseRecord
from heloco_p2p.tools.monitor import Monitor, display_names

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
MAX_SAMPLES = 720  # an hour of history at the default 5 s interval
MAX_VALIDATIONS = 240


# ---------------------------------------------------------------------------- history (pure)
class History:
    """The last ``max_samples`` snapshots, kept per series so the page can chart them.

    A sample is taken per poll; a peer or language that appears later has ``None`` before it
    (a gap in its line). Validation points are kept apart (they come every N seconds, not every
    poll) in the last ``max_validations``.
    """

    def __init__(self, max_samples: int = MAX_SAMPLES, max_validations: int = MAX_VALIDATIONS):
        self.max_samples = max_samples
        self.samples: deque[dict] = deque(maxlen=max_samples)
        self.validations: deque[dict] = deque(maxlen=max_validations)

    def add(self, snap: dict, lease: Optional[LeaseRecord], now: float) -> None:
        """One sample of the swarm at ``now``: per peer (by display name) tokens, training loss and
        mean staleness; per language tokens and mean training loss; the lease's branch counts."""
        names = display_names(snap["peers"])
        peers, regions = {}, {}
        for p in snap["peers"]:
            peers[names[p["peer_id"]]] = {"tokens": p["tokens"], "loss": p["last_loss"] if p["alive"] else None,
                                          "staleness": p["staleness_mean"] if p["alive"] else None}
            region = regions.setdefault(p["region"], {"tokens": 0, "losses": []})
            region["tokens"] += p["tokens"]  # a peer that left still contributed its tokens
            if p["alive"] and p["last_loss"] is not None:
                region["losses"].append(p["last_loss"])
        c = snap["coordinator"]
        self.samples.append({
            "time": now, "version": None if c is None else c["version"],
            "commits_per_min": None if c is None else c["commits_per_min"],
            "run_tokens": None if lease is None else lease.tokens,
            "peers": peers,
            "regions": {r: {"tokens": v["tokens"], "loss": statistics.fmean(v["losses"]) if v["losses"] else None}
                        for r, v in regions.items()},
            "branches": dict(lease.branches) if lease is not None else {},
        })

    def add_validation(self, now: float, version: int, mean: float, per_language: dict[str, float]) -> None:
        self.validations.append({"time": now, "version": version, "mean": mean, "per_language": dict(per_language)})

    @staticmethod
    def _columns(points: list[dict], field: str, sub: str | None = None) -> dict[str, list]:
        """``{key: [value or None per point]}`` over the keys any point has in ``points[i][field]``."""
        keys = sorted({k for p in points for k in p[field]})
        return {k: [(p[field].get(k, {}) or {}).get(sub) if sub else p[field].get(k) for p in points] for k in keys}

    def export(self) -> dict:
        """Columnar history, every list aligned with its ``time``::

            {"max_samples", "time", "version", "commits_per_min", "run_tokens",
             "peers": {"tokens"|"loss"|"staleness": {name: [...]}},
             "regions": {"tokens"|"loss": {region: [...]}},
             "branches": {branch: [...]},       # counts in the coordinator's term (reset by a new term)
             "validation": {"time", "version", "mean", "per_language": {region: [...]}}}
        """
        s, v = list(self.samples), list(self.validations)
        return {
            "max_samples": self.max_samples,
            "time": [p["time"] for p in s], "version": [p["version"] for p in s],
            "commits_per_min": [p["commits_per_min"] for p in s], "run_tokens": [p["run_tokens"] for p in s],
            "peers": {f: self._columns(s, "peers", f) for f in ("tokens", "loss", "staleness")},
            "regions": {f: self._columns(s, "regions", f) for f in ("tokens", "loss")},
            "branches": self._columns(s, "branches"),
            "validation": {"time": [p["time"] for p in v], "version": [p["version"] for p in v],
                           "mean": [p["mean"] for p in v], "per_language": self._columns(v, "per_language")},
        }


# ---------------------------------------------------------------------------- Prometheus
# name -> help; every series the collector can yield
METRICS = {
    "heloco_coordinator_live": "1 when a live coordinator lease exists",
    "heloco_term": "the live coordinator's term",
    "heloco_version": "the global version (commits) the coordinator is at",
    "heloco_commits_per_minute": "commits per minute, as the coordinator reports it",
    "heloco_standbys": "standbys the coordinator names",
    "heloco_run_tokens": "tokens committed in the run",
    "heloco_correction_branches": "correction branches fired in the coordinator's term, by branch",
    "heloco_peers": "peers known to the dashboard",
    "heloco_peers_alive": "peers with a recent heartbeat",
    "heloco_peer_info": "1 per peer; labels carry its role, device and reachability",
    "heloco_peer_alive": "1 when the peer's heartbeat is recent",
    "heloco_peer_steps_per_second": "inner steps per second of the peer's last round",
    "heloco_peer_inner_steps": "H of the peer's last round",
    "heloco_peer_tokens": "tokens the peer trained on (its own count)",
    "heloco_peer_loss": "the peer's last training loss",
    "heloco_peer_staleness": "staleness of the peer's last accepted submission",
    "heloco_peer_staleness_mean": "mean staleness over the submissions the dashboard saw",
    "heloco_peer_bytes_in": "bytes the peer received",
    "heloco_peer_bytes_out": "bytes the peer sent",
    "heloco_peer_last_heartbeat_seconds": "unix time of the peer's last heartbeat (its own clock)",
    "heloco_peer_rejected": "requests of the peer that were refused, all reasons together",
    "heloco_peer_refusals": "requests of the peer the coordinator refused, by reason",
    "heloco_region_peers_alive": "alive peers per language",
    "heloco_region_tokens": "tokens trained per language",
    "heloco_region_loss": "mean last training loss of the alive peers of a language",
    "heloco_credit_commits": "commits of the peer's pseudo-gradients (the coordinator's credit)",
    "heloco_credit_tokens": "tokens of the peer's committed pseudo-gradients (the coordinator's credit)",
    "heloco_credit_share": "the peer's share of the run's committed tokens",
    "heloco_credit_cosine": "mean cosine of the peer's pseudo-gradient blocks to the outer momentum",
    "heloco_credit_blocks": "share of the peer's blocks HeLoCo kept, rotated or shrank",
    "heloco_validation_loss": "validation loss of the global model per language (last evaluation)",
    "heloco_validation_loss_mean": "validation loss of the global model, mean over languages (last evaluation)",
}

PEER_LABELS = ("peer_id", "name", "region")


class SwarmCollector:
    """A Prometheus collector over a dashboard's last poll (registered in its own registry, so
    several dashboards in one process do not collide)."""

    def __init__(self, dashboard: "Dashboard"):
        self.dashboard = dashboard

    def describe(self):
        return []  # the series depend on the swarm; nothing to check at registration

    def collect(self):
        snap, lease, last_val = self.dashboard.metrics_view()
        families = {}

        def family(name: str, labels: Iterable[str] = ()) -> GaugeMetricFamily:
            if name not in families:
                families[name] = GaugeMetricFamily(name, METRICS[name], labels=list(labels))
            return families[name]

        c = snap["coordinator"]
        family("heloco_coordinator_live").add_metric([], 0.0 if c is None else 1.0)
        if c is not None:
            family("heloco_term").add_metric([], c["term"])
            family("heloco_version").add_metric([], c["version"])
            family("heloco_commits_per_minute").add_metric([], c["commits_per_min"])
            family("heloco_standbys").add_metric([], len(c["standbys"]))
        if lease is not None:
            family("heloco_run_tokens").add_metric([], lease.tokens)
            branches = family("heloco_correction_branches", ["branch"])
            for branch, n in sorted(lease.branches.items()):
                branches.add_metric([branch], n)
        peers = snap["peers"]
        family("heloco_peers").add_metric([], len(peers))
        family("heloco_peers_alive").add_metric([], sum(p["alive"] for p in peers))
        names = display_names(peers)
        regions: dict[str, dict] = {}
        for p in peers:
            labels = [p["peer_id"], names[p["peer_id"]], p["region"]]
            role = p["role"] if p["alive"] or p["role"] == "left" else "silent"
            family("heloco_peer_info", [*PEER_LABELS, "role", "device", "reachability"]).add_metric(
                labels + [role, p["device"], p["reachability"]], 1.0)
            values = {"heloco_peer_alive": float(p["alive"]), "heloco_peer_steps_per_second": p["speed"],
                      "heloco_peer_inner_steps": p["inner_steps"], "heloco_peer_tokens": p["tokens"],
                      "heloco_peer_loss": p["last_loss"], "heloco_peer_staleness": p["staleness_last"],
                      "heloco_peer_staleness_mean": p["staleness_mean"], "heloco_peer_bytes_in": p["bytes_in"],
                      "heloco_peer_bytes_out": p["bytes_out"], "heloco_peer_last_heartbeat_seconds": p["last_seen"]}
            for name, value in values.items():
                if value is not None:  # no loss or staleness before the first round: no sample, not a fake 0
                    family(name, PEER_LABELS).add_metric(labels, float(value))
            family("heloco_peer_rejected", PEER_LABELS).add_metric(labels, p["rejected"]["total"])
            for reason, n in p["rejected"].items():
                if reason != "total":
                    family("heloco_peer_refusals", [*PEER_LABELS, "reason"]).add_metric(labels + [reason], n)
            region = regions.setdefault(p["region"], {"alive": 0, "tokens": 0, "losses": []})
            region["alive"] += int(p["alive"])
            region["tokens"] += p["tokens"]
            if p["alive"] and p["last_loss"] is not None:
                region["losses"].append(p["last_loss"])
        for r, v in sorted(regions.items()):
            family("heloco_region_peers_alive", ["region"]).add_metric([r], v["alive"])
            family("heloco_region_tokens", ["region"]).add_metric([r], v["tokens"])
            if v["losses"]:
                family("heloco_region_loss", ["region"]).add_metric([r], statistics.fmean(v["losses"]))
        for pid, c in snap.get("credit", {}).get("peers", {}).items():
            labels = [pid, names.get(pid, c["name"]), c["region"]]
            family("heloco_credit_commits", PEER_LABELS).add_metric(labels, c["commits"])
            family("heloco_credit_tokens", PEER_LABELS).add_metric(labels, c["tokens"])
            family("heloco_credit_share", PEER_LABELS).add_metric(labels, c["share"])
            family("heloco_credit_cosine", PEER_LABELS).add_metric(labels, c["cosine_mean"])
            for branch in ("kept", "rotated", "shrunk"):
                family("heloco_credit_blocks", [*PEER_LABELS, "branch"]).add_metric(labels + [branch], c[branch])
        if last_val is not None:
            family("heloco_validation_loss_mean").add_metric([], last_val["mean"])
            for r, loss in sorted(last_val["per_language"].items()):
                family("heloco_validation_loss", ["region"]).add_metric([r], loss)
        yield from families.values()


# ---------------------------------------------------------------------------- the poller
class Dashboard:
    """Owns the last snapshot and the history; its poll thread is their only writer.

    :param monitor: a ``Monitor`` over the run's records (its ``poll`` may block on the DHT)
    :param run_id: the run's name
    :param genesis: the run's genesis record, if already read
    :param interval: seconds between polls
    :param max_samples: history samples kept
    """

    def __init__(self, monitor: Monitor, run_id: str, genesis: GenesisRecord | None = None, interval: float = 5.0,
                 max_samples: int = MAX_SAMPLES):
        self.monitor, self.run_id, self.genesis, self.interval = monitor, run_id, genesis, interval
        self.history = History(max_samples)
        self._lock = threading.Lock()
        self._snap: dict = {"coordinator": None, "peers": []}
        self._lease: LeaseRecord | None = None
        self._polled_at: float | None = None
        self._error = ""
        self._last_validation = -math.inf  # time of the newest evaluator point charted
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SwarmCollector(self))

    def poll_once(self, now: float | None = None) -> None:
        """Read the records once (blocking) and publish the result to the handlers."""
        try:
            snap = self.monitor.poll(now)
        except Exception as exc:  # a DHT hiccup: keep the last snapshot and say so
            with self._lock:
                self._error = f"could not read the records: {type(exc).__name__}: {exc}"
            return
        genesis = self.genesis
        if genesis is None:  # a dashboard started with its run (the testnet) finds the record a moment later
            try:
                genesis = self.monitor.records.genesis()
            except Exception as exc:
                logger.debug("genesis not read: %s", exc)
        now = time.time() if now is None else now
        with self._lock:
            self.genesis = genesis
            self._snap, self._lease, self._polled_at, self._error = snap, self.monitor.lease, now, ""
            self.history.add(snap, self.monitor.lease, now)
        val = snap.get("validation")
        if val is not None:  # an evaluator's record (join --evaluator): its points not charted yet
            for point in val["history"] or [val]:
                if point["time"] > self._last_validation:
                    self.record_validation(point["version"], point["mean"], point["per_language"], now=point["time"])
                    self._last_validation = point["time"]

    def record_validation(self, version: int, mean: float, per_language: dict[str, float],
                          now: float | None = None) -> None:
        """A validation of the global model (mean and per language), from any evaluator."""
        with self._lock:
            self.history.add_validation(time.time() if now is None else now, version, mean, per_language)

    def start(self) -> "Dashboard":
        self._thread = threading.Thread(target=self._run, name="dashboard-poll", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self.poll_once()
            self._stop.wait(max(0.0, self.interval - (time.monotonic() - started)))

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 30)

    def state(self) -> dict:
        """The JSON of ``/api/swarm.json`` (see the module docstring)."""
        with self._lock:
            g = self.genesis
            return {**self._snap, "history": self.history.export(), "run": {
                "run_id": self.run_id, "polled_at": self._polled_at, "error": self._error,
                "interval": self.interval, "genesis": None if g is None else {k: v for k, v in g.dict().items()
                                                                             if k != "mac"}}}

    def metrics_view(self) -> tuple[dict, LeaseRecord | None, dict | None]:
        with self._lock:
            last_val = self.history.validations[-1] if self.history.validations else None
            return self._snap, self._lease, last_val


# ---------------------------------------------------------------------------- HTTP
def _page(state: dict) -> str:
    """The page with the current state inlined, so it shows the swarm before its first fetch."""
    template = (STATIC / "dashboard.html").read_text()
    # "</" inside a <script> would end it early: a peer's name is untrusted text
    data = json.dumps(state, allow_nan=False).replace("</", "<\\/")
    return template.replace("{{RUN_ID}}", html.escape(state["run"]["run_id"])).replace("{{STATE_JSON}}", data)


def make_app(dashboard: Dashboard) -> web.Application:
    """``/`` the page, ``/api/swarm.json``, ``/metrics`` and ``/static/`` (the page's script, styles and uPlot)."""

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=_page(dashboard.state()), content_type="text/html")

    async def api(request: web.Request) -> web.Response:
        return web.json_response(dashboard.state(), dumps=lambda o: json.dumps(o, allow_nan=False))

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(dashboard.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/swarm.json", api)
    app.router.add_get("/metrics", metrics)
    app.router.add_static("/static/", STATIC)
    return app


class DashboardServer:
    """Serves ``make_app(dashboard)`` on ``host:port`` from an event-loop thread of its own
    (``port`` 0: any free port; ``url`` says which)."""

    def __init__(self, dashboard: Dashboard, host: str = "127.0.0.1", port: int = 8080):
        self.dashboard, self.host, self.port = dashboard, host, port
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dashboard-http", daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> "DashboardServer":
        """Bind and serve; raises ``OSError`` when the address is taken."""
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
            raise
        return self

    async def _start(self) -> None:
        self._runner = web.AppRunner(make_app(self.dashboard), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
