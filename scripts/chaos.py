#!/usr/bin/env python
"""Chaos on the local testnet: SIGKILL the coordinator (and random other peers) while a run
trains, restart them, and check that nothing acknowledged was lost.

    python scripts/chaos.py --minutes 9 --kills 10 --seed 0 --out runs/chaos --baseline --kill-all --write-results

Fault run: the cast of --peers (peers/*.yaml: 4 peers at different speeds, 1 thread each) trains
--config through ``heloco_p2p.tools.testnet.run_testnet``. --kills times, at roughly even intervals, the
coordinator's whole process group is SIGKILLed (``LocalSwarm.kill``), with probability
--other-kill-prob together with one random peer that is neither coordinator nor standby. A kill
waits until the lease names a live standby, so every standby never dies at once. The killed peers
restart with the same identity once the standby has taken over. Reported:

- failovers, and time to failover (kill → the next ``takeover`` event) and to the first commit;
- acknowledged-but-lost submissions (must be 0): every acknowledgement a peer received must be
  the final chain's commit at its version (same θ digest, same submitter and sequence number);
  the submission behind a duplicate acknowledgement must be in the chain; and the final replicated
  ledger (``applied`` in the last checkpoint) must cover every peer's highest acknowledged sequence number;
- version gaps and forks (must be 0): the commit events of every coordinator over the run must
  form one chain 1..N, no version committed twice with different θ;
- the final validation loss, against a fault-free run of the same length (--baseline).

--kill-all: a separate run of --kill-all-minutes that kills the coordinator and every standby
together halfway through (or later, once they hold a checkpoint); the victims restart without --resume for --wait seconds (no peer
holds the commit state: the run cannot commit), then the victim with the newest checkpoint
restarts with ``--resume``. Reported: versions and acknowledged submissions lost (those after the
checkpoint), commits while no one resumed, time to recover.

Writes OUT/chaos.json (and each run's testnet outputs under OUT/faults, OUT/baseline,
OUT/kill-all); --write-results replaces the "## Chaos" section of docs/reliability.md.

Freeze and partition scenarios (instead of the kill run), each --runs times, one at a time:

    python scripts/chaos.py --out runs/chaos-sc --freeze --partition --netns --tiny --runs 5 --write-results

--freeze: the coordinator, the standby, and a training peer right after a round (its submission
in flight) SIGSTOPped for --freeze-seconds; --partition (needs --netns: every peer in a network
namespace of its own, heloco_p2p/tools/netns.py, root): the link coordinator↔standby cut for
--cut-seconds while the other peers reach both, healed, then either side SIGKILLed; and the
coordinator isolated from everyone for --isolate-seconds. Each run is checked with
check_history (lost, forks, applied twice), the longest stall (no new version) from the first
fault on, and the takeovers whose replaced holder was not frozen, killed or isolated in the 3
lease periods before (unnecessary failovers). OUT/chaos.json "scenarios"; --write-results: one
section per scenario under "## Chaos: freeze and partition" of docs/reliability.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heloco_p2p.checkpoint import load_checkpoint, read_header  # noqa: E402
from heloco_p2p.config import load_config  # noqa: E402
from heloco_p2p.tools.monitor import live_coordinator  # noqa: E402
from heloco_p2p.tools.report import git_tree, replace_section  # noqa: E402
from heloco_p2p.tools.testnet import load_profiles, peer_args, run_testnet  # noqa: E402

HEADING = "## Chaos"


# ------------------------------------------------------------------------------ reading the swarm
def _events(peers_dir: Path) -> list[dict]:
    out = []
    for f in sorted(peers_dir.glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda e: e["time"])


def _names(sw) -> dict[str, str]:
    return sw.peer_names()


def _live_lease(client, lease_seconds: float):
    """The live coordinator by the one lease rule (roles/lease.py), as a reader without history."""
    return live_coordinator(client.records.lease_claims(), time.time(), lease_seconds)


def _restart(sw, name: str, profile, *extra: str) -> None:
    """The same peer again (same identity, metrics and checkpoint directory); LocalSwarm.start keeps
    its earlier log as NAME.log.N."""
    sw.start(name, profile.region, *peer_args(profile), *extra)


# ------------------------------------------------------------------------------ fault injection
class CoordinatorKiller:
    """``run_testnet``'s ``during`` hook: kill the coordinator (and maybe one other peer) at the
    scheduled times, then follow the failover and restart the victims."""

    def __init__(self, profiles, kills: int, minutes: float, seed: int, other_kill_prob: float,
                 lease_seconds: float, restart_delay: float = 2.0):
        self.rng = random.Random(seed)
        self.profiles = {p.name: p for p in profiles}
        self.lease_seconds, self.other_kill_prob, self.restart_delay = lease_seconds, other_kill_prob, restart_delay
        t0, span = time.time(), 60 * minutes
        warmup, tail = min(60.0, 0.15 * span), min(45.0, 0.1 * span)
        step = (span - warmup - tail) / max(1, kills)
        self.schedule = [t0 + warmup + step * (i + self.rng.uniform(0.2, 0.8)) for i in range(kills)]
        self.kills: list[dict] = []
        self.pending: dict | None = None

    def __call__(self, sw, client) -> None:
        now = time.time()
        if self.pending is not None:
            self._follow(sw, now)
            return
        if not self.schedule or now < self.schedule[0]:
            return
        lease = _live_lease(client, self.lease_seconds)
        names = _names(sw)
        alive = {n for n, p in sw.procs.items() if p.poll() is None}
        if lease is None or lease.peer_id not in names or names[lease.peer_id] not in alive:
            return  # between coordinators: try again next tick
        standbys = [names.get(s) for s in lease.standbys]
        if not any(s in alive for s in standbys):
            return  # killing now could take every standby: wait for the coordinator to name one
        coordinator = names[lease.peer_id]
        others = sorted(n for n in alive if n != coordinator and n not in standbys)
        victims = [coordinator]
        if others and self.rng.random() < self.other_kill_prob:
            victims.append(self.rng.choice(others))
        killed_at = time.time()
        for v in victims:
            sw.kill(v)
        self.schedule.pop(0)
        self.pending = {"n": len(self.kills) + 1, "killed_at": killed_at, "victims": victims, "term": lease.term,
                        "lease_version": lease.version, "standbys": [s for s in standbys if s]}
        print(f"[chaos] kill {self.pending['n']}: {', '.join(victims)} (coordinator {coordinator}, term {lease.term}, "
              f"standby {', '.join(self.pending['standbys'])})", flush=True)

    def _follow(self, sw, now: float) -> None:
        p = self.pending
        if "takeover_at" not in p:
            took = [e for e in sw.all_events("takeover") if e["time"] > p["killed_at"]]
            if took:
                first = min(took, key=lambda e: e["time"])
                p.update(takeover_at=first["time"], heir=first["name"], new_term=first["term"],
                         takeover_version=first["version"], failover_seconds=first["time"] - p["killed_at"])
            elif now - p["killed_at"] < 120:
                return
            else:
                p.update(takeover_at=None, failover_seconds=None)
        if "restarted_at" not in p:
            if now - p["killed_at"] < self.restart_delay:
                return
            for v in p["victims"]:
                _restart(sw, v, self.profiles[v])
            p["restarted_at"] = now
        commits = [e for e in sw.all_events("commit") if e["time"] > p["killed_at"]]
        if commits or now - p["killed_at"] > 180:
            p["first_commit_seconds"] = min(e["time"] for e in commits) - p["killed_at"] if commits else None
            self.kills.append(p)
            self.pending = None
            print(f"[chaos]   failover {_fmt(p['failover_seconds'])} s by {p.get('heir')}, first commit after "
                  f"{_fmt(p['first_commit_seconds'])} s", flush=True)


class KillAll:
    """``during`` hook of the --kill-all run: at ``at``, kill the coordinator and every standby;
    restart them without --resume; after ``wait`` seconds restart the one with the newest
    checkpoint with --resume."""

    def __init__(self, profiles, at: float, wait: float, lease_seconds: float):
        self.profiles = {p.name: p for p in profiles}
        self.at, self.wait, self.lease_seconds = at, wait, lease_seconds
        self.record: dict = {}

    def __call__(self, sw, client) -> None:
        now, r = time.time(), self.record
        if not r:
            if now < self.at:
                return
            lease = _live_lease(client, self.lease_seconds)
            names = _names(sw)
            if lease is None or lease.peer_id not in names or not lease.standbys:
                return
            victims = [names[lease.peer_id]] + [names[s] for s in lease.standbys if s in names]
            headers = {v: read_header(sw.dir / f"ckpt-{v}") for v in victims}
            if not any(headers.values()):
                return  # nothing to resume from yet: wait for the first checkpoint
            killed_at = time.time()
            for v in victims:
                sw.kill(v)
            commits = sw.all_events("commit")
            headers = {v: read_header(sw.dir / f"ckpt-{v}") for v in victims}  # as the kill left them
            holder = max((v for v in victims if headers[v]), key=lambda v: (headers[v]["term"], headers[v]["version"]),
                         default=None)
            r.update(killed_at=killed_at, victims=victims, term=lease.term,
                     last_version=max(c["version"] for c in commits),
                     checkpoints={v: (h["term"], h["version"]) if h else None for v, h in headers.items()},
                     holder=holder, checkpoint_version=headers[holder]["version"] if holder else 0)
            for v in victims:
                if v != holder:
                    _restart(sw, v, self.profiles[v])
            print(f"[chaos] killed {', '.join(victims)} together at version {r['last_version']}; newest checkpoint: "
                  f"{holder} at version {r['checkpoint_version']}", flush=True)
            return
        if "resumed_at" not in r:
            if now - r["killed_at"] < self.wait:
                return
            r["commits_without_resume"] = len([c for c in sw.all_events("commit") if c["time"] > r["killed_at"]])
            r["resumed_at"] = now
            if r["holder"]:
                _restart(sw, r["holder"], self.profiles[r["holder"]], "--resume", str(sw.dir / f"ckpt-{r['holder']}"))
            print(f"[chaos] {r['commits_without_resume']} commits in {self.wait:.0f} s without a coordinator; "
                  f"restarting {r['holder']} with --resume", flush=True)
            return
        if "first_commit_seconds" not in r:
            took = [e for e in sw.all_events("takeover") if e["time"] > r["resumed_at"] and e.get("resumed")]
            commits = [c for c in sw.all_events("commit") if c["time"] > r["resumed_at"]]
            if took and "takeover_seconds" not in r:
                r["takeover_seconds"] = took[0]["time"] - r["killed_at"]
                r["resumed_term"], r["resumed_version"] = took[0]["term"], took[0]["version"]
            if commits:
                r["first_commit_seconds"] = min(c["time"] for c in commits) - r["killed_at"]
                print(f"[chaos] resumed: first commit {r['first_commit_seconds']:.1f} s after the kill", flush=True)


# ------------------------------------------------------------------------------ checking the history
def check_history(events: list[dict], final_checkpoint: Path | None) -> dict:
    """Gaps, forks and acknowledged-but-lost submissions over every peer's events (see module doc)."""
    commits = [e for e in events if e["event"] == "commit"]
    by_version: dict[int, list[dict]] = defaultdict(list)
    for c in commits:
        by_version[c["version"]].append(c)
    forks = sorted(v for v, cs in by_version.items() if len({c["digest"] for c in cs}) > 1)
    # a standby's replica event stands for a commit whose holder was killed after the standby
    # applied it and before logging it (the commit events decide wherever they exist)
    for r in (e for e in events if e["event"] == "replica"):
        by_version[r["version"]].append(r)
    top = max(by_version, default=0)
    gaps = [v for v in range(1, top + 1) if v not in by_version]
    final = {v: max(cs, key=lambda c: (c["term"], c["event"] == "commit", c["time"])) for v, cs in by_version.items()}
    in_chain = {(c["peer"], c["seq"]): v for v, c in final.items()}
    twice = len(final) - len(in_chain)  # one submission committed at two versions of the chain
    acks = [e for e in events if e["event"] == "ack"]
    lost, lost_duplicates = [], []
    for a in acks:
        if a.get("duplicate"):
            if (a["peer"], a["seq"]) not in in_chain:
                lost_duplicates.append(a)
            continue
        c = final.get(a["version"])  # a peer receives θ̄ with look-ahead dispatch: its digest is dispatch_digest
        # with wrap8 replies a peer holds θ̄ on the version's grid (or nothing yet, on a resync): the
        # chain entry must still be its submission; the θ̄ digest cannot be compared
        grid = a.get("reply_encoding") == "wrap8" or a.get("reply_resync")
        if c is None or (c["peer"], c["seq"]) != (a["peer"], a["seq"]) or \
                (not grid and c.get("dispatch_digest", c["digest"]) != a["digest"]):
            lost.append(a)
    ledger = {}
    if final_checkpoint is not None:
        saved = load_checkpoint(final_checkpoint)
        applied = saved.commit_state["applied"]
        highest: dict[str, int] = {}
        for a in acks:
            highest[a["peer"]] = max(highest.get(a["peer"], -1), a["seq"])
        ledger = {"version": saved.version, "term": saved.term,
                  "applied_total": sum(saved.commit_state["applied_count"].values()),
                  "peers_behind": sorted(p for p, s in highest.items() if applied.get(p, -1) < s)}
    return {"commits_logged": len(commits), "top_version": top, "gaps": gaps, "forks": forks,
            "submissions_committed_twice": twice,
            "acks": len(acks), "duplicate_acks": sum(1 for a in acks if a.get("duplicate")),
            "acked_but_lost": len(lost) + len(lost_duplicates),
            "lost_examples": [{k: a.get(k) for k in ("name", "version", "seq", "term", "duplicate", "time")}
                              for a in (lost + lost_duplicates)[:5]],
            "ledger": ledger}


