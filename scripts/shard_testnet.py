#!/usr/bin/env python
"""Sharded coordination on shaped links: the same cast on network namespaces with tbf-shaped
links (heloco_p2p/tools/netns.py), run with ``swarm.shards`` S = 1, 2 and 4, measured for the
bytes on the busiest link per round, the trainers' utilisation and the commits per shard; and a
failover: after the measured window of the S = 2 run (``--failover-shards``), still in the steady
state, the holder of shard S-1 is SIGKILLed (its process group) while the other shards commit.

    python scripts/shard_testnet.py                              # S = 1, 2, 4 and the failover (S = 2)
    python scripts/shard_testnet.py --write-results              # ... and docs/results.md "## Sharded coordination"
    python scripts/shard_testnet.py --tiny --shards 1,2 --minutes 0.3   # the tiny model (tests/test_shard_testnet.py)
    python scripts/shard_testnet.py --calibrate                  # the H and link rate the defaults would use, then exit

The cast (identical for every S): four nodes started with ``--no-train`` (node-a founds the run,
then node-b, node-c, node-d), which hold the coordinator / shard roles and stand by; the
trainers start only once every shard has a holder among them (no node holding two) and a
standby. Then four training peers (berlin de, paris fr, moscow ru, madrid es: peers/*.yaml's
names and regions, the built-in corpus of docs/data.md). Every node's link has the same tbf rate
each way (``--mbit``). The run config is scripts/wan_testnet.py's (``run_tree``: gpu-125m's shape
with ``--num-layers`` layers, AdamW fp32 on the CPU, batch 1 × 32 tokens, 8bit uplink) with
``swarm.shards`` S, ``swarm.defence.screen: false`` and 8bit replies for every S (S > 1 refuses
the loss screen and wrap8 replies); ``num_standbys: 1``.

Defaults: the model has 2 layers (22.0M parameters: eight processes of it fit a 24 GiB machine;
``--num-layers``). Without ``--mbit`` / ``--steps-per-round`` the script first times inner steps
with the four trainers' processes running at once (the CPU they will share), takes H so that a
round computes about ``--round-seconds``, and the link rate at which compute per round is 2 × one
trainer's transfer (upload, forward to a standby, reply), as scripts/wan_testnet.py's
``--calibrate`` does. At S = 1 the hub then carries K replies and K forwarded Δs up per round
(8/6 of the compute time at K = 4): it is the bottleneck, while a trainer's own link is busy a
third of a round.

Memory: one peer's peak RSS at the run's size (wan_testnet.measure_rss: a peer that trains and
coordinates), times 8 processes, must stay under 90% of MemAvailable (wan_testnet.check_memory).

What is recorded per S (bench/results.json key ``shards``; every other key is kept) is described
in ``ROUND_DEFINITION`` and the docs section. Namespaces and processes are removed on every exit
path (NetnsTestnet, LocalSwarm.close; SIGTERM becomes SystemExit).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_wire  # noqa: E402
import wan_testnet as wan  # noqa: E402

import bench  # noqa: E402
from heloco_p2p.swarm.lifetime import kill_group  # noqa: E402
from heloco_p2p.tools import netns  # noqa: E402
from heloco_p2p.tools.launcher import LocalSwarm  # noqa: E402
from heloco_p2p.tools.report import git_tree, replace_section  # noqa: E402

HEADING = "## Sharded coordination"
AFTER = "## Consumer links"  # the section goes after this one when docs/results.md has none yet
SERVERS = (("node-a", "de"), ("node-b", "fr"), ("node-c", "ru"), ("node-d", "es"))  # --no-train
TRAINERS = (("berlin", "de"), ("paris", "fr"), ("moscow", "ru"), ("madrid", "es"))  # peers/*.yaml
DEFAULT_LAYERS = 2  # 22.0M parameters: 8 processes fit a 24 GiB machine with margin
REPLY = "8bit"  # what every S accepts (S > 1 refuses wrap8)
ROUND_DEFINITION = ("one round = one acknowledged pseudo-gradient of every trainer: the trainers' acknowledged "
                    "parts in the measured window (ack events, each (trainer, shard, seq) once: an ack answered "
                    "'duplicate' to a resent part counts, it is the first ack that part got) / (S × number of "
                    "trainers); "
                    "bytes per round = a veth's bytes in the window (tx + rx, Ethernet frames as tbf counts them, "
                    "replication and DHT traffic included) / rounds")


# ------------------------------------------------------------------------------ options and config
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test model on 20 Mbit/s links (tests)")
    ap.add_argument("--shards", default="1,2,4", help="the values of swarm.shards to run, comma-separated")
    ap.add_argument("--failover-shards", type=int, default=2,
                    help="S of the failover run (0: none); the holder of shard S-1 is SIGKILLed")
    ap.add_argument("--minutes", type=float, default=None, help="measured steady state per S (default 6; --tiny 0.4)")
    ap.add_argument("--failover-after", type=float, default=None,
                    help="minutes of steady state before the kill when S of the failover is not in --shards (its "
                         "run is then a cast of its own; else the kill follows that S's measured window; default 2; "
                         "--tiny 0.2)")
    ap.add_argument("--failover-tail", type=float, default=None,
                    help="minutes after the heir's first commit (default 2; --tiny 0.2)")
    ap.add_argument("--num-layers", type=int, default=None,
                    help=f"the model's layers (gpu-125m's shape; default {DEFAULT_LAYERS}: 22.0M parameters; 13: 126M)")
    ap.add_argument("--seq-len", type=int, default=32, help="tokens per block (not --tiny)")
    ap.add_argument("--steps-per-round", type=int, default=None, help="H (default: from --round-seconds)")
    ap.add_argument("--round-seconds", type=float, default=40.0,
                    help="without --steps-per-round: H so that a round computes about this long")
    ap.add_argument("--mbit", type=float, default=None,
                    help="every link's rate each way (default: compute per round = 2 × one trainer's transfer; "
                         "--tiny 20)")
    ap.add_argument("--compression", default="8bit", help="swarm.compression (uplink)")
    ap.add_argument("--lease-seconds", type=float, default=None, help="swarm.lease_seconds (45; --tiny 6)")
    ap.add_argument("--submit-timeout", type=float, default=None, help="swarm.submit_timeout (900; --tiny 120)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per peer")
    ap.add_argument("--join-timeout", type=float, default=None, help="seconds for each start step (900; --tiny 180)")
    ap.add_argument("--calibrate", action="store_true", help="print the H and link rate the run would use, exit")
    ap.add_argument("--calibrate-steps", type=int, default=4)
    ap.add_argument("--step-worker", action="store_true", help=argparse.SUPPRESS)  # one process of the calibration
    ap.add_argument("--rederive", action="store_true",
                    help="recompute the per-round figures of --results' `shards` key from its runs' directories "
                         "(nothing is started); with --write-results also the docs section")
    ap.add_argument("--rss-seconds", type=float, default=60.0)
    ap.add_argument("--peak-rss-gib", type=float, default=None, help="skip the RSS measurement: use this peak")
    ap.add_argument("--out", type=Path, default=None, help="run directories (default: a new /tmp/shardnet-* one)")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results.json",
                    help="the results file whose `shards` key is written")
    ap.add_argument("--write-results", action="store_true", help=f"replace '{HEADING}' in docs/results.md")
    opts = ap.parse_args(argv)
    tiny = opts.tiny
    wan.size_defaults(opts, (("minutes", 6.0, 0.4), ("failover_after", 2.0, 0.2), ("failover_tail", 2.0, 0.2),
                             ("lease_seconds", 45.0, 6.0), ("submit_timeout", 900.0, 120.0), ("join_timeout", 900.0, 180.0)))
    if tiny:
        if opts.mbit is None and not opts.calibrate:
            opts.mbit = 20.0
    elif opts.num_layers is None:
        opts.num_layers = DEFAULT_LAYERS
    opts.shard_list = [int(x) for x in opts.shards.split(",") if x.strip()]
    # what wan_testnet's config writer and memory check read
    opts.reply_compression = REPLY
    opts.swarm_extra = {"defence": {"screen": False}}
    return opts


def with_shards(opts, shards: int) -> argparse.Namespace:
    """``opts`` whose run config (wan_testnet.run_tree) has ``swarm.shards: shards``."""
    return argparse.Namespace(**{**vars(opts), "swarm_extra": {**opts.swarm_extra, "shards": shards}})


def rates(opts) -> dict[str, tuple[float, float]]:
    return {n: (opts.mbit, opts.mbit) for n, _ in SERVERS + TRAINERS}


def n_params(opts) -> int:
    return sum(math.prod(s) for s in wan.layout(opts))


# ------------------------------------------------------------------------------ calibration
def step_worker(opts) -> None:
    """One process of the calibration: wan_testnet.calibrate's timing, its result as a JSON last line."""
    ns = argparse.Namespace(**{**vars(opts), "trainer_mbit": opts.mbit or 50.0, "server_mbit": opts.mbit or 50.0})
    out = wan.calibrate(ns)
    print("STEP " + json.dumps({"step_seconds": out["step_seconds"], "up_bytes": out["up_bytes"],
                                "reply_bytes": out["reply_bytes"], "params": out["params"]}), flush=True)


