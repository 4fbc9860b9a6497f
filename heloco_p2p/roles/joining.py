"""Joining a run and serving what joiners need (docs/protocol.md, "Joining").

- ``find_genesis`` / ``publish_genesis``: the run's identity in the DHT (protocol version, config
  and tokenizer digests, budget); ``open_swarm_key``: the run's swarm key, if it has one;
- ``fetch_run_files``: the run's config and tokenizer from any peer that serves them, checked
  against the genesis digests (the peer and ``heloco-peer doctor`` use this one function);
  ``fetch_genesis_files``: the same for a joining peer, checked against its ``--config``;
- ``download_state``: the current θ from the coordinator, else a standby, else any peer;
- ``swarm_holds``: what live peers hold, for ``--resume`` (checkpoint.plan_resume);
- ``StateServer``: the ``genesis`` and ``state`` handlers (θ is copied under the commit lock and
  encoded off the event loop; the tokenizer file is built once).
"""
from __future__ import annotations

import asyncio
import logging
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import torch
import yaml

from heloco_p2p.config import config_from_dict, load_config
from heloco_p2p.data import load_tokenizer, tokenizer_digest
from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.swarm.auth import SwarmKeyError, load_swarm_key
from heloco_p2p.swarm.records import PROTOCOL_VERSION, GenesisRecord, PeerRecord
from heloco_p2p.swarm.wire import encode_tensors, pack_params, unpack_params

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


def publish_genesis(node, cfg, tokenizer) -> GenesisRecord:
    record = GenesisRecord(protocol_version=PROTOCOL_VERSION, run_id=node.run_id, config_digest=cfg.digest(),
                           tokenizer_digest=tokenizer_digest(tokenizer), max_versions=cfg.swarm.max_versions,
                           max_tokens=cfg.swarm.max_tokens, created=time.time(), founder=node.peer_id)
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


def download_state(node, election, expected: list, stop_event: threading.Event, timeout: float = 120.0,
                   model: str = "dispatch"):
    """Where a round starts now (θ̄ or θ, ``model="dispatch"``), or the global θ itself
    (``model="theta"``: evaluators): from the coordinator, else a standby, else any peer (newest
    version first; a training peer only holds what it received). Returns (params, the ``state``
    reply header, the peer id it came from).

    :raises JoinError: no peer served a state of the run's layout within ``timeout``
    """
    deadline = time.time() + timeout
    election.wait_for_lease(5.0)  # a fresh joiner believes a claim once its holder told us its key
    while time.time() < deadline and not stop_event.is_set():
        lease = election.refresh()
        candidates = [lease.peer_id, *lease.standbys] if lease is not None else []
        candidates += [p.peer_id for p in sorted(node.records.peers(), key=lambda p: -p.version)]
        for peer_id in dict.fromkeys(candidates):
            if peer_id == node.peer_id:
                continue
            try:
                header, payload = node.call(peer_id, "state", {"run_id": node.run_id, "model": model}, timeout=60)
                if header.get("status") != "ok" or (model == "theta" and header.get("source") == "peer"):
                    continue
                return unpack_params(payload, expected), header, peer_id
            except Exception as exc:
                logger.debug("state from %s failed: %s", peer_id[-8:], exc)
        time.sleep(1.0)
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

    async def serve_genesis(self, header: dict, payload: bytes, remote: str):
        """The run's config and tokenizer; with ``meta_only``, only the config digest (a joiner
        choosing among several genesis records asks the peers it joined through)."""
        if header.get("meta_only"):
            return {"config_digest": self.config_digest}, b""
        return {"config_yaml": self.config_yaml, "config_digest": self.config_digest}, self.tokenizer_file

    async def serve_state(self, header: dict, payload: bytes, remote: str):
        """Coordinators and standbys serve where a round starts now (``dispatch_params``: θ̄ with
        look-ahead dispatch, else θ), or θ itself when asked ``{"model": "theta"}`` (evaluators:
        the global model is θ); a training peer serves what it last received."""
        svc, st = self.service, self.service.state
        params, version = self.held()
        role = self.role()
        if header.get("meta_only"):  # what this peer holds, without θ (resuming peers and standbys ask)
            return {"status": "ok", "version": max(version, st.version), "term": st.term,
                    "highest_term": svc.term.highest_seen, "role": role, "coordinating": svc.active,
                    "record_key": self.record_key.hex()}, b""
        loop = asyncio.get_running_loop()
        if svc.active or (role == "standby" and st.version >= version):
            engine = st.engine
            source_of = (lambda: engine.params) if header.get("model") == "theta" else engine.dispatch_params
            async with svc.lock:  # θ of exactly one version, not one between a commit's update and its count
                copy = await loop.run_in_executor(None, lambda: [p.detach().clone() for p in source_of()])
                params, version, source, term = copy, st.version, role, st.term
        elif params is not None:
            source, term = "peer", st.term
        else:
            return {"status": "unavailable", "message": "no state yet"}, b""
        meta, data = await loop.run_in_executor(None, encode_tensors, params, "none")
        return {"status": "ok", "version": version, "term": term, "source": source,
                "schedule_step": st.schedule_step()}, pack_params(meta, data)


def tensor_layout(params: list[torch.Tensor]) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(p.shape), torch.float32) for p in params]