# ------------------------------------------------------------------------------ runs
def fault_run(args, profiles, out: Path) -> dict:
    cfg = load_config(args.config)
    killer = CoordinatorKiller(profiles, args.kills, args.minutes, args.seed, args.other_kill_prob,
                               cfg.swarm.lease_seconds)
    summary = run_testnet(profiles, args.config, args.minutes, out, run_id=f"chaos-{uuid.uuid4().hex[:6]}",
                          live=False, eval_every=args.eval_every, during=killer)
    if killer.pending is not None:
        killer.kills.append(killer.pending)  # the run ended during the last failover
    ckpt = out / "checkpoint"
    history = check_history(_events(out / "peers"), ckpt if ckpt.exists() else None)
    fo = [k["failover_seconds"] for k in killer.kills if k.get("failover_seconds") is not None]
    return {"kills": killer.kills, "coordinator_kills": len(killer.kills),
            "other_peers_killed": sum(len(k["victims"]) - 1 for k in killer.kills),
            "failovers": len(fo), "failover_seconds": fo,
            "first_commit_seconds": [k.get("first_commit_seconds") for k in killer.kills],
            "history": history, "summary": summary}


def baseline_run(args, profiles, out: Path) -> dict:
    summary = run_testnet(profiles, args.config, args.minutes, out, run_id=f"baseline-{uuid.uuid4().hex[:6]}",
                          live=False, eval_every=args.eval_every)
    ckpt = out / "checkpoint"
    return {"history": check_history(_events(out / "peers"), ckpt if ckpt.exists() else None), "summary": summary}


