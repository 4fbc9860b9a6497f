#!/usr/bin/env python
"""Flood the coordinator with submissions and measure what it costs the swarm.

A real 2-peer swarm of the tiny model on 127.0.0.1 (``a`` founds the run and coordinates, ``b``
trains honestly). After a quiet phase, ``--senders`` fake peers (each its own libp2p identity,
a bare p2pd, no DHT) open ``--streams`` submission streams each, as fast as the coordinator
answers, for ``--seconds``: full-size pseudo-gradients that the coordinator has to read and
decode before its checks refuse them (‖Δ‖ far beyond the norm bound, and a base version of 0
that is too stale once the run passes version 64). Then a quiet phase again.

Measured per phase: the coordinator's memory (RSS of the peer process and of its p2pd, from
/proc every 0.5 s), the honest peer's submissions (round-trip time of the accepted attempt,
attempts, how many), the coordinator's commits, the latency of a state download by an honest
observer every second, and what the flood's requests were answered.

    python scripts/flood.py                                  # about 3 minutes
    python scripts/flood.py --keyed                          # the swarm has a key, the flooders do not
    python scripts/flood.py --seconds 30 --write-results     # also the "## Flood" section of docs/reliability.md

Writes bench/flood[-keyed].json.
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from heloco_p2p.swarm.lifetime import all_proc_stats  # noqa: E402
from heloco_p2p.tools.launcher import LocalSwarm, write_test_config  # noqa: E402
from heloco_p2p.tools.monitor import live_coordinator  # noqa: E402
from heloco_p2p.tools.report import replace_section  # noqa: E402

HEADING = "## Flood"


# ------------------------------------------------------------------------------------------- /proc
def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> dict[int, str]:
    return {child: st.name for child, st in all_proc_stats().items() if st.ppid == pid}


class Sampler(threading.Thread):
    """RSS of the coordinator's peer process and of its p2pd, every ``every`` seconds."""

    def __init__(self, pid: int, every: float = 0.5):
        super().__init__(daemon=True)
        self.pid, self.every, self.samples, self.stop = pid, every, [], threading.Event()

    def run(self):
        while not self.stop.wait(self.every):
            kids = children(self.pid)
            p2pd = sum(rss_mib(p) for p, name in kids.items() if "p2pd" in name)
            self.samples.append((time.time(), rss_mib(self.pid), p2pd))


class Prober(threading.Thread):
    """An honest observer downloading the state from the coordinator every second."""

    def __init__(self, node, coordinator: str):
        super().__init__(daemon=True)
        self.node, self.coordinator, self.samples, self.stop = node, coordinator, [], threading.Event()

    def run(self):
        while not self.stop.wait(1.0):
            t = time.perf_counter()
            try:
                reply, _ = self.node.call(self.coordinator, "state", {"run_id": self.node.run_id}, timeout=30)
                ok = reply.get("status") == "ok"
            except Exception:
                ok = False
            self.samples.append((time.time(), time.perf_counter() - t, ok))


