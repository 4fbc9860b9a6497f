#!/usr/bin/env python
"""The benchmark suite: how close the swarm comes to keeping every device busy, in one go.

1. utilization    a 3-peer testnet (configs/testnet.yaml, peers berlin/paris/moscow at speeds 1,
                  0.6, 0.25): per peer, time in inner steps (emulated idling included) / wall time,
                  in the steady state (from the end of a peer's first round to the end of its last),
                  with overlapped rounds; the full run also measures blocking rounds to compare.
2. swarm_vs_solo  two swarm peers against two solo ``heloco-peer train`` runs of the same model
                  (configs/tiny.yaml), started together, one thread each: total tokens/s ratio
                  (solo windows before and after the swarm window, averaged).
3. commit         ms per outer commit (lookahead + heloco, 21M-parameter Llama shapes) and its
                  effective GB/s beside torch's own ``add_`` over the same tensors, same run; the θ
                  digest and the submission check the coordinator adds, also at 125M.
4. wire           bytes per parameter, relative error and loopback round trip of one submission
                  per compression, beside raw hivemind stream throughput of the same size.
5. join           process start → ready (DHT, config, state) → first inner step → first accepted
                  submission, for tiny, small and base, joining a coordinator that does not train.
6. fan_in         submissions/s one coordinator (small model, one standby) sustains with N
                  synthetic senders that do not train, and where the time goes.

    python scripts/bench.py --quick                  # smoke run, a few minutes on 2 cores
    python scripts/bench.py --write-results          # full run (about 20 minutes)

Prints a table; writes bench/results.json (keeping the keys other benchmarks own, e.g. ``wan``)
(keys: utilization {peer: fraction}, swarm_vs_solo,
commit, wire, join, fan_in) and bench/results-detail.json (everything, with date, machine,
command and the load average before and after); ``--write-results`` replaces the subsection
"### Benchmark suite" of docs/results.md. Item functions come from bench_outer.py and
bench_wire.py; peers are real processes on 127.0.0.1 (heloco_p2p.tools.launcher).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import bench_outer  # noqa: E402
import bench_wire  # noqa: E402

from heloco_p2p.config import read_yaml  # noqa: E402
from heloco_p2p.swarm.lifetime import all_proc_stats, kill_group, proc_stat  # noqa: E402
from heloco_p2p.tools.launcher import LocalSwarm  # noqa: E402
from heloco_p2p.tools.report import replace_section  # noqa: E402

RESULT_KEYS = ("utilization", "swarm_vs_solo", "commit", "wire", "join", "fan_in")
RESULTS_HEADING = "### Benchmark suite"  # a subsection of "## Benchmarks" in docs/results.md
CAST = ("berlin", "paris", "moscow")  # peers/*.yaml: speeds 1, 0.6, 0.25


def _med(xs):
    return statistics.median(xs) if xs else float("nan")


def _write_config(path: Path, base: str, update: dict) -> Path:
    """A run config from configs/<base>.yaml with sections updated (``{"inner": {"steps_per_round": 2}}``)."""
    tree = read_yaml(ROOT / "configs" / f"{base}.yaml")
    for section, values in update.items():
        tree.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(tree))
    return path


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) of every live process in a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    return sum((st.utime + st.stime) / tick for st in all_proc_stats().values() if st.pgrp == pgid)


def peer_cpu_parts(pgid: int) -> dict:
    """CPU seconds of a peer's process group by part: its main (training) thread, its other threads
    (event loop, commits, maintenance, submissions), and its child processes (DHT, p2pd)."""
    tick = os.sysconf("SC_CLK_TCK")
    parts = {"training_thread": 0.0, "other_threads": 0.0, "children": 0.0}
    for pid, st in all_proc_stats().items():
        if st.pgrp != pgid:
            continue
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            continue
        for tid in tids:
            t = proc_stat(pid, tid)
            if t is None:
                continue
            key = "children" if pid != pgid else ("training_thread" if tid == pid else "other_threads")
            parts[key] += (t.utime + t.stime) / tick
    return parts


# ---------------------------------------------------------------------------------- 1 utilization
def steady_utilization(rounds: list[dict]) -> float | None:
    """Time in inner steps / wall time between the end of the first and of the last round: each
    interval holds one round's steps plus whatever kept the peer from stepping (submission in
    blocking mode; fold, wait and bookkeeping in overlapped mode). None with fewer than 3 rounds."""
    rounds = sorted(rounds, key=lambda r: r["time"])
    if len(rounds) < 3:
        return None
    return sum(r["compute_seconds"] for r in rounds[1:]) / (rounds[-1]["time"] - rounds[0]["time"])


def measure_utilization(minutes: float, workdir: Path, overlap: bool) -> dict:
    from heloco_p2p.tools.testnet import load_profiles, run_testnet

    peers = workdir / "cast"
    peers.mkdir(parents=True, exist_ok=True)
    for name in CAST:
        shutil.copy(ROOT / "peers" / f"{name}.yaml", peers / f"{name}.yaml")
    cfg = _write_config(workdir / "testnet.yaml", "testnet", {"swarm": {"overlap": overlap}})
    out = workdir / "out"
    summary = run_testnet(load_profiles(str(peers / "*.yaml")), str(cfg), minutes=minutes, out=out, live=False,
                          eval_every=1e9)  # no evaluation while the peers train: it would take their CPU
    per_peer = {}
    for name in CAST:
        events = [json.loads(x) for x in (out / "peers" / f"{name}.jsonl").read_text().splitlines() if x.strip()]
        rounds = [e for e in events if e.get("event") == "round"]
        rounds.sort(key=lambda r: r["time"])
        # what kept the peer from stepping, per round: the submission in blocking mode; fold, wait and
        # bookkeeping (DyLU's read of the peer records, metrics) in overlapped mode
        off = [b["time"] - a["time"] - b["compute_seconds"] for a, b in zip(rounds, rounds[1:])]
        per_peer[name] = {"utilization": steady_utilization(rounds), "rounds": len(rounds),
                          "off_step_seconds_per_round": _med(off) if off else None,
                          "wait_seconds": sum(r.get("wait_seconds", 0.0) for r in rounds),
                          "fold_seconds": sum(r.get("fold_seconds", 0.0) for r in rounds),
                          "summary_utilization": next(p["utilization"] for p in summary["peers"] if p["name"] == name)}
    return {"overlap": overlap, "minutes": minutes, "peers": per_peer, "commits": summary["commits"],
            "rejected": summary["rejected"], "val_loss_start": summary["val_loss"]["start"]["mean"],
            "val_loss_end": summary["val_loss"]["end"]["mean"], "val_loss_version": summary["val_loss"]["end"]["version"]}


# ---------------------------------------------------------------------------------- 2 swarm vs solo
def _rate(points: list[tuple[float, float]]) -> float:
    """Tokens/s from (time, cumulative tokens) points: slope between the first and the last."""
    (t0, n0), (t1, n1) = points[0], points[-1]
    return (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")


def swarm_tokens_per_second(sw: LocalSwarm, names: list[str], t_from: float, t_to: float) -> dict:
    out = {}
    for n in names:
        rounds = [r for r in sw.events(n, "round") if t_from <= r["time"] <= t_to]
        if len(rounds) < 2:
            raise RuntimeError(f"{n}: fewer than 2 rounds in the window; lengthen --seconds")
        cum, points = 0, []
        for r in rounds:
            cum += r["tokens"] if points else 0  # tokens of the rounds after the first end in the window
            points.append((r["time"], cum))
        out[n] = _rate(points)
    return out


def solo_tokens_per_second(config: Path, regions: list[str], seconds: float, workdir: Path) -> dict:
    """Two ``heloco-peer train`` runs started together, one thread each; tokens/s from their logs."""
    from heloco_p2p.config import load_config

    cfg = load_config(config)
    per_step = cfg.inner.batch_size * (cfg.data.seq_len - 1)
    procs = {}
    try:
        for r in regions:
            out = workdir / f"solo-{r}"
            args = [sys.executable, "-m", "heloco_p2p", "train", "--config", str(config), "--region", r,
                    "--max-steps", "1000000", "--out", str(out), "--threads", "1", "--eval-every", "100000000",
                    "--eval-regions", r, "--no-progress"]
            log = open(workdir / f"solo-{r}.log", "w")
            procs[r] = (subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True), out)

        def logged(r):
            path = procs[r][1] / "metrics.jsonl"
            if not path.exists():
                return []
            return [json.loads(x) for x in path.read_text().splitlines() if x.strip() and '"tokens_per_second"' in x]

        deadline = time.time() + 300
        while not all(logged(r) for r in regions):
            for r, (p, _) in procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"solo run {r} exited: {(workdir / f'solo-{r}.log').read_text()[-2000:]}")
            if time.time() > deadline:
                raise TimeoutError("solo runs did not start within 300 s")
            time.sleep(0.5)
        t_from, cpu0 = time.time(), sum(group_cpu_seconds(p.pid) for p, _ in procs.values())
        time.sleep(seconds)
        t_to, cpu1 = time.time(), sum(group_cpu_seconds(p.pid) for p, _ in procs.values())
        out = {}
        for r in regions:
            pts = [(e["time"], e["step"] * per_step) for e in logged(r) if t_from <= e["time"] <= t_to]
            if len(pts) < 2:
                raise RuntimeError(f"solo {r}: fewer than 2 log points in the window")
            out[r] = _rate(pts)
        out["_cores"] = (cpu1 - cpu0) / (t_to - t_from)
        return out
    finally:
        for p, _ in procs.values():
            kill_group(p.pid)
            p.wait(30)


def measure_swarm_vs_solo(seconds: float, workdir: Path, steps_per_round: int | None) -> dict:
    update = {"swarm": {"lease_seconds": 6.0, "heartbeat_seconds": 2.0}}
    if steps_per_round:
        update["inner"] = {"steps_per_round": steps_per_round}
    cfg = _write_config(workdir / "tiny.yaml", "tiny", update)
    regions = ["de", "fr"]
    # solo, swarm, solo: the mean of the solo windows is taken at the swarm window's midpoint, so a
    # load that drifts linearly on a shared machine cancels out of the ratio
    solo_before = solo_tokens_per_second(cfg, regions, seconds / 2, _mk(workdir / "solo-before"))
    sw = LocalSwarm(workdir, f"bench-{uuid.uuid4().hex[:6]}")
    try:
        sw.start("s0", regions[0], "--config", str(cfg))
        sw.start("s1", regions[1])
        sw.wait_until(lambda: all(len(sw.events(n, "ack")) >= 1 for n in ("s0", "s1")), 300, "both peers' first commit")
        groups = [sw.procs[n].pid for n in ("s0", "s1")]
        parts0 = [peer_cpu_parts(g) for g in groups]
        t_from, cpu0 = time.time(), sum(group_cpu_seconds(g) for g in groups)
        time.sleep(seconds)
        t_to, cpu1 = time.time(), sum(group_cpu_seconds(g) for g in groups)
        parts1 = [peer_cpu_parts(g) for g in groups]
        # cores per part, per peer: what the swarm costs beside training
        cpu_parts = {n: {k: (b[k] - a[k]) / (t_to - t_from) for k in a}
                     for n, a, b in zip(("s0", "s1"), parts0, parts1)}
        swarm = swarm_tokens_per_second(sw, ["s0", "s1"], t_from, t_to)
        swarm_cores = (cpu1 - cpu0) / (t_to - t_from)
        acks = [a for n in ("s0", "s1") for a in sw.events(n, "ack") if t_from <= a["time"] <= t_to]
    finally:
        sw.close()
    solo_after = solo_tokens_per_second(cfg, regions, seconds / 2, _mk(workdir / "solo-after"))
    solo = {r: (solo_before[r] + solo_after[r]) / 2 for r in regions}
    solo_cores = (solo_before.pop("_cores") + solo_after.pop("_cores")) / 2
    total_swarm, total_solo = sum(swarm.values()), sum(solo.values())
    from heloco_p2p.config import load_config

    return {"ratio": total_swarm / total_solo, "swarm_tokens_per_second": swarm, "solo_tokens_per_second": solo,
            "solo_before_tokens_per_second": solo_before, "solo_after_tokens_per_second": solo_after,
            "seconds": seconds, "steps_per_round": load_config(cfg).inner.steps_per_round,
            "commits_in_window": len(acks), "median_rtt_ms": 1e3 * _med([a["rtt"] for a in acks]),
            # tokens per CPU-second of every process of each side (peers, their DHT processes and p2pd;
            # the solo runs): what the ratio is where each side has the cores to itself, whatever else runs
            "swarm_cores": swarm_cores, "solo_cores": solo_cores, "swarm_cpu_parts": cpu_parts,
            "ratio_per_cpu_second": (total_swarm / swarm_cores) / (total_solo / solo_cores)}


# ---------------------------------------------------------------------------------- 3 commit
def measure_commit(repeats: int, warmup: int, shapes=None, digest_shapes=None) -> dict:
    """One commit of lookahead + heloco vs ``add_`` over the same tensors (bench_outer's traffic
    rule), plus what the coordinator adds per submission: the Δ check and the θ digest."""
    from heloco_p2p.outer import build_engine
    from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits, params_digest

    shapes = shapes or bench_outer.llama_shapes()
    gen = torch.Generator().manual_seed(0)
    params = [0.02 * torch.randn(s, generator=gen) for s in shapes]
    pool = [[1e-3 * torch.randn(s, generator=gen) for s in shapes] for _ in range(3)]
    signs = torch.randint(0, 2, (16, len(shapes)), generator=gen).mul(2).sub(1).tolist()
    delta = [torch.empty_like(p) for p in params]
    numel = sum(p.numel() for p in params)
    p_bytes = 4 * numel
    k = {"n": 0}

    def next_delta():
        n = k["n"] = k["n"] + 1
        for d, src, sgn in zip(delta, pool[n % 3], signs[n % len(signs)]):
            torch.mul(src, sgn, out=d)

    sync = lambda: None  # noqa: E731
    added = [p.clone() for p in params]
    add_ms = bench_outer.timed(lambda: [p.add_(d) for p, d in zip(added, delta)], repeats, warmup, sync, next_delta)
    engine = build_engine(params, "lookahead", {}, "heloco", {})
    infos = []
    commit_ms = bench_outer.timed(lambda: infos.append(engine.commit(delta, engine.version)), repeats, warmup, sync,
                                  next_delta)
    infos = infos[-repeats:]
    sizes = [p.numel() for p in params]
    units = 4.0 + bench_outer.OPT_UNITS["lookahead"] + statistics.fmean(
        sum(bench_outer.BRANCH_UNITS[b] * s for b, s in zip(i.branches, sizes)) / numel for i in infos)
    state = CommitState(engine)
    check_ms = bench_outer.timed(lambda: state.check(delta, engine.version, SubmissionLimits()), repeats, warmup, sync,
                                 next_delta)
    digest_ms = bench_outer.timed(lambda: params_digest(engine.params), max(2, repeats // 4), 1, sync)
    out = {"params": numel, "param_bytes": p_bytes, "repeats": repeats,
           "commit_ms": _med(commit_ms), "commit_min_ms": min(commit_ms), "add_ms": _med(add_ms), "add_min_ms": min(add_ms),
           "traffic_units": units, "commit_gb_per_s": units * p_bytes / (_med(commit_ms) * 1e-3) / 1e9,
           "add_gb_per_s": 3 * p_bytes / (_med(add_ms) * 1e-3) / 1e9, "commit_vs_add": _med(commit_ms) / _med(add_ms),
           "check_ms": _med(check_ms), "digest_ms": _med(digest_ms)}
    if digest_shapes is not None:  # the digest at a larger model: memory-bound hashing grows with θ
        big = [torch.randn(s, generator=gen) for s in digest_shapes]
        big_ms = bench_outer.timed(lambda: params_digest(big), 2, 1, sync)
        out["digest_125m_params"] = sum(p.numel() for p in big)
        out["digest_125m_ms"] = _med(big_ms)
        del big
    return out


def measure_submit_path(name: str) -> dict:
    """CPU ms (``time.process_time``, best of 2, one thread) of each step a submission costs the
    coordinator and its standby, for a config's layout: the profile of the submit path by step.
    The norm is shown both ways: the coordinator's, and float64 copies (how it was computed before)."""
    from heloco_p2p.outer import build_engine
    from heloco_p2p.roles.commit_state import params_digest, tensor_norm
    from heloco_p2p.swarm.wire import decode_tensors, encode_tensors, pack_params

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shapes = bench_wire.layout(name)
        expected = [(s, torch.float32) for s in shapes]
        gen = torch.Generator().manual_seed(0)
        engine = build_engine([0.02 * torch.randn(s, generator=gen) for s in shapes], "lookahead", {}, "heloco", {})
        delta = [1e-3 * torch.randn(s, generator=gen) for s in shapes]
        meta, payload = encode_tensors(delta, "none")
        steps = {
            "decode": lambda: decode_tensors(meta, payload, expected),
            "norm": lambda: tensor_norm(delta),
            "norm_float64_copies": lambda: math.sqrt(sum(float(torch.sum(t.double() * t.double())) for t in delta)),
            "commit": lambda: engine.commit(delta, engine.version),
            "digest": lambda: params_digest(engine.params),
            "encode_reply": lambda: pack_params(*encode_tensors([p.detach() for p in engine.params], "none")),
        }
        out = {"params": sum(math.prod(s) for s in shapes)}
        for key, fn in steps.items():
            fn()
            best = float("inf")
            for _ in range(2):
                t = time.process_time()
                fn()
                best = min(best, time.process_time() - t)
            out[f"{key}_ms"] = 1e3 * best
        # per submission: coordinator decode, 2 norms (Δ, θ bound), commit, digest, encode; standby decode, norm, commit, digest
        per = lambda norm: 2 * out["decode_ms"] + 3 * norm + 2 * out["commit_ms"] + 2 * out["digest_ms"] + out["encode_reply_ms"]  # noqa: E731
        out["submission_ms"] = per(out["norm_ms"])
        out["submission_float64_norm_ms"] = per(out["norm_float64_copies_ms"])
        theta = [p.detach().clone() for p in engine.params]
        out["now"] = _submit_path_now(theta, delta, shapes)
        return out
    finally:
        torch.set_num_threads(threads)