def kill_all_run(args, profiles, out: Path) -> dict:
    cfg = load_config(args.config)
    hook = KillAll(profiles, at=time.time() + 30 * args.kill_all_minutes, wait=args.wait,
                   lease_seconds=cfg.swarm.lease_seconds)
    summary = run_testnet(profiles, args.config, args.kill_all_minutes, out, run_id=f"killall-{uuid.uuid4().hex[:6]}",
                          live=False, eval_every=args.eval_every, during=hook)
    r = hook.record
    events = _events(out / "peers")
    ckpt = out / "checkpoint"
    history = check_history(events, ckpt if ckpt.exists() else None)
    if r:
        before = [a for a in events if a["event"] == "ack" and not a.get("duplicate") and a["time"] <= r["killed_at"]]
        r["acks_after_checkpoint"] = sum(1 for a in before if a["version"] > r["checkpoint_version"])
        r["versions_lost"] = r["last_version"] - r["checkpoint_version"]
    return {"record": r, "history": history, "summary": summary}


# ------------------------------------------------------------------------------ freeze and partition scenarios
SCENARIOS = {
    "freeze-coordinator": "the coordinator's process group SIGSTOPped for --freeze-seconds, then SIGCONT",
    "freeze-standby": "the standby's process group SIGSTOPped for --freeze-seconds, then SIGCONT",
    "freeze-trainer": "a training peer SIGSTOPped right after a round ended (its submission in flight) for "
                      "--freeze-seconds, then SIGCONT",
    "cut-kill-coordinator": "the link coordinator↔standby cut for --cut-seconds while every other peer reaches both; "
                            "healed; a lease later the coordinator of the cut SIGKILLed (restarted after the takeover)",
    "cut-kill-standby": "the same cut and heal; a lease later the standby of that moment SIGKILLed (then restarted)",
    "isolate-coordinator": "the coordinator cut from everyone (its bridge port down: peers and observer) for "
                           "--isolate-seconds, then back",
}
FREEZE = [s for s in SCENARIOS if s.startswith("freeze")]
PARTITION = [s for s in SCENARIOS if not s.startswith("freeze")]
SCENARIO_HEADING = "## Chaos: freeze and partition"


def _latest_roles(sw) -> dict[str, tuple[float, str]]:
    """name → (time, role) of each running peer's latest heartbeat."""
    out = {}
    for name, proc in sw.procs.items():
        beats = sw.events(name, "heartbeat")
        if proc.poll() is None and beats:
            out[name] = (beats[-1]["time"], beats[-1].get("role"))
    return out


def roles_now(sw, stale: float) -> tuple[str | None, str | None, list[str]]:
    """(coordinator, standby, training peers) by the peers' own recent heartbeats."""
    now, roles = time.time(), _latest_roles(sw)
    fresh = {n: r for n, (t, r) in roles.items() if now - t < stale}
    coord = [n for n, r in fresh.items() if r == "coordinator"]
    standby = [n for n, r in fresh.items() if r == "standby"]
    return (coord[0] if len(coord) == 1 else None, standby[0] if standby else None,
            sorted(n for n, r in fresh.items() if r == "training"))


def commit_times(events: list[dict]) -> list[float]:
    """When each version first entered the chain (the earliest commit event of each (version, digest))."""
    first: dict[tuple, float] = {}
    for e in events:
        if e["event"] == "commit":
            key = (e["version"], e["digest"])
            first[key] = min(first.get(key, e["time"]), e["time"])
    return sorted(first.values())


