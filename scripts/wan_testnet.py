#!/usr/bin/env python
"""Consumer links: a ~125M-parameter run trained for real on CPU by peers on shaped links, each
peer in a network namespace of its own (heloco_p2p/tools/netns.py, root).

    python scripts/wan_testnet.py --calibrate                        # time inner steps here, suggest H
    python scripts/wan_testnet.py --rss-only                         # one peer's peak RSS, then exit
    python scripts/wan_testnet.py --rss-roles --num-layers 6         # each role's peak RSS (loopback), then exit
    python scripts/wan_testnet.py --compare --minutes 20 --write-results  # wrap8 vs fp32 replies, H 80
    python scripts/wan_testnet.py --tiny --minutes 1                 # the tiny model (tests/test_wan.py)

The cast: a coordinator and a standby started with ``--no-train`` on 200 Mbit/s links each way
(the coordinator first, so that it founds the run; the standby next, and the trainers only once
the coordinator has made it its standby), then three training peers (de, fr, ru: the built-in
corpus, docs/data.md) on 50 Mbit/s links each way. Rates are tbf qdiscs on each peer's veth
(NetnsTestnet's ``rates``); ``--tiny`` uses the tiny test model (launcher.write_test_config) on
20 / 80 Mbit/s links.

The run config is written from configs/gpu-125m.yaml: plain AdamW in fp32 on the CPU, batch 1 ×
32 tokens, a few validation blocks, a cheap loss screen, ``swarm.compression`` (default 8bit) up
and ``swarm.reply_compression`` down, a lease long enough for a forwarded 125M commit. H
(``inner.steps_per_round``) is ``--steps-per-round``; ``--calibrate`` times a few inner steps of
the model on this machine and prints the H that makes compute per round about twice the
compressed transfer time of one submission (upload, forward to the standby, reply).

Before starting the cast, one peer's peak RSS (its whole process group: peer, DHT process, p2pd)
is measured (``--rss-only`` stops there); 5 × that above 90% of MemAvailable is refused.

Per run: each trainer's utilisation (time in inner steps / wall time in the steady state, as
scripts/bench.py's ``steady_utilization``), bits per parameter up and down per submission (the
``ack`` events' ``bytes`` and ``reply_bytes``), the reply's drift and resyncs where the acks carry
them, join seconds (process start → ``ready`` and → first accepted submission), the coordinator's
CPU seconds per commit (its process group, /proc, over the measured window), commits per minute,
bytes per veth and their peak rate over 1 s windows, each peer's peak RSS, the load average.
``--compare`` runs the cast twice: with ``--reply-compression`` (default wrap8) and with fp32
replies (``none``). Writes bench/results.json key ``wan`` (the other keys are kept) and, with
``--write-results``, the section "## Consumer links" of docs/results.md.

Namespaces and processes are removed on every exit path (NetnsTestnet, LocalSwarm.close).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_wire  # noqa: E402
from chaos import roles_now  # noqa: E402

import bench  # noqa: E402
from heloco_p2p.config import ConfigError, config_from_dict, read_yaml  # noqa: E402
from heloco_p2p.fsutil import atomic_write_text  # noqa: E402
from heloco_p2p.swarm.lifetime import all_proc_stats  # noqa: E402
from heloco_p2p.swarm.wire import encode_tensors  # noqa: E402
from heloco_p2p.tools import netns  # noqa: E402
from heloco_p2p.tools.launcher import LocalSwarm, write_test_config  # noqa: E402
from heloco_p2p.tools.report import git_tree, replace_section  # noqa: E402

HEADING = "## Consumer links"
TRAINERS = (("berlin", "de"), ("paris", "fr"), ("moscow", "ru"))  # peers/*.yaml's names and regions
SERVERS = (("coordinator", "de"), ("standby", "fr"))  # started with --no-train
# H at 125M without --steps-per-round: what --calibrate suggested on a 2-core machine (1.1 s per
# inner step on 1 thread; 8bit up and down, 50 / 200 Mbit/s: 45 s of transfer per submission)
DEFAULT_H = 80
# seconds: the peak rate of a link is its busiest window this long. A tbf lets its burst (128 KiB,
# or 20 ms at the rate) through above the rate: over 1 s that is 5% at 20 Mbit/s, 2% at 80
RATE_WINDOW = 1.0


# ------------------------------------------------------------------------------ the run config
def run_tree(opts, reply: str) -> dict:
    """The run config (a tree for config_from_dict) of one run of the cast. ``opts.swarm_extra``
    (optional, a dict) updates the swarm section, one level deep (scripts/shard_testnet.py:
    ``shards`` and ``defence.screen``)."""
    swarm = {"compression": opts.compression, "reply_compression": reply, "lease_seconds": opts.lease_seconds,
             "heartbeat_seconds": opts.lease_seconds / 6, "num_standbys": 1, "submit_timeout": opts.submit_timeout,
             "checkpoint_every": 100_000,  # a 125M checkpoint would take the coordinator's disk and CPU mid-run
             "defence": {"screen_blocks": 1, "screen_tokens": min(32, opts.seq_len)}}
    for key, value in (getattr(opts, "swarm_extra", None) or {}).items():
        swarm[key] = {**swarm[key], **value} if isinstance(value, dict) and isinstance(swarm.get(key), dict) else value
    if opts.tiny:
        with tempfile.TemporaryDirectory(prefix="wan-") as tmp:
            tree = read_yaml(write_test_config(Path(tmp) / "cfg.yaml", **swarm))
    else:
        tree = read_yaml(ROOT / "configs" / "gpu-125m.yaml")
        tree["name"] = "wan-125m"
        tree["data"].update(seq_len=opts.seq_len, val_blocks=2)
        tree["inner"].update(optimizer="adamw", precision="fp32", device="cpu", batch_size=1, warmup_steps=20)
        if opts.num_layers:  # fewer layers: ~100M at 10 (5 processes must fit the machine's memory)
            m = tree["model"]
            m["num_layers"] = opts.num_layers
            h, i = m["hidden_size"], m["intermediate_size"]
            m["nominal_params"] = m["vocab_size"] * h + opts.num_layers * (4 * h * h + 3 * h * i)
        tree["swarm"] = swarm
    if opts.steps_per_round:
        tree["inner"]["steps_per_round"] = opts.steps_per_round
    elif not opts.tiny:
        tree["inner"]["steps_per_round"] = DEFAULT_H
    return tree


def checked_config(opts, reply: str):
    """The run config of ``reply``, validated; exits with what to change when this tree refuses it."""
    try:
        return config_from_dict(run_tree(opts, reply), source=f"the wan run config (reply {reply})")
    except ConfigError as exc:
        raise SystemExit(f"{exc}\n(--reply-compression {reply!r} / --compression {opts.compression!r}: this tree's "
                         "heloco_p2p/config.py does not take it; choose another value)") from None


def write_config(path: Path, opts, reply: str) -> Path:
    checked_config(opts, reply)
    path.write_text(yaml.safe_dump(run_tree(opts, reply), sort_keys=False))
    return path


def cast_rates(opts) -> dict[str, tuple[float, float]]:
    """peer name → (uplink, downlink) Mbit/s."""
    return {**{n: (opts.server_mbit, opts.server_mbit) for n, _ in SERVERS},
            **{n: (opts.trainer_mbit, opts.trainer_mbit) for n, _ in TRAINERS}}


def layout(opts) -> list[tuple[int, ...]]:
    """The run's parameter shapes (its own model config: ``--num-layers`` changes them), on the meta device."""
    from heloco_p2p.local import build_model, trainable_params

    cfg = checked_config(opts, opts.reply_compression)
    with torch.device("meta"):
        model = build_model(cfg.model)
    return [tuple(p.shape) for p in trainable_params(model)]