def _submit_path_now(theta: list[torch.Tensor], delta: list[torch.Tensor], shapes) -> dict:
    """The coordinator's steps per submission as roles/coordinator.py runs them today (8-bit
    uplink, wrap8 replies, the engine working in the consumed Δ, one θ digest), CPU ms, one thread,
    best of 2; ``before_forward_ms``: the steps before the commit is forwarded to the standbys
    (decode, norm, commit, digest, θ̄); ``beside_forward_ms``: the wrap8 payload and the dispatch
    digest, which run while the commit travels to the standbys (roles/coordinator.py);
    ``standby_ms``: the standby's decode, norm, commit and digest.
    The engine is the published ``heloco`` (look-ahead dispatch: θ̄ is computed per version)."""
    from heloco_p2p.algorithms import build_outer_engine, get_algorithm
    from heloco_p2p.roles.commit_state import params_digest, tensor_norm
    from heloco_p2p.swarm.downlink import DownlinkWindow
    from heloco_p2p.swarm.wire import decode_tensors, encode_tensors

    expected = [(s, torch.float32) for s in shapes]
    engine = build_outer_engine(get_algorithm("heloco"), theta, num_workers=3)
    del theta
    engine.commit([d.clone() for d in delta], 0)  # the momentum exists: θ̄ = θ − η·μ·m differs from θ
    meta8, payload8 = encode_tensors(delta, "8bit")
    window = DownlinkWindow()
    window.start(engine.dispatch_params(), engine.version, 1)
    state = {}

    def decode():
        state["delta"] = decode_tensors(meta8, payload8, expected)

    def commit():
        if "delta" not in state:
            decode()
        engine.commit(state.pop("delta"), engine.version, consume=True)

    def dispatch():
        state["dispatched"] = engine.dispatch_params()

    def wrap8():
        window.advance(state.get("dispatched") or engine.dispatch_params(), engine.version, 1)

    steps = {"decode_8bit": decode, "norm": lambda: tensor_norm(state.get("delta") or delta), "commit_consumed": commit,
             "digest": lambda: params_digest(engine.params), "dispatch": dispatch, "wrap8_payload": wrap8,
             "dispatch_digest": lambda: params_digest(state.get("dispatched") or engine.params)}
    prepare = {"commit_consumed": decode,  # its input, not timed
               "wrap8_payload": lambda: (commit(), dispatch())}  # a new version each time (the payload is cached)
    out = {}
    for key, fn in steps.items():
        best = float("inf")
        for _ in range(2):
            if key in prepare:
                prepare[key]()
            t = time.process_time()
            fn()
            best = min(best, time.process_time() - t)
        out[f"{key}_ms"] = 1e3 * best
    out["before_forward_ms"] = sum(out[f"{k}_ms"] for k in ("decode_8bit", "norm", "commit_consumed", "digest", "dispatch"))
    out["beside_forward_ms"] = out["wrap8_payload_ms"] + out["dispatch_digest_ms"]
    out["coordinator_ms"] = out["before_forward_ms"] + out["beside_forward_ms"]
    out["standby_ms"] = out["decode_8bit_ms"] + out["norm_ms"] + out["commit_consumed_ms"] + out["digest_ms"]
    return out