def calibrate(opts, workdir: Path) -> dict:
    """Time inner steps with the trainers' processes running at once; choose H and the link rate
    (module docstring). Sets ``opts.steps_per_round`` and ``opts.mbit`` where they were not given."""
    workdir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, str(Path(__file__).resolve()), "--step-worker", "--threads", str(opts.threads),
            "--calibrate-steps", str(opts.calibrate_steps), "--seq-len", str(opts.seq_len),
            "--compression", opts.compression] + (["--tiny"] if opts.tiny else ["--num-layers", str(opts.num_layers)])
    procs = []
    try:
        for i in range(len(TRAINERS)):
            log = open(workdir / f"step-{i}.log", "w")
            procs.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                          start_new_session=True))
        for p in procs:
            p.wait(900)
    finally:
        for p in procs:
            if p.poll() is None:
                kill_group(p.pid)
                p.wait(10)
    results = []
    for i in range(len(procs)):
        text = (workdir / f"step-{i}.log").read_text()
        line = next((x for x in reversed(text.splitlines()) if x.startswith("STEP ")), None)
        if line is None:
            raise SystemExit(f"the calibration process {i} failed:\n{text[-3000:]}")
        results.append(json.loads(line[5:]))
    step = statistics.median(r["step_seconds"] for r in results)
    up, down = results[0]["up_bytes"], results[0]["reply_bytes"]
    H = opts.steps_per_round or max(1, math.ceil(opts.round_seconds / step))
    compute = H * step
    per_trainer = 2 * up + down  # upload, forward to a standby, reply: one trainer's transfer per round
    mbit = opts.mbit or round(8 * 2 * per_trainer / compute / 1e6, 1)
    opts.steps_per_round, opts.mbit = H, mbit
    rate = mbit * 1e6 / 8
    K = len(TRAINERS)
    out = {"step_seconds_parallel": step, "processes": len(results), "steps_per_round": H,
           "compute_seconds_per_round": compute, "up_bytes": up, "reply_bytes": down, "mbit": mbit,
           "trainer_transfer_seconds": per_trainer / rate,
           "hub_uplink_seconds_per_round_s1": K * (up + down) / rate, "params": results[0]["params"]}
    print(f"[shards] {results[0]['params'] / 1e6:.1f}M parameters: {step:.3f} s per inner step with {len(results)} "
          f"trainer processes at once; H = {H}: {compute:.0f} s of compute per round", flush=True)
    print(f"[shards] link rate {mbit:g} Mbit/s each way: one trainer's transfer {per_trainer / rate:.1f} s per round "
          f"(upload {up / 1e6:.1f} MB, forward, reply {down / 1e6:.1f} MB); at S = 1 the hub's uplink needs "
          f"{out['hub_uplink_seconds_per_round_s1']:.0f} s per round of every trainer (K = {K})", flush=True)
    return out


