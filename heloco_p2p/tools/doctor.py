"""Pre-flight checks before joining a run: ``heloco-peer doctor``.

Each check says what it found and, when something is wrong, how to fix it. A ``fail`` means
``heloco-peer join`` with the same options would fail (or its rounds would be refused); a
``warn`` means it would work worse than it could. The checks, in order::

    initial peers  the addresses answer (a libp2p/DHT node starts through them)
    reachability   the peers can dial this machine back (hivemind's DHT ping with validate=True,
                   the same test a joining DHT server must pass), else --client-mode or a relay
    run            the run's genesis record is found; protocol version matches this program's
    clock          skew against peers (the DHT ping carries their clock) and their heartbeats;
                   hivemind refuses a node more than 3 s off, records expire by the clock
    run files      config and tokenizer from a peer, checked against the genesis digests
    bandwidth      download: θ through the ``state`` RPC, timed; upload: a payload sent with the
                   ``genesis`` RPC (read and discarded by the peer), timed against an empty one
    device         the training device and threads
    throughput     inner steps/s of the run's model and batch on this machine, the round time it
                   implies, and the staleness the round would have at the run's commit rate
    disk           free space for checkpoints (θ and the outer optimizer's state, written atomically)

``run_checks`` returns ``Check`` values; the command prints them or their JSON. It writes no DHT
record; its node is a DHT server only for as long as the checks run (so that the reachability
ping means what it means for a joining peer).
"""
from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
from hivemind.p2p import PeerID
from hivemind.proto import dht_pb2
from hivemind.utils import MAX_DHT_TIME_DISCREPANCY_SECONDS, get_dht_time

from heloco_p2p.config import RunConfig
from heloco_p2p.local import InnerTrainer, build_model, count_params, pick_device
from heloco_p2p.roles.joining import fetch_run_files
from heloco_p2p.swarm.auth import SwarmKeyError, load_swarm_key
from heloco_p2p.swarm.lifetime import guard_children, stop_reaper
from heloco_p2p.swarm.node import JOIN_HELP, SwarmNode, start_error_message
from heloco_p2p.swarm.records import PROTOCOL_VERSION
from heloco_p2p.swarm.wire import unpack_params
from heloco_p2p.tools.monitor import live_coordinator, wait_for_genesis

logger = logging.getLogger(__name__)

OK, WARN, FAIL, SKIP = "ok", "warn", "fail", "skip"
UPLOAD_PROBE_BYTES = 768 << 10  # under the 1 MiB a handler without a limit of its own accepts
CHECKPOINT_FACTOR = 6  # θ, up to two optimizer slots, twice while the new file is written beside the old


@dataclass
class Check:
    name: str
    status: str  # ok | warn | fail | skip
    detail: str
    fix: str = ""
    values: dict = field(default_factory=dict)


@dataclass
class DoctorOptions:
    run_id: str
    initial_peers: Sequence[str]
    host_maddrs: Sequence[str] = ("/ip4/127.0.0.1/tcp/0",)
    announce_maddrs: Optional[Sequence[str]] = None
    client_mode: bool = False
    swarm_key_file: Optional[str] = None
    checkpoint_dir: str = "."
    device: Optional[str] = None
    batch_size: Optional[int] = None
    threads: int = 0
    bench_seconds: float = 10.0
    timeout: float = 15.0


# ---------------------------------------------------------------------------- pure judgements
def judge_clock(skews: dict[str, float], heartbeat_ages: dict[str, float], heartbeat_seconds: float) -> Check:
    """``skews``: peer → its clock minus ours (s), from DHT pings; ``heartbeat_ages``: peer → our
    now minus its last heartbeat, a cruder bound (negative: its clock is ahead of ours)."""
    if not skews and not heartbeat_ages:
        return Check("clock", SKIP, "no peer to compare clocks with")
    worst = max(skews.values(), key=abs) if skews else None
    ahead = min(heartbeat_ages.values()) if heartbeat_ages else None
    values = {"max_skew_seconds": worst, "newest_heartbeat_age_seconds": ahead}
    fix = "synchronise this machine's clock (e.g. `timedatectl set-ntp true`, or chrony/ntpd)"
    if worst is not None and abs(worst) > MAX_DHT_TIME_DISCREPANCY_SECONDS:
        return Check("clock", FAIL, f"this clock is {abs(worst):.1f} s {'behind' if worst > 0 else 'ahead of'} a peer's; "
                                    f"hivemind refuses nodes more than {MAX_DHT_TIME_DISCREPANCY_SECONDS} s off", fix, values)
    # a heartbeat from the future means that peer's clock runs ahead of ours by at least that much
    if ahead is not None and ahead < -max(1.0, heartbeat_seconds):
        return Check("clock", WARN, f"a peer's heartbeat is {-ahead:.1f} s in this machine's future", fix, values)
    if worst is not None and abs(worst) > 1.0:
        return Check("clock", WARN, f"this clock is {abs(worst):.1f} s off a peer's (hivemind allows "
                                    f"{MAX_DHT_TIME_DISCREPANCY_SECONDS} s)", fix, values)
    detail = f"within {abs(worst):.2f} s of {len(skews)} peer(s)" if worst is not None else "heartbeats are consistent"
    return Check("clock", OK, detail, values=values)