# ---------------------------------------------------------------------------------- 4 wire
def measure_wire(configs: list[str], reps: int) -> dict:
    rows = []
    for name in configs:
        shapes = bench_wire.layout(name)
        for compression in ("none", "fp16", "8bit"):
            rows.append({"config": name, **bench_wire.measure_codec(shapes, compression, reps)})
    timings = asyncio.run(bench_wire.measure_streams([(r["meta"], r["payload"]) for r in rows], reps))
    out: dict = {}
    for r, (t_msg, t_raw) in zip(rows, timings):
        out.setdefault(r["config"], {})[r["compression"]] = {
            "params": r["params"], "bytes": r["payload_bytes"], "bytes_per_param": r["bytes_per_param"],
            "rel_l2": r["rel_l2"], "encode_ms": r["encode_ms"], "decode_ms": r["decode_ms"],
            "message_ms": 1e3 * t_msg, "raw_ms": 1e3 * t_raw, "raw_mb_per_s": r["payload_bytes"] / 1e6 / t_raw,
            "message_vs_raw": t_msg / t_raw}
    return out


# ---------------------------------------------------------------------------------- 5 join
def measure_join(name: str, workdir: Path, steps: int = 2, batch_size: int = 8) -> dict:
    cfg = _write_config(workdir / f"{name}.yaml", name, {"inner": {"steps_per_round": steps},
                                                          "swarm": {"lease_seconds": 6.0, "heartbeat_seconds": 2.0}})
    sw = LocalSwarm(workdir, f"join-{uuid.uuid4().hex[:6]}")
    try:
        sw.start("coordinator", "de", "--config", str(cfg), "--no-train")
        sw.wait_until(lambda: sw.events("coordinator", "train_start"), 300, "the coordinator")
        t0 = time.time()
        sw.start("joiner", "fr", "--batch-size", str(batch_size))
        sw.wait_until(lambda: sw.events("joiner", "ack"), 600, "the joiner's first accepted submission")
        ev = {e["event"]: e["time"] for e in reversed(sw.events("joiner"))}  # the first of each kind
    finally:
        sw.close()
    return {"model": name, "steps_per_round": steps, "batch_size": batch_size,
            "ready_s": ev["ready"] - t0, "first_eval_done_s": ev["eval"] - t0,
            "first_step_s": ev["first_step"] - t0, "first_accepted_s": ev["ack"] - t0}


