"""The local multi-peer testnet: a cast of peer profiles (peers/*.yaml) training one run on this
machine, each a separate process with its own language and speed, watched live from the DHT.

    summary = run_testnet(load_profiles("peers/*.yaml"), "configs/testnet.yaml", minutes=5, out=Path("runs/t"))

While it runs, the dashboard (``heloco_p2p/tools/dashboard.py``) serves the swarm on
``dashboard_port`` (its URL is logged and shown under the live view), with the validation curve.
Writes into ``out``: summary.json, metrics.jsonl (every commit, heartbeat, round and the
validation curve), report.md with plots, checkpoint/ (the final state, for ``heloco-peer
export``), and peers/ (each peer's log and metrics).
"""
from __future__ import annotations

import glob
import json
import logging
import shutil
import statistics
import time
import uuid
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.live import Live

from heloco_p2p.checkpoint import load_checkpoint, read_header
from heloco_p2p.config import ConfigError, format_errors, load_config, read_yaml
from heloco_p2p.data import load_tokenizer
from heloco_p2p.fsutil import atomic_write_json
from heloco_p2p.local import build_model, trainable_params
from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.roles.evaluator import Evaluator
from heloco_p2p.roles.shards import ShardPlan
from heloco_p2p.swarm.auth import load_swarm_key
from heloco_p2p.swarm.node import SwarmNode
from heloco_p2p.swarm.wire import unpack_params
from heloco_p2p.tools.dashboard import Dashboard, DashboardServer
from heloco_p2p.tools.export import ExportError, read_checkpoint
from heloco_p2p.tools.launcher import LocalSwarm
from heloco_p2p.tools.monitor import Monitor, render
from heloco_p2p.tools.report import write_testnet_report

logger = logging.getLogger(__name__)


class PeerProfile(BaseModel):
    """One testnet peer. ``speed`` in (0, 1]: a peer of speed s idles (1/s − 1) × its measured
    step time after each step, emulating hardware 1/s times slower."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    region: str
    speed: float = Field(1.0, gt=0, le=1)
    device: str = "auto"
    batch_size: int = Field(16, gt=0)
    threads: int = Field(1, ge=0)


def load_profiles(pattern: str) -> list[PeerProfile]:
    """Peer profiles from files matching ``pattern`` (sorted by name; the first is the bootstrap)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise ConfigError(f"{pattern}: no peer profile matches")
    profiles = []
    for f in files:
        try:
            profiles.append(PeerProfile.model_validate(read_yaml(f)))
        except ValidationError as err:
            raise ConfigError(format_errors(f, err)) from None
    names = [p.name for p in profiles]
    if len(set(names)) != len(names):
        raise ConfigError(f"{pattern}: peer names must be unique, got {names}")
    return profiles


def peer_args(p: PeerProfile) -> list[str]:
    """The ``heloco-peer join`` options a profile sets (its speed, batch size, device, threads)."""
    return ["--speed", str(p.speed), "--batch-size", str(p.batch_size), "--device", p.device, "--threads", str(p.threads)]


class _Evaluator:
    """Validation loss of a θ on every language of the cast (the same fixed blocks each time),
    through the evaluator role's own code (roles/evaluator.py), whose record it also publishes."""

    def __init__(self, cfg, regions: list[str]):
        self.tok = load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)
        self.model = build_model(cfg.model, self.tok, seed=0)  # seed 0: the founder's θ0
        self.theta0 = [p.detach().clone() for p in self.model.parameters()]
        self.role = Evaluator(self.model, self._load, cfg, self.tok, regions=list(dict.fromkeys(regions)))
        # swarm.shards > 1: θ is fetched from every shard's holder and merged by the run's plan
        self.plan = ShardPlan.for_shapes([tuple(p.shape) for p in trainable_params(self.model)], cfg.swarm.shards)

    def _load(self, params: list[torch.Tensor]) -> None:
        for p, q in zip(self.model.parameters(), params):
            p.copy_(q)

    def __call__(self, params: list[torch.Tensor], version: int = 0) -> dict:
        point = self.role.evaluate(params, version, self.role.regions_for(()))
        return {"mean": point["mean"], "per_language": point["per_language"]}