def judge_disk(free_bytes: int, param_bytes: int, path: str) -> Check:
    need = CHECKPOINT_FACTOR * param_bytes
    values = {"free_bytes": free_bytes, "needed_bytes": need, "path": path}
    if free_bytes < need:
        return Check("disk", FAIL, f"{free_bytes / 2**30:.2f} GiB free at {path}; a checkpoint of this model needs about "
                                   f"{need / 2**30:.2f} GiB", "free space or choose another --checkpoint-dir", values)
    if free_bytes < 4 * need:
        return Check("disk", WARN, f"{free_bytes / 2**30:.2f} GiB free at {path}, little above the "
                                   f"{need / 2**30:.2f} GiB a checkpoint needs", "free some space", values)
    return Check("disk", OK, f"{free_bytes / 2**30:.1f} GiB free at {path} (a checkpoint needs about "
                             f"{need / 2**20:.0f} MiB)", values=values)


def judge_throughput(steps_per_second: float, cfg: RunConfig, batch_size: int, param_bytes: int,
                     down_bps: float | None, up_bps: float | None, commits_per_min: float | None) -> Check:
    """Round time = H / steps/s + upload of Δ + download of θ (at the measured rates). Each commit
    of another peer during a round adds one to its staleness, so at the run's commit rate a round
    arrives about ``commits/min × round minutes`` versions stale; above ``swarm.max_staleness``
    it is refused (``too_stale``)."""
    H = cfg.inner.steps_per_round
    compute = H / steps_per_second
    transfer = (param_bytes / up_bps if up_bps else 0.0) + (param_bytes / down_bps if down_bps else 0.0)
    round_seconds = compute + transfer
    tokens_per_second = steps_per_second * batch_size * (cfg.data.seq_len - 1)
    staleness = (commits_per_min or 0.0) * round_seconds / 60.0
    values = {"steps_per_second": steps_per_second, "tokens_per_second": tokens_per_second, "inner_steps": H,
              "batch_size": batch_size, "round_seconds": round_seconds, "compute_seconds": compute,
              "transfer_seconds": transfer, "expected_staleness": staleness, "max_staleness": cfg.swarm.max_staleness}
    detail = (f"{steps_per_second:.2f} inner steps/s ({tokens_per_second:,.0f} tokens/s) at batch {batch_size}: "
              f"a round of H={H} takes about {round_seconds:.1f} s ({compute:.1f} s compute, {transfer:.1f} s transfer)")
    if commits_per_min:
        detail += f"; at {commits_per_min:.1f} commits/min it would arrive about {staleness:.1f} versions stale"
    fix = ("use a faster device (--device cuda) or more --threads; a smaller --batch-size shortens rounds but "
           "each carries fewer tokens")
    if staleness > cfg.swarm.max_staleness:
        return Check("throughput", FAIL, detail + f", above the run's max_staleness {cfg.swarm.max_staleness}: "
                                                  "its submissions would be refused as too_stale", fix, values)
    if staleness > cfg.swarm.max_staleness / 2:
        return Check("throughput", WARN, detail + f", near the run's max_staleness {cfg.swarm.max_staleness}", fix, values)
    return Check("throughput", OK, detail, values=values)