def longest_stall(times: list[float], start: float, end: float) -> float:
    """The longest time without a commit between ``start`` and ``end``."""
    return _stall(times, start, end)[0]


def _stall(times: list[float], start: float, end: float) -> tuple[float, float]:
    """(length, start time) of the longest time without a commit between ``start`` and ``end``."""
    marks = [start] + [t for t in times if start < t < end] + [end]
    return max((b - a, a) for a, b in zip(marks, marks[1:]))


def classify_takeovers(events: list[dict], unavailable: list[dict], lease_seconds: float, until: float) -> list[dict]:
    """Each takeover before ``until`` (not a handover), with the holder it replaced (the last peer to
    commit in an earlier term) and whether that holder was unavailable (frozen, killed, isolated:
    ``unavailable`` windows {"peer", "start", "end"}) at some time in the 3 lease periods before it.
    One that was not is unnecessary: the holder was alive and reachable by the swarm (a cut of the
    single link holder↔claimant leaves it reachable by every other peer)."""
    out = []
    commits = [e for e in events if e["event"] == "commit"]
    for t in (e for e in events if e["event"] == "takeover" and e["time"] < until):
        if t.get("handover"):
            out.append({"time": t["time"], "by": t["name"], "term": t["term"], "handover": True, "unnecessary": False})
            continue
        earlier = [c for c in commits if c["term"] < t["term"] and c["time"] <= t["time"]]
        holder = max(earlier, key=lambda c: c["time"])["name"] if earlier else None
        window = (t["time"] - 3 * lease_seconds, t["time"])
        down = [w for w in unavailable if w["peer"] == holder and w["start"] <= window[1] and
                (w["end"] is None or w["end"] >= window[0])]
        out.append({"time": t["time"], "by": t["name"], "term": t["term"], "version": t["version"], "holder": holder,
                    "holder_unavailable": [w["why"] for w in down], "unnecessary": holder is not None and not down})
    return out


def newest_checkpoint(sw) -> Path | None:
    headers = {p.parent: read_header(p.parent) for p in sw.dir.glob("ckpt-*/coordinator.pt")}
    headers = {d: h for d, h in headers.items() if h}
    return max(headers, key=lambda d: (headers[d]["term"], headers[d]["version"])) if headers else None


def _stop_swarm(sw) -> None:
    """Training peers first, the coordinator last (its checkpoint is then the final state)."""
    import signal

    coordinator, _, _ = roles_now(sw, stale=30.0)
    order = sorted((n for n, p in sw.procs.items() if p.poll() is None), key=lambda n: n == coordinator)
    for n in order:
        try:
            sw.stop(n, signal.SIGTERM, timeout=60)
        except Exception as exc:  # a peer that does not stop in time is SIGKILLed by close()
            print(f"[chaos] {n} did not stop: {exc}", flush=True)
    sw.close()


