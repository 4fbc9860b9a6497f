"""A volunteer peer: joins the run's DHT, gets config, tokenizer and state from other peers,
trains rounds on its region's data, submits pseudo-gradients to the elected coordinator, and
takes the coordinator (or standby) role when the swarm gives it one.

Threads: the main thread trains; the node's event loop serves RPCs (including the coordinator's
commits); a maintenance thread publishes heartbeats, renews or watches the lease, and runs the
election. See docs/protocol.md.

    peer = Peer(PeerOptions(run_id="demo", config="configs/tiny.yaml", region="de"))
    peer.start(); peer.train_loop(); peer.leave()
"""
from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from heloco_p2p.algorithms import build_outer_engine, resolve_outer
from heloco_p2p.checkpoint import Checkpointer, CheckpointError, load_checkpoint, plan_resume
from heloco_p2p.config import RunConfig, load_config
from heloco_p2p.data import TokenBlocks, load_tokenizer, open_source, tokenizer_digest, validation_blocks
from heloco_p2p.local import InnerTrainer, build_model, validation_loss
from heloco_p2p.local.model import param_names, trainable_params
from heloco_p2p.local.solo import source_spec
from heloco_p2p.outer import DyLU
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits, params_digest
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.defence import DefenceLimits, DefenceState, LossScreen
from heloco_p2p.roles.election import Election
from heloco_p2p.roles.evaluator import Evaluator, evaluate_forever
from heloco_p2p.roles.joining import (
    JoinError,
    StateServer,
    download_state,
    fetch_run_files,
    find_genesis,
    publish_genesis,
    swarm_holds,
    tensor_layout,
    tokenizer_json,
)
from heloco_p2p.roles.rounds import RoundLoop
from heloco_p2p.roles.submit import SubmitClient
from heloco_p2p.swarm.auth import SwarmKeyError, load_swarm_key
from heloco_p2p.swarm.lifetime import guard_children, stop_reaper
from heloco_p2p.swarm.node import SwarmNode, start_error_message
from heloco_p2p.swarm.records import GenesisRecord, PeerRecord

logger = logging.getLogger(__name__)


@dataclass
class PeerOptions:
    run_id: str
    config: str | None = None  # only the founder needs one; others fetch it from peers
    region: str = "en"
    name: str = ""
    identity: str | None = None
    initial_peers: list[str] = field(default_factory=list)
    host_maddrs: list[str] = field(default_factory=lambda: ["/ip4/127.0.0.1/tcp/0"])
    announce_maddrs: list[str] | None = None
    client_mode: bool = False
    no_train: bool = False
    checkpoint_dir: str | None = None
    resume: str | None = None  # a checkpoint directory to restart the run from (see _resume)
    max_rounds: int | None = None
    max_minutes: float | None = None
    threads: int = 0
    seed: int = 0
    speed: float = 1.0  # (0, 1]: emulate slower hardware by idling (1/speed − 1) × step time after each step
    batch_size: int | None = None  # this peer's inner batch size (local: not part of the run's identity)
    device: str | None = None  # this peer's device: auto | cpu | cuda | cuda:1 ...
    metrics_path: str | None = None
    overrides: dict = field(default_factory=dict)
    swarm_key_file: str | None = None  # the run's swarm key (docs/security.md); None: an open run
    overlap: bool | None = None  # overlapped rounds (None: the run's swarm.overlap)
    evaluator: bool = False  # evaluate the global model per language and publish it instead of training
    eval_every: float = 60.0  # evaluator: seconds between evaluations
    eval_regions: list[str] | None = None  # evaluator: languages (None: every region the swarm trains)