def _coordinator_now(sw: LocalSwarm) -> str | None:
    """The live peer whose metrics hold the most recent commit."""
    latest = {n: max((e["time"] for e in sw.events(n, "commit")), default=0.0)
              for n, proc in sw.procs.items() if proc.poll() is None}
    latest = {n: t for n, t in latest.items() if t > 0}
    return max(latest, key=latest.get) if latest else None


def run_testnet(profiles: list[PeerProfile], config_path: str, minutes: float, out: Path,
                run_id: str | None = None, live: bool = True, eval_every: float = 30.0, during=None,
                swarm_key_file: str | None = None, dashboard_host: str = "127.0.0.1",
                dashboard_port: int | None = None, entry: dict[str, list[str]] | None = None,
                extra_args: dict[str, list[str]] | None = None, until=None) -> dict:
    """Run the cast for ``minutes``, then stop every peer and write the outputs; returns the summary.
    ``swarm_key_file``: every peer (and the observer) uses this swarm key (docs/security.md).
    ``dashboard_port``: serve the dashboard there while the run lasts (taken: any free port; None: none).
    ``during(sw, client)``, if given, is called about once a second while the run lasts (scripts/chaos.py
    injects faults with it). ``entry``/``extra_args``: per peer name, how it is started
    (``LocalSwarm.entry``) and options added to its ``join``; ``until(sw)``: stop early once it is
    true (checked about once a second; scripts/poison.py stops when every honest peer trained its rounds)."""
    cfg = load_config(config_path)
    out.mkdir(parents=True, exist_ok=True)
    run_id = run_id or f"testnet-{uuid.uuid4().hex[:6]}"
    config_file = Path(config_path).resolve()
    (out / "config.yaml").write_text(cfg.to_yaml())
    evaluator = _Evaluator(cfg, [p.region for p in profiles])
    curve = [{"event": "val", "time": time.time(), "version": 0, "val_loss": evaluator(evaluator.theta0)}]
    sw = LocalSwarm(out / "peers", run_id, swarm_key_file=swarm_key_file)
    sw.entry.update(entry or {})
    extra_args = extra_args or {}
    (out / "peers").mkdir(exist_ok=True)
    client = dashboard = server = None
    interrupted = False
    t_start = time.time()
    try:
        first, rest = profiles[0], profiles[1:]
        sw.start(first.name, first.region, "--config", str(config_file), *peer_args(first), *extra_args.get(first.name, []))
        for p in rest:
            sw.start(p.name, p.region, *peer_args(p), *extra_args.get(p.name, []))
        client = SwarmNode(run_id, initial_peers=[sw.maddr], client_mode=True,
                           swarm_key=load_swarm_key(swarm_key_file) if swarm_key_file else None)
        banner = ""
        if dashboard_port is not None:
            dashboard = Dashboard(Monitor(client.records, silent_after=3 * cfg.swarm.heartbeat_seconds,
                                          lease_seconds=cfg.swarm.lease_seconds, holder_keys=lease_rules.holder_keys(client),
                                          shards=cfg.swarm.shards),
                                  run_id, interval=2.0)
            _record_validation(dashboard, curve[0])
            dashboard.start()
            server = _serve_dashboard(dashboard, dashboard_host, dashboard_port)
            banner = f"dashboard: {server.url}"
            logger.info("%s (while the testnet runs)", banner)
        deadline = t_start + 60 * minutes
        next_eval = time.time() + eval_every
        with _LiveView(client, sw, enabled=live, lease_seconds=cfg.swarm.lease_seconds,
                       silent_after=3 * cfg.swarm.heartbeat_seconds, banner=banner, shards=cfg.swarm.shards) as view:
            while time.time() < deadline:
                time.sleep(1.0)
                view.refresh()
                if during is not None:
                    during(sw, client)
                if until is not None and until(sw):
                    break
                if time.time() >= next_eval:
                    next_eval += eval_every
                    point = _fetch_and_evaluate(client, evaluator, view.leases())
                    if point:
                        curve.append(point)
                        if dashboard is not None:
                            _record_validation(dashboard, point)
                        view.note(f"validation loss {point['val_loss']['mean']:.3f} at version {point['version']}")
    except KeyboardInterrupt:
        interrupted = True
        logger.warning("interrupted: stopping every peer")
    finally:
        if server is not None:
            server.stop()
        if dashboard is not None:
            dashboard.stop()
        _stop_all(sw)
        if client is not None:
            client.shutdown()
    wall = time.time() - t_start
    ckpt = _collect_checkpoint(sw, out) if cfg.swarm.shards == 1 else _collect_shard_checkpoints(sw, out)
    if ckpt is not None:
        try:
            saved = load_checkpoint(ckpt) if cfg.swarm.shards == 1 else read_checkpoint(ckpt)
        except ExportError as exc:
            logger.warning("the final checkpoint: %s", exc)
        else:
            curve.append({"event": "val", "time": time.time(), "version": saved.version,
                          "val_loss": evaluator(saved.params)})
    summary = build_summary(sw, profiles, curve, wall)
    summary["interrupted"] = interrupted
    summary["run_id"] = run_id
    _write_metrics(sw, curve, out / "metrics.jsonl")
    atomic_write_json(out / "summary.json", summary)
    write_testnet_report(out)
    return summary


