#!/usr/bin/env python
"""Swarm figures on this machine: a real 3-peer swarm of the tiny model on 127.0.0.1.

For each compression (none, fp16, 8bit), a run of --seconds: commits per minute, round-trip time
per submission and its parts (serialize, transfer, decode, commit, replicate, encode reply),
bytes per submission, staleness per peer. Then failover: the coordinator is SIGKILLed --kills
times (the killed peer rejoins with its identity each time) and the time from kill to the
standby's takeover is measured.

    python scripts/bench_swarm.py                       # about 6 minutes
    python scripts/bench_swarm.py --seconds 30 --kills 2 --write-results

Writes bench/swarm.json; --write-results puts the tables in docs/results.md ("## Swarm") and
the failover figures in docs/reliability.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from heloco_p2p.tools.launcher import LocalSwarm, write_test_config  # noqa: E402
from heloco_p2p.tools.report import replace_section  # noqa: E402

REGIONS = ["de", "fr", "en"]
SWARM_HEADING = "### Submission costs, bytes and failover"  # a subsection of "## Swarm" in docs/results.md


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def run_compression(compression: str, seconds: float, workdir: Path) -> dict:
    cfg = write_test_config(workdir / "cfg.yaml", compression=compression)
    sw = LocalSwarm(workdir, f"bench-{uuid.uuid4().hex[:6]}")
    try:
        sw.start("p0", REGIONS[0], "--config", str(cfg))
        for i, r in enumerate(REGIONS[1:], start=1):
            sw.start(f"p{i}", r)
        sw.wait_until(lambda: all(sw.events(f"p{i}", "ack") for i in range(3)), 180, "every peer's first commit")
        t0 = time.time()
        time.sleep(seconds)
        t1 = time.time()
    finally:
        sw.close()
    acks = [a for n in sw.procs for a in sw.events(n, "ack") if t0 <= a["time"] <= t1 and not a["duplicate"]]
    remote = [a for a in acks if a["server"] and a["peer"] != sw.events("p0", "ack")[0]["peer"]]
    parts = defaultdict(list)
    for a in remote:
        s = a["server"]
        parts["serialize"].append(a["serialize_seconds"])
        parts["rtt"].append(a["rtt"])
        for k in ("decode", "commit", "replicate", "encode_reply"):
            parts[k].append(s[k])
        parts["transfer"].append(a["rtt"] - sum(s.values()))
    staleness = defaultdict(list)
    for a in acks:
        staleness[a["name"]].append(a["staleness"] or 0)
    n_params = 920192
    return {
        "compression": compression,
        "seconds": t1 - t0,
        "commits_per_minute": 60 * len(acks) / (t1 - t0),
        "bytes_per_submission": _med([a["bytes"] for a in acks]),
        "bytes_per_parameter": _med([a["bytes"] for a in acks]) / n_params,
        "reply_bytes": _med([a["reply_bytes"] for a in acks]),
        "ms": {k: 1000 * _med(v) for k, v in parts.items()},
        "staleness": {n: {"mean": statistics.fmean(v), "max": max(v), "hist": dict(sorted(
            {str(x): v.count(x) for x in set(v)}.items(), key=lambda kv: int(kv[0])))} for n, v in staleness.items()},
    }


def run_failover(kills: int, workdir: Path) -> dict:
    cfg = write_test_config(workdir / "cfg.yaml")
    sw = LocalSwarm(workdir, f"chaos-{uuid.uuid4().hex[:6]}")
    times, gaps = [], []
    try:
        sw.start("p0", "de", "--config", str(cfg))
        sw.start("p1", "fr")
        sw.start("p2", "en")
        sw.wait_until(lambda: len(sw.all_events("commit")) >= 10, 180, "10 commits")
        for _ in range(kills):
            seen = len(sw.all_events("takeover"))
            coordinator = _coordinator_name(sw)
            sw.wait_until(lambda: _has_standby(sw), 60, "a standby")
            killed_at = time.time()
            sw.kill(coordinator)
            sw.wait_until(lambda seen=seen: len(sw.all_events("takeover")) > seen, 90, "takeover")
            take = sorted(sw.all_events("takeover"), key=lambda e: e["time"])[seen]
            times.append(take["time"] - killed_at)
            sw.wait_until(lambda take=take: any(e["time"] > take["time"] for e in sw.all_events("commit")), 90,
                          "a commit after takeover")
            first = min((e for e in sw.all_events("commit") if e["time"] > take["time"]), key=lambda e: e["time"])
            gaps.append(first["time"] - killed_at)
            # the killed peer comes back with the same identity (same peer id, same records)
            sw.start(coordinator, "de" if coordinator == "p0" else ("fr" if coordinator == "p1" else "en"))
            sw.wait_until(lambda c=coordinator, t=killed_at: len(sw.events(c, "ack")) >= 1 + _acks_before(sw, c, t), 180,
                          "the restarted peer's first commit")
    finally:
        sw.close()
    return {"kills": kills, "lease_seconds": 4.0, "takeover_seconds": times, "first_commit_after_kill_seconds": gaps}


def _coordinator_name(sw: LocalSwarm) -> str:
    """The peer whose metrics show the most recent commit is the coordinator now."""
    latest = {n: max((e["time"] for e in sw.events(n, "commit")), default=0) for n in sw.procs if sw.procs[n].poll() is None}
    return max(latest, key=latest.get)


def _has_standby(sw: LocalSwarm) -> bool:
    return any("standby holds a replica" in (sw.dir / f"{n}.log").read_text() or
               "replica loaded" in (sw.dir / f"{n}.log").read_text() for n in sw.procs)


def _acks_before(sw: LocalSwarm, name: str, t: float) -> int:
    return len([a for a in sw.events(name, "ack") if a["time"] < t])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--compressions", default="none,fp16,8bit")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    results = {"compressions": [], "failover": None}
    with tempfile.TemporaryDirectory(prefix="bench-swarm-") as tmp:
        for c in args.compressions.split(","):
            d = Path(tmp) / c
            d.mkdir()
            results["compressions"].append(run_compression(c, args.seconds, d))
            print(json.dumps(results["compressions"][-1]), flush=True)
        if args.kills:
            d = Path(tmp) / "failover"
            d.mkdir()
            results["failover"] = run_failover(args.kills, d)
            print(json.dumps(results["failover"]), flush=True)
    command = "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:])
    machine = f"{platform.machine()}, {os.cpu_count()} cores, CPU only"
    head = f"{datetime.date.today()} · {machine} · `{command}` · 3 peers (de, fr, en), tiny model (0.92M), 1 thread each, H=10, batch 8 × 64, lease 4 s"
    lines = [head, "", "| compression | commits/min | bytes/submission | bytes/param | RTT ms | serialize | transfer | decode | commit | replicate | encode reply |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["compressions"]:
        ms = r["ms"]
        lines.append(f"| {r['compression']} | {r['commits_per_minute']:.1f} | {r['bytes_per_submission']:,.0f} | {r['bytes_per_parameter']:.2f} | "
                     f"{ms.get('rtt', float('nan')):.1f} | {ms.get('serialize', float('nan')):.1f} | {ms.get('transfer', float('nan')):.1f} | "
                     f"{ms.get('decode', float('nan')):.1f} | {ms.get('commit', float('nan')):.1f} | {ms.get('replicate', float('nan')):.1f} | "
                     f"{ms.get('encode_reply', float('nan')):.1f} |")
    lines += ["", "Median milliseconds per submission from a non-coordinator peer; transfer = RTT − server-side parts "
              "(both directions, including the reply's θ, sent uncompressed so replicas stay exact).", "",
              "Staleness per peer (compression none): " + "; ".join(
                  f"{n}: mean {s['mean']:.2f}, max {s['max']}, histogram {s['hist']}"
                  for n, s in results["compressions"][0]["staleness"].items())]
    table = "\n".join(lines)
    print(table)
    if results["failover"]:
        f = results["failover"]
        fo = (f"{datetime.date.today()} · {machine} · `{command}`\n\nCoordinator SIGKILLed {f['kills']} times (lease 4 s; "
              f"the killed peer rejoined with its identity each time). Time from kill to the standby's takeover: "
              + ", ".join(f"{t:.1f}" for t in f["takeover_seconds"]) + f" s (median {_med(f['takeover_seconds']):.1f} s); "
              "to the first commit after the kill: " + ", ".join(f"{t:.1f}" for t in f["first_commit_after_kill_seconds"]) + " s.")
        print(fo)
    (ROOT / "bench").mkdir(exist_ok=True)
    (ROOT / "bench" / "swarm.json").write_text(json.dumps(results, indent=2))
    if args.write_results:
        path = ROOT / "docs" / "results.md"
        path.write_text(replace_section(path.read_text(), SWARM_HEADING, table))
        if results["failover"]:
            rel = ROOT / "docs" / "reliability.md"
            text = rel.read_text() if rel.exists() else "# Reliability\n\nFigures from fault injection on this machine.\n"
            rel.write_text(replace_section(text, "## Coordinator failover", fo))


if __name__ == "__main__":
    main()
