"""Joining a run and serving what joiners need (docs/protocol.md, "Joining").

- ``find_genesis`` / ``publish_genesis``: the run's identity in the DHT (protocol version, config
  and tokenizer digests, budget); ``open_swarm_key``: the run's swarm key, if it has one;
- ``fetch_run_files``: the run's config and tokenizer from any peer that serves them, checked
  against the genesis digests (the peer and ``heloco-peer doctor`` use this one function);
  ``fetch_genesis_files``: the same for a joining peer, checked against its ``--config``;
- ``download_state``: the current θ̄ (or θ) in parts from several peers at once: a ``plan`` of
  one version from the coordinator (else a standby, else any peer), then ``PartDownload`` of
  that version's parts from the peers that hold it (fp16 by default; each part and the whole
  checked against the plan's digests; a failed part is fetched from another peer);
- ``swarm_holds``: what live peers hold, for ``--resume`` (checkpoint.plan_resume);
- ``StateServer``: the ``genesis`` and ``state`` handlers (θ is copied under the commit lock and
  encoded off the event loop; a version served in parts is copied once and kept while joiners
  ask for it; the tokenizer file is built once).
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import yaml

from heloco_p2p.config import config_from_dict, load_config
from heloco_p2p.data import load_tokenizer, tokenizer_digest
from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.roles.messages import MAX_PARTS, StateRequest, rejected
from heloco_p2p.swarm.auth import SwarmKeyError, load_swarm_key
from heloco_p2p.swarm.lifetime import trim_heap
from heloco_p2p.swarm.records import PROTOCOL_VERSION, GenesisRecord, PeerRecord
from heloco_p2p.swarm.wire import WireError, encode_tensors, pack_params, unpack_params

logger = logging.getLogger(__name__)


class JoinError(RuntimeError):
    """The peer cannot join the run; the message says why and what to do."""


def open_swarm_key(path: str | None):
    """The run's swarm key from ``--swarm-key-file`` (docs/security.md), or None for an open run.

    :raises JoinError: the file cannot be read as a swarm key
    """
    if not path:
        return None
    try:
        key = load_swarm_key(path)
    except SwarmKeyError as exc:
        raise JoinError(f"--swarm-key-file: {exc}") from None
    logger.info("swarm key %s: only peers with this key can take part", key.fingerprint)
    return key


def run_identity(g: GenesisRecord) -> tuple:
    """What makes two genesis records the same run: config, tokenizer and budgets."""
    return (g.config_digest, g.tokenizer_digest, g.max_versions, g.max_tokens)


def choose_genesis(run_id: str, records: list[GenesisRecord], pinned: str | None = None,
                   vouched: Callable[[], set[str]] | None = None) -> GenesisRecord:
    """The genesis of the run this peer joins, among every record published under ``run_id`` (in
    an open run anyone can publish one, e.g. with an earlier ``created`` and a budget of one
    version). Records of the same run (``run_identity``) count once, the earliest. With several
    runs: the one whose config digest starts with ``pinned`` (``--genesis-digest``), else the one
    the peers this peer joined through serve (``vouched()``: their config digests), else none:
    ``JoinError`` listing them."""
    runs: dict[tuple, GenesisRecord] = {}
    for g in sorted(records, key=lambda r: r.created):
        runs.setdefault(run_identity(g), g)
    options = list(runs.values())
    if pinned:
        options = [g for g in options if g.config_digest.startswith(pinned)]
        if not options:
            raise JoinError(f"no genesis of run {run_id!r} has a config digest starting with {pinned!r} (--genesis-digest)")
    if len(options) > 1 and vouched is not None:
        served = vouched()
        chosen = [g for g in options if g.config_digest in served]
        if len(chosen) == 1:
            logger.warning("run %r has %d different genesis records in the DHT; following %s, the one the initial "
                           "peers serve", run_id, len(options), chosen[0].config_digest[:12])
            options = chosen
    if len(options) > 1:
        listed = "; ".join(f"config {g.config_digest[:12]} founded by {g.founder[-8:]} (budget {g.max_versions} versions, "
                           f"{g.max_tokens} tokens)" for g in options)
        raise JoinError(f"run {run_id!r} has {len(options)} different genesis records in the DHT (anyone can publish "
                        f"one): {listed}. The peers given with --initial-peers vouch for none of them or for several: "
                        "pass --genesis-digest with the start of the config digest of the run you mean (its "
                        "organiser knows it; `heloco-peer doctor` prints it)")
    g = options[0]
    if g.protocol_version != PROTOCOL_VERSION:
        raise JoinError(f"run {run_id!r} speaks protocol {g.protocol_version}, this peer "
                        f"speaks {PROTOCOL_VERSION}: install the heloco-p2p version the run uses")
    return g


def find_genesis(records, run_id: str, wait: float, pinned: str | None = None,
                 vouched: Callable[[], set[str]] | None = None) -> GenesisRecord | None:
    """The run's genesis record (waiting up to ``wait`` s for one; ``choose_genesis`` among
    several), or None when the run does not exist yet."""
    deadline = time.time() + wait
    while True:
        found = records.genesis_records()
        if found:
            return choose_genesis(run_id, found, pinned, vouched)
        if time.time() >= deadline:
            return None
        time.sleep(0.5)


def vouched_by(node, initial_peers: list[str]) -> Callable[[], set[str]]:
    """``vouched()`` for ``choose_genesis``: the config digests the peers named in the initial
    multiaddrs (their ``/p2p/<id>`` part) serve; a peer that does not answer vouches for nothing."""
    def ask() -> set[str]:
        served = set()
        for maddr in initial_peers:
            peer_id = maddr.rsplit("/p2p/", 1)[-1] if "/p2p/" in maddr else None
            if not peer_id:
                continue
            try:
                header, _ = node.call(peer_id, "genesis", {"run_id": node.run_id, "meta_only": True}, timeout=10)
                served.add(str(header.get("config_digest", "")))
            except Exception as exc:
                logger.info("initial peer %s did not say which run it serves: %s", peer_id[-8:], exc)
        return served
    return ask


def publish_genesis(node, cfg, tokenizer, shards: list[int] = ()) -> GenesisRecord:
    """The run's genesis record; ``shards``: the shard plan's record (roles/shards.py; empty for one)."""
    record = GenesisRecord(protocol_version=PROTOCOL_VERSION, run_id=node.run_id, config_digest=cfg.digest(),
                           tokenizer_digest=tokenizer_digest(tokenizer), max_versions=cfg.swarm.max_versions,
                           max_tokens=cfg.swarm.max_tokens, created=time.time(), founder=node.peer_id,
                           shards=list(shards))
    node.records.publish_genesis(record)
    return record


def tokenizer_json(tokenizer) -> bytes:
    """The tokenizer as the single ``tokenizer.json`` file joiners receive."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return (Path(d) / "tokenizer.json").read_bytes()