class Peer:
    def __init__(self, opts: PeerOptions):
        self.opts = opts
        self.stop_event = threading.Event()
        self.node: SwarmNode | None = None
        self.cfg: RunConfig | None = None
        self._role = "joining"  # until the election exists (then it owns the role)
        self.election: Election | None = None  # the lease as this peer lives it (roles/election.py)
        self._renewer: threading.Thread | None = None
        # above every sequence number an earlier process with this identity used: the ledger must
        # not take a restarted peer's new submissions for duplicates of its old ones
        self.seq = time.time_ns() // 1000
        self.version = 0  # global version of self.global_params
        self.global_params: list[torch.Tensor] | None = None
        self.tokens = 0
        self.accepted = 0
        self.rejected = 0
        self.last_staleness = 0
        self.acks: list[dict] = []
        self._metrics_lock = threading.Lock()
        self._maint: threading.Thread | None = None
        self._reaper = None
        self.checkpointer: Checkpointer | None = None
        self.rounds_loop: RoundLoop | None = None  # the training thread's rounds (roles/rounds.py)
        self.deadline: float | None = None

    @property
    def role(self) -> str:
        return self.election.role if self.election is not None else self._role

    @role.setter
    def role(self, value: str) -> None:
        if self.election is not None:
            self.election.role = value
        else:
            self._role = value

    # ------------------------------------------------------------------------------ metrics
    def log_metric(self, record: dict) -> None:
        if not self.opts.metrics_path:
            return
        with self._metrics_lock, open(self.opts.metrics_path, "a") as f:
            f.write(json.dumps({"peer": self.node.peer_id if self.node else None, "name": self.opts.name,
                                "time": time.time(), **record}) + "\n")

    # ------------------------------------------------------------------------------ joining
    def start(self) -> None:
        o = self.opts
        if o.threads:
            torch.set_num_threads(o.threads)
        saved = self._load_resume_checkpoint() if o.resume else None  # a bad checkpoint fails before any network
        swarm_key = self._load_swarm_key()
        try:
            self.node = SwarmNode(o.run_id, identity_dir=o.identity, initial_peers=o.initial_peers,
                                  host_maddrs=o.host_maddrs, announce_maddrs=o.announce_maddrs, client_mode=o.client_mode,
                                  swarm_key=swarm_key)
        except Exception as exc:
            raise JoinError(start_error_message(exc, o.initial_peers)) from None
        try:
            self._reaper = guard_children(self.node.child_pids())
        except Exception as exc:  # guarding is best effort; the launcher also kills the process group
            logger.warning("could not guard child processes: %s", exc)
        self.name = o.name or self.node.peer_id[-6:]
        logger.info("peer %s joined the DHT; others can join with --initial-peers %s", self.name,
                    " ".join(self.node.visible_maddrs()))
        genesis = find_genesis(self.node.records, o.run_id, wait=0.0 if ((o.config or saved) and not o.initial_peers) else 10.0)
        founder = genesis is None
        if saved is not None:
            self.cfg, self.tokenizer = self._resume_files(saved, genesis)
        elif founder:
            if not o.config:
                raise JoinError(f"no run {o.run_id!r} found in the DHT; to start it, give --config")
            self.cfg = load_config(o.config, overrides=o.overrides)
            self.tokenizer = load_tokenizer(self.cfg.data.tokenizer, vocab_size=self.cfg.data.vocab_size)
        else:
            self.cfg, self.tokenizer = self._fetch_genesis_files(genesis)
        self._tokenizer_file = tokenizer_json(self.tokenizer)
        self._build_local()
        self._open_checkpoints()
        limits = SubmissionLimits.from_config(self.cfg.swarm)
        theta0 = [p.detach().clone() for p in trainable_params(self.model)]
        mode, self.preset = resolve_outer(self.cfg.outer)
        try:  # the simulator's factory: one run config, one algorithm (K comes with each commit)
            engine = build_outer_engine(self.preset, theta0, names=param_names(self.model), num_workers=None)  # K: per commit
        except ValueError as exc:
            raise JoinError(f"outer: {exc}") from None
        self.commit_state = CommitState(engine, defence=DefenceState(limits.defence or DefenceLimits()))
        if limits.defence is not None and limits.defence.enabled and limits.defence.screen:
            # its own copy of the model, on the training device (a GPU at 125M: docs/security.md, "Poisoning")
            self.commit_state.screen = LossScreen(
                lambda: build_model(self.cfg.model, self.tokenizer, seed=0).to(self.trainer.device), self._screen_blocks)
        self.service = CoordinatorService(self.node, self.commit_state, [tuple(p.shape) for p in theta0], limits,
                                          reply_compression=self.cfg.swarm.reply_compression,
                                          config_digest=self.cfg.digest(), mode=mode,
                                          barrier_timeout=self.cfg.swarm.barrier_timeout,
                                          min_replicas=self.cfg.swarm.min_replicas,
                                          lease_seconds=self.cfg.swarm.lease_seconds)
        self.service.on_commit = lambda summary: self.log_metric({"event": "commit", **summary})
        self.election = Election(self.node, self.cfg, self.service, self.stop_event, self.log_metric, role=self._role)
        self.rounds_loop = RoundLoop(self.trainer, self._steps_this_round, self._more_rounds, self._submit,
                                     lambda: (self.global_params, self.version), self.log_metric, self.stop_event,
                                     speed=o.speed, submit_timeout=self.cfg.swarm.submit_timeout)
        self.submitter = SubmitClient(self.node, self.election, self.service, self.cfg.swarm, o.region,
                                      self.commit_state.engine.names, self.stop_event, self._time_left)
        self.state_server = StateServer(self.cfg.to_yaml(), self._tokenizer_file, self.service, lambda: self.role,
                                        lambda: (self.global_params, self.version), self.node.records.owner)
        self.node.add_handler("genesis", self.state_server.serve_genesis)
        self.node.add_handler("state", self.state_server.serve_state)
        if saved is not None:
            self._resume(saved, founder)
        elif founder:
            self._found()
        else:
            self._catch_up()
        self._maint = threading.Thread(target=self._maintenance, name="maintenance", daemon=True)
        self._maint.start()
        self._renewer = threading.Thread(target=self.election.renew_loop, name="lease", daemon=True)
        self._renewer.start()

    def _load_swarm_key(self):
        if not self.opts.swarm_key_file:
            return None
        try:
            key = load_swarm_key(self.opts.swarm_key_file)
        except SwarmKeyError as exc:
            raise JoinError(f"--swarm-key-file: {exc}") from None
        logger.info("swarm key %s: only peers with this key can take part", key.fingerprint)
        return key

    def _found(self) -> None:
        record = self.genesis = publish_genesis(self.node, self.cfg, self.tokenizer)
        self.global_params = [p.detach().clone() for p in self.commit_state.engine.params]
        self.version = 0
        self.service.activate(term=1)
        self.role = "coordinator"
        self.election.publish()
        logger.info("founded run %s (config %s, tokenizer %s)", self.opts.run_id, record.config_digest[:12],
                    record.tokenizer_digest[:12])

    # ------------------------------------------------------------------------------ resuming
    def _load_resume_checkpoint(self):
        try:
            saved = load_checkpoint(self.opts.resume, run_id=self.opts.run_id)
        except CheckpointError as exc:
            raise JoinError(f"--resume: {exc}") from None
        if self.opts.checkpoint_dir is None:  # keep checkpointing where the run left off
            self.opts.checkpoint_dir = str(saved.path.parent)
        return saved

    def _resume_files(self, saved, genesis: GenesisRecord | None):
        """Config and tokenizer from the checkpoint; with a run in the DHT they must be the run's."""
        try:
            cfg, tok = saved.config(), saved.tokenizer()
        except (CheckpointError, OSError, ValueError) as exc:
            raise JoinError(f"--resume: {exc}") from None
        if self.opts.config and load_config(self.opts.config, overrides=self.opts.overrides).digest() != cfg.digest():
            raise JoinError(f"--config {self.opts.config} differs from the config in {saved.path}; drop --config to "
                            "resume with the run's own")
        if genesis is not None:
            if (genesis.config_digest, genesis.tokenizer_digest) != (saved.config_digest, tokenizer_digest(tok)):
                raise JoinError(f"--resume: {saved.path} is not a checkpoint of the run {self.opts.run_id!r} in the DHT "
                                f"(config {saved.config_digest[:12]} vs the run's {genesis.config_digest[:12]}, tokenizer "
                                f"{tokenizer_digest(tok)[:12]} vs {genesis.tokenizer_digest[:12]}); join without --resume")
            self.genesis = genesis
        return cfg, tok

    def _open_checkpoints(self) -> None:
        if not self.opts.checkpoint_dir:
            return
        ck = Checkpointer(self.opts.checkpoint_dir, run_id=self.opts.run_id, config_yaml=self.cfg.to_yaml(),
                          config_digest=self.cfg.digest(), tokenizer_json=self._tokenizer_file.decode("utf-8"),
                          tokenizer_digest=tokenizer_digest(self.tokenizer), param_names=param_names(self.model),
                          every=self.cfg.swarm.checkpoint_every)
        try:
            ck.prepare()
        except CheckpointError as exc:
            raise JoinError(str(exc)) from None
        self.checkpointer = ck

    def _resume(self, saved, founder: bool) -> None:
        """``--resume``: take the coordinator role from the checkpoint when no peer holds the
        run's state, join normally when the swarm holds newer state, refuse when the swarm went
        on from older state (checkpoint.plan_resume; docs/reliability.md, "Checkpoints")."""
        if founder:
            self.genesis = publish_genesis(self.node, self.cfg, self.tokenizer)
            claims, highest, swarm_version = [], 0, 0
        else:
            claims, highest, swarm_version = swarm_holds(self.node, self.election, self.cfg.swarm)
        plan = plan_resume(saved, claims, highest, swarm_version)
        logger.warning("resume: %s", plan.message)
        self.log_metric({"event": "resume", "action": plan.action, "term": plan.term, "checkpoint_version": saved.version,
                         "checkpoint_term": saved.term, "swarm_version": swarm_version, "message": plan.message})
        if plan.action == "refuse":
            raise JoinError(plan.message)
        if plan.action == "join":
            self._catch_up()
            return
        try:
            self.commit_state.load_state_dict(saved.commit_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise JoinError(f"--resume: {saved.path} does not fit this run's model and outer optimizer: {exc}") from None
        params = [p.detach().clone() for p in self.commit_state.engine.params]
        self._adopt(params, self.commit_state.version, self.commit_state.schedule_step())
        self.service.activate(plan.term)
        self.role = "coordinator"
        self.election.publish()
        self.log_metric({"event": "takeover", "term": plan.term, "version": self.version, "resumed": True,
                         "digest": params_digest(params)})

    def _fetch_genesis_files(self, genesis: GenesisRecord):
        """Config and tokenizer from any peer that has them, verified against the genesis digests."""
        o = self.opts
        self.genesis = genesis
        cache = Path(o.identity or Path.home() / ".cache" / "heloco-p2p" / "runs") / f"{o.run_id}-tokenizer"
        try:
            cfg, tok, peer_id, _, _ = fetch_run_files(self.node, genesis, self.node.records.peers(), cache)
        except RuntimeError as exc:
            raise JoinError(f"could not fetch run {o.run_id!r}'s config and tokenizer: {exc}") from None
        if o.config and load_config(o.config, overrides=o.overrides).digest() != genesis.config_digest:
            raise JoinError(f"--config {o.config} differs from run {o.run_id!r}'s config; drop --config to use the "
                            "run's own")
        logger.info("fetched config and tokenizer from %s (digests verified)", peer_id[-8:])
        return cfg, tok

    def _build_local(self) -> None:
        cfg, o = self.cfg, self.opts
        local = {k: v for k, v in (("batch_size", o.batch_size), ("device", o.device)) if v is not None}
        inner = cfg.inner.model_copy(update=local) if local else cfg.inner  # the run's config (and digest) stay as they are
        self.source = open_source(source_spec(cfg, o.region))
        blocks = TokenBlocks(self.source, self.tokenizer, seq_len=cfg.data.seq_len, split="train",
                             seed=o.seed * 1000 + zlib.crc32(self.node.peer_id.encode()) % 1000)
        self.model = build_model(cfg.model, self.tokenizer, seed=0)  # same θ0 on every peer; the state download overrides it
        self.trainer = InnerTrainer(self.model, inner, blocks.batches(inner.batch_size))
        self.val_blocks = validation_blocks(self.source, self.tokenizer, cfg.data.seq_len, cfg.data.val_blocks)
        _, preset = resolve_outer(cfg.outer)
        self.dylu = DyLU(min_steps=cfg.outer.dylu_min_steps) if preset.dylu else None

    def _screen_blocks(self, region: str) -> torch.Tensor | None:
        """The loss screen's held-out blocks of ``region``: ``swarm.defence.screen_blocks`` blocks of its
        validation split right after the ``data.val_blocks`` that evaluators measure (disjoint from them
        when the split is long enough; else its last blocks)."""
        cfg = self.cfg
        n, k = cfg.data.val_blocks, cfg.swarm.defence.screen_blocks
        blocks = validation_blocks(open_source(source_spec(cfg, region)), self.tokenizer, cfg.data.seq_len, n + k)
        return blocks[-k:, :cfg.swarm.defence.screen_tokens] if len(blocks) else None

    def _catch_up(self) -> None:
        """Download the current θ (roles/joining.py) and start from it."""
        self.role = "catching_up"
        expected = tensor_layout(trainable_params(self.model))
        params, header, peer_id = download_state(self.node, self.election, expected, self.stop_event)
        self._adopt(params, int(header["version"]), int(header.get("schedule_step", 0)))
        logger.info("caught up: version %d from %s (%s)", self.version, peer_id[-8:], header.get("source"))
        self.role = "evaluator" if self.opts.evaluator else "training"

    def _adopt(self, params: list[torch.Tensor], version: int, schedule_step: int) -> None:
        self.global_params = params
        self.version = version
        flight = self.rounds_loop.in_flight if self.rounds_loop is not None else None
        if flight is not None and flight.is_sender():
            # overlapped rounds: the model is training; the training thread folds θ in (roles/rounds.py)
            flight.hand(params, version, schedule_step)
            return
        self.trainer.load_params(params)
        self.trainer.step = max(self.trainer.step, schedule_step)

    # ------------------------------------------------------------------------------ lease
    def _maintenance(self) -> None:
        sw = self.cfg.swarm
        last_beat = last_renew = 0.0
        while self.election.tick(0.5):
            now = time.time()
            try:
                if self.service.active:
                    if now - last_renew >= sw.lease_seconds / 3:
                        self.election.choose_standbys()  # the lease is renewed on its own thread (_renew_lease_loop)
                        last_renew = now
                    self.role = "coordinator"
                    if self.service.mode == "sync":
                        self._update_participants(now)
                self.election.watch(now)
                self._maybe_checkpoint()
                if now - last_beat >= sw.heartbeat_seconds:
                    self._heartbeat()
                    last_beat = now
            except Exception as exc:  # the DHT can hiccup; keep the peer alive
                logger.warning("maintenance: %s", exc)

    def _update_participants(self, now: float) -> None:
        """Sync mode: the barrier waits for every live training peer that has trained before."""
        sw = self.cfg.swarm
        live = {p.peer_id for p in self.node.records.peers()
                if p.role in ("training", "standby", "coordinator") and p.rounds > 0
                and p.heartbeat + 3 * sw.heartbeat_seconds > now}
        if not self.opts.no_train:
            live.add(self.node.peer_id)
        self.service.participants = live
        self.node.run(self.service.check_barrier(), timeout=60)

    def _heartbeat(self) -> None:
        record = PeerRecord(peer_id=self.node.peer_id, name=self.name, region=self.opts.region,
                            device=str(self.trainer.device), role=self.role, steps_per_second=float(self.rounds_loop.steps_per_second),
                            inner_steps=int(self.rounds_loop.inner_steps), version=int(self.version), rounds=int(self.rounds_loop.rounds),
                            tokens=int(self.tokens), loss=float(self.rounds_loop.last_loss) if math.isfinite(self.rounds_loop.last_loss) else -1.0,
                            staleness=int(self.last_staleness), accepted=int(self.accepted), rejected=int(self.rejected),
                            bytes_in=int(self.node.bytes_in), bytes_out=int(self.node.bytes_out), heartbeat=time.time(),
                            maddrs=self.node.visible_maddrs())
        self._peer_record = record
        self.node.records.publish_peer(record, ttl=4 * self.cfg.swarm.heartbeat_seconds)
        self.log_metric({"event": "heartbeat", **{k: v for k, v in record.dict().items() if k != "maddrs"}})

    def _maybe_checkpoint(self, force: bool = False) -> int | None:
        """The coordinator's (and a standby's) commit state every ``swarm.checkpoint_every`` commits
        and when leaving: one sealed file, written atomically (heloco_p2p/checkpoint.py)."""
        ck, st = self.checkpointer, self.commit_state
        if ck is None or not (force or self.service.active or self.role == "standby"):
            return None
        if not ck.due(st.term, st.version, force):
            return None
        t0 = time.perf_counter()

        async def _snapshot():
            async with self.service.lock:  # never a state between a commit's parameter update and its version
                return st.state_dict()

        snapshot = self.node.run(_snapshot(), timeout=60)
        if ck.write(snapshot) is None:
            return None
        self.log_metric({"event": "checkpoint", "version": snapshot["engine"]["version"], "term": snapshot["term"],
                         "role": self.role, "seconds": time.perf_counter() - t0})
        return snapshot["engine"]["version"]

    # ------------------------------------------------------------------------------ rounds
    def _steps_this_round(self) -> int:
        H = self.cfg.inner.steps_per_round
        if self.dylu is None:
            return H
        for p in self.node.records.peers():
            if p.steps_per_second > 0:
                self.dylu.update(p.peer_id, p.steps_per_second)
        if self.rounds_loop.steps_per_second > 0:
            self.dylu.update(self.node.peer_id, self.rounds_loop.steps_per_second)
        return self.dylu.steps_for(self.node.peer_id, H) if self.dylu.speed(self.node.peer_id) else H

    def _time_left(self) -> bool:
        return self.deadline is None or time.time() < self.deadline

    def _more_rounds(self) -> bool:
        if self.stop_event.is_set() or not self._time_left():
            return False
        if self.opts.max_rounds is not None and self.rounds_loop.rounds >= self.opts.max_rounds:
            return False
        if self.genesis.max_versions and self.version >= self.genesis.max_versions:
            logger.info("the run reached its budget of %d versions", self.genesis.max_versions)
            return False
        if self.genesis.max_tokens and self.election.run_tokens >= self.genesis.max_tokens:
            logger.info("the run reached its budget of %d tokens (%d committed)", self.genesis.max_tokens,
                        self.election.run_tokens)
            return False
        return True

    @property
    def overlap(self) -> bool:
        return self.cfg.swarm.overlap if self.opts.overlap is None else self.opts.overlap

    def train_loop(self) -> None:
        o, started = self.opts, time.time()
        self.deadline = started + 60 * o.max_minutes if o.max_minutes else None
        self.log_metric({"event": "ready", "version": self.version})  # joined and holding θ (join latency)
        if not o.no_train:
            self.log_metric({"event": "eval", "version": self.version, "val_loss": self.evaluate()})
        self.log_metric({"event": "train_start"})
        if o.evaluator:
            self.role = "evaluator"
            ev = Evaluator(self.model, self.trainer.load_params, self.cfg, self.tokenizer, regions=o.eval_regions,
                           own_region=o.region)
            evaluate_forever(ev, self.node, self.election, self.name, o.eval_every, self.stop_event, self._time_left,
                             self.log_metric)
            return
        if o.no_train:
            while not self.stop_event.wait(1.0):
                if o.max_minutes and time.time() - started > 60 * o.max_minutes:
                    break
            return
        self.rounds_loop.run(self.overlap)
        self.log_metric({"event": "train_end", "rounds": self.rounds_loop.rounds})
        self.log_metric({"event": "eval", "version": self.version, "val_loss": self.evaluate()})

    def _submit(self, delta: list[torch.Tensor], base: int, stats, compute: float) -> None:
        """One round's pseudo-gradient through the submit client, and what its outcome means here."""
        expected = [(tuple(p.shape), torch.float32) for p in self.global_params]
        out = self.submitter.submit(self.seq, delta, base, stats, expected)
        if out.status == "accepted":
            reply = out.reply
            self._adopt(out.params, out.version, int(reply.get("schedule_step", 0)))
            self.accepted += 1
            self.tokens += stats.tokens
            self.election.run_tokens = max(self.election.run_tokens, int(reply.get("run_tokens", 0)))
            self.last_staleness = int(reply["staleness"] or 0)
            ack = {"event": "ack", "seq": self.seq, "version": self.version, "term": int(reply["term"]),
                   "digest": params_digest(out.params), "duplicate": bool(reply.get("duplicate")),
                   "staleness": reply.get("staleness"), "loss": stats.loss, "tokens": stats.tokens, "steps": stats.steps,
                   "compute_seconds": compute, "rtt": out.rtt, "serialize_seconds": out.serialize_seconds,
                   "bytes": out.payload_bytes, "reply_bytes": out.reply_bytes, "server": reply.get("timing", {}),
                   "attempts": out.attempts, "compression": self.cfg.swarm.compression}
            self.acks.append(ack)
            self.log_metric(ack)
            logger.info("round %d: v%d loss %.3f %.0f tok/s staleness %s role %s", self.rounds_loop.rounds, self.version,
                        stats.loss, stats.tokens_per_second, reply.get("staleness"), self.role)
        elif out.status == "rejected":  # a reason a retry cannot fix; start again from the current state
            self.rejected += 1
            self.log_metric({"event": "rejected", "reason": out.reason, "message": out.reply.get("message")})
            logger.warning("submission rejected: %s (%s)", out.reason, out.reply.get("message"))
        self.seq += 1
        # harmful_update: the loss screen scores Δ at the coordinator's θ; a Δ from a base that θ has
        # moved far from (after a bad commit) can fail it for that reason alone: start from θ again
        if (out.status == "gave_up" or out.reason in ("too_stale", "bad_version", "harmful_update")) \
                and not self.stop_event.is_set() and self._time_left():
            self._catch_up()

    # ------------------------------------------------------------------------------ leaving
    def evaluate(self) -> float:
        with torch.no_grad():
            self.trainer.load_params(self.global_params)
        return validation_loss(self.model, self.val_blocks)

    def request_stop(self, *_args) -> None:
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)

    def leave(self) -> None:
        """Deregister, hand the role over (standbys take it when the lease lapses), stop p2pd."""
        self.stop_event.set()
        if self._maint is not None:
            self._maint.join(timeout=5)
        if self.node is None:
            return
        try:
            if self.cfg is not None:
                heir = self.node.run(self.service.hand_over(), timeout=30) if self.service.active else None
                written = self._maybe_checkpoint(force=True)
                if written is not None and heir is None:  # no standby took the role: the checkpoint is the run
                    self.service.checkpointed(written)
                if getattr(self, "_peer_record", None) is not None:
                    self.node.records.withdraw_peer(self._peer_record, ttl=4 * self.cfg.swarm.heartbeat_seconds + 5)
        except Exception as exc:
            logger.debug("leaving: %s", exc)
        self.node.shutdown()
        if self._reaper is not None:
            stop_reaper(self._reaper)
        logger.info("left the swarm")