# ------------------------------------------------------------------------------ /proc readers
def group_rss_bytes(stats: dict | None = None) -> dict[int, int]:
    """process group → the sum of its live members' VmRSS (pages shared between them count in each)."""
    out: dict[int, int] = {}
    for pid, st in (stats if stats is not None else all_proc_stats()).items():
        if st.state in "ZX":
            continue
        try:
            with open(f"/proc/{pid}/status") as f:
                kb = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
        except (OSError, ValueError):
            continue
        out[st.pgrp] = out.get(st.pgrp, 0) + 1024 * kb
    return out


def group_pss_bytes(pgid: int) -> int:
    """The sum of a process group's Pss (/proc/PID/smaps_rollup: a page shared by n processes counts
    1/n in each), what the group takes from the machine's memory."""
    total = 0
    for pid, st in all_proc_stats().items():
        if st.pgrp != pgid or st.state in "ZX":
            continue
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += 1024 * next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0)
        except (OSError, ValueError):
            continue
    return total


def mem_available() -> int:
    """MemAvailable of /proc/meminfo, bytes."""
    with open("/proc/meminfo") as f:
        return next(1024 * int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class Sampler(threading.Thread):
    """Every ``period`` s each link's byte counters; every ``rss_period`` s each peer's group RSS."""

    def __init__(self, sw: LocalSwarm, net, period: float = 0.25, rss_period: float = 2.0):
        super().__init__(daemon=True, name="wan-sampler")
        self.sw, self.net, self.period, self.rss_period = sw, net, period, rss_period
        self.links: dict[str, list[tuple[float, int, int]]] = {}  # name → [(time, up bytes, down bytes)]
        self.rss_peak: dict[str, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        last_rss = 0.0
        while not self.done.wait(self.period):
            if self.net is not None:
                for name in list(self.net.peers):
                    t0 = time.time()
                    try:
                        up, down = self.net.link_bytes(name)
                    except (OSError, ValueError):
                        continue
                    t1 = time.time()
                    if t1 - t0 < 0.02:  # descheduled mid-read, the time of the reading is unsure
                        self.links.setdefault(name, []).append(((t0 + t1) / 2, up, down))
            if time.time() - last_rss >= self.rss_period:
                last_rss = time.time()
                rss = group_rss_bytes()
                for name, proc in list(self.sw.procs.items()):
                    self.rss_peak[name] = max(self.rss_peak.get(name, 0), rss.get(proc.pid, 0))

    def stop(self) -> None:
        self.done.set()
        self.join(10)

    def run_bytes(self, name: str) -> dict:
        """Bytes each way on ``name``'s link between the first and the last sample (joins included)."""
        points = self.links.get(name) or [(0.0, 0, 0)]
        return {"up": points[-1][1] - points[0][1], "down": points[-1][2] - points[0][2]}

    def peak_mbit(self, name: str, t_from: float = 0.0, t_to: float = math.inf) -> dict:
        """The busiest RATE_WINDOW of ``name``'s link each way, Mbit/s (counted as tbf counts: frames)."""
        points = [p for p in self.links.get(name, []) if t_from <= p[0] <= t_to]
        best = {"up": 0.0, "down": 0.0}
        j = 0
        for i, (t, up, down) in enumerate(points):
            j = max(j, i + 1)  # the first point at least RATE_WINDOW after point i
            while j < len(points) and points[j][0] - t < RATE_WINDOW:
                j += 1
            if j == len(points):
                break
            t2, up2, down2 = points[j]
            best["up"] = max(best["up"], (up2 - up) * 8 / (t2 - t) / 1e6)
            best["down"] = max(best["down"], (down2 - down) * 8 / (t2 - t) / 1e6)
        return best


# ------------------------------------------------------------------------------ one run of the cast
def run_cast(opts, reply: str, workdir: Path) -> dict:
    """Start the cast (coordinator, standby, trainers), let it train ``opts.minutes`` after every
    trainer is ready, and measure; every namespace and process is gone when this returns or raises."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = write_config(workdir / "run.yaml", opts, reply)
    rates = cast_rates(opts)
    lease = opts.lease_seconds
    started: dict[str, float] = {}
    trainers = [n for n, _ in TRAINERS]
    with netns.NetnsTestnet(list(rates), rates=rates) as net:
        sw = LocalSwarm(workdir, f"wan-{uuid.uuid4().hex[:8]}", netns=net)
        sampler = Sampler(sw, net)
        extra = ["--threads", str(opts.threads)]
        try:
            sampler.start()
            load_start = load()
            (name, region), (standby, standby_region) = SERVERS
            started[name] = time.time()
            sw.start(name, region, "--config", str(cfg), "--no-train", *extra)
            sw.wait_until(lambda: sw.events(name, "train_start"), opts.join_timeout, "the coordinator founding the run")
            started[standby] = time.time()
            sw.start(standby, standby_region, "--no-train", *extra)
            sw.wait_until(lambda: roles_now(sw, 3 * lease)[:2] == (name, standby), opts.join_timeout,
                          f"{name} coordinating with {standby} as its standby (heartbeats)")
            print(f"[wan] {name} coordinates, {standby} is its standby; starting the trainers", flush=True)
            for n, r in TRAINERS:
                started[n] = time.time()
                sw.start(n, r, *extra)
            sw.wait_until(lambda: all(sw.events(n, "train_start") for n in trainers), opts.join_timeout,
                          "every trainer ready")
            t0 = time.time()
            cpu0 = {n: bench.group_cpu_seconds(sw.procs[n].pid) for n, _ in SERVERS}
            bytes0 = {n: net.link_bytes(n) for n in rates}
            print(f"[wan] reply {reply}: every trainer is ready; measuring for {opts.minutes:g} min", flush=True)
            sw.wait_until(lambda: time.time() >= t0 + 60 * opts.minutes, 60 * opts.minutes + 60, "the run's end")
            t1 = time.time()
            cpu1 = {n: bench.group_cpu_seconds(sw.procs[n].pid) for n, _ in SERVERS}
            bytes1 = {n: net.link_bytes(n) for n in rates}
            roles_end = roles_now(sw, 3 * lease)
            if roles_end[0] != name:  # a failover mid-run: the CPU per commit is then not one coordinator's
                print(f"[wan] warning: {roles_end[0]} coordinates at the end, not {name}", flush=True)
            load_end = load()
        finally:
            sampler.stop()
            sw.close()
    events = {n: sw.events(n) for n in rates}
    return summarize(opts, reply, rates, events, started, (t0, t1), cpu0, cpu1, bytes0, bytes1, sampler,
                     roles_end, [load_start, load_end], workdir)


def summarize(opts, reply, rates, events, started, window, cpu0, cpu1, bytes0, bytes1, sampler, roles_end, loads,
              workdir) -> dict:
    t0, t1 = window
    n_params = sum(math.prod(s) for s in layout(opts))
    of = lambda name, kind: [e for e in events[name] if e.get("event") == kind]  # noqa: E731
    trainers = [n for n, _ in TRAINERS]
    coordinator = SERVERS[0][0]
    per_trainer, acks = {}, []
    for n in trainers:
        rounds = of(n, "round")
        mine = of(n, "ack")
        acks += mine
        first = {k: next((e["time"] for e in events[n] if e.get("event") == k), None) for k in ("ready", "ack")}
        per_trainer[n] = {
            "utilization": bench.steady_utilization(rounds), "rounds": len(rounds), "acks": len(mine),
            "rejected": len(of(n, "rejected")),
            "join_ready_s": first["ready"] - started[n] if first["ready"] else None,
            "join_first_accepted_s": first["ack"] - started[n] if first["ack"] else None,
            "median_rtt_s": statistics.median([a["rtt"] for a in mine]) if mine else None,
            "median_compute_s": statistics.median([r["compute_seconds"] for r in rounds]) if rounds else None}
    up = [8 * a["bytes"] / n_params for a in acks if a.get("bytes")]
    down = [8 * a["reply_bytes"] / n_params for a in acks if a.get("reply_bytes")]
    drift = [x for x in (_ack_field(a, "reply_drift_rel_l2") for a in acks) if isinstance(x, (int, float))]
    resync = [_ack_field(a, "reply_resync") for a in acks]
    resync = [x for x in resync if x is not None]
    commits = {(e["version"], e["digest"]) for n in rates for e in events[n]
               if e.get("event") == "commit" and t0 <= e["time"] <= t1}
    own_commits = [e for e in events[coordinator] if e.get("event") == "commit" and t0 <= e["time"] <= t1]
    minutes = (t1 - t0) / 60
    links = {n: {"up_mbit": rates[n][0], "down_mbit": rates[n][1],
                 "up_bytes": bytes1[n][0] - bytes0[n][0], "down_bytes": bytes1[n][1] - bytes0[n][1],
                 "peak_mbit": sampler.peak_mbit(n), "run_bytes": sampler.run_bytes(n)} for n in rates}
    return {
        "reply_compression": reply, "compression": opts.compression, "minutes": minutes, "window": [t0, t1],
        "model_params": n_params, "trainers": per_trainer,
        "utilization": {n: p["utilization"] for n, p in per_trainer.items()},
        "bits_per_param_up": statistics.fmean(up) if up else None,
        "bits_per_param_down": statistics.fmean(down) if down else None,
        "drift_rel_l2_max": max(drift) if drift else None,
        "reply_resync": (sum(float(x) for x in resync) if resync else None),
        "submissions": len(acks),
        "commits": len(commits), "commits_per_minute": len(commits) / minutes if minutes > 0 else None,
        "coordinator_commits": len(own_commits),
        "coordinator_cpu_s": cpu1[coordinator] - cpu0[coordinator],
        "coordinator_cpu_s_per_submission": ((cpu1[coordinator] - cpu0[coordinator]) / len(own_commits)
                                             if own_commits else None),
        "standby_cpu_s": cpu1[SERVERS[1][0]] - cpu0[SERVERS[1][0]],
        "roles_at_end": {"coordinator": roles_end[0], "standby": roles_end[1], "training": roles_end[2]},
        "links": links, "rss_peak_mib": {n: v / 2**20 for n, v in sampler.rss_peak.items()},
        "load": loads, "dir": str(workdir)}


def _ack_field(ack: dict, key: str):
    """A field of an ``ack`` event, or of the server's part of it, when the tree logs it."""
    return ack.get(key, (ack.get("server") or {}).get(key))


# ------------------------------------------------------------------------------ memory
def measure_rss(opts, workdir: Path) -> int:
    """Peak RSS (bytes) of one peer's process group at the run's size: a peer that founds a run
    alone trains and coordinates (every role's memory), sampled for ``--rss-seconds`` and at
    least until its first accepted submission (its first commit and reply)."""
    workdir.mkdir(parents=True, exist_ok=True)
    small_h = argparse.Namespace(**{**vars(opts), "steps_per_round": min(opts.steps_per_round or 4, 4)})
    cfg = write_config(workdir / "run.yaml", small_h, opts.reply_compression)
    sw = LocalSwarm(workdir, f"wan-rss-{uuid.uuid4().hex[:8]}")
    peak, peak_pss, t0 = 0, 0, time.time()
    try:
        sw.start("solo", "de", "--config", str(cfg), "--threads", str(opts.threads))
        pgid = sw.procs["solo"].pid
        deadline = t0 + max(opts.rss_seconds, 1.0)
        while time.time() < deadline or (not sw.events("solo", "ack") and time.time() < t0 + 3 * opts.rss_seconds):
            if sw.procs["solo"].poll() is not None:
                raise RuntimeError(f"the peer exited: {(workdir / 'solo.log').read_text()[-2000:]}")
            peak = max(peak, group_rss_bytes().get(pgid, 0))
            peak_pss = max(peak_pss, group_pss_bytes(pgid))
            time.sleep(0.5)
    finally:
        sw.close()
    print(f"[wan] one peer's peak RSS (process group, {time.time() - t0:.0f} s, "
          f"{len(sw.events('solo', 'ack'))} accepted rounds): {peak / 2**30:.2f} GiB VmRSS, {peak_pss / 2**30:.2f} GiB "
          "Pss (pages its processes share counted once)", flush=True)
    return peak


class RoleSampler(threading.Thread):
    """Every ``period`` s, each peer's process group: the sum of VmRSS (as ``Sampler``), the sum of
    Pss, and the peer process's own VmHWM (its kernel-kept peak RSS, so no peak falls between two
    samples); the peaks of each."""

    def __init__(self, sw: LocalSwarm, period: float = 0.5):
        super().__init__(daemon=True, name="wan-role-sampler")
        self.sw, self.period = sw, period
        self.peak: dict[str, dict[str, int]] = {}
        self.series: dict[str, list[tuple[float, int]]] = {}  # name → [(time, the peer process's VmRSS)]
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.period):
            rss = group_rss_bytes()
            for name, proc in list(self.sw.procs.items()):
                top = self.peak.setdefault(name, {"group_rss": 0, "group_pss": 0, "peer_hwm": 0})
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        own = next((int(line.split()[1]) for line in f if line.startswith("VmRSS:")), 0)
                    self.series.setdefault(name, []).append((time.time(), 1024 * own))
                except (OSError, ValueError):
                    pass
                top["group_rss"] = max(top["group_rss"], rss.get(proc.pid, 0))
                top["group_pss"] = max(top["group_pss"], group_pss_bytes(proc.pid))
                try:
                    with open(f"/proc/{proc.pid}/status") as f:
                        hwm = next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
                    top["peer_hwm"] = max(top["peer_hwm"], 1024 * hwm)
                except (OSError, ValueError):
                    pass

    def stop(self) -> None:
        self.done.set()
        self.join(10)


def measure_roles(opts, workdir: Path) -> dict:
    """Peak memory of each role of the cast, on the loopback (no namespaces): a coordinator and a
    standby with ``--no-train`` (started as in ``run_cast``), then ``--rss-trainers`` training
    peers, sampled (``RoleSampler``) until every trainer has ``--rss-acks`` accepted submissions.
    H is at most 4, as in ``measure_rss``. Returns name → {role, the peaks (bytes), fp32 copies of
    θ in the peer process's peak (VmHWM / 4 bytes per parameter)} and the load averages."""
    workdir.mkdir(parents=True, exist_ok=True)
    small_h = argparse.Namespace(**{**vars(opts), "steps_per_round": min(opts.steps_per_round or 4, 4)})
    cfg = write_config(workdir / "run.yaml", small_h, opts.reply_compression)
    n_params = sum(math.prod(s) for s in layout(opts))
    sw = LocalSwarm(workdir, f"wan-roles-{uuid.uuid4().hex[:8]}")
    sampler = RoleSampler(sw)
    extra = ["--threads", str(opts.threads)]
    (name, region), (standby, standby_region) = SERVERS
    trainers = TRAINERS[:opts.rss_trainers]
    loads, t0 = [load()], time.time()
    try:
        sampler.start()
        sw.start(name, region, "--config", str(cfg), "--no-train", *extra)
        sw.wait_until(lambda: sw.events(name, "train_start"), opts.join_timeout, "the coordinator founding the run")
        sw.start(standby, standby_region, "--no-train", *extra)
        sw.wait_until(lambda: roles_now(sw, 3 * opts.lease_seconds)[:2] == (name, standby), opts.join_timeout,
                      f"{name} coordinating with {standby} as its standby (heartbeats)")
        for n, r in trainers:
            sw.start(n, r, *extra)
        sw.wait_until(lambda: all(len(sw.events(n, "ack")) >= opts.rss_acks for n, _ in trainers),
                      opts.join_timeout, f"{opts.rss_acks} accepted submissions of every trainer")
        time.sleep(2 * sampler.period)
        loads.append(load())
    finally:
        sampler.stop()
        sw.close()
    roles = {name: "coordinator (--no-train)", standby: "standby (--no-train)", **{n: "training" for n, _ in trainers}}
    out = {n: {"role": role, **{f"{k}_bytes": v for k, v in sampler.peak.get(n, {}).items()},
               "fp32_copies": sampler.peak.get(n, {}).get("peer_hwm", 0) / (4 * n_params)} for n, role in roles.items()}
    print(f"[wan] peak memory per role ({n_params / 1e6:.1f}M parameters, {4 * n_params / 2**20:.0f} MiB per fp32 copy "
          f"of θ; {time.time() - t0:.0f} s; load {loads[0]} → {loads[-1]}): peer process VmHWM / its process group's "
          "VmRSS sum / Pss sum", flush=True)
    for n, r in out.items():
        print(f"[wan]   {n:12s} {r['role']:26s} {r.get('peer_hwm_bytes', 0) / 2**30:.2f} / "
              f"{r.get('group_rss_bytes', 0) / 2**30:.2f} / {r.get('group_pss_bytes', 0) / 2**30:.2f} GiB; "
              f"{r['fp32_copies']:.1f} copies of θ in VmHWM", flush=True)
    result = {"label": opts.rss_label or git_tree(ROOT), "model_params": n_params, "roles": out, "load": loads,
              "date": datetime.date.today().isoformat(), "tree": git_tree(ROOT), "machine": bench_wire.machine(),
              "trainers": len(trainers)}
    atomic_write_text(workdir / "memory.json", json.dumps({**result, "series": sampler.series}) + "\n")
    return result


MEMORY_HEADING = "### Memory per role"


def merge_memory(path: Path, run: dict) -> dict:
    """bench/results.json with ``run`` in its ``wan_memory`` runs (one per label; every other key kept)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    memory = results.setdefault("wan_memory", {"runs": []})
    memory["runs"] = [r for r in memory["runs"] if r.get("label") != run["label"]] + [run]
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    return memory


def render_memory(memory: dict) -> str:
    """The Markdown of "### Memory per role" (docs/results.md, in "## Consumer links")."""
    lines = ["Peak memory of each role (`--rss-roles`: a coordinator and a standby with `--no-train`, then the "
             "trainers, on the loopback; sampled every 0.5 s until every trainer had 3 accepted submissions, H = 4). "
             "VmHWM: the peer process's own peak RSS (the kernel's, no sample can miss it); copies: VmHWM / "
             "(4 bytes × parameters), the process's baseline (Python, torch, hivemind: about 0.4 GiB) included. "
             "Group: the sum of VmRSS of its process group (peer, DHT process, p2pd), as the cast's own sampler "
             "counts it.", "",
             "| run | date · tree · load (1, 5, 15 min) start → end | parameters | role | VmHWM GiB | copies of θ | "
             "group VmRSS GiB | group Pss GiB |", "|---|---|---|---|---|---|---|---|"]
    for run in memory.get("runs", []):
        head = (f"{run['date']} · {run['tree']} · {', '.join(map(str, run['load'][0]))} → "
                f"{', '.join(map(str, run['load'][-1]))}")
        for name, r in run["roles"].items():
            lines.append(f"| {run['label']} | {head} | {run['model_params'] / 1e6:.1f}M | {name}: {r['role']} | "
                         f"{r.get('peer_hwm_bytes', 0) / 2**30:.2f} | {r['fp32_copies']:.1f} | "
                         f"{r.get('group_rss_bytes', 0) / 2**30:.2f} | {r.get('group_pss_bytes', 0) / 2**30:.2f} |")
            head = ""
    return "\n".join(lines)


def role_peaks(results: Path, params: int) -> dict[str, int] | None:
    """The newest ``--rss-roles`` run of bench/results.json's ``wan_memory`` at ``params`` parameters:
    role → its process group's Pss peak (shared pages counted once), or None when there is none."""
    try:
        runs = json.loads(results.read_text()).get("wan_memory", {}).get("runs", [])
    except (OSError, ValueError):
        return None
    runs = [r for r in runs if r.get("model_params") == params and r.get("roles")]
    if not runs:
        return None
    roles = runs[-1]["roles"]
    trainer = max((r["group_pss_bytes"] for r in roles.values() if r.get("role") == "training"), default=None)
    if trainer is None or "coordinator" not in roles or "standby" not in roles:
        return None
    return {"coordinator": roles["coordinator"]["group_pss_bytes"], "standby": roles["standby"]["group_pss_bytes"],
            "trainer": trainer, "label": runs[-1].get("label")}


def check_role_memory(peaks: dict, trainers: int, fraction: float = 0.95) -> dict:
    """The cast's need as the sum of its roles' measured peaks (``role_peaks``): a coordinator, a
    standby and ``trainers`` trainers; refused above ``fraction`` of MemAvailable."""
    need = peaks["coordinator"] + peaks["standby"] + trainers * peaks["trainer"]
    record = {"role_peak_pss_bytes": {k: v for k, v in peaks.items() if k != "label"}, "role_peaks_run": peaks["label"],
              "peers": 2 + trainers}
    return _within_memory(need, record, fraction, f"the cast's role peaks (run {peaks['label']!r})",
                          "Free memory, or run a smaller model (--num-layers)")


def check_memory(peak: int, peers: int, fraction: float = 0.9) -> dict:
    return _within_memory(peers * peak, {"peak_rss_bytes": peak, "peers": peers}, fraction,
                          f"{peers} peers × {peak / 2**30:.2f} GiB peak RSS",
                          "Free memory, run on a larger machine or a smaller model (--tiny); the peak is that of one "
                          "peer that trains and coordinates at once, so --peak-rss-gib (e.g. its Pss) may replace it")


def _within_memory(need: int, record: dict, fraction: float, what: str, advice: str) -> dict:
    """``record`` with MemAvailable and ``need``; SystemExit when ``need`` is above ``fraction`` of it."""
    avail = mem_available()
    if need > fraction * avail:
        raise SystemExit(f"{what}: {need / 2**30:.1f} GiB, above {100 * fraction:.0f}% of MemAvailable "
                         f"({avail / 2**30:.1f} GiB): refusing to start. {advice}")
    return {**record, "mem_available_bytes": avail, "needed_bytes": need}


# ------------------------------------------------------------------------------ calibration
def payload_bytes(shapes: list[tuple[int, ...]], compression: str) -> tuple[int, bool]:
    """Bytes of one message of tensors of ``shapes`` in ``compression`` (each distinct shape encoded
    once); (bytes, measured): a compression this tree's wire does not know is taken as 8bit."""
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple[int, ...], int] = {}
    for s in shapes:
        counts[s] = counts.get(s, 0) + 1
    total, measured = 0, True
    for s, k in counts.items():
        t = 1e-3 * torch.randn(s, generator=g)
        try:
            _, data = encode_tensors([t], compression)
        except ValueError:
            _, data = encode_tensors([t], "8bit")
            measured = False
        total += k * len(data)
    return total, measured