def fetch_run_files(node, genesis: GenesisRecord, peers: list[PeerRecord], workdir: Path):
    """The run's config and tokenizer from the first peer (the founder first) that serves them with
    the genesis digests; returns (config, tokenizer, peer id, seconds the call took, reply bytes).

    :raises RuntimeError: no peer served files that match, with each peer's reason
    """
    errors = []
    for pid in dict.fromkeys([genesis.founder] + [p.peer_id for p in peers]):
        if pid == node.peer_id:
            continue
        started = time.perf_counter()
        try:
            header, payload = node.call(pid, "genesis", {"run_id": node.run_id}, timeout=30)
        except Exception as exc:
            errors.append(f"{pid[-8:]}: {type(exc).__name__}: {exc}")
            continue
        seconds = time.perf_counter() - started
        if not isinstance(header.get("config_yaml"), str):  # refused (e.g. unauthenticated: no swarm key)
            errors.append(f"{pid[-8:]}: {header.get('reason', header.get('status'))}: {header.get('message', '')}")
            continue
        cfg = config_from_dict(yaml.safe_load(header["config_yaml"]), source=f"run {node.run_id} (from {pid[-8:]})")
        if cfg.digest() != genesis.config_digest:
            errors.append(f"{pid[-8:]}: config digest mismatch")
            continue
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "tokenizer.json").write_bytes(payload)
        tok = load_tokenizer(str(workdir / "tokenizer.json"))
        if tokenizer_digest(tok) != genesis.tokenizer_digest:
            errors.append(f"{pid[-8:]}: tokenizer digest mismatch")
            continue
        return cfg, tok, pid, seconds, len(payload)
    raise RuntimeError("; ".join(errors) or "no peer answered")


def fetch_genesis_files(node, genesis: GenesisRecord, identity: str | None = None, config_path: str | None = None,
                        overrides: dict | None = None):
    """A joining peer's (config, tokenizer) of the run: from any peer that has them, verified
    against the genesis digests (``fetch_run_files``; the tokenizer is kept in the peer's
    ``identity`` directory, else in ~/.cache/heloco-p2p/runs); with ``config_path`` (``--config``)
    that config must be the run's.

    :raises JoinError: no peer served matching files, or ``config_path`` is another config
    """
    run_id = node.run_id
    cache = Path(identity or Path.home() / ".cache" / "heloco-p2p" / "runs") / f"{run_id}-tokenizer"
    try:
        cfg, tok, peer_id, _, _ = fetch_run_files(node, genesis, node.records.peers(), cache)
    except RuntimeError as exc:
        raise JoinError(f"could not fetch run {run_id!r}'s config and tokenizer: {exc}") from None
    if config_path and load_config(config_path, overrides=overrides).digest() != genesis.config_digest:
        raise JoinError(f"--config {config_path} differs from run {run_id!r}'s config; drop --config to use the "
                        "run's own")
    logger.info("fetched config and tokenizer from %s (digests verified)", peer_id[-8:])
    return cfg, tok