# ---------------------------------------------------------------------------------- 6 fan-in
async def _senders(maddr: str, run_id: str, n: int, seconds: list[float], payload, meta) -> list[dict]:
    """n synthetic peers (own libp2p identity each, no DHT, no training) submitting Δ in a loop,
    once per window length in ``seconds`` (1, 2, 4 … senders active); returns a record per window."""
    from hivemind.p2p import P2P, PeerID

    from heloco_p2p.swarm.wire import request

    peer_id = PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
    handler = f"heloco.{run_id}.submit"
    clients = []
    try:
        for _ in range(n):
            clients.append(await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=[maddr]))
        state = {"version": 0, "term": 0}
        seqs = [0] * n

        async def submit(i: int) -> tuple[dict, float]:
            header = {"run_id": run_id, "seq": seqs[i], "base_version": state["version"], "steps": 1, "tensors": meta,
                      "stats": {"loss": None, "tokens": 0, "seconds": 0.0}, "term": state["term"]}
            seqs[i] += 1
            t = time.perf_counter()
            _, reader, writer = await clients[i].call_binary_stream_handler(peer_id, handler)
            try:
                reply, data = await request(reader, writer, header, payload, expect_continue=True, max_payload_bytes=1 << 31)
            finally:
                writer.close()
            if reply.get("status") == "accepted":
                state["version"] = max(state["version"], int(reply["version"]))
                state["term"] = max(state["term"], int(reply["term"]))
            return reply, time.perf_counter() - t

        for i in range(n):  # warm the connections (and the coordinator's norm history)
            await submit(i)
        windows = []
        active = 1
        for secs in seconds:
            replies = []
            stop_at = time.perf_counter() + secs

            async def loop(i, stop_at=stop_at, replies=replies):
                while time.perf_counter() < stop_at:
                    replies.append(await submit(i))

            t0 = time.perf_counter()
            await asyncio.gather(*(loop(i) for i in range(active)))
            wall = time.perf_counter() - t0
            ok = [(r, rtt) for r, rtt in replies if r.get("status") == "accepted" and not r.get("duplicate")]
            parts = {k: 1e3 * _med([r["timing"][k] for r, _ in ok]) for k in ("decode", "commit", "replicate", "encode_reply")}
            windows.append({"senders": active, "seconds": wall, "accepted": len(ok),
                            "other": len(replies) - len(ok), "submissions_per_s": len(ok) / wall,
                            "rtt_ms": 1e3 * _med([rtt for _, rtt in ok]), "server_ms": parts,
                            "statuses": sorted({r.get("status") for r, _ in replies})})
            active = min(n, active * 2)
        return windows
    finally:
        for c in clients:
            await c.shutdown()