def calibrate(opts) -> dict:
    """Time inner steps of the run's model here; the H whose compute is 2 × one submission's transfer."""
    from heloco_p2p.local import InnerTrainer, build_model, trainable_params

    torch.set_num_threads(opts.threads)
    cfg = checked_config(opts, "none")  # the model and the inner loop; the reply is only sized
    B, L = cfg.inner.batch_size, cfg.data.seq_len
    g = torch.Generator().manual_seed(0)
    batches = iter(lambda: torch.randint(0, cfg.model.vocab_size, (B, L), generator=g), None)
    model = build_model(cfg.model, seed=0)
    trainer = InnerTrainer(model, cfg.inner, batches)
    trainer.run_round(None, 2)  # first-call allocations and AdamW state
    t = time.perf_counter()
    trainer.run_round(None, opts.calibrate_steps)
    step = (time.perf_counter() - t) / opts.calibrate_steps
    shapes = [tuple(p.shape) for p in trainable_params(model)]
    up, _ = payload_bytes(shapes, opts.compression)
    down, measured = payload_bytes(shapes, opts.reply_compression)
    fp32 = 4 * sum(math.prod(s) for s in shapes)
    tr, sv = opts.trainer_mbit * 1e6 / 8, opts.server_mbit * 1e6 / 8
    parts = {"upload": up / tr, "forward to the standby": up / sv, "reply": down / min(tr, sv)}
    transfer = sum(parts.values())
    H = max(1, math.ceil(2 * transfer / step))
    out = {"step_seconds": step, "threads": opts.threads, "params": sum(math.prod(s) for s in shapes),
           "up_bytes": up, "reply_bytes": down, "reply_measured": measured, "fp32_reply_bytes": fp32,
           "transfer_seconds": transfer, "transfer_parts": parts, "suggested_steps_per_round": H,
           "fp32_reply_transfer_seconds": up / tr + up / sv + fp32 / min(tr, sv)}
    print(f"[wan] {out['params'] / 1e6:.1f}M parameters, batch {B} × {L}, AdamW fp32, {opts.threads} thread(s): "
          f"{step:.2f} s per inner step (mean of {opts.calibrate_steps})")
    print(f"[wan] one submission: {up / 1e6:.1f} MB up ({opts.compression}), {down / 1e6:.1f} MB reply "
          f"({opts.reply_compression}{'' if measured else ': not in this tree, sized as 8bit'}); at "
          f"{opts.trainer_mbit:g} / {opts.server_mbit:g} Mbit/s: "
          + ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()) + f" = {transfer:.1f} s "
          f"(fp32 reply: {out['fp32_reply_transfer_seconds']:.1f} s)")
    print(f"[wan] suggested --steps-per-round {H} (compute {H * step:.0f} s per round ≈ 2 × {transfer:.1f} s)")
    return out