# ---------------------------------------------------------------------------- measurements
async def ping_peers(dht, node, peer_ids: list[str], timeout: float) -> dict[str, dict]:
    """Run inside the DHT process (``DHT.run_coroutine``): a DHT ping with ``validate=True`` to each
    peer, which makes the peer ping us back and report whether it could (``available``), and
    carries its clock. Returns peer → {available, skew (its clock − ours), rtt} or {error}."""
    out = {}
    for pid in peer_ids:
        request = dht_pb2.PingRequest(peer=node.protocol.node_info, validate=True)
        t0 = get_dht_time()
        try:
            response = await node.protocol.get_stub(PeerID.from_base58(pid)).rpc_ping(request, timeout=timeout)
        except Exception as exc:  # an unreachable or stopped peer: report, try the next
            out[pid] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        t1 = get_dht_time()
        out[pid] = {"available": bool(response.available), "skew": response.dht_time - (t0 + t1) / 2, "rtt": t1 - t0}
    return out


def measure_steps_per_second(cfg: RunConfig, tok, device: str | None, batch_size: int, seconds: float) -> tuple[float, str]:
    """Inner steps/s of the run's model on random tokens of the run's shape (the data's content
    does not change the cost of a step): one warm-up step, then steps for about ``seconds``."""
    inner = cfg.inner.model_copy(update={"batch_size": batch_size, **({"device": device} if device else {})})
    model = build_model(cfg.model, tok, seed=0)
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randint(0, cfg.data.vocab_size, (batch_size, cfg.data.seq_len), generator=generator)

    trainer = InnerTrainer(model, inner, batches())
    trainer.train_step()  # allocations, kernel selection
    steps, started = 0, time.perf_counter()
    while steps < 3 or (time.perf_counter() - started < seconds and steps < 200):
        trainer.train_step()
        steps += 1
    return steps / (time.perf_counter() - started), str(trainer.device)


# ---------------------------------------------------------------------------- the checks
def start_node(o: DoctorOptions, client_mode: bool, swarm_key) -> SwarmNode:
    return SwarmNode(o.run_id, initial_peers=o.initial_peers, host_maddrs=o.host_maddrs,
                     announce_maddrs=o.announce_maddrs, client_mode=client_mode, startup_timeout=30.0,
                     swarm_key=swarm_key)


def run_checks(o: DoctorOptions) -> list[Check]:
    """Every check of the module docstring, in order; a check that cannot run is ``skip``."""
    checks: list[Check] = []
    swarm_key = None
    if o.swarm_key_file:
        try:
            swarm_key = load_swarm_key(o.swarm_key_file)
        except SwarmKeyError as exc:
            return [Check("swarm key", FAIL, str(exc), "check --swarm-key-file (heloco-peer keygen FILE makes one)")]
    node, reach = None, None
    try:
        node = start_node(o, o.client_mode, swarm_key)
    except Exception as exc:
        text = str(exc)
        # a DHT server that its bootstrap peers cannot dial back is refused by hivemind itself
        if not o.client_mode and "can't access this node" in text:
            reach = Check("reachability", FAIL, "the initial peers cannot dial this machine back, so a DHT server here "
                                                "is refused", "join with --client-mode (you can train, but not serve as "
                                                "coordinator or standby), or open/forward the port and pass "
                                                f"--announce-maddrs /ip4/PUBLIC_IP/tcp/PORT ({JOIN_HELP})")
            try:
                node = start_node(o, True, swarm_key)
            except Exception as exc2:
                text = str(exc2)
        if node is None:
            if "local time must be within" in text:
                checks.append(Check("clock", FAIL, text.strip().splitlines()[-1],
                                    "synchronise this machine's clock (e.g. `timedatectl set-ntp true`)"))
            else:
                checks.append(Check("initial peers", FAIL, start_error_message(exc, o.initial_peers)))
            checks += local_checks(o, None)
            return checks
    reaper = None
    try:
        try:
            reaper = guard_children(node.child_pids())  # a killed doctor leaves no DHT process or p2pd behind
        except Exception as exc:  # best effort, as in a peer
            logger.debug("could not guard child processes: %s", exc)
        checks.append(Check("initial peers", OK, f"answered at {' '.join(o.initial_peers)}",
                            values={"visible_maddrs": node.visible_maddrs()}))
        checks += swarm_checks(o, node, reach)
    finally:
        node.shutdown()
        if reaper is not None:
            stop_reaper(reaper)
    return checks