def _serve_dashboard(dashboard: Dashboard, host: str, port: int) -> DashboardServer:
    """The dashboard on ``port``, or on any free port when that one is taken (a second testnet)."""
    try:
        return DashboardServer(dashboard, host, port).start()
    except OSError as exc:
        logger.warning("dashboard: port %d is taken (%s); using a free one", port, exc)
        return DashboardServer(dashboard, host, 0).start()


def _record_validation(dashboard: Dashboard, point: dict) -> None:
    loss = point["val_loss"]
    dashboard.record_validation(point["version"], loss["mean"], loss["per_language"], now=point["time"])


def _fetch_and_evaluate(client, evaluator, leases) -> dict | None:
    """The believed coordinator's θ (``leases``: the live view's, by the peers' rule; one per
    shard, whose parts are merged by the plan, the version being the lowest of theirs), evaluated;
    the result is published as the testnet's evaluator record, as ``join --evaluator`` does."""
    if not leases or any(lease is None for lease in leases):
        return None
    parts, versions = [], []
    for k, lease in enumerate(leases):
        request = {"run_id": client.run_id, **({"shard": k} if k else {})}
        try:
            header, payload = client.call(lease.peer_id, "state", request, timeout=30)
            if header.get("status") != "ok":
                return None
            parts.append(unpack_params(payload))
        except Exception as exc:  # the coordinator may be changing hands: try again next time
            logger.debug("evaluation fetch failed: %s", exc)
            return None
        versions.append(int(header["version"]))
    params, version = parts[0] if len(parts) == 1 else evaluator.plan.merge(parts), min(versions)
    point = {"event": "val", "time": time.time(), "version": version, "val_loss": evaluator(params, version)}
    try:
        client.records.publish_eval(evaluator.role.record(client.peer_id, "testnet"), ttl=600.0)
    except Exception as exc:
        logger.debug("publishing the evaluation failed: %s", exc)
    return point


def _stop_all(sw: LocalSwarm) -> None:
    """Training peers first, then the coordinator, so that its last checkpoint is the final state."""
    coordinator = _coordinator_now(sw)
    sw.terminate([n for n in sw.procs if n != coordinator], 60)
    if coordinator:
        sw.terminate([coordinator], 60)
    sw.close()  # SIGKILLs any group still there


def _collect_checkpoint(sw: LocalSwarm, out: Path) -> Path | None:
    """The newest checkpoint of the run (highest term, then version) among the peers' directories."""
    headers = {p.parent: read_header(p) for p in sw.dir.glob("ckpt-*/coordinator.pt")}
    headers = {d: h for d, h in headers.items() if h is not None}
    if not headers:
        return None
    best = max(headers, key=lambda d: (headers[d]["term"], headers[d]["version"])) / "coordinator.pt"
    dest = out / "checkpoint"
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(best.parent, dest)
    return dest


def _collect_shard_checkpoints(sw: LocalSwarm, out: Path) -> Path | None:
    """swarm.shards > 1: the newest checkpoint of each shard (highest term, then version) among the
    peers' directories, as ``<out>/checkpoint/shard-<k>`` (tools/export.py assembles θ from them)."""
    best: dict[str, tuple] = {}
    for p in sw.dir.glob("ckpt-*/shard-*/coordinator.pt"):
        h = read_header(p)
        if h is not None and (p.parent.name not in best or (h["term"], h["version"]) > best[p.parent.name][0]):
            best[p.parent.name] = ((h["term"], h["version"]), p.parent)
    if not best:
        return None
    dest = out / "checkpoint"
    if dest.exists():
        shutil.rmtree(dest)
    for name, (_, src) in best.items():
        shutil.copytree(src, dest / name)
    return dest