# ------------------------------------------------------------------------------ results
def wan_results(opts, runs: dict[str, dict], memory: dict | None, command: str, loads: list) -> dict:
    main_run = runs[opts.reply_compression] if opts.reply_compression in runs else next(iter(runs.values()))
    fp32 = runs.get("none")
    rates = cast_rates(opts)
    return {
        "model_params": main_run["model_params"],
        "link_mbit": {n: {"up": u, "down": d} for n, (u, d) in rates.items()},
        "utilization": main_run["utilization"],
        "utilization_fp32_reply": fp32["utilization"] if fp32 else None,
        "bits_per_param_up": main_run["bits_per_param_up"],
        "bits_per_param_down": main_run["bits_per_param_down"],
        "per_compression": {r: {k: run[k] for k in ("bits_per_param_up", "bits_per_param_down", "utilization",
                                                    "reply_resync", "drift_rel_l2_max", "commits_per_minute",
                                                    "coordinator_cpu_s_per_submission", "submissions")}
                            for r, run in runs.items()},
        "drift_rel_l2_max": main_run["drift_rel_l2_max"],
        "reply_resync": main_run["reply_resync"],
        "join_seconds": {n: {"ready": t["join_ready_s"], "first_accepted": t["join_first_accepted_s"]}
                         for n, t in main_run["trainers"].items()},
        "coordinator_cpu_s_per_submission": {"before": fp32["coordinator_cpu_s_per_submission"] if fp32 else None,
                                             "after": main_run["coordinator_cpu_s_per_submission"]
                                             if main_run is not fp32 else None},
        "commits_per_minute": {r: run["commits_per_minute"] for r, run in runs.items()},
        "link_bytes": {r: {n: {k: v for k, v in link.items() if k in ("up_bytes", "down_bytes", "peak_mbit", "run_bytes")}
                           for n, link in run["links"].items()} for r, run in runs.items()},
        "rss_peak_mib": {r: run["rss_peak_mib"] for r, run in runs.items()},
        "memory": memory,
        "cast": [{"name": n, "region": r, "role": role, "up_mbit": rates[n][0], "down_mbit": rates[n][1]}
                 for (n, r), role in [(s, "coordinator (--no-train)") for s in SERVERS[:1]]
                 + [(s, "standby (--no-train)") for s in SERVERS[1:]] + [(t, "training") for t in TRAINERS]],
        "model": "tiny (launcher.write_test_config)" if opts.tiny else
                 f"gpu-125m shape{f' with {opts.num_layers} layers' if opts.num_layers else ''}, AdamW fp32, "
                 f"batch 1 × {opts.seq_len}",
        "steps_per_round": checked_config(opts, opts.reply_compression).inner.steps_per_round,
        "compression": opts.compression, "minutes": opts.minutes, "threads_per_peer": opts.threads,
        "command": command, "date": datetime.date.today().isoformat(), "tree": git_tree(ROOT),
        "machine": bench_wire.machine(), "load": {"start": loads[0], "end": loads[1]},
        "runs": runs,
    }