# ------------------------------------------------------------------------------ placement (heartbeats)
def placement(sw: LocalSwarm, shards: int, stale: float) -> dict[str, dict]:
    """shard → {"holder", "standbys"} as each running node's latest heartbeat (fresh within
    ``stale`` s) says: its ``shards`` roles (S > 1) or its role (S = 1). ``holders`` lists every
    node that says it coordinates the shard (more than one: a moment of a handover)."""
    now = time.time()
    out = {str(k): {"holder": None, "holders": [], "standbys": []} for k in range(shards)}
    for name, proc in sw.procs.items():
        if proc.poll() is not None:
            continue
        beats = sw.events(name, "heartbeat")
        if not beats or now - beats[-1]["time"] > stale:
            continue
        beat = beats[-1]
        roles = beat.get("shards") or ({"0": beat.get("role")} if shards == 1 else {})
        for k, role in roles.items():
            if k in out and role == "coordinator":
                out[k]["holders"].append(name)
            elif k in out and role == "standby":
                out[k]["standbys"].append(name)
    for p in out.values():
        p["holder"] = p["holders"][0] if len(p["holders"]) == 1 else None
        p["standbys"].sort()
    return out


def servers_placed(place: dict, shards: int) -> bool:
    """Every shard has one holder, a node started --no-train, no node holds two (S ≤ 4), and a
    standby; where a --no-train node holds no shard, no standby holds another shard (the free
    node stands by instead: the protocol's placement, once it has settled)."""
    holders = [p["holder"] for p in place.values()]
    servers = {n for n, _ in SERVERS}
    if not (all(h in servers for h in holders) and len(set(holders)) == min(shards, len(servers))
            and all(p["standbys"] for p in place.values())):
        return False
    return len(servers) <= shards or not any(set(p["standbys"]) & set(holders) for p in place.values())


def _shard(e: dict) -> int:
    return int(e.get("shard", 0) or 0)


def trainer_acks(sw: LocalSwarm, name: str) -> list[dict]:
    return [a for a in sw.events(name, "ack") if not a.get("duplicate")]


# ------------------------------------------------------------------------------ one run of the cast
class Stable:
    """A predicate for wait_until: ``cond()`` holds and ``key()`` has not changed for ``seconds``."""

    def __init__(self, cond, key, seconds: float):
        self.cond, self.key, self.seconds = cond, key, seconds
        self.last, self.since = None, time.time()

    def __call__(self) -> bool:
        k = self.key()
        if k != self.last:
            self.last, self.since = k, time.time()
        return self.cond() and time.time() - self.since >= self.seconds


def _key(place: dict) -> str:
    return json.dumps({k: (p["holder"], p["standbys"]) for k, p in place.items()}, sort_keys=True)