def swarm_checks(o: DoctorOptions, node: SwarmNode, reach: Check | None) -> list[Check]:
    checks = []
    genesis = wait_for_genesis(node.records, o.timeout)
    if genesis is None:
        if reach is not None:
            checks.append(reach)
        checks.append(Check("run", FAIL, f"no run {o.run_id!r} found through these peers",
                            "check --run-id (a run exists once its first peer started with --config)"))
        return checks + local_checks(o, None)
    now = time.time()
    peers = node.records.peers()
    alive = [p for p in peers if p.role != "left" and now - p.heartbeat < 60]
    lease = live_coordinator(node.records.lease_claims(), now, 60.0)
    if genesis.protocol_version != PROTOCOL_VERSION:
        checks.append(Check("run", FAIL, f"run {o.run_id!r} speaks protocol {genesis.protocol_version}, this program "
                                         f"{PROTOCOL_VERSION}: peers would refuse it",
                            "install the heloco-p2p version the run uses",
                            {"protocol_version": genesis.protocol_version}))
    else:
        checks.append(Check("run", OK if lease else WARN,
                            f"run {o.run_id!r} (config digest {genesis.config_digest[:16]}), protocol "
                            f"{genesis.protocol_version}, {len(alive)} peer(s) alive, "
                            + (f"coordinator at version {lease.version} (term {lease.term})" if lease
                               else "no live coordinator lease (an election may be under way)"),
                            "" if lease else "wait a few seconds and run doctor again",
                            {"protocol_version": genesis.protocol_version, "peers_alive": len(alive),
                             "config_digest": genesis.config_digest}))
    others = [p.peer_id for p in sorted(alive, key=lambda p: -p.heartbeat) if p.peer_id != node.peer_id][:3]
    pings = {}
    if others:
        try:
            pings = node.dht.run_coroutine(functools.partial(ping_peers, peer_ids=others, timeout=10.0))
        except Exception as exc:
            logger.debug("DHT ping failed: %s", exc)
    if reach is None:
        reach = judge_reachability(pings, o.client_mode)
    checks.append(reach)
    skews = {pid: r["skew"] for pid, r in pings.items() if "skew" in r}
    checks.append(judge_clock(skews, {p.peer_id: now - p.heartbeat for p in alive}, 3.0))
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg, tok, source, genesis_seconds, genesis_bytes = fetch_run_files(node, genesis, alive, Path(tmp))
        except Exception as exc:
            checks.append(Check("run files", FAIL, f"could not fetch the run's config and tokenizer: {exc}",
                                "check --swarm-key-file (a keyed run refuses peers without its key)"))
            return checks + local_checks(o, None)
    checks.append(Check("run files", OK, f"config {cfg.digest()[:12]} and tokenizer from {source[-8:]}, digests verified"))
    rates = measure_bandwidth(node, source, lease, genesis_seconds, genesis_bytes)
    checks.append(rates)
    batch = o.batch_size or cfg.inner.batch_size
    checks += local_checks(o, (cfg, tok, batch, rates.values.get("download_bytes_per_second"),
                               rates.values.get("upload_bytes_per_second"),
                               lease.commits_per_minute if lease else None))
    return checks


def judge_reachability(pings: dict[str, dict], client_mode: bool) -> Check:
    if client_mode:
        return Check("reachability", SKIP, "--client-mode: peers will not dial this machine (it trains, but never "
                                           "serves as coordinator or standby)")
    answered = {pid: r for pid, r in pings.items() if "available" in r}
    if not answered:
        return Check("reachability", WARN, "no peer answered a DHT ping, so reachability is unknown",
                     values={"pings": pings})
    dialed = [pid for pid, r in answered.items() if r["available"]]
    values = {"peers_asked": len(answered), "peers_that_dialed_back": len(dialed)}
    if not dialed:
        return Check("reachability", FAIL, f"none of {len(answered)} peer(s) could dial this machine back",
                     "join with --client-mode, or open/forward the port and pass --announce-maddrs "
                     f"/ip4/PUBLIC_IP/tcp/PORT ({JOIN_HELP})", values)
    return Check("reachability", OK, f"{len(dialed)} of {len(answered)} peer(s) dialed this machine back", values=values)