# ---------------------------------------------------------------------------------------- state in parts
JOIN_PART_MB = 16.0  # default part size (MB of the compressed state): ``heloco-peer join --join-part-mb``
JOIN_SOURCES = 4  # default number of peers a joiner downloads from at once: ``--join-sources``
PIN_SECONDS = 60.0  # a version served in parts is kept this long after its last request
MAX_PINNED = 2  # versions a server keeps for joiners at once (each a copy of θ̄ or θ)
MAX_PLANS_KEPT = 4  # part counts whose part digests a kept version remembers
MIN_PART_RATE = 256 << 10  # bytes/s below which a part request is given up (plus PART_TIMEOUT_BASE)
PART_TIMEOUT_BASE = 30.0
PROGRESS_SECONDS = 2.0  # seconds between progress lines
MAX_BUSY = 5  # busy replies in a row after which a joiner drops a source


def part_ranges(numel: int, parts: int) -> list[tuple[int, int]]:
    """Part i of ``parts`` is the values [i·N//parts, (i+1)·N//parts) of the state's N values in
    layout order (every tensor flattened, one after the other): parts cover every value exactly
    once and differ in size by at most one value."""
    return [(i * numel // parts, (i + 1) * numel // parts) for i in range(parts)]


def parts_for(numel: int, compression: str, part_mb: float) -> int:
    """How many parts a joiner cuts a state of ``numel`` values into for parts of ``part_mb`` MB."""
    nbytes = numel * (2 if compression == "fp16" else 4)
    return max(1, min(MAX_PARTS, numel, math.ceil(nbytes / max(part_mb * 1e6, 1.0))))


def write_slice(tensors: Sequence[torch.Tensor], start: int, values: torch.Tensor) -> None:
    """Write ``values`` over [start, start + len(values)) of the tensors flattened one after the other."""
    stop, offset = start + values.numel(), 0
    for t in tensors:
        n = t.numel()
        if offset + n > start and offset < stop:
            a, b = max(start - offset, 0), min(stop - offset, n)
            t.view(-1)[a:b] = values[offset + a - start:offset + b - start]
        offset += n
        if offset >= stop:
            break


def wire_values(values: torch.Tensor, compression: str) -> torch.Tensor:
    """What a receiver decodes from ``values`` sent with ``compression``, in the wire's dtype
    (fp16: hivemind's Float16Compression, which clamps to ±65504 first)."""
    if compression == "fp16":
        return values.clamp(-65504.0, 65504.0).to(torch.float16)
    return values


def wire_digest(tensors: Iterable[torch.Tensor]) -> str:
    """blake2b of the tensors' bytes as one stream, in order: the same over a list of parts as
    over the whole (not ``params_digest``, whose tree also hashes the tensor boundaries)."""
    h = hashlib.blake2b(digest_size=16)
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


@dataclass
class PinnedState:
    """One version of θ̄ (or θ) a server keeps for joiners: a flat fp32 copy and the digests of
    its wire forms, made once per version however many joiners ask. A part's wire form (fp16)
    is made from the copy when the part is asked for (``wire_part``), not kept whole beside it:
    at 125M that would be 250 MB more per kept version."""

    model: str
    version: int
    term: int
    source: str
    schedule_step: int
    flat: torch.Tensor
    layout: list  # the tensors' shapes, in order
    used: float = field(default_factory=time.monotonic)
    wire: dict = field(default_factory=dict)  # compression -> digest of the whole in that wire form
    part_digests: dict = field(default_factory=dict)  # (compression, parts) -> [digest of each part]

    def wire_part(self, compression: str, start: int, stop: int) -> torch.Tensor:
        """Values [start, stop) in the wire's dtype (``wire_values`` is elementwise: a slice of the
        whole's wire form)."""
        return wire_values(self.flat[start:stop], compression)

    def digest(self, compression: str) -> str:
        """The digest of the whole in ``compression`` (``wire_digest`` of one stream: fed in slices)."""
        if compression not in self.wire:
            self.wire[compression] = wire_digest(  # one slice in its wire form at a time
                self.wire_part(compression, a, b) for a, b in _slices(self.flat.numel()))
        return self.wire[compression]

    def digests_of_parts(self, compression: str, parts: int) -> list[str]:
        key = (compression, parts)
        if key not in self.part_digests:
            while len(self.part_digests) >= MAX_PLANS_KEPT:  # plans with ever new part counts cannot grow memory
                del self.part_digests[next(iter(self.part_digests))]
            self.part_digests[key] = [wire_digest([self.wire_part(compression, a, b)])
                                      for a, b in part_ranges(self.flat.numel(), parts)]
        return self.part_digests[key]


DIGEST_SLICE = 1 << 22  # values made into their wire form at once for the digest of a whole


def _slices(numel: int) -> list[tuple[int, int]]:
    return [(a, min(numel, a + DIGEST_SLICE)) for a in range(0, numel, DIGEST_SLICE)] or [(0, 0)]


def plan_problem(plan: dict, expected: Sequence, compression: str, parts: int) -> str | None:
    """Why a plan reply cannot be downloaded against the joiner's layout, or None."""
    layout = [list(shape) for shape, _ in expected]
    numel = sum(math.prod(shape) for shape, _ in expected)
    version, digests = plan.get("version"), plan.get("part_digests")
    if type(version) is not int or version < 0 or not isinstance(plan.get("digest"), str):
        return "no version or digest"
    if plan.get("compression") != compression or plan.get("parts") != parts:
        return f"{plan.get('parts')!r} parts in {plan.get('compression')!r}, {parts} in {compression!r} asked"
    if plan.get("numel") != numel or plan.get("layout") != layout:
        return f"layout of {plan.get('numel')!r} values differs from this peer's model ({numel} values)"
    if not isinstance(digests, list) or len(digests) != parts or not all(isinstance(d, str) for d in digests):
        return "no digest per part"
    return None


def decode_part(data: bytes, numel: int, compression: str, digest: str) -> torch.Tensor:
    """A part's values (float32) from its reply payload, checked against its digest in the plan.

    :raises WireError: ``bad_tensor`` (another layout, or values that are not the plan's)
    """
    values = unpack_params(data, [((numel,), torch.float32)])[0]
    if wire_digest([wire_values(values, compression)]) != digest:
        raise WireError("bad_tensor", "the part's values differ from the plan's digest")
    return values


class PartDownload:
    """One download of a planned state (a ``plan`` reply) from several peers at once.

    Parts are handed out from one queue (each source takes the next part when it has finished
    one: fast sources take more); a part that fails (connection lost, timeout, a refusal, values
    that do not match the plan's digest) goes back to the front of the queue for another source,
    and its source is dropped (a reserve source, if any, takes its place). When the queue is empty,
    an idle source also asks for the slowest part still in flight (the first answer is kept).

    :param sources: peer ids, in order of preference; the first ``parallel`` download at once
    """

    def __init__(self, node, plan: dict, expected: Sequence, sources: list[str], parallel: int,
                 stop_event: threading.Event, part_timeout: float):
        self.node, self.plan, self.stop_event, self.part_timeout = node, plan, stop_event, part_timeout
        self.sources, self.parallel = sources, max(1, parallel)
        self.compression, self.parts = plan["compression"], plan["parts"]
        self.ranges = part_ranges(plan["numel"], self.parts)
        self.params = [torch.empty(tuple(shape), dtype=torch.float32) for shape, _ in expected]
        self.pending: deque[int] = deque(range(self.parts))
        self.done: set[int] = set()
        self.inflight: dict[int, set[str]] = {}
        self.started: dict[int, float] = {}
        self.retried = 0  # parts fetched again after a failure
        self.failed: dict[str, str] = {}  # source -> why it was dropped
        self.by_source: Counter = Counter()  # source -> parts it delivered
        self.busy: Counter = Counter()  # source -> busy replies in a row
        self.bytes = 0
        self.part_seconds: list[float] = []
        self.t0 = self.last_log = time.monotonic()
        self.total_bytes = plan["numel"] * (2 if self.compression == "fp16" else 4)

    async def run(self) -> list[torch.Tensor] | None:
        """The assembled tensors, or None when the sources ran out (or stop) with parts missing."""
        reserve = deque(self.sources[self.parallel:])
        workers = {asyncio.ensure_future(self.worker(s)) for s in self.sources[:self.parallel]}
        try:
            while workers and len(self.done) < self.parts:
                finished, workers = await asyncio.wait(workers, return_when=asyncio.FIRST_COMPLETED)
                for _ in finished:
                    if reserve and len(self.done) < self.parts and not self.stop_event.is_set():
                        workers.add(asyncio.ensure_future(self.worker(reserve.popleft())))
        finally:
            for w in workers:
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
        return self.params if len(self.done) == self.parts else None

    def next_part(self, source: str) -> int | None:
        while self.pending:
            i = self.pending.popleft()
            if i not in self.done:
                return i
        # the end game: a second request for a part that has been in flight much longer than parts take
        usual = 2 * sum(self.part_seconds) / len(self.part_seconds) if self.part_seconds else self.part_timeout / 2
        now = time.monotonic()
        slow = [i for i, holders in self.inflight.items()
                if i not in self.done and len(holders) == 1 and source not in holders and now - self.started[i] > usual]
        return min(slow, key=lambda i: self.started[i]) if slow else None

    async def worker(self, source: str) -> None:
        while len(self.done) < self.parts and not self.stop_event.is_set():
            i = self.next_part(source)
            if i is None:
                await asyncio.sleep(0.05)  # the rest is in flight elsewhere
                continue
            if not await self.fetch(source, i):
                return

    async def fetch(self, source: str, i: int) -> bool:
        """Part ``i`` from ``source``; False when the source failed (the part goes back to the queue)."""
        start, stop = self.ranges[i]
        plan = self.plan
        request = {"run_id": self.node.run_id, "model": plan.get("model", "dispatch"), "compression": self.compression,
                   "part": i, "parts": self.parts, "version": plan["version"], "digest": plan["digest"]}
        holders = self.inflight.setdefault(i, set())
        holders.add(source)
        self.started.setdefault(i, time.monotonic())
        t0 = time.monotonic()
        try:
            reply, data = await asyncio.wait_for(self.node.acall(source, "state", request), self.part_timeout)
            if reply.get("status") == "rejected" and reply.get("reason") in ("busy", "rate_limited"):
                self.busy[source] += 1
                if self.busy[source] > MAX_BUSY:
                    raise WireError("busy", f"busy {MAX_BUSY} times in a row")
                retry = reply.get("retry_after")
                await asyncio.sleep(min(float(retry), 10.0) if isinstance(retry, (int, float)) and retry > 0 else 1.0)
                raise WireError("retry", "busy")
            self.busy[source] = 0
            if reply.get("status") != "ok":
                raise WireError(str(reply.get("status")), str(reply.get("message", reply.get("reason", ""))))
            got = (reply.get("version"), reply.get("digest"), reply.get("part"), reply.get("start"), reply.get("stop"))
            if got != (plan["version"], plan["digest"], i, start, stop):
                raise WireError("bad_tensor", f"the reply is (version, digest, part, range) {got}, not the plan's")
            values = await asyncio.get_running_loop().run_in_executor(
                None, decode_part, data, stop - start, self.compression, plan["part_digests"][i])
        except Exception as exc:  # a timeout, a lost connection, a refusal, bad bytes
            holders.discard(source)
            busy = isinstance(exc, WireError) and exc.code == "retry"  # the same source, later
            if i not in self.done and not holders:
                self.pending.appendleft(i)
                self.retried += 0 if busy else 1
            if busy:
                return True
            why = f"{type(exc).__name__}: {exc}" if not isinstance(exc, WireError) else str(exc)
            self.failed[source] = why
            logger.warning("state part %d/%d from %s failed (%s); it goes to another peer", i + 1, self.parts,
                           source[-8:], why)
            return False
        holders.discard(source)
        if i in self.done:
            return True  # a second request for a slow part: the first answer was kept
        write_slice(self.params, start, values)
        self.done.add(i)
        self.bytes += len(data)
        self.by_source[source] += 1
        self.part_seconds.append(time.monotonic() - t0)
        self.progress()
        return True

    def progress(self) -> None:
        now = time.monotonic()
        if now - self.last_log < PROGRESS_SECONDS and len(self.done) < self.parts:
            return
        self.last_log = now
        logger.info("state v%d: %d/%d parts, %.1f/%.1f MB, %.1f MB/s from %d peers", self.plan["version"],
                    len(self.done), self.parts, self.bytes / 1e6, self.total_bytes / 1e6,
                    self.bytes / 1e6 / max(now - self.t0, 1e-9), len([s for s in self.by_source if s not in self.failed]))

    def summary(self) -> dict:
        seconds = time.monotonic() - self.t0
        return {"seconds": round(seconds, 3), "bytes": self.bytes, "mb_per_s": round(self.bytes / 1e6 / max(seconds, 1e-9), 2),
                "parts": self.parts, "compression": self.compression, "retried": self.retried,
                "sources": {s[-8:]: n for s, n in self.by_source.items()}, "failed": {s[-8:]: w for s, w in self.failed.items()}}


def download_state(node, election, expected: list, stop_event: threading.Event, timeout: float = 120.0,
                   model: str = "dispatch", compression: str | None = None, sources: int = JOIN_SOURCES,
                   part_mb: float = JOIN_PART_MB):
    """Where a round starts now (θ̄ or θ, ``model="dispatch"``), or the global θ itself
    (``model="theta"``: evaluators, always exact fp32), in parts from several peers at once
    (docs/protocol.md, "Joining"). The version is chosen first: a ``plan`` from the coordinator,
    else a standby, else the peer with the newest version (a training peer only holds what it
    received); then ``PartDownload`` fetches the parts of exactly that version from up to
    ``sources`` of the peers that hold it (coordinator, standbys, training peers whose record
    shows that version), each part checked against the plan's digest of it, the whole against the
    plan's digest of the whole. When the peers holding that version are gone, it plans again.
    Returns (params, the plan's header with a ``join`` summary, the peer id of the plan).

    :param compression: ``fp16`` (default for the dispatch state: within fp16 rounding of θ̄) or ``none``
    :param part_mb: MB (of the compressed state) per part
    :param timeout: seconds without progress (no plan and no part) before giving up
    :raises JoinError: no peer served a state of the run's layout within ``timeout``
    """
    compression = "none" if model == "theta" else (compression or "fp16")
    numel = sum(math.prod(shape) for shape, _ in expected)
    parts = parts_for(numel, compression, part_mb)
    part_timeout = PART_TIMEOUT_BASE + numel * (2 if compression == "fp16" else 4) / parts / MIN_PART_RATE
    deadline = time.time() + timeout
    election.wait_for_lease(5.0)  # a fresh joiner believes a claim once its holder told us its key
    while time.time() < deadline and not stop_event.is_set():
        lease = election.refresh()
        servers = [lease.peer_id, *lease.standbys] if lease is not None else []
        records = sorted(node.records.peers(), key=lambda p: -p.version)
        candidates = [p for p in dict.fromkeys(servers + [p.peer_id for p in records]) if p != node.peer_id]
        for planner in candidates:
            try:
                plan, payload = node.call(planner, "state", {"run_id": node.run_id, "model": model, "plan": True,
                                                             "parts": parts, "compression": compression}, timeout=60)
            except Exception as exc:
                logger.debug("state plan from %s failed: %s", planner[-8:], exc)
                continue
            if plan.get("status") != "ok" or (model == "theta" and plan.get("source") == "peer"):
                continue
            if plan.get("parts") is None:  # a server that answers with the whole state
                try:
                    return unpack_params(payload, expected), plan, planner
                except WireError as exc:  # a peer's malformed answer: ask another
                    logger.warning("state from %s refused: %s", planner[-8:], exc)
                    continue
            problem = plan_problem(plan, expected, compression, parts)
            if problem is not None:
                logger.warning("state plan from %s refused: %s", planner[-8:], problem)
                continue
            at_version = [p.peer_id for p in records if p.version == plan["version"]] if model == "dispatch" else []
            peers = [planner] + [s for s in dict.fromkeys(servers + at_version) if s not in (planner, node.peer_id)]
            download = PartDownload(node, {**plan, "model": model}, expected, peers, sources, stop_event, part_timeout)
            logger.info("downloading state v%d (%s, %.1f MB in %d parts) from %d of %d peers that may hold it",
                        plan["version"], compression, download.total_bytes / 1e6, parts, min(sources, len(peers)),
                        len(peers))
            params = node.run(download.run())
            summary = download.summary()
            if download.done:
                deadline = max(deadline, time.time() + timeout)  # it made progress
            if params is None:
                logger.warning("state v%d: %d of %d parts missing after %.1f s (%s); planning again", plan["version"],
                               parts - len(download.done), parts, summary["seconds"], summary["failed"])
                break
            if wire_digest([wire_values(p.reshape(-1), compression) for p in params]) != plan["digest"]:
                logger.warning("state v%d: the assembled state differs from the plan's digest; planning again",
                               plan["version"])
                break
            logger.info("downloaded state v%d: %.1f MB in %.2f s (%.1f MB/s, %s) from %d peers %s, %d parts retried",
                        plan["version"], summary["bytes"] / 1e6, summary["seconds"], summary["mb_per_s"], compression,
                        len(summary["sources"]), summary["sources"], summary["retried"])
            return params, {**plan, "join": summary}, planner
        stop_event.wait(1.0)
    raise JoinError(f"could not download the current state from any peer within {timeout:.0f} s")


def swarm_holds(node, election, swarm) -> tuple[list, int, int]:
    """Live lease claims (signed by their holder), the highest term and the newest version that
    live peers report. Waits long enough for a standby of a lapsed lease to claim first (rank r
    claims r × lease/2 after the lapse), so that a resume never competes with a failover."""
    deadline = time.time() + swarm.lease_seconds * (1 + swarm.num_standbys / 2) + swarm.heartbeat_seconds
    keys = election.holder_keys
    while True:
        now = time.time()
        claims = [c for owner, c in node.records.lease_claims_by_owner()  # only claims their holder signed
                  if owner == keys.get_blocking(c.peer_id, timeout=10)]
        live = [c for c in claims if lease_rules.is_live(c, now, swarm.lease_seconds)]
        if live or now >= deadline:
            break
        time.sleep(0.5)
    highest, version = max((c.term for c in claims), default=0), 0
    for p in node.records.peers():
        if p.peer_id == node.peer_id or p.role == "left" or p.heartbeat + 3 * swarm.heartbeat_seconds < now:
            continue
        version = max(version, p.version)
        try:  # the highest term a peer has seen is in no record; ask (headers only)
            header, _ = node.call(p.peer_id, "state", {"run_id": node.run_id, "meta_only": True}, timeout=10)
            keys.learn(p.peer_id, bytes.fromhex(header["record_key"]))
            seen = int(header.get("highest_term", header.get("term", 0)))
            if seen < 2 ** 31:  # a term no real run reaches is a peer's lie: it would make ours unusable
                highest = max(highest, seen)
            version = max(version, int(header.get("version", 0)))
        except Exception as exc:
            logger.debug("resume: %s did not answer (%s)", p.peer_id[-8:], exc)
    return live, highest, version


class StateServer:
    """The ``genesis`` and ``state`` handlers of a peer.

    A ``state`` request for a plan or a part (``StateRequest``) is served from a ``PinnedState``:
    the first such request for a version copies θ̄ (or θ) of that version once, and the copy is
    kept while joiners ask for it (``PIN_SECONDS`` after the last request, at most ``MAX_PINNED``
    versions), so parts of one version can be fetched while the coordinator commits newer ones.

    :param config_yaml: the run's config as YAML
    :param tokenizer_file: the run's ``tokenizer.json`` bytes (built once)
    :param service: the peer's ``CoordinatorService`` (its commit state and lock)
    :param role: ``role()`` → the peer's role now
    :param held: ``held()`` → (θ, version) a training peer last received, or (None, 0)
    """

    def __init__(self, config_yaml: str, tokenizer_file: bytes, service, role: Callable[[], str],
                 held: Callable[[], tuple], record_key: bytes, config_digest: str = ""):
        self.config_yaml, self.tokenizer_file, self.service = config_yaml, tokenizer_file, service
        self.role, self.held, self.record_key = role, held, record_key
        self.config_digest = config_digest
        # (model, version, term) -> its copy (the event loop's). The term is part of the key: after a
        # failover a version number the dead coordinator committed unreplicated is reused by the next
        # term for other values, and a copy of the old one must not be served as the current one
        self.pinned: dict[tuple[str, int, int], PinnedState] = {}
        self._pin_lock: asyncio.Lock | None = None  # made on the event loop that serves

    async def serve_genesis(self, header: dict, payload: bytes, remote: str):
        """The run's config and tokenizer; with ``meta_only``, only the config digest (a joiner
        choosing among several genesis records asks the peers it joined through)."""
        if header.get("meta_only"):
            return {"config_digest": self.config_digest}, b""
        return {"config_yaml": self.config_yaml, "config_digest": self.config_digest}, self.tokenizer_file

    def _replica(self, version: int) -> bool:
        """Whether this peer serves its commit state (coordinator, or a standby at least as new as
        what it last received) rather than what it last received."""
        svc = self.service
        return svc.active or (self.role() == "standby" and svc.state.version >= version and not svc.state.engine.hollow)

    async def serve_state(self, header: dict, payload: bytes, remote: str):
        """Coordinators and standbys serve where a round starts now (``dispatch_params``: θ̄ with
        look-ahead dispatch, else θ), or θ itself when asked ``{"model": "theta"}`` (evaluators:
        the global model is θ); a training peer serves what it last received. A plan or a part
        (``StateRequest``) is served by ``serve_parts``."""
        svc, st = self.service, self.service.state
        params, version = self.held()
        role = self.role()
        if header.get("meta_only"):  # what this peer holds, without θ (resuming peers and standbys ask)
            return {"status": "ok", "version": max(version, st.version), "term": st.term,
                    "highest_term": svc.term.highest_seen, "role": role, "coordinating": svc.active,
                    "record_key": self.record_key.hex()}, b""
        try:
            req = StateRequest.parse(header)
        except WireError as exc:
            return rejected(exc.code, exc.message)
        if req.parts is not None:
            return await self.serve_parts(req)
        loop = asyncio.get_running_loop()
        if self._replica(version):
            engine = st.engine
            source_of = (lambda: engine.params) if req.model == "theta" else engine.dispatch_params
            async with svc.lock:  # θ of exactly one version, not one between a commit's update and its count
                copy = await loop.run_in_executor(None, lambda: [p.detach().clone() for p in source_of()])
                params, version, source, term = copy, st.version, role, st.term
        elif params is not None:
            source, term = "peer", st.term
        else:
            return {"status": "unavailable", "message": "no state yet"}, b""
        meta, data = await loop.run_in_executor(None, encode_tensors, params, req.compression)
        return {"status": "ok", "version": version, "term": term, "source": source,
                "schedule_step": st.schedule_step()}, pack_params(meta, data)

    async def serve_parts(self, req: StateRequest):
        """A plan (version, term, layout, the digest of the whole and of each part, no payload) or
        one part (its values, and the version, term and digest of the whole it was cut from). A
        part of a version this peer no longer holds is answered ``gone``, one whose digest differs
        from the request's ``mismatch``: the joiner fetches it elsewhere or plans again."""
        if self._pin_lock is None:
            self._pin_lock = asyncio.Lock()
        loop = asyncio.get_running_loop()
        pin = await self._pin(req.model, req.version)
        if pin is None:
            now = self._current_version()
            if req.version is not None:
                return {"status": "gone", "version": now,
                        "message": f"version {req.version} is not held here (this peer is at {now})"}, b""
            return {"status": "unavailable", "message": "no state yet"}, b""
        async with self._pin_lock:  # made once per version and compression
            digest = await loop.run_in_executor(None, pin.digest, req.compression)
        numel = pin.flat.numel()
        if req.parts > max(numel, 1):
            return rejected("malformed", f"{req.parts} parts for a state of {numel} values")
        where = {"version": pin.version, "term": pin.term, "source": pin.source, "digest": digest,
                 "compression": req.compression, "parts": req.parts, "numel": numel}
        if req.plan:
            async with self._pin_lock:
                digests = await loop.run_in_executor(None, pin.digests_of_parts, req.compression, req.parts)
            return {"status": "ok", **where, "schedule_step": pin.schedule_step, "layout": pin.layout,
                    "part_digests": digests}, b""
        if req.digest is not None and req.digest != digest:
            return {"status": "mismatch", **where,
                    "message": f"version {pin.version} here has digest {digest}, not {req.digest}"}, b""
        start, stop = req.part * numel // req.parts, (req.part + 1) * numel // req.parts

        def encode():
            part = pin.wire_part(req.compression, start, stop)
            meta, data = encode_tensors([part.to(torch.float32)], req.compression)
            out = wire_digest([part]), pack_params(meta, data)
            del part, data
            trim_heap()  # what encoding the part freed (a join asks for parts by the dozen)
            return out

        part_digest, data = await loop.run_in_executor(None, encode)
        return {"status": "ok", **where, "part": req.part, "start": start, "stop": stop,
                "part_digest": part_digest}, data

    def _current_version(self) -> int:
        _, version = self.held()
        return self.service.state.version if self._replica(version) else version

    async def _pin(self, model: str, version: int | None) -> PinnedState | None:
        """The kept copy of ``version`` (None: the version this peer serves now), copied now if this
        peer holds it now; None when it does not (a training peer holds no θ, only θ̄).

        The copy is taken outside ``_pin_lock`` (it waits for the commit lock, which a commit or a
        standby's full state can hold for long): part requests of versions already kept are served
        meanwhile. A plan (``version`` None) takes whatever version the copy caught, so a commit
        landing while it waited does not fail the plan."""
        self._prune()
        async with self._pin_lock:
            current, term = self._current_version(), self.service.state.term
            want = current if version is None else version
            if want == current:
                pin = self.pinned.get((model, want, term))
            else:  # an older version: the copy of the newest term that kept it (the digest decides the rest)
                kept = [k for k in self.pinned if k[:2] == (model, want)]
                pin = self.pinned[max(kept, key=lambda k: k[2])] if kept else None
                if pin is None:
                    return None
        if pin is None:
            pin = await self._snapshot(model)
            if pin is None or (version is not None and pin.version != version):
                return None
            async with self._pin_lock:
                pin = self.pinned.setdefault((model, pin.version, pin.term), pin)
                while len(self.pinned) > MAX_PINNED:
                    del self.pinned[min(self.pinned, key=lambda k: self.pinned[k].used)]
        pin.used = time.monotonic()
        asyncio.get_running_loop().call_later(PIN_SECONDS + 1.0, self._prune)
        return pin

    def _prune(self) -> None:
        """Drop kept versions unused for ``PIN_SECONDS`` (also on a timer: no request needs to come)."""
        now = time.monotonic()
        for key in [k for k, p in self.pinned.items() if now - p.used > PIN_SECONDS]:
            del self.pinned[key]

    async def _snapshot(self, model: str) -> PinnedState | None:
        svc, st = self.service, self.service.state
        params, version = self.held()
        loop = asyncio.get_running_loop()

        def flat(tensors):
            return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors]), \
                [list(t.shape) for t in tensors]

        if self._replica(version):
            engine = st.engine
            source_of = (lambda: engine.params) if model == "theta" else engine.dispatch_params
            async with svc.lock:  # θ of exactly one version
                values, layout = await loop.run_in_executor(None, lambda: flat(source_of()))
                return PinnedState(model, st.version, st.term, self.role(), st.schedule_step(), values, layout)
        if params is None or model == "theta":
            return None
        values, layout = await loop.run_in_executor(None, flat, params)
        return PinnedState(model, version, st.term, "peer", st.schedule_step(), values, layout)


def tensor_layout(params: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(p.shape), torch.float32) for p in params]