def run_cast(opts, shards: int, workdir: Path, failover: bool = False) -> dict:
    """Start the cast with ``swarm.shards: shards``, wait for the steady state and measure for
    ``opts.minutes``; with ``failover``, then (still in the steady state) SIGKILL the holder of
    shard S-1 and wait for its heir's first commit and ``--failover-tail`` more (the figures of
    the kill: ``failover_summary``). Every namespace and process is gone when this returns or raises."""
    workdir.mkdir(parents=True, exist_ok=True)
    sopts = with_shards(opts, shards)
    cfg = wan.write_config(workdir / "run.yaml", sopts, REPLY)
    link = rates(opts)
    beat = opts.lease_seconds / 6
    stale = max(3 * beat, 10.0)  # a heartbeat this old is a node's last word (a loaded machine delays them)
    servers, trainers = [n for n, _ in SERVERS], [n for n, _ in TRAINERS]
    extra = ["--threads", str(opts.threads)]
    started: dict[str, float] = {}
    marks: dict = {}
    t_start = time.time()
    tag = f"S={shards}{' failover' if failover else ''}"
    at = lambda: f"{time.time() - t_start:.0f} s"  # noqa: E731
    with netns.NetnsTestnet(list(link), rates=link) as net:
        sw = LocalSwarm(workdir, f"shardnet-{uuid.uuid4().hex[:8]}", netns=net)
        sampler = wan.Sampler(sw, net)
        try:
            sampler.start()
            marks["load_start"] = wan.load()
            (first, region), rest = SERVERS[0], SERVERS[1:]
            started[first] = time.time()
            sw.start(first, region, "--config", str(cfg), "--no-train", *extra)
            sw.wait_until(lambda: sw.events(first, "train_start"), opts.join_timeout, f"{first} founding the run")
            for n, r in rest:
                started[n] = time.time()
                sw.start(n, r, "--no-train", *extra)
            settled = Stable(lambda: servers_placed(placement(sw, shards, stale), shards),
                             lambda: _key(placement(sw, shards, stale)), 2 * beat)
            sw.wait_until(settled, opts.join_timeout, f"every shard held by a --no-train node with a standby ({tag})")
            marks["placement_before_trainers"] = placement(sw, shards, stale)
            print(f"[shards] {tag}, {at()}: placed " + _fmt_place(marks["placement_before_trainers"]) + "; starting the trainers",
                  flush=True)
            for n, r in TRAINERS:
                started[n] = time.time()
                sw.start(n, r, *extra)

            def every_trainer_acked() -> bool:
                return all({_shard(a) for a in trainer_acks(sw, n)} >= set(range(shards)) for n in trainers) \
                    and all(p["holder"] for p in placement(sw, shards, stale).values())

            steady = Stable(every_trainer_acked, lambda: _key(placement(sw, shards, stale)), 2 * beat)
            sw.wait_until(steady, opts.join_timeout, f"an acknowledged round of every trainer on every shard ({tag})")
            t0 = time.time()
            bytes0 = {n: net.link_bytes(n) for n in link}
            cpu0 = {n: bench.group_cpu_seconds(sw.procs[n].pid) for n in servers}
            marks["placement_start"] = placement(sw, shards, stale)
            print(f"[shards] {tag}, {at()}: steady state ({_fmt_place(marks['placement_start'])}); measuring", flush=True)
            sw.wait_until(lambda: time.time() >= t0 + 60 * opts.minutes, 60 * opts.minutes + 60, "the window's end")
            t1 = time.time()
            bytes1 = {n: net.link_bytes(n) for n in link}
            cpu1 = {n: bench.group_cpu_seconds(sw.procs[n].pid) for n in servers}
            marks["placement_end"] = placement(sw, shards, stale)
            marks["load_end"] = wan.load()
            if failover:
                victim_shard = shards - 1
                victim = placement(sw, shards, stale)[str(victim_shard)]["holder"]
                if victim is None:
                    raise RuntimeError(f"shard {victim_shard} has no single holder to kill")
                marks["placement_at_kill"] = placement(sw, shards, stale)
                marks["killed"], marks["killed_shard"] = victim, victim_shard
                marks["killed_at"] = time.time()
                sw.kill(victim)
                print(f"[shards] {tag}, {at()}: SIGKILLed {victim}, the holder of shard {victim_shard}", flush=True)

                def heir_commit():
                    takeovers = [(n, e) for n in sw.procs if n != victim for e in sw.events(n, "takeover")
                                 if _shard(e) == victim_shard and not e.get("handover")
                                 and e["time"] > marks["killed_at"]]
                    if not takeovers:
                        return None
                    heir, ev = min(takeovers, key=lambda x: x[1]["time"])
                    commits = [e for e in sw.events(heir, "commit") if _shard(e) == victim_shard
                               and e["time"] >= ev["time"]]
                    return (heir, ev, min(commits, key=lambda e: e["time"])) if commits else None

                sw.wait_until(heir_commit, opts.join_timeout, f"a commit of shard {victim_shard} under its heir")
                heir, ev, first_commit = heir_commit()
                marks.update(heir=heir, takeover_at=ev["time"], heir_first_commit_at=first_commit["time"])
                print(f"[shards] {tag}, {at()}: {heir} took shard {victim_shard} over after "
                      f"{ev['time'] - marks['killed_at']:.1f} s, first commit after "
                      f"{first_commit['time'] - marks['killed_at']:.1f} s", flush=True)
                t_tail = time.time()
                sw.wait_until(lambda: time.time() >= t_tail + 60 * opts.failover_tail, 60 * opts.failover_tail + 60,
                              "the end of the failover run")
                marks["failover_end"] = time.time()
                marks["placement_after_failover"] = placement(sw, shards, stale)
                marks["load_after_failover"] = wan.load()
        finally:
            t_close = time.time()
            sampler.stop()
            sw.close()
    print(f"[shards] {tag}, {at()}: every node stopped (in {time.time() - t_close:.0f} s)", flush=True)
    events = {n: sw.events(n) for n in link}
    run = summarize(opts, shards, link, events, started, (t0, t1), bytes0, bytes1, cpu0, cpu1, sampler, marks,
                    workdir)
    if failover:
        run["failover"] = failover_summary(shards, events, marks)
    return run


def _fmt_place(place: dict) -> str:
    return "; ".join(f"shard {k}: {p['holder'] or '/'.join(p['holders']) or '?'} (standby "
                     f"{', '.join(p['standbys']) or 'none'})" for k, p in place.items())


# ------------------------------------------------------------------------------ figures
def commit_chain(events: dict[str, list[dict]], shard: int) -> dict[int, dict]:
    """version → the commit of ``shard`` that is the chain's at that version: of every node's
    commit events (a holder's) and replica events (a standby's: a holder killed after its standby
    applied a commit, before it logged it, has no commit event of it), the one of the highest term
    (a later term replaces a version only where an earlier holder's commit did not become the run's)."""
    chain: dict[int, dict] = {}
    for evs in events.values():
        for e in evs:
            if e.get("event") in ("commit", "replica") and _shard(e) == shard:
                v = int(e["version"])
                if v not in chain or int(e.get("term", 0)) > int(chain[v].get("term", 0)):
                    chain[v] = e
    return chain


def acked_parts(events: dict[str, list[dict]], name: str, window) -> list[dict]:
    """``name``'s acknowledged parts in ``window``: its ack events, the first of each (shard, seq)
    (a resent part answered 'duplicate' had no ack before)."""
    t0, t1 = window
    seen, out = set(), []
    for a in events[name]:
        if a.get("event") == "ack" and t0 <= a["time"] <= t1 and (_shard(a), a["seq"]) not in seen:
            seen.add((_shard(a), a["seq"]))
            out.append(a)
    return out


def round_figures(shards: int, events: dict[str, list[dict]], window, link_window: dict[str, dict]) -> dict:
    """Rounds in ``window`` (ROUND_DEFINITION) and each veth's bytes per round, from the window's
    bytes (``link_window``: name → {"tx", "rx"}) and the trainers' ack events; the resubmissions
    (attempts after the first, each sends its part again) of the acknowledged parts."""
    trainers = [n for n, _ in TRAINERS]
    acked = {n: acked_parts(events, n, window) for n in trainers}
    rounds = sum(len(a) for a in acked.values()) / (shards * len(trainers))
    per_veth = {n: {"tx": b["tx"] / rounds if rounds else None, "rx": b["rx"] / rounds if rounds else None,
                    "total": (b["tx"] + b["rx"]) / rounds if rounds else None} for n, b in link_window.items()}
    busiest = max(per_veth, key=lambda n: per_veth[n]["total"] or 0)
    return {"rounds": rounds, "busiest_link": busiest, "busiest_link_bytes_per_round": per_veth[busiest]["total"],
            "bytes_per_veth_per_round": per_veth, "acked": acked,
            "resubmissions": sum(max(0, int(a.get("attempts") or 1) - 1) for v in acked.values() for a in v),
            "duplicate_acks": sum(1 for v in acked.values() for a in v if a.get("duplicate"))}