class Scenario:
    """One run of a freeze or partition scenario on a LocalSwarm (peers in namespaces with ``net``)."""

    def __init__(self, name: str, args, profiles, config: Path, lease_seconds: float, net=None):
        self.name, self.args, self.profiles, self.config, self.lease, self.net = \
            name, args, {p.name: p for p in profiles}, config, lease_seconds, net
        self.order = [p.name for p in profiles]
        self.timeline: list[dict] = []      # what was done when
        self.unavailable: list[dict] = []   # windows in which a peer was frozen, dead or isolated

    def log(self, what: str, **info) -> None:
        self.timeline.append({"time": time.time(), "what": what, **info})
        print(f"[chaos] {self.name}: {what} {json.dumps(info, default=str)}", flush=True)

    def down(self, peer: str, why: str) -> dict:
        w = {"peer": peer, "why": why, "start": time.time(), "end": None}
        self.unavailable.append(w)
        return w

    def run(self, sw) -> dict:
        a = self.args
        first = self.order[0]
        sw.start(first, self.profiles[first].region, "--config", str(self.config), *peer_args(self.profiles[first]))
        for n in self.order[1:]:
            sw.start(n, self.profiles[n].region, *peer_args(self.profiles[n]))
        t0 = time.time()
        sw.wait_until(lambda: len(sw.all_events("commit")) >= a.warmup_commits and roles_now(sw, 3 * self.lease)[1],
                      300, f"{a.warmup_commits} commits and a standby")
        self.log("warm", commits=len(sw.all_events("commit")), seconds=round(time.time() - t0, 1))
        fault_start = time.time()
        getattr(self, "_" + self.name.replace("-", "_"))(sw)
        last_fault = max(w["end"] or time.time() for w in self.unavailable) if self.unavailable else time.time()
        last_fault = max([last_fault] + [e["time"] for e in self.timeline])
        # the rest of the run: at least 3 leases and 5 commits after the last fault, up to --scenario-minutes
        deadline = max(t0 + 60 * a.scenario_minutes, last_fault + 3 * self.lease)
        while time.time() < deadline or (len([t for t in commit_times(_events(sw.dir)) if t > last_fault]) < 5
                                          and time.time() < last_fault + 120):
            self._restart_dead(sw)
            time.sleep(1.0)
        stop_at = time.time()
        self.log("stop")
        _stop_swarm(sw)
        events = _events(sw.dir)
        ckpt = newest_checkpoint(sw)
        history = check_history(events, ckpt)
        times = commit_times(events)
        takeovers = classify_takeovers(events, self.unavailable, self.lease, stop_at)
        after = [t for t in times if last_fault < t < stop_at]
        stall, stall_at = _stall(times, fault_start, stop_at)
        before = [e for e in self.timeline if e["time"] <= stall_at + 0.5]
        return {"scenario": self.name, "history": history,
                "stall_seconds": stall, "stall_leases": stall / self.lease,
                "stall_started": {"after_first_fault": stall_at - fault_start,
                                  "after": before[-1]["what"] if before else None,
                                  "after_event_seconds": stall_at - before[-1]["time"] if before else None},
                "takeovers": takeovers, "unnecessary_failovers": sum(1 for t in takeovers if t["unnecessary"]),
                "failovers": sum(1 for t in takeovers if not t.get("handover")),
                "commits": len(times), "commits_after_last_fault": len(after),
                "terms": sorted({e["term"] for e in events if e["event"] == "commit"}),
                "timeline": self.timeline, "unavailable": self.unavailable,
                "seconds": stop_at - t0, "checkpoint": str(ckpt) if ckpt else None}

    # ------------------------------------------------------------------ helpers
    def _roles(self, sw, need_standby: bool = True, timeout: float = 120) -> tuple[str, str | None, list[str]]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            c, s, t = roles_now(sw, 3 * self.lease)
            if c and (s or not need_standby):
                return c, s, t
            time.sleep(0.5)
        raise TimeoutError(f"no coordinator{' and standby' if need_standby else ''} in {timeout:.0f} s")

    def _restart_dead(self, sw) -> None:
        """A killed peer comes back with its identity once a takeover followed the kill (or 30 s later)."""
        for w in self.unavailable:
            if w["why"] != "killed" or w["end"] is not None:
                continue
            took = [e for e in sw.all_events("takeover") if e["time"] > w["start"]]
            if took or time.time() - w["start"] > 30:
                p = self.profiles[w["peer"]]
                _restart(sw, w["peer"], p)
                w["end"] = time.time()
                self.log("restarted", peer=w["peer"])

    def _freeze(self, sw, peer: str, role: str) -> None:
        w = self.down(peer, "frozen")
        sw.freeze(peer)
        self.log("freeze", peer=peer, role=role)
        time.sleep(self.args.freeze_seconds)
        sw.thaw(peer)
        w["end"] = time.time()
        self.log("thaw", peer=peer)

    # ------------------------------------------------------------------ the scenarios
    def _freeze_coordinator(self, sw) -> None:
        c, _, _ = self._roles(sw)
        self._freeze(sw, c, "coordinator")

    def _freeze_standby(self, sw) -> None:
        _, s, _ = self._roles(sw)
        self._freeze(sw, s, "standby")

    def _freeze_trainer(self, sw) -> None:
        _, _, trainers = self._roles(sw)
        if not trainers:
            raise RuntimeError("no training peer to freeze (the cast needs 3 peers)")
        peer = trainers[0]
        rounds = len(sw.events(peer, "round"))
        deadline = time.time() + 120
        while len(sw.events(peer, "round")) == rounds and time.time() < deadline:
            time.sleep(0.05)  # a round just ended: its submission is on its way
        acks = len(sw.events(peer, "ack"))
        self._freeze(sw, peer, "training")
        self.timeline[-2]["acks_before"] = acks

    def _cut_then(self, sw, kill: str | None) -> None:
        c, s, _ = self._roles(sw)
        self.net.cut(c, s)
        self.log("cut", coordinator=c, standby=s)
        time.sleep(self.args.cut_seconds)
        self.net.heal(c, s)
        self.log("heal", coordinator=c, standby=s, roles=dict(zip(("coordinator", "standby", "training"),
                                                                   roles_now(sw, 3 * self.lease))))
        if kill is None:
            return
        time.sleep(self.lease)
        # the standby *now*: the coordinator may have replaced the one it was cut from during the cut,
        # and the case worth testing is the death of the peer that holds the replica
        victim = c if kill == "coordinator" else (roles_now(sw, 3 * self.lease)[1] or s)
        role = _latest_roles(sw).get(victim, (0, None))[1]
        self.down(victim, "killed")
        sw.kill(victim)
        self.log("kill", peer=victim, side=kill, role_then=role)

    def _cut_kill_coordinator(self, sw) -> None:
        self._cut_then(sw, "coordinator")

    def _cut_kill_standby(self, sw) -> None:
        self._cut_then(sw, "standby")

    def _isolate_coordinator(self, sw) -> None:
        c, s, _ = self._roles(sw)
        w = self.down(c, "isolated")
        self.net.isolate(c)
        self.log("isolate", peer=c, standby=s)
        time.sleep(self.args.isolate_seconds)
        self.net.rejoin(c)
        w["end"] = time.time()
        self.log("rejoin", peer=c)


def scenario_runs(args, profiles, out: Path, save=None) -> dict:
    """Every selected scenario, --runs times each, one run at a time (round robin over the scenarios);
    ``save(results)`` after each run, so that an interrupted series keeps what it measured."""
    from heloco_p2p.tools.launcher import write_test_config

    names = args.scenarios
    if any(n in PARTITION for n in names) and not args.netns:
        raise SystemExit(f"{', '.join(n for n in names if n in PARTITION)}: partitions need --netns")
    results: dict[str, list] = {}
    for i in range(args.runs):
        for name in names:
            run_dir = out / "scenarios" / f"{name}-{i + 1}"
            if run_dir.exists():
                import shutil

                shutil.rmtree(run_dir)
            run_dir.mkdir(parents=True)
            if args.tiny:
                config = write_test_config(run_dir / "cfg.yaml", lease_seconds=args.lease_seconds, num_standbys=1)
            else:
                config = Path(args.config).resolve()
            lease = load_config(config).swarm.lease_seconds
            load = os.getloadavg()[0]
            result = _one_scenario(name, args, profiles, config, lease, run_dir)
            result.update(run=i + 1, load=[load, os.getloadavg()[0]], lease_seconds=lease, dir=str(run_dir))
            results.setdefault(name, []).append(result)
            if save is not None:
                save(results)
            h = result.get("history", {})
            print(f"[chaos] {name} run {i + 1}: {result.get('error') or ''} acks {h.get('acks')} lost "
                  f"{h.get('acked_but_lost')} forks {len(h.get('forks', []))} twice {h.get('submissions_committed_twice')}"
                  f" stall {_fmt(result.get('stall_seconds'))} s, unnecessary failovers "
                  f"{result.get('unnecessary_failovers')}", flush=True)
    return results


def _one_scenario(name, args, profiles, config, lease, run_dir: Path) -> dict:
    from heloco_p2p.tools.launcher import LocalSwarm

    run_id = f"{name}-{uuid.uuid4().hex[:6]}"
    scenario = None
    if args.netns:
        from heloco_p2p.tools.netns import NetnsTestnet

        net = NetnsTestnet()
    else:
        net = None
    try:
        if net is not None:
            net.open()
        sw = LocalSwarm(run_dir, run_id, netns=net)
        scenario = Scenario(name, args, profiles, config, lease, net)
        try:
            return scenario.run(sw)
        except Exception as exc:  # recorded as a failed run, with the timeline so far
            import traceback

            traceback.print_exc()
            return {"scenario": name, "error": f"{type(exc).__name__}: {str(exc)[:2000]}",
                    "timeline": scenario.timeline, "unavailable": scenario.unavailable}
        finally:
            sw.close()
    finally:
        if net is not None:
            net.close()