# ------------------------------------------------------------------------------------------- the flood
class Flood:
    """``senders`` bare p2pd identities, ``streams`` concurrent submissions each, until stopped."""

    def __init__(self, run_id: str, maddr: str, coordinator: str, header: dict, payload: bytes, senders: int,
                 streams: int):
        self.run_id, self.maddr, self.coordinator = run_id, maddr, coordinator
        self.header, self.payload, self.senders, self.streams = header, payload, senders, streams
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.p2ps = []
        self.replies: list[tuple[float, str]] = []  # (time, status or reason)
        self.bytes_sent = 0
        self._stop = None
        self._tasks = []

    def _run(self, coro, timeout=120):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def open(self):
        from hivemind.p2p import P2P

        async def one():
            return await P2P.create(initial_peers=[self.maddr], host_maddrs=["/ip4/127.0.0.1/tcp/0"])

        async def all_():
            return await asyncio.gather(*(one() for _ in range(self.senders)))

        self.p2ps = self._run(all_())

    async def _worker(self, p2p, k: int):
        from hivemind.p2p import PeerID

        from heloco_p2p.swarm.wire import request

        seq = 0
        target = PeerID.from_base58(self.coordinator)
        while not self._stop.is_set():
            seq += 1
            try:
                _, reader, writer = await p2p.call_binary_stream_handler(target, f"heloco.{self.run_id}.submit")
                try:
                    reply, _ = await asyncio.wait_for(request(reader, writer, dict(self.header, seq=seq * 100 + k),
                                                              self.payload, expect_continue=True), 60)
                finally:
                    writer.close()
                outcome = reply.get("reason") or reply.get("status")
                if reply.get("reason") not in ("busy", "rate_limited", "unauthenticated"):
                    self.bytes_sent += len(self.payload)  # the coordinator asked for the payload
            except Exception as exc:  # the stream broke or timed out: counted by kind
                outcome = f"error:{getattr(exc, 'code', None) or type(exc).__name__}"
                await asyncio.sleep(0.1)
            self.replies.append((time.time(), outcome))

    def start(self):
        async def go():
            self._stop = asyncio.Event()
            self._tasks = [asyncio.ensure_future(self._worker(p, k)) for p in self.p2ps for k in range(self.streams)]

        self._run(go())

    def stop(self):
        async def go():
            self._stop.set()
            await asyncio.wait(self._tasks, timeout=70)

        if self._stop is not None:
            self._run(go())

    def close(self):
        async def go():
            for p in self.p2ps:
                try:
                    await p.shutdown()
                except Exception:
                    pass

        try:
            self._run(go(), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)


def flood_request(cfg_path: Path, run_id: str) -> tuple[dict, bytes]:
    """A full-size pseudo-gradient of the run's layout that its norm check refuses."""
    from heloco_p2p.config import load_config
    from heloco_p2p.data import load_tokenizer
    from heloco_p2p.local import build_model
    from heloco_p2p.local.model import param_names, trainable_params
    from heloco_p2p.swarm.wire import encode_tensors

    cfg = load_config(cfg_path)
    model = build_model(cfg.model, load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.data.vocab_size), seed=0)
    g = torch.Generator().manual_seed(0)
    delta = [torch.randn(p.shape, generator=g) * 100.0 for p in trainable_params(model)]
    meta, payload = encode_tensors(delta, cfg.swarm.compression)
    return {"run_id": run_id, "seq": 0, "base_version": 0, "steps": 1, "term": 0, "tensors": meta,
            "names": param_names(model)}, payload


# ------------------------------------------------------------------------------------------- phases
def _stats(xs):
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    return {"n": len(xs), "median": statistics.median(xs), "p90": xs[min(len(xs) - 1, int(0.9 * len(xs)))],
            "max": xs[-1]}


def summarize(phases: dict, sw: LocalSwarm, sampler: Sampler, prober: Prober, flood: Flood) -> dict:
    out = {}
    for name, (t0, t1) in phases.items():
        acks = [a for a in sw.events("b", "ack") if t0 <= a["time"] < t1 and not a["duplicate"]]
        commits = [c for c in sw.events("a", "commit") if t0 <= c["time"] < t1]
        mem = [(rss, p2pd) for t, rss, p2pd in sampler.samples if t0 <= t < t1]
        probes = [(dt, ok) for t, dt, ok in prober.samples if t0 <= t < t1]
        flood_replies = Counter(r for t, r in flood.replies if t0 <= t < t1)
        out[name] = {
            "seconds": t1 - t0,
            "commits_per_min": 60 * len(commits) / (t1 - t0),
            "honest_acks": len(acks),
            "honest_rtt_s": _stats([a["rtt"] for a in acks]),
            "honest_attempts": _stats([a["attempts"] for a in acks]),
            "honest_rejected": len([r for r in sw.events("b", "rejected") if t0 <= r["time"] < t1]),
            "coordinator_rss_mib": _stats([m[0] for m in mem]),
            "coordinator_p2pd_rss_mib": _stats([m[1] for m in mem]),
            "state_download_s": _stats([dt for dt, ok in probes if ok]),
            "state_download_failed": sum(1 for _, ok in probes if not ok),
            "flood_replies": dict(flood_replies.most_common()),
        }
    return out