def summarize(opts, shards, link, events, started, window, bytes0, bytes1, cpu0, cpu1, sampler, marks,
              workdir) -> dict:
    t0, t1 = window
    minutes = (t1 - t0) / 60
    trainers = [n for n, _ in TRAINERS]
    of = lambda name, kind: [e for e in events[name] if e.get("event") == kind]  # noqa: E731
    inside = lambda e: t0 <= e["time"] <= t1  # noqa: E731
    link_window = {n: {"tx": bytes1[n][0] - bytes0[n][0], "rx": bytes1[n][1] - bytes0[n][1]} for n in link}
    fig = round_figures(shards, events, window, link_window)
    acked, rounds, per_veth, busiest = fig["acked"], fig["rounds"], fig["bytes_per_veth_per_round"], fig["busiest_link"]
    commits: dict[str, set] = {str(k): set() for k in range(shards)}
    for evs in events.values():
        for e in evs:
            if e.get("event") == "commit" and inside(e):
                commits.setdefault(str(_shard(e)), set()).add((e["version"], e.get("digest"), e.get("term")))
    per_trainer = {}
    for n in trainers:
        rs = [r for r in of(n, "round") if inside(r)]
        per_trainer[n] = {
            "utilization": bench.steady_utilization(rs), "rounds": len(rs), "acked_parts": len(acked[n]),
            "rejected": len([e for e in of(n, "rejected") if inside(e)]),
            "median_rtt_s": statistics.median([a["rtt"] for a in acked[n]]) if acked[n] else None,
            "median_compute_s": statistics.median([r["compute_seconds"] for r in rs]) if rs else None,
            "median_wait_s": statistics.median([r.get("wait_seconds", 0.0) for r in rs]) if rs else None,
            "join_first_accepted_s": next((a["time"] - started[n] for a in of(n, "ack")), None)}
    takeovers = [{"node": n, "shard": _shard(e), "time": e["time"], "term": e.get("term")}
                 for n in link for e in of(n, "takeover") if not e.get("handover") and inside(e)]
    handovers = [{"node": n, "shard": _shard(e), "time": e["time"]}
                 for n in link for e in of(n, "takeover") if e.get("handover") and inside(e)]
    return {
        "shards": shards, "window": [t0, t1], "minutes": minutes, "round_definition": ROUND_DEFINITION,
        "rounds": rounds, "busiest_link": busiest,
        "busiest_link_bytes_per_round": per_veth[busiest]["total"],
        "bytes_per_veth_per_round": per_veth, "resubmissions": fig["resubmissions"],
        "duplicate_acks": fig["duplicate_acks"],
        "link_bytes": {n: {"tx": bytes1[n][0] - bytes0[n][0], "rx": bytes1[n][1] - bytes0[n][1],
                           "peak_mbit": sampler.peak_mbit(n, t0, t1)} for n in link},
        "utilization": {n: p["utilization"] for n, p in per_trainer.items()},
        "trainers": per_trainer,
        "commits_per_minute": {"per_shard": {k: len(v) / minutes for k, v in sorted(commits.items())},
                               "total": sum(len(v) for v in commits.values()) / minutes},
        "placement": {k: marks[k] for k in ("placement_before_trainers", "placement_start", "placement_end")},
        "takeovers_in_window": takeovers, "handovers_in_window": handovers,
        "server_cpu_s": {n: cpu1[n] - cpu0[n] for n in cpu0},
        "rss_peak_mib": {n: v / 2**20 for n, v in sampler.rss_peak.items()},
        "load": {"start": marks["load_start"], "end": marks["load_end"]}, "dir": str(workdir)}


FAILOVER_WAIT_AFTER = 60.0  # s after the heir's first commit that the trainers' waits are summed over


def failover_waits(events: dict[str, list[dict]], killed_at: float, first_commit_at: float) -> dict[str, float]:
    """trainer → seconds its rounds waited (overlapped mode: for the previous round's parts) in the
    rounds that ended from the kill to FAILOVER_WAIT_AFTER s after the heir's first commit."""
    return {n: sum(float(e.get("wait_seconds") or 0.0) for e in events[n] if e.get("event") == "round"
                   and killed_at <= e["time"] <= first_commit_at + FAILOVER_WAIT_AFTER) for n, _ in TRAINERS}


