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
from heloco_p2p.tools.report import replace_section  # noqa: E402
from heloco_p2p.tools.testnet import load_profiles, peer_args, run_testnet  # noqa: E402

HEADING = "## Chaos"


# ------------------------------------------------------------------------------ reading the swarm
def _events(peers_dir: Path) -> list[dict]:
    out = []
    for f in sorted(peers_dir.glob("*.jsonl")):
        out += [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    return sorted(out, key=lambda e: e["time"])


def _names(sw) -> dict[str, str]:
    """peer id → name, from the events each peer logs about itself."""
    out = {}
    for name in sw.procs:
        for e in sw.events(name, "heartbeat")[:1] + sw.events(name, "train_start")[:1]:
            if e.get("peer"):
                out[e["peer"]] = name
    return out


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
    top = max(by_version, default=0)
    gaps = [v for v in range(1, top + 1) if v not in by_version]
    forks = sorted(v for v, cs in by_version.items() if len({c["digest"] for c in cs}) > 1)
    final = {v: max(cs, key=lambda c: (c["term"], c["time"])) for v, cs in by_version.items()}
    in_chain = {(c["peer"], c["seq"]): v for v, c in final.items()}
    twice = len(final) - len(in_chain)  # one submission committed at two versions of the chain
    acks = [e for e in events if e["event"] == "ack"]
    lost, lost_duplicates = [], []
    for a in acks:
        if a.get("duplicate"):
            if (a["peer"], a["seq"]) not in in_chain:
                lost_duplicates.append(a)
            continue
        c = final.get(a["version"])
        if c is None or c["digest"] != a["digest"] or (c["peer"], c["seq"]) != (a["peer"], a["seq"]):
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
    import subprocess

    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


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
    args = ap.parse_args()
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