def merge_results(path: Path, wan: dict, key: str = "wan") -> None:
    """bench/results.json with its ``key`` key replaced (every other key kept as it is). ``lowbit``
    (the simulator's uplink figures, which no testnet run measures) is kept from the old value."""
    results = json.loads(path.read_text()) if path.exists() else {}
    old = results.get(key)
    if isinstance(old, dict) and "lowbit" in old and "lowbit" not in wan:
        wan = {**wan, "lowbit": old["lowbit"]}
    results[key] = wan
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def _f(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def render(wan: dict, memory_roles: dict | None = None) -> str:
    """The Markdown of docs/results.md's "## Consumer links" (with ``memory_roles``, bench/results.json's
    ``wan_memory``, its "### Memory per role")."""
    runs = wan["runs"]
    trainers = [n for n, _ in TRAINERS]
    rates = wan["link_mbit"]
    lines = [f"{wan['date']} · {wan['machine']} · `{wan['command']}` · tree {wan['tree']} · load average (1, 5, 15 min) "
             f"at the start {', '.join(map(str, wan['load']['start']))}, at the end "
             f"{', '.join(map(str, wan['load']['end']))}.", "",
             f"{wan['model']}, {wan['model_params'] / 1e6:.1f}M parameters, H = {wan['steps_per_round']}, "
             f"{wan['compression']} uplink, {wan['threads_per_peer']} thread(s) per peer, {wan['minutes']:g} min per "
             "run after every trainer was ready. Each peer in a network namespace of its own, tbf rates each way: "
             + ", ".join(f"{c['name']} ({c['region']}, {c['role']}) {c['up_mbit']:g}/{c['down_mbit']:g} Mbit/s"
                         for c in wan["cast"]) + ".", "",
             "| reply | utilisation (" + ", ".join(trainers) + ") | bits/param up | bits/param down | "
             "reply drift (rel. L2, max) | resyncs | commits/min | coordinator CPU s per commit | "
             "join: ready / first accepted, s (median) | peak link rate, trainers' down (Mbit/s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for reply, r in runs.items():
        joins = [t for t in r["trainers"].values()]
        ready = [t["join_ready_s"] for t in joins if t["join_ready_s"] is not None]
        first = [t["join_first_accepted_s"] for t in joins if t["join_first_accepted_s"] is not None]
        lines.append(
            f"| {reply} | " + ", ".join(_f(r["utilization"][n], ".3f") for n in trainers)
            + f" | {_f(r['bits_per_param_up'])} | {_f(r['bits_per_param_down'])} | {_f(r['drift_rel_l2_max'], '.1e')} | "
            f"{_f(r['reply_resync'], '.0f')} | {_f(r['commits_per_minute'], '.1f')} | "
            f"{_f(r['coordinator_cpu_s_per_submission'])} | "
            f"{_f(statistics.median(ready) if ready else None, '.0f')} / {_f(statistics.median(first) if first else None, '.0f')} | "
            + ", ".join(f"{r['links'][n]['peak_mbit']['down']:.1f} of {rates[n]['down']:g}" for n in trainers) + " |")
    mem = wan.get("memory")
    if mem and "role_peak_pss_bytes" in mem:
        peaks = mem["role_peak_pss_bytes"]
        lines += ["", f"Memory: the roles' peaks (process group Pss, `--rss-roles` run {mem['role_peaks_run']!r}) "
                  f"coordinator {peaks['coordinator'] / 2**30:.2f}, standby {peaks['standby'] / 2**30:.2f}, trainer "
                  f"{peaks['trainer'] / 2**30:.2f} GiB; the cast of {mem['peers']} needs "
                  f"{mem['needed_bytes'] / 2**30:.1f} GiB if every peak coincided, of "
                  f"{mem['mem_available_bytes'] / 2**30:.1f} GiB available."]
    elif mem:
        lines += ["", f"One peer's peak RSS (its process group): {mem['peak_rss_bytes'] / 2**30:.2f} GiB; "
                  f"{mem['peers']} peers need {mem['needed_bytes'] / 2**30:.1f} GiB of "
                  f"{mem['mem_available_bytes'] / 2**30:.1f} GiB available."]
    lines += ["", "Utilisation: time in inner steps / wall time from the end of a trainer's first round to the end of "
              "its last (scripts/bench.py's steady_utilization). Bits per parameter: the `ack` events' bytes × 8 / "
              "parameters, mean per submission. Coordinator CPU: its process group (peer, DHT process, p2pd) over "
              "the measured window, per commit it made. Peak link rate: the busiest "
              f"{RATE_WINDOW:g} s of the veth's counters."]
    if memory_roles:
        lines += ["", MEMORY_HEADING, "", render_memory(memory_roles)]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test model on 20 / 80 Mbit/s links (tests)")
    ap.add_argument("--minutes", type=float, default=None, help="per run, after every trainer is ready "
                    "(default 15; --tiny 1)")
    ap.add_argument("--steps-per-round", type=int, default=None,
                    help=f"H (default {DEFAULT_H}; --tiny: write_test_config's; see --calibrate)")
    ap.add_argument("--compression", default="8bit", help="swarm.compression (uplink)")
    ap.add_argument("--reply-compression", default="wrap8", help="swarm.reply_compression (passed through)")
    ap.add_argument("--compare", action="store_true", help="also a run with fp32 replies (none)")
    ap.add_argument("--trainer-mbit", type=float, default=None, help="trainers' links each way (50; --tiny 20)")
    ap.add_argument("--server-mbit", type=float, default=None,
                    help="coordinator's and standby's links each way (200; --tiny 80)")
    ap.add_argument("--lease-seconds", type=float, default=None, help="swarm.lease_seconds (45; --tiny 6)")
    ap.add_argument("--submit-timeout", type=float, default=None, help="swarm.submit_timeout (900; --tiny 120)")
    ap.add_argument("--seq-len", type=int, default=32, help="125M: tokens per block")
    ap.add_argument("--num-layers", type=int, default=None,
                    help="the model's layers (default gpu-125m's 13: 126M parameters; 10: 97M)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    ap.add_argument("--join-timeout", type=float, default=None, help="seconds for each start step (900; --tiny 180)")
    ap.add_argument("--calibrate", action="store_true", help="time inner steps here, print the H to use, exit")
    ap.add_argument("--calibrate-steps", type=int, default=3)
    ap.add_argument("--rss-only", action="store_true", help="one peer's peak RSS at the run's size, then exit")
    ap.add_argument("--rss-seconds", type=float, default=60.0)
    ap.add_argument("--rss-roles", action="store_true",
                    help="each role's peak RSS (coordinator, standby, trainers; loopback, no namespaces), then exit")
    ap.add_argument("--rss-trainers", type=int, default=1, help="--rss-roles: training peers (1-3)")
    ap.add_argument("--rss-acks", type=int, default=3, help="--rss-roles: accepted submissions per trainer")
    ap.add_argument("--rss-label", default=None, help="--rss-roles: the run's name in bench/results.json (the tree)")
    ap.add_argument("--peak-rss-gib", type=float, default=None, help="skip the RSS measurement: use this peak")
    ap.add_argument("--role-peaks", action="store_true",
                    help="check memory against the sum of each role's peak (Pss) from the newest --rss-roles run "
                         "at this size in --results, instead of 5 × one peer's peak")
    ap.add_argument("--out", type=Path, default=None, help="run directories (default: a new /tmp/wan-* directory)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json",
                    help="the results file whose `wan` key is written")
    ap.add_argument("--write-results", action="store_true", help=f"replace '{HEADING}' in docs/results.md")
    opts = ap.parse_args(argv)
    size_defaults(opts, (("minutes", 15.0, 1.0), ("trainer_mbit", 50.0, 20.0), ("server_mbit", 200.0, 80.0),
                         ("lease_seconds", 45.0, 6.0), ("submit_timeout", 900.0, 120.0), ("join_timeout", 900.0, 180.0)))
    return opts


def size_defaults(opts, table) -> None:
    """Fill the options left unset: (key, the full-size default, the ``--tiny`` default) rows; a
    tiny run also takes write_test_config's block length."""
    for key, big, small in table:
        if getattr(opts, key) is None:
            setattr(opts, key, small if opts.tiny else big)
    if opts.tiny:
        opts.seq_len = 64  # write_test_config's


def main(argv=None) -> dict | None:
    opts = parse_args(argv)
    command = "python " + " ".join(["scripts/wan_testnet.py"] + (sys.argv[1:] if argv is None else list(argv)))
    if opts.calibrate:
        calibrate(opts)
        return None
    out = opts.out or Path(tempfile.mkdtemp(prefix="wan-", dir="/tmp"))
    replies = [opts.reply_compression] + (["none"] if opts.compare and opts.reply_compression != "none" else [])
    for reply in replies:  # refuse an unknown compression before anything starts
        checked_config(opts, reply)
    if opts.rss_roles:
        run = measure_roles(opts, out / "roles")
        memory = merge_memory(opts.results, {**run, "command": command})
        print(f"[wan] wrote {opts.results} (key wan_memory, run {run['label']!r})")
        if opts.write_results:
            path = ROOT / "docs" / "results.md"
            path.write_text(replace_section(path.read_text(), MEMORY_HEADING, render_memory(memory)))
        return None
    memory = None
    if opts.role_peaks and not opts.tiny:
        peaks = role_peaks(opts.results, sum(math.prod(s) for s in layout(opts)))
        if peaks is None:
            raise SystemExit(f"--role-peaks: {opts.results} has no --rss-roles run at this model size; run "
                             "`python scripts/wan_testnet.py --rss-roles` with the same --num-layers first")
        memory = check_role_memory(peaks, len(TRAINERS))
        print(f"[wan] memory: role peaks (Pss, run {peaks['label']!r}) sum to {memory['needed_bytes'] / 2**30:.1f} GiB "
              f"of {memory['mem_available_bytes'] / 2**30:.1f} GiB available", flush=True)
    elif opts.rss_only or not opts.tiny:
        peak = int(opts.peak_rss_gib * 2**30) if opts.peak_rss_gib and not opts.rss_only else \
            measure_rss(opts, out / "rss")
        if opts.rss_only:
            print(f"peak RSS {peak / 2**30:.2f} GiB; MemAvailable {mem_available() / 2**30:.1f} GiB")
            return None
        memory = check_memory(peak, len(SERVERS) + len(TRAINERS))
    ok, why = netns.available()
    if not ok:
        raise SystemExit(f"network namespaces are not available here: {why}")
    load_start = load()
    runs = {}
    for reply in replies:
        runs[reply] = run_cast(opts, reply, out / f"reply-{reply}")
        r = runs[reply]
        print(f"[wan] reply {reply}: utilisation " + ", ".join(f"{n} {_f(u, '.3f')}" for n, u in r["utilization"].items())
              + f"; bits/param up {_f(r['bits_per_param_up'])} down {_f(r['bits_per_param_down'])}; "
              f"{_f(r['commits_per_minute'], '.1f')} commits/min; coordinator "
              f"{_f(r['coordinator_cpu_s_per_submission'])} CPU s per commit", flush=True)
    wan = wan_results(opts, runs, memory, command, [load_start, load()])
    merge_results(opts.results, wan)
    report = render(wan, json.loads(opts.results.read_text()).get("wan_memory"))
    print(report)
    print(f"[wan] wrote {opts.results} (key wan); run directories under {out}")
    if opts.write_results:
        path = ROOT / "docs" / "results.md"
        path.write_text(replace_section(path.read_text(), HEADING, report))
    return wan


if __name__ == "__main__":
    main()