def failover_summary(shards: int, events: dict[str, list[dict]], marks: dict) -> dict:
    """The kill's figures: every acknowledged part of the killed shard (the whole run's ack
    events) checked against that shard's final chain (every node's commit and replica events,
    the highest term at each version: ``commit_chain``), the other shards' commits while it had no holder, its stall, and the
    takeovers nothing called for (any but the killed shard's first after the kill, from the
    kill to the end of the run's tail; the shutdown's handovers are not takeovers)."""
    k, killed_at, first = marks["killed_shard"], marks["killed_at"], marks["heir_first_commit_at"]
    trainers = [n for n, _ in TRAINERS]
    chain = commit_chain(events, k)
    in_chain = {(e["peer"], e["seq"]) for e in chain.values()}
    acks = [a for n in trainers for a in events[n] if a.get("event") == "ack" and _shard(a) == k]
    lost = [{"trainer": a.get("name"), "seq": a["seq"], "version": a["version"], "time": a["time"],
             "duplicate": bool(a.get("duplicate")), "term": a.get("term")}
            for a in acks if (a["peer"], a["seq"]) not in in_chain]
    versions = sorted(chain)
    gaps = [v for v in range(1, versions[-1] + 1) if v not in chain] if versions else []
    times = sorted(e["time"] for e in chain.values())
    before = [t for t in times if t <= killed_at]
    others = [e for evs in events.values() for e in evs
              if e.get("event") == "commit" and _shard(e) != k and killed_at < e["time"] < first]
    takeovers = [(n, e) for n, evs in events.items() for e in evs if e.get("event") == "takeover"
                 and not e.get("handover") and killed_at <= e["time"] <= marks["failover_end"]]
    expected = [(n, e) for n, e in takeovers if _shard(e) == k and e["time"] > killed_at][:1]
    return {
        "shards": shards, "killed": marks["killed"], "killed_shard": k, "killed_at": killed_at, "heir": marks["heir"],
        "acknowledged_parts_checked": len(acks), "acknowledged_parts_lost": len(lost), "lost": lost[:20],
        "chain_versions": len(chain), "chain_gaps": gaps[:20],
        "other_shards_commits_during_failover": len({(_shard(e), e["version"], e.get("term")) for e in others}),
        "stall_seconds": first - (before[-1] if before else killed_at),
        "kill_to_takeover_s": marks["takeover_at"] - killed_at, "kill_to_first_commit_s": first - killed_at,
        "unnecessary_failovers": len(takeovers) - len(expected),
        "takeovers": [{"node": n, "shard": _shard(e), "time": e["time"], "term": e.get("term")} for n, e in takeovers],
        "rejected_norm_too_large": len([e for n in trainers for e in events[n]
                                        if e.get("event") == "rejected" and e.get("reason") == "norm_too_large"]),
        "trainer_wait_s": failover_waits(events, killed_at, first), "failover_end": marks["failover_end"],
        "placement_at_kill": marks["placement_at_kill"], "placement_after": marks["placement_after_failover"],
        "load": {"at_kill": marks["load_end"], "end": marks["load_after_failover"]}}


# ------------------------------------------------------------------------------ results
def shard_results(opts, runs: dict[str, dict], failover: dict | None, calib: dict | None, memory: dict | None,
                  command: str, loads: list, params: int, tree: str) -> dict:
    out: dict = dict(runs)
    if failover is not None:
        out["failover"] = failover
    cfg = wan.checked_config(with_shards(opts, 1), REPLY)
    out["cast"] = {
        "peers": [{"name": n, "region": r, "role": "--no-train (shard holders and standbys)"} for n, r in SERVERS]
        + [{"name": n, "region": r, "role": "training"} for n, r in TRAINERS],
        "links": {n: {"up_mbit": u, "down_mbit": d} for n, (u, d) in rates(opts).items()},
        "train": [n for n, _ in TRAINERS], "model_params": params,
        "model": "tiny (launcher.write_test_config)" if opts.tiny else
                 f"gpu-125m shape with {opts.num_layers} layers, AdamW fp32, batch 1 × {opts.seq_len}",
        "H": cfg.inner.steps_per_round, "compression": opts.compression, "reply_compression": REPLY,
        "screen": False, "num_standbys": cfg.swarm.num_standbys, "lease_seconds": cfg.swarm.lease_seconds,
        "threads_per_peer": opts.threads, "minutes": opts.minutes}
    out["target"] = targets(runs)
    out.update(calibration=calib, memory=memory, round_definition=ROUND_DEFINITION, command=command,
               date=datetime.date.today().isoformat(), tree=tree, machine=bench_wire.machine(),
               load={"start": loads[0], "end": loads[1]})
    return out


def targets(runs: dict[str, dict]) -> dict:
    """The issue's target, from the runs of S = 1 and 4 (None: not measured: that S not run, or a
    trainer with fewer than 3 rounds in the window)."""
    one, four = runs.get("1"), runs.get("4")
    ratio = (four["busiest_link_bytes_per_round"] / one["busiest_link_bytes_per_round"]
             if one and four and one["busiest_link_bytes_per_round"] else None)
    util = {k: list(r["utilization"].values()) for k, r in runs.items()}
    known = {k: [x for x in u if x is not None] for k, u in util.items()}
    return {"busiest_ratio_4_to_1": ratio, "busiest_ratio_ok": None if ratio is None else ratio <= 0.35,
            "min_utilization": {k: (min(u) if u and None not in u else None) for k, u in util.items()},
            "utilization_ok_4": None if four is None or None in util["4"] else min(util["4"]) >= 0.95,
            "s1_short": None if one is None or not known["1"] else min(known["1"]) < 0.95}


def rederive(opts, command: str) -> dict:
    """The per-round figures of the ``shards`` key of ``--results`` again, from each run's saved
    window, window bytes and its directory's events (ROUND_DEFINITION as this tree has it); the
    measurement's own fields (command, date, load) are kept, and ``rederived`` says when and how."""
    results = json.loads(opts.results.read_text())
    res = results["shards"]
    runs = {k: res[k] for k in ("1", "2", "4") if k in res}
    for k, run in runs.items():
        names = list(run["link_bytes"])
        events = {n: LocalSwarm(Path(run["dir"]), "").events(n) for n in names}
        fig = round_figures(int(k), events, run["window"], run["link_bytes"])
        for key in ("rounds", "busiest_link", "busiest_link_bytes_per_round", "bytes_per_veth_per_round",
                    "resubmissions", "duplicate_acks"):
            run[key] = fig[key]
        for n, parts in fig["acked"].items():
            run["trainers"][n]["acked_parts"] = len(parts)
        run["round_definition"] = ROUND_DEFINITION
    res["round_definition"] = ROUND_DEFINITION
    fo = res.get("failover")
    if fo and "trainer_wait_s" not in fo:
        run = runs.get(str(fo["shards"])) or fo.get("run")
        events = {n: LocalSwarm(Path(run["dir"]), "").events(n) for n in run["link_bytes"]}
        fo["trainer_wait_s"] = failover_waits(events, fo["killed_at"], fo["killed_at"] + fo["kill_to_first_commit_s"])
    res["target"] = targets(runs)
    res["rederived"] = {"command": command, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "tree": git_tree(ROOT)}
    wan.merge_results(opts.results, res, key="shards")
    return res