def render_scenarios(results: dict, meta: dict) -> dict[str, str]:
    """One markdown section per scenario: heading → body."""
    out = {}
    for name, runs in results.items():
        ok = [r for r in runs if "history" in r]
        lines = [f"{meta['date']} · {meta['machine']} · `{meta['command']}` · tree {meta.get('tree', 'unknown')}", "",
                 f"{SCENARIOS[name]}. {meta['cast']}; lease {runs[0].get('lease_seconds', '?'):g} s, 1 standby; "
                 f"{len(runs)} run{'s' if len(runs) != 1 else ''} "
                 f"({len(runs) - len(ok)} did not complete), one at a time under `nice -n 10`. Load average "
                 "(1 min) at each run's start / end: "
                 + ", ".join(f"{r['load'][0]:.1f}/{r['load'][1]:.1f}" for r in runs if r.get("load"))
                 + f" on {os.cpu_count()} cores.", "",
                 "| run | acknowledged | lost | forks | gaps | applied twice | longest stall | failovers | "
                 "unnecessary failovers | commits after the last fault | terms |",
                 "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in runs:
            if "history" not in r:
                lines.append(f"| {r.get('run')} | failed: {r['error'][:200]} | | | | | | | | | |")
                continue
            h = r["history"]
            lines.append(f"| {r['run']} | {h['acks']} | **{h['acked_but_lost']}** | **{len(h['forks'])}** | "
                         f"{len(h['gaps'])} | {h['submissions_committed_twice']} | {r['stall_seconds']:.1f} s "
                         f"({r['stall_leases']:.1f} leases; from {_fmt(r['stall_started']['after_event_seconds'], '.0f')} s "
                         f"after the {r['stall_started']['after']}) | {r['failovers']} | **{r['unnecessary_failovers']}** | "
                         f"{r['commits_after_last_fault']} | {','.join(map(str, r['terms']))} |")
        if ok:
            lines += ["", f"In all: {sum(r['history']['acks'] for r in ok)} acknowledged, "
                      f"{sum(r['history']['acked_but_lost'] for r in ok)} lost, "
                      f"{sum(len(r['history']['forks']) for r in ok)} forks, "
                      f"{sum(r['history']['submissions_committed_twice'] for r in ok)} applied twice, longest stall "
                      f"{max(r['stall_seconds'] for r in ok):.1f} s, "
                      f"{sum(r['unnecessary_failovers'] for r in ok)} unnecessary failovers."]
        out[f"### {name}"] = "\n".join(lines)
    return out


def publish_scenarios(results: dict, meta: dict, write: bool) -> bool:
    """Print (and with ``write`` put into docs/reliability.md) each scenario's section; True if sound."""
    sections = render_scenarios(results, meta)
    rel = ROOT / "docs" / "reliability.md"
    md = rel.read_text()
    if SCENARIO_HEADING not in md:
        md = md.rstrip() + f"\n\n{SCENARIO_HEADING}\n\n" + (
            "scripts/chaos.py --freeze / --partition (--netns: peers in network namespaces, "
            "heloco_p2p/tools/netns.py). Every acknowledgement is checked against the final chain "
            "(check_history: lost, forks, gaps, applied twice); the longest stall is the longest time without "
            "a new version from the first fault to the end of the run; a failover is unnecessary when the "
            "holder it replaced was not frozen, killed or isolated in the 3 lease periods before it (a cut of "
            "the one link holder↔claimant leaves the holder reachable by every other peer).\n")
    for heading, body in sections.items():
        print(f"\n{heading}\n\n{body}")
        if heading in md:
            md = replace_section(md, heading, body)
        else:  # under the scenarios' heading, after the sections already there
            start = md.index(SCENARIO_HEADING)
            nxt = md.find("\n## ", start + len(SCENARIO_HEADING))
            cut = len(md) if nxt < 0 else nxt
            md = md[:cut].rstrip() + f"\n\n{heading}\n\n{body}\n" + ("\n" + md[cut:].lstrip("\n") if nxt >= 0 else "")
    if write:
        rel.write_text(md)
    bad = [r for runs in results.values() for r in runs if "history" in r and
           (r["history"]["acked_but_lost"] or r["history"]["forks"] or r["history"]["submissions_committed_twice"])]
    return not bad


# ------------------------------------------------------------------------------ report
def _fmt(x, spec=".1f") -> str:
    return "–" if x is None else format(x, spec)


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _curve(run_dir: Path) -> list[tuple[int, float]]:
    """(version, mean validation loss) of a run's evaluations, in order."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    points = [json.loads(line) for line in path.read_text().splitlines() if '"event": "val"' in line]
    return [(int(e["version"]), float(e["val_loss"]["mean"])) for e in points]


def _reading(results: dict, out: Path) -> str:
    """What the loss and commit figures can and cannot say, from the numbers themselves."""
    f, s = results["faults"], results["faults"]["summary"]
    down = sum(x for x in f["first_commit_seconds"] if x is not None)
    other = f", the run without faults {results['baseline']['summary']['commits']}" if results.get("baseline") else ""
    text = (f"The fault run made {s['commits']} commits{other}. It committed nothing for {down:.0f} s in all "
            f"(kill → first commit, summed over the kills), and every killed peer lost its round in progress and "
            f"started again (DHT, model, state download).")
    h = f["history"]
    sound = not (h["acked_but_lost"] or h["submissions_committed_twice"] or h["gaps"] or h["forks"])
    faults, base = _curve(out / "faults")[1:], _curve(out / "baseline")[1:]
    if results.get("baseline") and faults and base:
        v, end = s["val_loss"]["end"]["version"], s["val_loss"]["end"]["mean"]
        near = min(base, key=lambda p: abs(p[0] - v))
        spread = min(max(x for _, x in c) - min(x for _, x in c) for c in (faults, base))
        if abs(end - near[1]) < spread:
            text += (f" At about the same version the two losses differ by {abs(end - near[1]):.2f}, less than "
                     f"either run's own swings between evaluations (at least {spread:.2f}): runs this short cannot "
                     "tell whether faults cost accuracy beyond the commits they cost."
                     + (" What they do show is that no acknowledged update was lost or applied twice." if sound else ""))
        else:
            text += (f" At about the same version the fault run's loss is {end - near[1]:+.2f} from the other's, "
                     f"more than the runs' own swings between evaluations ({spread:.2f}).")
    return text


def render(results: dict, out: Path) -> str:
    f = results["faults"]
    h = f["history"]
    s = f["summary"]
    lines = [f"{results['date']} · {results['machine']} · `{results['command']}` · tree {results.get('tree', 'unknown')}", "",
             f"{len(s['peers'])} peers ({', '.join(p['name'] + ' ' + p['region'] + ' ×' + format(p['speed_factor'], 'g') for p in s['peers'])}), "
             f"{results['config']} (lease {results['lease_seconds']:g} s, 1 standby, checkpoint every "
             f"{results['checkpoint_every']} commits), {results['minutes']:g} minutes per run. Load average at the start "
             f"and end: {results['load'][0]:.1f} / {results['load'][1]:.1f} on {os.cpu_count()} cores"
             + (" (the machine was shared with other work)." if max(results["load"]) > (os.cpu_count() or 1) else "."), "",
             "| | value |", "|---|---|",
             f"| coordinator kills (SIGKILL to the process group) | {f['coordinator_kills']} (+ {f['other_peers_killed']} other peers killed with them) |",
             f"| failovers | {f['failovers']} of {f['coordinator_kills']} |",
             f"| time to failover (kill → takeover), median / max | {_fmt(_med(f['failover_seconds']))} / "
             f"{_fmt(max(f['failover_seconds'], default=None))} s |",
             f"| kill → first commit, median / max | {_fmt(_med(f['first_commit_seconds']))} / "
             f"{_fmt(max([x for x in f['first_commit_seconds'] if x is not None], default=None))} s |",
             f"| acknowledged submissions | {h['acks']} ({h['duplicate_acks']} duplicates: retries answered from the ledger) |",
             f"| acknowledged but lost | **{h['acked_but_lost']}** |",
             f"| version gaps / forks | **{len(h['gaps'])} / {len(h['forks'])}** (chain 1..{h['top_version']}) |",
             f"| submissions committed twice | {h['submissions_committed_twice']} |",
             f"| final ledger covers every acknowledged sequence number | "
             f"{'yes' if h['ledger'] and not h['ledger']['peers_behind'] else 'no: ' + str(h['ledger'].get('peers_behind'))} |",
             f"| final validation loss (mean of {len(s['val_loss']['end']['per_language'])} languages) | "
             f"{s['val_loss']['end']['mean']:.3f} at version {s['val_loss']['end']['version']} |"]
    if results.get("baseline"):
        b = results["baseline"]["summary"]
        lines.append(f"| same run without faults | {b['val_loss']['end']['mean']:.3f} at version "
                     f"{b['val_loss']['end']['version']} |")
        faults, base = _curve(out / "faults")[1:], _curve(out / "baseline")[1:]
        if faults and base:
            v = s["val_loss"]["end"]["version"]
            near = min(base, key=lambda p: abs(p[0] - v))
            lines.append(f"| without faults, at the version nearest {v} | {near[1]:.3f} at version {near[0]} |")
            lines.append(f"| validation loss range over the run (evaluations after version 0), faults / without | "
                         f"{min(x for _, x in faults):.3f}–{max(x for _, x in faults):.3f} / "
                         f"{min(x for _, x in base):.3f}–{max(x for _, x in base):.3f} |")
    lease = results["lease_seconds"]
    lines += ["", f"The lease is renewed every {lease / 3:g} s and lapses {lease:g} s after its last renewal, so a "
              f"standby takes over between {2 * lease / 3:g} and {lease:g} s after a kill, plus the time to read "
              "the DHT.", ""]
    lines += [_reading(results, out)]
    lines += [
              "", "Per kill: " + "; ".join(
        f"{k['n']}: {'+'.join(k['victims'])} → {k.get('heir', '?')} in {_fmt(k.get('failover_seconds'))} s"
        for k in f["kills"]) + "."]
    ka = results.get("kill_all")
    if ka and ka["record"]:
        r, hk = ka["record"], ka["history"]
        lines += ["", f"**Coordinator and every standby killed together** ({results['kill_all_minutes']:g}-minute run, "
                  f"killed {', '.join(r['victims'])} at version {r['last_version']}): the newest checkpoint was "
                  f"{r['holder']}'s at version {r['checkpoint_version']}. Lost: {r['versions_lost']} versions and "
                  f"{r['acks_after_checkpoint']} acknowledged submissions (everything after the checkpoint; "
                  f"{len(hk['forks'])} versions were committed again with other θ after the resume). Without "
                  f"`--resume` the swarm made {r['commits_without_resume']} commits in {results['wait']:g} s: the "
                  f"restarted peers hold no commit state and no standby is left to claim the lease. Restarted with "
                  f"`--resume`, {r['holder']} took the role in term {r.get('resumed_term', '–')} at version "
                  f"{r.get('resumed_version', '–')}, {_fmt(r.get('takeover_seconds'))} s after the kill "
                  f"({_fmt((r.get('takeover_seconds') or 0) - results['wait'] if r.get('takeover_seconds') else None)} s "
                  f"after the restart, of which {results.get('resume_wait', 0):g} s waiting for a standby's claim before "
                  f"taking the role); first commit {_fmt(r.get('first_commit_seconds'))} s after the kill. Final "
                  f"validation loss {ka['summary']['val_loss']['end']['mean']:.3f} at version "
                  f"{ka['summary']['val_loss']['end']['version']}."]
    return "\n".join(lines)


def _tree() -> str:
    """The commit the run used, and whether the working tree differed from it."""
    return git_tree(ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=9.0, help="length of the fault run (and of the baseline)")
    ap.add_argument("--kills", type=int, default=10, help="coordinator kills in the fault run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--peers", default=str(ROOT / "peers" / "*.yaml"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "testnet.yaml"))
    ap.add_argument("--other-kill-prob", type=float, default=0.5,
                    help="chance that a random non-standby peer dies with the coordinator")
    ap.add_argument("--eval-every", type=float, default=30.0)
    ap.add_argument("--baseline", action="store_true", help="also a fault-free run of the same length")
    ap.add_argument("--kill-all", action="store_true", help="also a run that kills the coordinator and all standbys")
    ap.add_argument("--kill-all-minutes", type=float, default=5.0)
    ap.add_argument("--wait", type=float, default=30.0, help="--kill-all: seconds before the --resume restart")
    ap.add_argument("--no-faults", action="store_true", help="skip the fault run (e.g. only --kill-all)")
    ap.add_argument("--write-results", action="store_true")
    ap.add_argument("--render-only", action="store_true", help="rewrite the table from OUT/chaos.json, no runs")
    sc = ap.add_argument_group("freeze and partition scenarios (instead of the kill run)")
    sc.add_argument("--freeze", action="store_true", help="the freeze scenarios: " + ", ".join(FREEZE))
    sc.add_argument("--partition", action="store_true", help="the partition scenarios (need --netns): "
                    + ", ".join(PARTITION))
    sc.add_argument("--scenario", action="append", default=[], choices=sorted(SCENARIOS), help="one scenario (repeatable)")
    sc.add_argument("--netns", action="store_true", help="every peer in a network namespace of its own (root)")
    sc.add_argument("--runs", type=int, default=1, help="runs of each scenario")
    sc.add_argument("--scenario-minutes", type=float, default=3.0, help="length of each scenario run")
    sc.add_argument("--freeze-seconds", type=float, default=15.0, help="how long a frozen peer stays frozen")
    sc.add_argument("--cut-seconds", type=float, default=12.0, help="how long the coordinator↔standby link stays cut")
    sc.add_argument("--isolate-seconds", type=float, default=15.0, help="how long the coordinator stays isolated")
    sc.add_argument("--warmup-commits", type=int, default=10, help="commits before the fault")
    sc.add_argument("--tiny", action="store_true", help="a 3-peer cast (de, fr, en) on the tiny test model "
                    "(launcher.write_test_config) instead of --peers and --config")
    sc.add_argument("--lease-seconds", type=float, default=6.0, help="--tiny: the lease")
    args = ap.parse_args()
    args.scenarios = list(dict.fromkeys((FREEZE if args.freeze else []) + (PARTITION if args.partition else [])
                                        + args.scenario))
    if args.scenarios and args.render_only:  # the sections again, from OUT/chaos.json
        saved = json.loads((args.out / "chaos.json").read_text())
        runs = {n: saved["scenarios"][n] for n in args.scenarios if n in saved.get("scenarios", {})}
        publish_scenarios(runs, saved["scenarios_meta"], args.write_results)
        return
    if args.scenarios:
        scenarios_main(args)
        return
    if args.render_only:
        results = json.loads((args.out / "chaos.json").read_text())
        cfg = load_config(args.config)
        results.setdefault("resume_wait", cfg.swarm.lease_seconds * (1 + cfg.swarm.num_standbys / 2)
                           + cfg.swarm.heartbeat_seconds)
        _publish(results, args)
        return
    profiles = load_profiles(args.peers)
    cfg = load_config(args.config)
    args.out.mkdir(parents=True, exist_ok=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    load_start = os.getloadavg()[0]
    commit = _tree()
    results = {"command": command, "date": str(datetime.date.today()), "tree": commit,
               "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
               "config": Path(args.config).name, "lease_seconds": cfg.swarm.lease_seconds,
               "checkpoint_every": cfg.swarm.checkpoint_every, "minutes": args.minutes,
               "kill_all_minutes": args.kill_all_minutes, "wait": args.wait, "seed": args.seed,
               "resume_wait": cfg.swarm.lease_seconds * (1 + cfg.swarm.num_standbys / 2) + cfg.swarm.heartbeat_seconds}
    if not args.no_faults:
        results["faults"] = fault_run(args, profiles, args.out / "faults")
    if args.baseline:
        results["baseline"] = baseline_run(args, profiles, args.out / "baseline")
    if args.kill_all:
        results["kill_all"] = kill_all_run(args, profiles, args.out / "kill-all")
    results["load"] = [load_start, os.getloadavg()[0]]
    (args.out / "chaos.json").write_text(json.dumps(results, indent=2, default=str))
    _publish(results, args)


def scenarios_main(args) -> None:
    """--freeze / --partition / --scenario: run them, write OUT/chaos.json's "scenarios" and (with
    --write-results) a section of docs/reliability.md per scenario; exit 1 on a loss or fork."""
    from heloco_p2p.tools.testnet import PeerProfile

    if args.tiny:
        profiles = [PeerProfile(name=n, region=r, device="cpu", batch_size=8) for n, r in (("a", "de"), ("b", "fr"),
                                                                                           ("c", "en"))]
        cast = "3 peers (a de, b fr, c en) on the tiny test model (launcher.write_test_config)"
    else:
        profiles = load_profiles(args.peers)
        cast = (f"{len(profiles)} peers ({', '.join(f'{p.name} {p.region} ×{p.speed:g}' for p in profiles)}), "
                f"{Path(args.config).name}")
    cast += ", each in its own network namespace" if args.netns else ", on 127.0.0.1"
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "date": str(datetime.date.today()), "tree": _tree(), "cast": cast,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only"}
    path = args.out / "chaos.json"
    saved = json.loads(path.read_text()) if path.exists() else {}

    def save(results: dict) -> None:
        saved.setdefault("scenarios", {}).update(results)
        saved["scenarios_meta"] = meta
        path.write_text(json.dumps(saved, indent=2, default=str))

    results = scenario_runs(args, profiles, args.out, save)
    if not publish_scenarios(results, meta, args.write_results):
        sys.exit(1)


def _publish(results: dict, args) -> None:
    if "faults" not in results:
        print(json.dumps(results.get("kill_all", {}).get("record"), indent=2, default=str))
        return
    text = render(results, args.out)
    print(text)
    if args.write_results:
        rel = ROOT / "docs" / "reliability.md"
        rel.write_text(replace_section(rel.read_text(), HEADING, text))
    h = results["faults"]["history"]
    if h["acked_but_lost"] or h["gaps"] or h["forks"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