def measure_fan_in(workdir: Path, senders: int, seconds: float) -> dict:
    from heloco_p2p.swarm.wire import encode_tensors

    cfg = _write_config(workdir / "small.yaml", "small", {"swarm": {"lease_seconds": 6.0, "heartbeat_seconds": 2.0,
                                                                      "num_standbys": 1}})
    shapes = bench_wire.layout("small")
    gen = torch.Generator().manual_seed(0)
    meta, payload = encode_tensors([1e-3 * torch.randn(s, generator=gen) for s in shapes], "none")
    counts = [1]
    while counts[-1] * 2 <= senders:
        counts.append(counts[-1] * 2)
    sw = LocalSwarm(workdir, f"fanin-{uuid.uuid4().hex[:6]}")
    try:
        sw.start("coordinator", "de", "--config", str(cfg), "--no-train")
        sw.start("standby", "fr", "--no-train")
        sw.wait_until(lambda: "holds a replica" in (workdir / "coordinator.log").read_text(), 300, "a standby")
        pg = {n: sw.procs[n].pid for n in ("coordinator", "standby")}
        cpu0 = {n: group_cpu_seconds(p) for n, p in pg.items()}
        t0 = time.time()
        windows = asyncio.run(_senders(sw.maddr, sw.run_id, counts[-1], [seconds] * len(counts), payload, meta))
        wall = time.time() - t0
        cpu = {n: (group_cpu_seconds(p) - cpu0[n]) / wall for n, p in pg.items()}
    finally:
        sw.close()
    best = max(windows, key=lambda w: w["submissions_per_s"])
    server = best["server_ms"]
    per_sub = 1e3 / best["submissions_per_s"]
    lock_ms = server["commit"] + server["replicate"] + server["encode_reply"]  # held under the commit lock
    return {"model": "small", "params": sum(math.prod(s) for s in shapes), "payload_bytes": len(payload),
            "reply_bytes": 4 * sum(math.prod(s) for s in shapes), "windows": windows,
            "max_submissions_per_s": best["submissions_per_s"], "at_senders": best["senders"],
            "cpu_cores": cpu, "commit_lock_busy": lock_ms / per_sub,
            "saturates": _saturation(windows, best, cpu, lock_ms / per_sub)}