def _f(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _mb(x) -> str:
    return _f(None if x is None else x / 1e6, ".1f")


def render(res: dict) -> str:
    """The Markdown of docs/results.md's "## Sharded coordination"."""
    cast = res["cast"]
    trainers = cast["train"]
    runs = {k: res[k] for k in ("1", "2", "4") if k in res}
    rate = next(iter(cast["links"].values()))
    lines = [f"{res['date']} · {res['machine']} · `{res['command']}` · tree {res['tree']} · load average (1, 5, 15 min) "
             f"at the start {', '.join(map(str, res['load']['start']))}, at the end "
             f"{', '.join(map(str, res['load']['end']))}.", "",
             f"{cast['model']}, {cast['model_params'] / 1e6:.1f}M parameters, H = {cast['H']}, {cast['compression']} "
             f"uplink and {cast['reply_compression']} replies, loss screen off, {cast['num_standbys']} standby per "
             f"shard, lease {cast['lease_seconds']:g} s, {cast['threads_per_peer']} thread per peer, "
             f"{cast['minutes']:g} min measured per S in the steady state. Eight network namespaces, every link "
             f"{rate['up_mbit']:g} Mbit/s each way (tbf): "
             + ", ".join(f"{p['name']} ({p['region']})" for p in cast["peers"][:len(SERVERS)])
             + " started `--no-train` (they hold the shards and stand by), "
             + ", ".join(f"{p['name']} ({p['region']})" for p in cast["peers"][len(SERVERS):]) + " train.", ""]
    calib = res.get("calibration")
    if calib:
        lines += [f"Calibration: {calib['step_seconds_parallel']:.3f} s per inner step with {calib['processes']} "
                  f"trainer processes at once, so H = {calib['steps_per_round']} computes "
                  f"{calib['compute_seconds_per_round']:.0f} s per round; at {calib['mbit']:g} Mbit/s one trainer's "
                  f"transfer per round (upload, forward to a standby, reply) takes "
                  f"{calib['trainer_transfer_seconds']:.0f} s, and at S = 1 the hub's uplink needs "
                  f"{calib['hub_uplink_seconds_per_round_s1']:.0f} s per round of every trainer.", ""]
    lines += ["| S | busiest link (node) | MB per round on it (tx + rx) | ratio to S = 1 | utilisation ("
              + ", ".join(trainers) + ") | commits/min per shard (total) | shard holders (standbys) | "
              "takeovers in window | parts resent (acks answered duplicate) | load start → end |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    base = runs.get("1", {}).get("busiest_link_bytes_per_round")
    for k, r in runs.items():
        place = r["placement"].get("placement_end") or r["placement"].get("placement_start") or {}
        cpm = r["commits_per_minute"]
        lines.append(
            f"| {k} | {r['busiest_link']} | {_mb(r['busiest_link_bytes_per_round'])} | "
            f"{_f(r['busiest_link_bytes_per_round'] / base if base else None)} | "
            + ", ".join(_f(r["utilization"].get(n), ".3f") for n in trainers) + " | "
            + ", ".join(_f(v, ".1f") for v in cpm["per_shard"].values()) + f" ({_f(cpm['total'], '.1f')}) | "
            + "; ".join(f"{s}: {p['holder'] or '?'} ({', '.join(p['standbys']) or '–'})" for s, p in place.items())
            + f" | {len(r['takeovers_in_window'])} | {r.get('resubmissions', '–')} ({r.get('duplicate_acks', '–')}) | "
              f"{', '.join(map(str, r['load']['start']))} → "
              f"{', '.join(map(str, r['load']['end']))} |")
    names = [p["name"] for p in cast["peers"]]
    lines += ["", "MB per round on every veth (tx + rx; round: " + res["round_definition"] + "):", "",
              "| S | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for k, r in runs.items():
        lines.append(f"| {k} | " + " | ".join(_mb(r["bytes_per_veth_per_round"][n]["total"]) for n in names) + " |")
    fo = res.get("failover")
    if fo:
        lines += ["", f"**Failover** (S = {fo['shards']}): {fo['killed']}, the holder of shard {fo['killed_shard']}, "
                  f"SIGKILLed (its process group) in the steady state; {fo['heir']} took the shard over after "
                  f"{fo['kill_to_takeover_s']:.0f} s and committed on it {fo['kill_to_first_commit_s']:.0f} s after the "
                  f"kill (the shard's stall, from its last commit before the kill: {fo['stall_seconds']:.0f} s). "
                  f"Meanwhile the other shard(s) made {fo['other_shards_commits_during_failover']} commits. "
                  f"Acknowledged parts of the killed shard checked against its final chain (every node's commit "
                  f"and replica events, the highest term at each version): {fo['acknowledged_parts_checked']}, lost "
                  f"{fo['acknowledged_parts_lost']}; gaps in the chain: {len(fo['chain_gaps'])}; takeovers nothing "
                  f"called for: {fo['unnecessary_failovers']}; parts refused as too large: "
                  f"{fo['rejected_norm_too_large']}."
                  + (" The trainers' rounds that ended from the kill to 60 s after the heir's first commit waited "
                     + ", ".join(f"{n} {w:.0f} s" for n, w in fo["trainer_wait_s"].items())
                     + " in all for earlier parts (overlapped rounds: a round waits for the previous one's "
                       "submission, whose part for the killed shard is held up to the grace of "
                       "roles/shard_submit.py)." if fo.get("trainer_wait_s") else "")]
    tgt = res.get("target", {})
    word = lambda ok, yes="met", no="not met": "not measured" if ok is None else (yes if ok else no)  # noqa: E731
    lines += ["", "Utilisation: time in inner steps / wall time between the first and the last round that ended in "
              "the measured window (scripts/bench.py's steady_utilization; – for a trainer with fewer than 3 rounds "
              "there). Commits per minute: distinct (version, digest) per shard in the window. Holders and "
              "standbys: each node's last heartbeat in the window (its `shards` roles). The payload bytes a link "
              "carries per round scale linearly with the parameter count (every submission, reply and forwarded "
              "commit is 8 bits per parameter of the shard's tensors; only the DHT's records, a few kB per "
              "heartbeat, do not), so the ratio busiest(S = 4) / busiest(S = 1) does not depend on the model's "
              "size; what does depend on it, at a given link rate and CPU, is whether the hub's link is the "
              "bottleneck, which is why the link rate is chosen from the compute per round.",
              "", f"Target of the issue: busiest(S = 4) / busiest(S = 1) ≤ 0.35 (measured "
              f"{_f(tgt.get('busiest_ratio_4_to_1'))}: {word(tgt.get('busiest_ratio_ok'))}); every trainer's "
              f"utilisation ≥ 0.95 at S = 4 ({word(tgt.get('utilization_ok_4'))}) where S = 1 falls short "
              f"({word(tgt.get('s1_short'), 'it does', 'it does not')})."]
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """docs/results.md with HEADING's section replaced, or added after AFTER's section."""
    md = path.read_text()
    if HEADING not in md and AFTER in md:
        start = md.index(AFTER) + len(AFTER)
        nxt = md.find("\n## ", start)
        if nxt != -1:  # insert before the section that follows AFTER's
            md = md[:nxt + 1] + f"{HEADING}\n\n{body.rstrip()}\n\n" + md[nxt + 1:]
            path.write_text(md)
            return
    path.write_text(replace_section(md, HEADING, body))


# ------------------------------------------------------------------------------ main
def _sigterm(signum, frame):
    raise SystemExit(128 + signum)


def main(argv=None) -> dict | None:
    opts = parse_args(argv)
    if opts.step_worker:
        step_worker(opts)
        return None
    command = "python " + " ".join(["scripts/shard_testnet.py"] + (sys.argv[1:] if argv is None else list(argv)))
    old = signal.getsignal(signal.SIGTERM)
    in_main = threading.current_thread() is threading.main_thread()
    if in_main:
        signal.signal(signal.SIGTERM, _sigterm)  # SIGTERM unwinds like Ctrl-C: every finally runs
    try:
        return _main(opts, command)
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, old)


def _main(opts, command: str) -> dict | None:
    if opts.rederive:
        return _report(opts, rederive(opts, command), f"[shards] rewrote {opts.results} (key shards) from its runs' "
                                                      "directories")
    for s in sorted(set(opts.shard_list + ([opts.failover_shards] if opts.failover_shards else []))):
        wan.checked_config(with_shards(opts, s), REPLY)  # refuse a setting before anything starts
    out = opts.out or Path(tempfile.mkdtemp(prefix="shardnet-", dir="/tmp"))
    tree = git_tree(ROOT)  # the code that runs (a commit made while it runs is not it)
    calib = None
    if opts.calibrate or (not opts.tiny and (opts.mbit is None or opts.steps_per_round is None)):
        calib = calibrate(opts, out / "calibrate")
    if opts.calibrate:
        return None
    params = n_params(opts)
    memory = None
    if not opts.tiny:
        peak = int(opts.peak_rss_gib * 2**30) if opts.peak_rss_gib else wan.measure_rss(opts, out / "rss")
        memory = wan.check_memory(peak, len(SERVERS) + len(TRAINERS))
    ok, why = netns.available()
    if not ok:
        raise SystemExit(f"network namespaces are not available here: {why}")
    load_start = wan.load()
    print(f"[shards] {params / 1e6:.1f}M parameters, H = {wan.checked_config(opts, REPLY).inner.steps_per_round}, "
          f"every link {opts.mbit:g} Mbit/s each way; runs under {out}", flush=True)
    runs: dict[str, dict] = {}
    failover = None
    for s in opts.shard_list:  # the failover follows the measured window of its S's run, on the same cast
        r = runs[str(s)] = run_cast(opts, s, out / f"shards-{s}", failover=s == opts.failover_shards)
        print(f"[shards] S={s}: busiest link {r['busiest_link']} {_mb(r['busiest_link_bytes_per_round'])} MB per round "
              f"({r['rounds']:.1f} rounds); utilisation " + ", ".join(f"{n} {_f(u, '.3f')}" for n, u in
                                                                  r["utilization"].items())
              + f"; {_f(r['commits_per_minute']['total'], '.1f')} commits/min; load {r['load']['end']}", flush=True)
        failover = r.pop("failover", failover)
    if opts.failover_shards and failover is None:  # an S not measured above: a cast of its own
        alone = argparse.Namespace(**{**vars(opts), "minutes": opts.failover_after})
        failover = run_cast(alone, opts.failover_shards, out / f"failover-{opts.failover_shards}", failover=True)
        failover = {**failover.pop("failover"), "run": failover}
    if failover is not None:
        fo = failover
        print(f"[shards] failover: {fo['acknowledged_parts_lost']} of {fo['acknowledged_parts_checked']} acknowledged "
              f"parts lost; other shards {fo['other_shards_commits_during_failover']} commits during it; stall "
              f"{fo['stall_seconds']:.1f} s; unnecessary failovers {fo['unnecessary_failovers']}", flush=True)
    res = shard_results(opts, runs, failover, calib, memory, command, [load_start, wan.load()], params, tree)
    wan.merge_results(opts.results, res, key="shards")
    return _report(opts, res, f"[shards] wrote {opts.results} (key shards); run directories under {out}\n"
                              f"[shards] command: {command}")


def _report(opts, res: dict, done: str) -> dict:
    """Print the section and ``done``; with --write-results, write it into docs/results.md."""
    report = render(res)
    print(report)
    print(done)
    if opts.write_results:
        write_section(ROOT / "docs" / "results.md", report)
    return res


if __name__ == "__main__":
    main()