def build_summary(sw: LocalSwarm, profiles: list[PeerProfile], curve: list[dict], wall: float) -> dict:
    commits = sw.all_events("commit")
    acks = [a for a in sw.all_events("ack") if not a.get("duplicate")]
    peers = []
    for p in profiles:
        rounds = sw.events(p.name, "round")
        mine = [a for a in sw.events(p.name, "ack") if not a.get("duplicate")]
        start = next((e["time"] for e in sw.events(p.name, "train_start")), None)
        end = max((e["time"] for e in sw.events(p.name) if e.get("event") in ("train_end", "ack", "round")), default=None)
        busy = sum(r["compute_seconds"] for r in rounds)
        span = (end - start) if (start and end and end > start) else None
        peers.append({
            "name": p.name, "region": p.region, "speed_factor": p.speed, "rounds": len(rounds),
            "tokens": int(sum(a["tokens"] for a in mine)),
            "utilization": min(1.0, busy / span) if span else 0.0,
            "staleness_mean": statistics.fmean([a["staleness"] or 0 for a in mine]) if mine else 0.0,
        })
    return {
        "wall_seconds": wall,
        "commits": len({(c["term"], c["version"]) for c in commits}),
        "accepted_rounds": len(acks),
        "rejected": len(sw.all_events("rejected")),
        "coordinator_changes": len(sw.all_events("takeover")),
        "val_loss": {"start": _val(curve[0]), "end": _val(curve[-1])},
        "peers": peers,
    }


def _val(point: dict) -> dict:
    return {"mean": point["val_loss"]["mean"], "per_language": point["val_loss"]["per_language"],
            "version": point["version"]}


def _write_metrics(sw: LocalSwarm, curve: list[dict], path: Path) -> None:
    events = [e for n in sw.procs for e in sw.events(n)] + curve
    events.sort(key=lambda e: e.get("time", 0.0))
    with open(path, "w") as f:
        for e in events:
            f.write(json.dumps(e) + "\n")


class _LiveView:
    """The monitor's view of the swarm (heloco_p2p.tools.monitor, read from the DHT), refreshed in place,
    with a line of notes (validation losses) under it."""

    def __init__(self, client, sw: LocalSwarm, enabled: bool, lease_seconds: float = 10.0, silent_after: float = 10.0,
                 banner: str = "", shards: int = 1):
        self.client, self.sw, self.enabled, self.banner = client, sw, enabled, banner
        self.monitor = Monitor(client.records, silent_after=silent_after, lease_seconds=lease_seconds,
                               holder_keys=lease_rules.holder_keys(client), shards=shards)
        self.notes: list[str] = []
        self.live = None

    def __enter__(self):
        if self.enabled:
            self.live = Live(self._render(), refresh_per_second=1, transient=False)
            self.live.__enter__()
        return self

    def __exit__(self, *exc):
        if self.live is not None:
            self.live.__exit__(*exc)

    def note(self, text: str) -> None:
        self.notes = (self.notes + [time.strftime("%H:%M:%S ") + text])[-3:]
        if not self.enabled:
            logger.info(text)

    def lease(self):
        """The coordinator as the peers believe it (roles/lease.py), read now."""
        try:
            self.monitor.poll()
        except Exception as exc:  # the DHT may hiccup: the last belief stands
            logger.debug("lease read: %s", exc)
        return self.monitor.lease

    def leases(self) -> list:
        """``lease()`` of every shard (one element without shards), read now."""
        first = self.lease()
        return [first] + [m.lease for m in self.monitor.shard_monitors]

    def refresh(self) -> None:
        if self.live is not None:
            try:
                self.live.update(self._render())
            except Exception as exc:  # the DHT may hiccup; the view waits for the next tick
                logger.debug("live view: %s", exc)

    def _render(self):
        now = time.time()
        lines = ([self.banner] if self.banner else []) + self.notes
        return render(self.monitor.poll(now), self.client.run_id, now, note="\n".join(lines))