def measure_bandwidth(node: SwarmNode, source: str, lease, genesis_seconds: float, genesis_bytes: int) -> Check:
    """Download: θ through ``state`` from the coordinator (else ``source``). Upload: the ``genesis``
    call again with ``UPLOAD_PROBE_BYTES`` of payload (the peer reads and discards it), minus
    the empty call's time."""
    target = lease.peer_id if lease is not None else source
    values: dict = {"peer": target}
    try:
        started = time.perf_counter()
        header, payload = node.call(target, "state", {"run_id": node.run_id}, timeout=300)
        seconds = time.perf_counter() - started
        if header.get("status") != "ok":
            raise RuntimeError(f"{header.get('status')}: {header.get('message', '')}")
        params = unpack_params(payload)
        values.update(download_bytes=len(payload), download_seconds=seconds,
                      download_bytes_per_second=len(payload) / seconds, state_version=int(header["version"]),
                      param_count=sum(p.numel() for p in params))
    except Exception as exc:
        return Check("bandwidth", FAIL, f"could not download the current state from {target[-8:]}: {exc}",
                     "a joiner downloads θ the same way: check the peer's address and firewalls", values)
    try:
        probe = os.urandom(UPLOAD_PROBE_BYTES)
        times = []
        for _ in range(2):
            started = time.perf_counter()
            node.call(source, "genesis", {"run_id": node.run_id}, probe, timeout=120)
            times.append(time.perf_counter() - started)
        extra = min(times) - genesis_seconds
        if extra > 0.005:  # below that, the difference is noise: the link is faster than we can tell
            values.update(upload_bytes_per_second=UPLOAD_PROBE_BYTES / extra)
    except Exception as exc:
        logger.debug("upload probe failed: %s", exc)
    down = values["download_bytes_per_second"] * 8 / 1e6
    up = values.get("upload_bytes_per_second")
    return Check("bandwidth", OK, f"download {down:.1f} Mbit/s (θ, {len(payload) / 2**20:.1f} MiB, in "
                                  f"{values['download_seconds']:.2f} s from {target[-8:]}); upload "
                                  + (f"{up * 8 / 1e6:.1f} Mbit/s" if up else "too fast to measure with a small probe"),
                 values=values)


def local_checks(o: DoctorOptions, run: tuple | None) -> list[Check]:
    """device, throughput and disk; without the run's files only the device and free disk."""
    checks = []
    if o.threads:
        torch.set_num_threads(o.threads)
    try:
        device = pick_device(o.device or (run[0].inner.device if run else "auto"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("CUDA is not available on this machine")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU cores"
        checks.append(Check("device", OK, f"{device} ({name}), torch {torch.__version__} with {torch.get_num_threads()} "
                                          "threads", values={"device": str(device), "threads": torch.get_num_threads()}))
    except Exception as exc:
        checks.append(Check("device", FAIL, f"device {o.device!r}: {exc}", "pass --device cpu or a device that exists"))
        return checks
    param_bytes = None
    if run is not None:
        cfg, tok, batch, down, up, commits_per_min = run
        try:
            sps, dev = measure_steps_per_second(cfg, tok, o.device, batch, o.bench_seconds)
            param_bytes = 4 * count_params(build_model(cfg.model, tok, seed=0))
            checks.append(judge_throughput(sps, cfg, batch, param_bytes, down, up, commits_per_min))
        except Exception as exc:
            checks.append(Check("throughput", FAIL, f"the run's model does not train here: {type(exc).__name__}: {exc}",
                                "try a smaller --batch-size or another --device"))
    else:
        checks.append(Check("throughput", SKIP, "needs the run's config"))
    path = Path(o.checkpoint_dir).expanduser()
    probe = next((p for p in [path, *path.resolve().parents] if p.exists()), Path("/"))
    free = shutil.disk_usage(probe).free
    if param_bytes is None:
        checks.append(Check("disk", OK, f"{free / 2**30:.1f} GiB free at {probe}", values={"free_bytes": free}))
    else:
        checks.append(judge_disk(free, param_bytes, str(probe)))
    return checks


def exit_code(checks: list[Check]) -> int:
    """1 when any check failed (joining would fail), else 0."""
    return 1 if any(c.status == FAIL for c in checks) else 0


def as_json(checks: list[Check]) -> dict:
    return {"ok": exit_code(checks) == 0, "checks": [asdict(c) for c in checks]}


def summary_line(checks: list[Check]) -> str:
    failed = [c.name for c in checks if c.status == FAIL]
    warned = [c.name for c in checks if c.status == WARN]
    if failed:
        return f"joining would fail: {', '.join(failed)}" + (f" (warnings: {', '.join(warned)})" if warned else "")
    return "ready to join" + (f", with warnings: {', '.join(warned)}" if warned else "")