def run(args) -> dict:
    from heloco_p2p.swarm.auth import generate_key_file
    from heloco_p2p.swarm.node import SwarmNode

    work = Path(tempfile.mkdtemp(prefix="flood-"))
    key_file = None
    key = None
    if args.keyed:
        key_file = work / "swarm.key"
        key = generate_key_file(key_file)
    cfg = write_test_config(work / "cfg.yaml")
    run_id = f"flood-{uuid.uuid4().hex[:6]}"
    sw = LocalSwarm(work, run_id, swarm_key_file=key_file)
    observer = flood = sampler = prober = None
    phases = {}
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.wait_until(lambda: len(sw.events("b", "ack")) >= 3, 240, "the honest peer's first submissions")
        coordinator = sw.events("a", "ack")[0]["peer"] if sw.events("a", "ack") else None
        observer = SwarmNode(run_id, initial_peers=[sw.maddr], client_mode=True, swarm_key=key)
        coordinator = coordinator or live_coordinator(observer.records.lease_claims(), time.time(), 60.0).peer_id
        header, payload = flood_request(cfg, run_id)
        flood = Flood(run_id, sw.maddr, coordinator, header, payload, args.senders, args.streams)
        flood.open()
        sampler = Sampler(sw.procs["a"].pid)
        prober = Prober(observer, coordinator)
        sampler.start()
        prober.start()
        t = time.time()
        time.sleep(args.seconds)
        phases["before"] = (t, time.time())
        t = time.time()
        flood.start()
        time.sleep(args.seconds)
        flood.stop()
        phases["flood"] = (t, time.time())
        t = time.time()
        time.sleep(args.seconds / 2)
        phases["after"] = (t, time.time())
        alive = {n: p.poll() is None for n, p in sw.procs.items()}
    finally:
        for th in (sampler, prober):
            if th is not None:
                th.stop.set()
        if flood is not None:
            flood.close()
        if observer is not None:
            observer.shutdown()
        sw.close()
    result = summarize(phases, sw, sampler, prober, flood)
    from heloco_p2p.config import load_config

    sw_cfg = load_config(cfg).swarm
    lease_limits = {k: getattr(sw_cfg, k) for k in ("max_pending_submits", "submit_rate", "submit_burst")}
    return {
        "date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, CPU only",
        "keyed": args.keyed, "senders": args.senders, "streams": args.streams, "seconds": args.seconds,
        "payload_mib": len(payload) / (1 << 20), "limits": lease_limits, "peers_alive_at_end": alive,
        "flood_requests": len(flood.replies), "flood_payload_mib_read": flood.bytes_sent / (1 << 20),
        "phases": result,
        "command": "python scripts/flood.py " + " ".join(sys.argv[1:]),
    }