def _saturation(windows: list[dict], best: dict, cpu: dict, lock_busy: float) -> str:
    """Where the coordinator saturates: with one sender nothing queues, so its round trip splits
    into the server's parts and transfer; at the best rate the commit lock's busy share says
    whether the serial section (commit, replicate, encode reply) is the limit."""
    one = windows[0]
    s = one["server_ms"]
    parts = {"replicate": s["replicate"], "commit": s["commit"], "encode reply": s["encode_reply"],
             "decode": s["decode"], "transfer both ways": one["rtt_ms"] - sum(s.values())}
    largest = max(parts, key=parts.get)
    limit = ("the commit lock (commit, replicate to the standby, encode reply run one submission at a time)"
             if lock_busy >= 0.8 else f"not the commit lock; {os.cpu_count()} cores shared by every process")
    return (f"at {best['senders']} senders the commit lock is busy {100 * lock_busy:.0f}% of the time: the limit is "
            f"{limit}; coordinator {cpu['coordinator']:.2f} cores, standby {cpu['standby']:.2f} cores (process groups). "
            f"Alone (1 sender) a round trip of {one['rtt_ms']:.0f} ms is "
            + ", ".join(f"{k} {v:.0f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1]))
            + f" ms: the largest part is {largest}")


# ---------------------------------------------------------------------------------- the suite
def validate_results(results: dict) -> None:
    """Raise ValueError unless ``results`` has the suite's schema (bench/results.json)."""
    if tuple(results) != RESULT_KEYS:
        raise ValueError(f"bench results must have the keys {RESULT_KEYS} in order, got {tuple(results)}")
    u = results["utilization"]
    if not u or not all(isinstance(k, str) and (v is None or 0.0 <= v <= 1.05) for k, v in u.items()):
        raise ValueError(f"utilization must map peer names to fractions, got {u!r}")
    if not isinstance(results["swarm_vs_solo"], float) or not results["swarm_vs_solo"] > 0:
        raise ValueError(f"swarm_vs_solo must be a positive ratio, got {results['swarm_vs_solo']!r}")
    for key in RESULT_KEYS[2:]:
        if not isinstance(results[key], dict) or not results[key]:
            raise ValueError(f"{key} must be a non-empty object")


def _f(x, fmt=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def render(detail: dict) -> str:
    """The Markdown report of one suite run (docs/results.md, "### Benchmark suite")."""
    m = detail["meta"]
    lines = [f"{m['date']} · {m['machine']} · `{m['command']}` · load average (1, 5, 15 min) before "
             f"{m['load_before']}, after {m['load_after']}; suite wall time {m['wall_seconds'] / 60:.1f} min.", ""]
    items = m.get("items", {})
    if items:
        lines += ["Each item: when it ran, the load average before → after, and its command:", ""]
        lines += [f"- {k}: {v['started']}, load {v['load_before']} → {v['load_after']}, `{v['command']}`"
                  for k, v in items.items()] + [""]
    u = detail["utilization"]
    lines += ["**1. Utilization** (time in inner steps, emulated idling included, / wall time; steady state from "
              "each peer's first round end to its last; 3-peer testnet, configs/testnet.yaml, 1 thread each):", "",
              "| peer | speed | " + " | ".join(f"{'overlapped' if r['overlap'] else 'blocking'} rounds" for r in u) + " |",
              "|---|---|" + "---|" * len(u)]
    speeds = {"berlin": 1.0, "paris": 0.6, "moscow": 0.25}
    for name in CAST:
        lines.append(f"| {name} | {speeds[name]} | " + " | ".join(
            f"{_f(r['peers'][name]['utilization'], '.3f')} ({r['peers'][name]['rounds']} rounds)" for r in u) + " |")
    if all("off_step_seconds_per_round" in r["peers"][n] for r in u for n in CAST):
        lines.append("| median seconds per round outside the steps (berlin, paris, moscow) | | " + " | ".join(
            ", ".join(_f(r["peers"][n]["off_step_seconds_per_round"], ".3f") for n in CAST) for r in u) + " |")
    lines.append("| validation loss, mean of de/fr/ru (start → end) | | " + " | ".join(
        f"{r['val_loss_start']:.3f} → {r['val_loss_end']:.3f} (v{r['val_loss_version']}, {r['commits']} commits, "
        f"{r['minutes']:g} min)" for r in u) + " |")
    s = detail["swarm_vs_solo"]
    lines += ["", f"**2. Swarm vs solo** (configs/tiny.yaml, H = {s['steps_per_round']}, two peers / two solo runs, "
                  f"1 thread each; a {s['seconds']:.0f} s swarm window between two solo windows of "
                  f"{s['seconds'] / 2:.0f} s): swarm "
              + " + ".join(f"{v:,.0f}" for v in s["swarm_tokens_per_second"].values())
              + " tokens/s, solo " + " + ".join(f"{v:,.0f}" for v in s["solo_tokens_per_second"].values())
              + f" tokens/s; **swarm_vs_solo = {s['ratio']:.3f}** ({s['commits_in_window']} commits in the window, "
                f"median RTT {s['median_rtt_ms']:.0f} ms)."
              + (f" Per CPU-second of every process on each side (swarm {s['swarm_cores']:.2f} cores, solo "
                 f"{s['solo_cores']:.2f} cores in use): **{s['ratio_per_cpu_second']:.3f}**; solo before "
                 + " + ".join(f"{v:,.0f}" for v in s["solo_before_tokens_per_second"].values()) + ", after "
                 + " + ".join(f"{v:,.0f}" for v in s["solo_after_tokens_per_second"].values()) + " tokens/s."
                 if "ratio_per_cpu_second" in s else "")
              + ("".join(f" {n}: training thread {c['training_thread']:.3f} cores, its other threads "
                         f"{c['other_threads']:.3f}, DHT process and p2pd {c['children']:.3f}."
                         for n, c in s["swarm_cpu_parts"].items()) if "swarm_cpu_parts" in s else "")]
    c = detail["commit"]
    lines += ["", f"**3. Commit** ({c['params'] / 1e6:.1f}M parameters, lookahead + heloco, median of {c['repeats']}): "
                  f"{c['commit_ms']:.1f} ms per commit ({c['traffic_units']:.1f} P of traffic, "
                  f"{c['commit_gb_per_s']:.1f} GB/s) against {c['add_ms']:.1f} ms for one `add_` pass "
                  f"({c['add_gb_per_s']:.1f} GB/s): × {c['commit_vs_add']:.1f}. The coordinator adds the Δ check "
                  f"({c['check_ms']:.1f} ms) and the θ digest ({c['digest_ms']:.1f} ms)"
              + (f"; the digest of a {c['digest_125m_params'] / 1e6:.0f}M θ takes {c['digest_125m_ms']:.0f} ms."
                 if "digest_125m_ms" in c else ".")]
    lines += ["", "Each step of one submission on the coordinator and its standby, CPU ms (one thread, best of 2):", "",
              "| layout | decode | norm (float64 copies) | commit | digest | encode reply | per submission (with float64 norms) |",
              "|---|---|---|---|---|---|---|"]
    for name, r in c.get("submit_path", {}).items():
        lines.append(f"| {name} ({r['params'] / 1e6:.1f}M) | {r['decode_ms']:.1f} | {r['norm_ms']:.1f} "
                     f"({r['norm_float64_copies_ms']:.1f}) | {r['commit_ms']:.1f} | {r['digest_ms']:.1f} | "
                     f"{r['encode_reply_ms']:.1f} | {r['submission_ms']:.0f} ({r['submission_float64_norm_ms']:.0f}) |")
    now = {n: r["now"] for n, r in c.get("submit_path", {}).items() if "now" in r}
    if now:
        lines += ["", "The same submission on today's path (8-bit Δ decoded, the engine working in it, one θ digest, "
                      "θ̄ dispatched; the wrap8 reply, built once per version for every reply, and the dispatch "
                      "digest run while the commit travels to the standbys), CPU ms:", "",
                  "| layout | decode 8bit | norm | commit | digest | dispatch θ̄ | before the forward | wrap8 payload | "
                  "dispatch digest | beside the forward | coordinator in all | standby |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in now.items():
            lines.append(f"| {name} | {r['decode_8bit_ms']:.1f} | {r['norm_ms']:.1f} | {r['commit_consumed_ms']:.1f} | "
                         f"{r['digest_ms']:.1f} | {r['dispatch_ms']:.1f} | {r['before_forward_ms']:.0f} | "
                         f"{r['wrap8_payload_ms']:.1f} | {r['dispatch_digest_ms']:.1f} | {r['beside_forward_ms']:.0f} | "
                         f"{r['coordinator_ms']:.0f} | {r['standby_ms']:.0f} |")
    lines += ["", "**4. Wire** (one submission; message = framed request + ack on loopback, raw = the same bytes "
                  "on a bare hivemind stream):", "",
              "| model | compression | bytes/param | rel. L2 error | encode ms | decode ms | message ms | raw ms | raw MB/s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for name, per in detail["wire"].items():
        for comp, w in per.items():
            lines.append(f"| {name} | {comp} | {w['bytes_per_param']:.3f} | {w['rel_l2']:.1e} | {w['encode_ms']:.1f} | "
                         f"{w['decode_ms']:.1f} | {w['message_ms']:.1f} | {w['raw_ms']:.1f} | {w['raw_mb_per_s']:.0f} |")
    j = detail["join"]
    first = next(iter(j.values()))
    lines += ["", f"**5. Join** (seconds from process start; a coordinator that does not train is already up; "
                  f"H = {first['steps_per_round']}, batch {first['batch_size']}):", "",
              "| model | ready (DHT, config, state) | first validation done | first inner step | first accepted submission |",
              "|---|---|---|---|---|"]
    for name, r in j.items():
        lines.append(f"| {name} | {r['ready_s']:.1f} | {r['first_eval_done_s']:.1f} | {r['first_step_s']:.1f} | "
                     f"{r['first_accepted_s']:.1f} |")
    f = detail["fan_in"]
    lines += ["", f"**6. Fan-in** (small model, {f['params'] / 1e6:.1f}M parameters: {f['payload_bytes'] / 1e6:.1f} MB "
                  f"up and {f['reply_bytes'] / 1e6:.1f} MB of θ back per submission; one coordinator with one standby, "
                  "neither training; synthetic senders):", "",
              "| senders | submissions/s | RTT ms | decode | commit | replicate | encode reply |", "|---|---|---|---|---|---|---|"]
    for w in f["windows"]:
        s_ms = w["server_ms"]
        lines.append(f"| {w['senders']} | {w['submissions_per_s']:.2f} | {w['rtt_ms']:.0f} | {s_ms['decode']:.0f} | "
                     f"{s_ms['commit']:.0f} | {s_ms['replicate']:.0f} | {s_ms['encode_reply']:.0f} |")
    lines += ["", f"Saturation: {f['saturates']}."]
    return "\n".join(lines)


def summary_table(results: dict) -> str:
    rows = [("utilization", ", ".join(f"{k} {_f(v, '.3f')}" for k, v in results["utilization"].items())),
            ("swarm_vs_solo", f"{results['swarm_vs_solo']:.3f}"),
            ("commit", f"{results['commit']['commit_ms']:.1f} ms ({results['commit']['commit_gb_per_s']:.1f} GB/s) vs add_ "
                       f"{results['commit']['add_ms']:.1f} ms"),
            ("wire", "; ".join(f"{n} {c} {w['bytes_per_param']:.2f} B/param {w['message_ms']:.0f} ms"
                               for n, per in results["wire"].items() for c, w in per.items())),
            ("join", "; ".join(f"{n} step {r['first_step_s']:.0f} s, accepted {r['first_accepted_s']:.0f} s"
                               for n, r in results["join"].items())),
            ("fan_in", f"{results['fan_in']['max_submissions_per_s']:.2f} submissions/s at "
                       f"{results['fan_in']['at_senders']} senders")]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: short windows, tiny model only where possible")
    ap.add_argument("--write-results", action="store_true", help="replace '### Benchmark suite' in docs/results.md")
    ap.add_argument("--out", type=Path, default=ROOT / "bench", help="where results.json goes (default: bench/)")
    ap.add_argument("--only", default=",".join(RESULT_KEYS), help="comma list of items to run (others are left out)")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: keep the other items from the last bench/results-detail.json")
    args = ap.parse_args(argv)
    q = args.quick
    only = set(args.only.split(","))
    torch.set_num_threads(2)
    started = time.time()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    command = "python " + " ".join([Path(sys.argv[0]).as_posix() if argv is None else "scripts/bench.py"]
                                   + (sys.argv[1:] if argv is None else list(argv)))
    detail: dict = {}
    items: dict = {}
    previous = args.out / "results-detail.json"
    if args.merge and previous.exists():  # re-measure some items, keep the others from the last run
        detail = json.loads(previous.read_text())
        items = detail.pop("meta").get("items", {})
    with tempfile.TemporaryDirectory(prefix="heloco-bench-") as tmp:
        tmp = Path(tmp)

        def step(key, fn):
            if key in only:
                t = time.time()
                load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
                print(f"# {key} ...", flush=True)
                detail[key] = fn()
                items[key] = {"started": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
                              "seconds": time.time() - t, "load_before": load, "command": command,
                              "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg())}
                print(f"# {key} done in {time.time() - t:.0f} s", flush=True)

        def util():
            modes = [True] if q else [True, False]
            return [measure_utilization(0.75 if q else 3.5, tmp / f"util-{m}", m) for m in modes]

        step("utilization", util)
        step("swarm_vs_solo", lambda: measure_swarm_vs_solo(40 if q else 90, _mk(tmp / "svs"), 10 if q else None))
        step("commit", lambda: {**measure_commit(5 if q else 20, 2 if q else 3,
                                                 digest_shapes=None if q else _layout_shapes("gpu-125m")),
                                "submit_path": {n: measure_submit_path(n) for n in (["small"] if q else ["small", "gpu-125m"])}})
        step("wire", lambda: measure_wire(["tiny"] if q else ["tiny", "small"], 2 if q else 5))
        step("join", lambda: {n: measure_join(n, _mk(tmp / f"join-{n}")) for n in (["tiny"] if q else ["tiny", "small", "base"])})
        step("fan_in", lambda: measure_fan_in(_mk(tmp / "fanin"), 2 if q else 8, 8 if q else 20))
    detail["meta"] = {"date": datetime.date.today().isoformat(), "machine": bench_wire.machine(), "command": command,
                      "quick": q, "load_before": load_before, "load_after": ", ".join(f"{x:.2f}" for x in os.getloadavg()),
                      "wall_seconds": time.time() - started, "items": items}
    if set(RESULT_KEYS) - set(detail):
        print(json.dumps(detail, indent=1, default=str))
        return detail
    results = {
        "utilization": {n: p["utilization"] for n, p in detail["utilization"][0]["peers"].items()},
        "swarm_vs_solo": float(detail["swarm_vs_solo"]["ratio"]),
        "commit": detail["commit"], "wire": detail["wire"], "join": detail["join"], "fan_in": detail["fan_in"],
    }
    validate_results(results)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.json"
    try:  # keys other benchmarks own (wan: scripts/wan_testnet.py) are kept, after this suite's
        kept = {k: v for k, v in json.loads(path.read_text()).items() if k not in RESULT_KEYS}
    except (OSError, ValueError, AttributeError):
        kept = {}
    path.write_text(json.dumps({**results, **kept}, indent=1) + "\n")
    (args.out / "results-detail.json").write_text(json.dumps(detail, indent=1) + "\n")
    report = render(detail)
    print(summary_table(results))
    print()
    print(report)
    if args.write_results:
        path = ROOT / "docs" / "results.md"
        text = path.read_text()
        if RESULTS_HEADING not in text and "## Benchmarks" in text:  # the subsection goes under its section
            text = text.replace("## Benchmarks", f"## Benchmarks\n\n{RESULTS_HEADING}\n\n(pending)", 1)
        path.write_text(replace_section(text, RESULTS_HEADING, report))
    return results


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _layout_shapes(name: str) -> list[tuple[int, ...]]:
    return bench_wire.layout(name)


if __name__ == "__main__":
    main()