def markdown(results: list[dict]) -> str:
    lines = []
    for r in results:
        ph = r["phases"]
        lim = r["limits"]
        what = ("that the coordinator refuses from its header (`unauthenticated`), before the payload is sent"
                if r["keyed"] else "that the coordinator must read and decode before refusing it (`norm_too_large`, "
                                   "or `too_stale` past version 64)")
        lines += [
            f"{r['date']} · {r['machine']} · `{r['command']}`",
            "",
            f"{'Keyed swarm, keyless flooders' if r['keyed'] else 'Open swarm (no key)'}: {r['senders']} fake peers × "
            f"{r['streams']} streams for {r['seconds']:.0f} s, each request a full-size pseudo-gradient of the tiny model "
            f"({r['payload_mib']:.1f} MiB) {what}; {r['flood_requests']} flood requests, "
            f"{r['flood_payload_mib_read']:.0f} MiB of payload read by the coordinator. Limits: "
            f"{lim['max_pending_submits']} submissions in flight, {lim['submit_rate']:g}/s per peer (burst "
            f"{lim['submit_burst']:g}). Peers alive at the end: "
            f"{', '.join(n for n, a in r['peers_alive_at_end'].items() if a) or 'none'}.",
            "",
            "| phase | coordinator RSS MiB (median / max) | its p2pd RSS MiB (max) | honest submissions | honest RTT s (median / p90) | attempts (max) | rejected | state download s (median / p90) | commits/min |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in ("before", "flood", "after"):
            p = ph[name]
            rss, p2pd, rtt, dl = p["coordinator_rss_mib"], p["coordinator_p2pd_rss_mib"], p["honest_rtt_s"], p["state_download_s"]
            f = lambda s, k, fmt: format(s[k], fmt) if s.get("n") else "-"  # noqa: E731
            lines.append(f"| {name} | {f(rss, 'median', '.0f')} / {f(rss, 'max', '.0f')} | {f(p2pd, 'max', '.0f')} | "
                         f"{p['honest_acks']} | {f(rtt, 'median', '.2f')} / {f(rtt, 'p90', '.2f')} | "
                         f"{f(p['honest_attempts'], 'max', 'd')} | {p['honest_rejected']} | "
                         f"{f(dl, 'median', '.2f')} / {f(dl, 'p90', '.2f')} | {p['commits_per_min']:.0f} |")
        replies = ph["flood"]["flood_replies"]
        before, during = ph["before"]["coordinator_rss_mib"], ph["flood"]["coordinator_rss_mib"]
        bound = 2 * lim["max_pending_submits"] * r["payload_mib"]
        lines += ["", "Flood requests were answered: " + ", ".join(f"{k} {v}" for k, v in replies.items()) + ". "
                  f"Coordinator RSS during the flood: at most {during['max']:.0f} MiB, {during['max'] - before['max']:+.0f} "
                  f"MiB over the quiet phase's maximum (submissions in flight are bounded by "
                  f"{lim['max_pending_submits']} × (payload + decoded copy) ≈ {bound:.0f} MiB).", ""]
    lines += ["Reading: the flooders run on the same machine (2 shared cores) as both peers, so their p2pd processes "
              "and the coordinator's stream handling compete with training for CPU; where the honest round trip and "
              "the commit rate fall by a similar factor with and without a key (with a key no flood payload is read), "
              "that cost is CPU, not queueing. An honest submission told `busy` waits `retry_after` and is sent again "
              "(the attempts column); half the submission slots are kept for peers with an accepted submission, so "
              "fresh identities cannot take them all.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--senders", type=int, default=12)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=40.0, help="length of the quiet and flood phases")
    ap.add_argument("--keyed", action="store_true", help="the swarm has a swarm key (the flooders do not)")
    ap.add_argument("--both", action="store_true", help="run the open and the keyed swarm, one after the other")
    ap.add_argument("--write-results", action="store_true", help='replace the "## Flood" section of docs/reliability.md')
    ap.add_argument("--report-only", action="store_true", help="no run: the tables from the last bench/flood*.json")
    args = ap.parse_args()
    results = []
    for keyed in ((False, True) if args.both else (args.keyed,)):
        out = ROOT / "bench" / f"flood{'-keyed' if keyed else ''}.json"
        if args.report_only:
            results.append(json.loads(out.read_text()))
            continue
        args.keyed = keyed
        r = run(args)
        results.append(r)
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(r, indent=1))
        print(json.dumps(r["phases"], indent=1))
    text = markdown(results)
    print(text)
    if args.write_results:
        doc = ROOT / "docs" / "reliability.md"
        doc.write_text(replace_section(doc.read_text(), HEADING, text))


if __name__ == "__main__":
    main()
