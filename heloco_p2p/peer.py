"""A volunteer peer: joins the run's DHT, gets config, tokenizer and state from other peers,
trains rounds on its region's data, submits pseudo-gradients to the elected coordinator, and
takes the coordinator (or standby) role when the swarm gives it one.

``Peer`` is the composition root: it builds the collaborators of roles/ and wires them. Which
thread owns which of them, and the hand-offs between threads: roles/__init__.py. See
docs/protocol.md.

    peer = Peer(PeerOptions(run_id="demo", config="configs/tiny.yaml", region="de"))
    peer.start(); peer.train_loop(); peer.leave()
"""
from __future__ import annotations

import logging
import os
import signal
import threading
import time
import zlib
from dataclasses import dataclass, field

import torch

from heloco_p2p.algorithms import build_dylu, build_outer_engine, resolve_outer
from heloco_p2p.config import RunConfig, load_config
from heloco_p2p.data import TokenBlocks, load_tokenizer, open_source, validation_blocks
from heloco_p2p.local import InnerTrainer, build_model, validation_loss
from heloco_p2p.local.model import param_names, trainable_params
from heloco_p2p.local.solo import source_spec
from heloco_p2p.roles.checkpoints import Checkpoints
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits, params_digest
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.defence import DefenceLimits, DefenceState, LossScreen
from heloco_p2p.roles.election import REPLICA_ROLES, Election
from heloco_p2p.roles.evaluator import Evaluator, evaluate_forever
from heloco_p2p.roles.joining import (
    JOIN_PART_MB,
    JOIN_SOURCES,
    JoinError,
    StateServer,
    download_state,
    fetch_genesis_files,
    find_genesis,
    open_swarm_key,
    publish_genesis,
    tensor_layout,
    tokenizer_json,
    vouched_by,
)
from heloco_p2p.roles.maintenance import Maintenance
from heloco_p2p.roles.metrics import MetricsLog
from heloco_p2p.roles.rounds import RoundLoop
from heloco_p2p.roles.schedule import RoundSchedule
from heloco_p2p.roles.shard_node import ShardNode, ShardRouter
from heloco_p2p.roles.shard_submit import ShardedSubmit
from heloco_p2p.roles.shards import ShardError, ShardPlan, scalar_version, standby_rank
from heloco_p2p.roles.submit import SubmitClient
from heloco_p2p.roles.tally import SubmitTally
from heloco_p2p.swarm.lifetime import guard_children, stop_reaper, trim_heap
from heloco_p2p.swarm.node import SwarmNode, start_error_message

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
    resume: str | None = None  # a checkpoint directory to restart the run from (roles/checkpoints.py)
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
    genesis_digest: str | None = None  # which run's genesis to follow when the run id has several (--genesis-digest)
    overlap: bool | None = None  # overlapped rounds (None: the run's swarm.overlap)
    evaluator: bool = False  # evaluate the global model per language and publish it instead of training
    eval_every: float = 60.0  # evaluator: seconds between evaluations
    eval_regions: list[str] | None = None  # evaluator: languages (None: every region the swarm trains)
    # the state download (roles/joining.py): this peer's link decides them, not the run
    join_sources: int = JOIN_SOURCES  # peers to download parts from at once
    join_part_mb: float = JOIN_PART_MB  # MB of the (fp16) state per part


@dataclass
class ShardStack:
    """The one-coordinator roles of one shard (all of them, as today, when ``swarm.shards`` is 1):
    its node view (roles/shard_node.py), commit state, coordinator service, election, submit
    client, state server and checkpoints."""

    shard: int
    node: object
    commit_state: CommitState
    service: CoordinatorService
    election: Election
    submitter: SubmitClient
    state_server: StateServer
    checkpoints: Checkpoints


class Peer:
    """One peer of a run: ``start`` joins (or founds, or resumes) it and wires the roles,
    ``train_loop`` trains (or evaluates, or only serves), ``leave`` hands the role over and stops.

    Collaborators (roles/): ``checkpoints`` (``--resume``, ``--checkpoint-dir``), ``service`` (the
    coordinator and standby handlers over ``commit_state``), ``election`` (the lease; it owns the
    role), ``rounds_loop`` and ``submitter`` (the training thread's rounds), ``tally`` (what the
    submissions came to), ``state_server`` (what joiners download), ``maintenance`` (its thread:
    standbys, takeover, checkpoints, heartbeats) and ``metrics`` (the JSONL log). The peer itself
    holds the global θ its rounds start from (``global_params`` at ``version``: ``held``).
    """

    held_in_model = False  # global_params are the model's own parameters (a peer that never trains)
    # set in ``__init__``/``start``; class defaults so a peer assembled piecemeal (tests) is unsharded
    shards: "list[ShardStack] | tuple" = ()
    sharded: "ShardedSubmit | None" = None

    def __init__(self, opts: PeerOptions):
        self.opts = opts
        self.held_in_model = opts.no_train and not opts.evaluator
        self.stop_event = threading.Event()
        self.node: SwarmNode | None = None
        self.cfg: RunConfig | None = None
        self._role = "joining"  # until the election exists (then it owns the role)
        self.election: Election | None = None  # the lease as this peer lives it (roles/election.py)
        self.metrics = MetricsLog(opts.metrics_path, opts.name)
        self.tally = SubmitTally()
        self.version = 0  # global version of self.global_params
        self.global_params: list[torch.Tensor] | None = None
        # what global_params are: "exact" θ̄, the "wrap8" grid of θ̄ (swarm/downlink.py), "none" (lossy)
        self.held_kind = "exact"
        self.checkpoints: Checkpoints | None = None
        self.rounds_loop: RoundLoop | None = None  # the training thread's rounds (roles/rounds.py)
        self.maintenance: Maintenance | None = None
        self.schedule: RoundSchedule | None = None  # H of each round, and when they stop (roles/schedule.py)
        self._renewer: threading.Thread | None = None
        self._reaper = None
        self.shards: list[ShardStack] = []  # one stack of roles per shard (roles/shards.py)
        self.plan: ShardPlan | None = None
        self.sharded: ShardedSubmit | None = None  # S > 1: the parts of each Δ in flight (roles/shard_submit.py)

    @property
    def role(self) -> str:
        """The peer's role; with S > 1 shards its strongest one (coordinator of any shard, else
        standby of any, else the role it has as a trainer): ``shard_roles`` has each."""
        if self.election is None:
            return self._role
        if len(self.shards) <= 1:
            return self.election.role
        roles = [st.election.role for st in self.shards]
        return next((r for r in ("coordinator", "standby") if r in roles), roles[0])

    @role.setter
    def role(self, value: str) -> None:
        if self.election is not None:
            self.election.role = value  # shard 0's (the only one without shards)
            for st in self.shards[1:]:
                st.election.role = value
        else:
            self._role = value

    def shard_roles(self) -> dict[str, str]:
        """Shard -> this peer's role in it, for the shards it coordinates or stands by for (S > 1)."""
        if len(self.shards) <= 1:
            return {}
        return {str(st.shard): st.election.role for st in self.shards if st.election.role in ("coordinator", "standby")}

    def held(self) -> tuple[list[torch.Tensor] | None, int]:
        """(θ, version): the global θ this peer holds, where its next round starts."""
        return self.global_params, self.version

    # ------------------------------------------------------------------------------ joining
    def start(self) -> None:
        o = self.opts
        if o.threads:
            torch.set_num_threads(o.threads)
        self.checkpoints = Checkpoints(o.run_id, o.checkpoint_dir, o.resume, self.metrics.log)  # a bad --resume fails before any network
        saved, swarm_key = self.checkpoints.saved, open_swarm_key(o.swarm_key_file)
        try:
            self.node = SwarmNode(o.run_id, identity_dir=o.identity, initial_peers=o.initial_peers,
                                  host_maddrs=o.host_maddrs, announce_maddrs=o.announce_maddrs, client_mode=o.client_mode,
                                  swarm_key=swarm_key)
        except Exception as exc:
            raise JoinError(start_error_message(exc, o.initial_peers)) from None
        self.metrics.peer_id = self.node.peer_id
        try:
            self._reaper = guard_children(self.node.child_pids())
        except Exception as exc:  # guarding is best effort; the launcher also kills the process group
            logger.warning("could not guard child processes: %s", exc)
        self.name = o.name or self.node.peer_id[-6:]
        logger.info("peer %s joined the DHT; others can join with --initial-peers %s", self.name,
                    " ".join(self.node.visible_maddrs()))
        self.genesis = genesis = find_genesis(self.node.records, o.run_id,
                                              wait=0.0 if ((o.config or saved) and not o.initial_peers) else 10.0,
                                              pinned=o.genesis_digest, vouched=vouched_by(self.node, o.initial_peers))
        founder = genesis is None
        if founder and o.client_mode:
            raise JoinError(f"no run {o.run_id!r} found in the DHT, and a --client-mode peer cannot start one: "
                            "the founder is the run's first coordinator, and no peer can dial a --client-mode "
                            "peer. Start the run on a reachable peer (without --client-mode), or check "
                            "--initial-peers and --run-id if the run exists")
        if saved is not None:
            self.cfg, self.tokenizer = self.checkpoints.run_files(genesis, o.config, o.overrides)
        elif founder:
            if not o.config:
                raise JoinError(f"no run {o.run_id!r} found in the DHT; to start it, give --config")
            self.cfg = load_config(o.config, overrides=o.overrides)
            self.tokenizer = load_tokenizer(self.cfg.data.tokenizer, vocab_size=self.cfg.data.vocab_size)
        else:
            self.cfg, self.tokenizer = fetch_genesis_files(self.node, genesis, o.identity, o.config, o.overrides)
        tokenizer_file = tokenizer_json(self.tokenizer)
        self._build_local()
        self.checkpoints.open(self.cfg, self.tokenizer, tokenizer_file, param_names(self.model))
        limits = SubmissionLimits.from_config(self.cfg.swarm)
        theta0 = [p.detach() for p in trainable_params(self.model)]  # the engine copies them (it owns θ)
        mode, self.preset = resolve_outer(self.cfg.outer)
        self.plan = self._shard_plan(theta0, founder and saved is None)
        names = param_names(self.model)
        router = ShardRouter(self.node) if self.plan.count > 1 else None
        self.shards = [self._build_shard(k, router, params, part_names, limits, mode, tokenizer_file, o.region)
                       for k, (params, part_names) in enumerate(zip(self.plan.split(theta0), self.plan.split(names)))]
        del theta0
        if not founder and saved is None:
            # a joiner's commit state is only ever loaded whole (made a standby, or a checkpoint):
            # until then it holds no θ (one copy of the model less on every training peer)
            for stack in self.shards:
                stack.commit_state.engine.release()
        first = self.shards[0]  # an unsharded run's one stack; with S > 1 the stack of shard 0
        self.commit_state, self.service, self.election = first.commit_state, first.service, first.election
        self.submitter, self.state_server = first.submitter, first.state_server
        self.schedule = RoundSchedule(self.node, self.cfg.inner.steps_per_round, build_dylu(self.preset), self.election,
                                      lambda: self.genesis, self.held, self.stop_event, max_rounds=o.max_rounds)
        self.rounds_loop = self.schedule.loop = RoundLoop(
            self.trainer, self.schedule.steps_for, self.schedule.more, self._submit, self.held, self.metrics.log,
            self.stop_event, speed=o.speed, submit_timeout=self.cfg.swarm.submit_timeout)
        for stack in self.shards:
            stack.submitter.keep_going = self.schedule.time_left
        if self.plan.count > 1:
            self.sharded = ShardedSubmit(self.plan, self._send_part, self._part_grace)
        self.node.add_handler("genesis", self.state_server.serve_genesis)
        if saved is not None:
            self._resume(founder)
        elif founder:
            self._found()
        else:
            self._catch_up()
        self.maintenance = Maintenance(self.node, self.cfg, self.election, self.service, self.rounds_loop, self.tally,
                                       self.held, self._checkpoint, self.metrics.log, name=self.name, region=o.region,
                                       device=str(self.trainer.device), trains=not o.no_train,
                                       initial_peers=o.initial_peers, client=o.client_mode,
                                       shards=[(st.election, st.service) for st in self.shards[1:]])
        self.maintenance.start()
        self._renewers = [threading.Thread(target=st.election.renew_loop, name=f"lease-{st.shard}" if st.shard else "lease",
                                           daemon=True) for st in self.shards]
        self._renewer = self._renewers[0]
        for t in self._renewers:
            t.start()

    def _shard_plan(self, theta0: list[torch.Tensor], founding: bool) -> ShardPlan:
        """The run's shard plan: from ``swarm.shards`` when founding, else the genesis record's
        (which must be the one the config gives: roles/shards.py)."""
        try:
            plan = ShardPlan.for_shapes([tuple(p.shape) for p in theta0], self.cfg.swarm.shards)
            if not founding and self.genesis is not None:
                recorded = ShardPlan.from_record(self.genesis.shards, [tuple(p.shape) for p in theta0])
                if recorded != plan:
                    raise ShardError(f"the genesis record's shard plan ({recorded.count} shards) is not the one "
                                     f"swarm.shards = {self.cfg.swarm.shards} gives for this model")
        except ShardError as exc:
            raise JoinError(str(exc)) from None
        if plan.count > 1 and (self.cfg.swarm.reply_compression == "wrap8" or self.checkpoints.saved is not None):
            raise JoinError("swarm.shards > 1 does not support wrap8 replies or --resume yet")
        return plan

    def _build_shard(self, shard: int, router, params: list[torch.Tensor], names: list[str], limits, mode: str,
                     tokenizer_file: bytes, region: str) -> "ShardStack":
        """The one-coordinator roles of ``shard`` over its tensors (all of them when S = 1)."""
        node = self.node if router is None else ShardNode(self.node, router, shard)
        try:  # the simulator's factory: one run config, one algorithm (K comes with each commit)
            engine = build_outer_engine(self.preset, params, names=names, num_workers=None)  # K: per commit
        except ValueError as exc:
            raise JoinError(f"outer: {exc}") from None
        commit_state = CommitState(engine, defence=DefenceState(limits.defence or DefenceLimits()))
        if limits.defence is not None and limits.defence.enabled and limits.defence.screen:
            # its own copy of the model, on the training device (a GPU at 125M: docs/security.md, "Poisoning")
            commit_state.screen = LossScreen(
                lambda: build_model(self.cfg.model, self.tokenizer, seed=0).to(self.trainer.device), self._screen_blocks)
        service = CoordinatorService(node, commit_state, [tuple(p.shape) for p in params], limits,
                                     reply_compression=self.cfg.swarm.reply_compression,
                                     reply_window=self.cfg.swarm.reply_window,
                                     config_digest=self.cfg.digest(), mode=mode,
                                     barrier_timeout=self.cfg.swarm.barrier_timeout,
                                     min_replicas=self.cfg.swarm.min_replicas,
                                     lease_seconds=self.cfg.swarm.lease_seconds)
        tag = {} if router is None else {"shard": shard}
        service.on_commit = lambda summary: self.metrics.log({"event": "commit", **summary, **tag})
        service.standby.on_replica = lambda held: self.metrics.log({"event": "replica", **held, **tag})
        log = self.metrics.log if router is None else (lambda e: self.metrics.log({**e, "shard": shard}))
        election = Election(node, self.cfg, service, self.stop_event, log, role=self._role)
        if self.opts.client_mode:  # nobody can dial this peer: it trains and submits, it never holds a role
            election.serves = service.standby.accepts_replicas = False
        if router is not None:  # a peer coordinating another shard may stand by for this one, after free peers
            election.may_stand_by = lambda p, k=str(shard): p.role in REPLICA_ROLES + ("coordinator",) \
                and p.shards.get(k) != "coordinator"
            election.standby_rank = lambda p: standby_rank(p.shards)
            election.shard = shard
        start = (lambda: (self.global_params, self.held_kind)) if router is None else \
            (lambda: (None if self.global_params is None else self.plan.part(self.global_params, shard), self.held_kind))
        submitter = SubmitClient(node, election, service, self.cfg.swarm, region, names, self.stop_event,
                                 lambda: True, start_point=start)
        held = self.held if router is None else (lambda: self._held_part(shard))
        state_server = StateServer(self.cfg.to_yaml(), tokenizer_file, service, lambda: election.role if router else self.role,
                                   held, self.node.records.owner, config_digest=self.cfg.digest())
        node.add_handler("state", state_server.serve_state)
        checkpoints = self.checkpoints
        if router is not None and self.opts.checkpoint_dir:  # one checkpoint directory per shard
            checkpoints = Checkpoints(self.opts.run_id, os.path.join(self.opts.checkpoint_dir, f"shard-{shard}"), None,
                                      lambda e: self.metrics.log({**e, "shard": shard}))
            checkpoints.open(self.cfg, self.tokenizer, tokenizer_file, names)
        elif router is not None:
            checkpoints = Checkpoints(self.opts.run_id, None, None, self.metrics.log)
        return ShardStack(shard, node, commit_state, service, election, submitter, state_server, checkpoints)

    def _held_part(self, shard: int) -> tuple[list[torch.Tensor] | None, int]:
        """(θ of ``shard``, its version): what this peer serves joiners of that shard."""
        params, version = self.global_params, self.version
        if params is None:
            return None, 0
        return self.plan.part(params, shard), version[shard]

    def _found(self) -> None:
        record = self.genesis = publish_genesis(self.node, self.cfg, self.tokenizer, shards=self.plan.record())
        if self.plan.count == 1:
            self.global_params = self._held_copy(self.commit_state.engine.params)
        else:
            self.global_params = self.plan.merge([[p.detach().clone() for p in st.commit_state.engine.params]
                                                  for st in self.shards])
        self.version = 0 if self.plan.count == 1 else (0,) * self.plan.count
        for stack in self.shards:  # the founder holds every shard until others can (Maintenance.place_shards)
            self._coordinate(term=1, stack=stack)
        logger.info("founded run %s (config %s, tokenizer %s)", self.opts.run_id, record.config_digest[:12],
                    record.tokenizer_digest[:12])

    def _resume(self, founder: bool) -> None:
        """``--resume``: take the coordinator role from the checkpoint when no peer holds the
        run's state, else join normally (or refuse: ``Checkpoints.plan``)."""
        if founder:
            self.genesis = publish_genesis(self.node, self.cfg, self.tokenizer)
        plan = self.checkpoints.plan(self.node, self.election, self.cfg.swarm, founder)
        if plan.action == "join":
            self._catch_up()
            return
        params = self.checkpoints.restore(self.commit_state)
        self._adopt(params, self.commit_state.version, self.commit_state.schedule_step())
        self._coordinate(plan.term)
        self.metrics.log({"event": "takeover", "term": plan.term, "version": self.version, "resumed": True,
                          "digest": params_digest(params)})

    def _coordinate(self, term: int, stack: "ShardStack | None" = None) -> None:
        """Hold the coordinator role (of ``stack``'s shard; default: the only one) in ``term``
        (founding or resuming the run) and claim the lease."""
        stack = stack or self.shards[0]
        stack.service.activate(term)
        stack.election.role = "coordinator"
        stack.election.publish()

    def _checkpoint(self, force: bool = False) -> int | None:
        """Checkpoint each shard this peer coordinates or stands by for (when due); the version
        written of shard 0 (or, with S > 1, of the last shard written)."""
        if len(self.shards) == 1:
            return self.checkpoints.maybe_write(self.node, self.service, self.commit_state, self.role, force)
        written = None
        for st in self.shards:
            v = st.checkpoints.maybe_write(st.node, st.service, st.commit_state, st.election.role, force)
            written = v if v is not None else written
        return written

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

    def _screen_blocks(self, region: str) -> torch.Tensor | None:
        """The loss screen's held-out blocks of ``region``: ``swarm.defence.screen_blocks`` blocks of its
        validation split right after the ``data.val_blocks`` that evaluators measure (disjoint from them
        when the split is long enough; else its last blocks)."""
        cfg = self.cfg
        n, k = cfg.data.val_blocks, cfg.swarm.defence.screen_blocks
        blocks = validation_blocks(open_source(source_spec(cfg, region)), self.tokenizer, cfg.data.seq_len, n + k)
        return blocks[-k:, :cfg.swarm.defence.screen_tokens] if len(blocks) else None

    def _catch_up(self, exact: bool = False) -> None:
        """Download the current θ (roles/joining.py) and start from it; ``exact``: in fp32 (a wrap8
        resync), else in fp16 parts. With S > 1 shards: each shard's part from that shard's peers."""
        if len(self.shards) > 1:
            self._catch_up_shards(exact)
            return
        self.role = "catching_up"
        expected = tensor_layout(trainable_params(self.model))
        params, header, peer_id = download_state(self.node, self.election, expected, self.stop_event,
                                                 compression="none" if exact else None,
                                                 sources=self.opts.join_sources, part_mb=self.opts.join_part_mb)
        # what the start point is, for the coordinator's wrap8 window (the submission's ``held``): a
        # training peer serves what it received (with wrap8, that version's grid); a coordinator or
        # standby θ̄ itself, in fp32 or rounded to fp16. An fp16 start is held "exact": its rounding
        # (2^-11 relative) is a few grid steps at most, inside the window's margin (100 of the 127
        # steps that decode), and a block it would break fails its checksums (a resync in fp32). As
        # "none" every joiner's first reply was the dense fp32 θ̄: on a 50 Mbit/s link at 79M
        # parameters that reply took ~100 s against ~35 s, and cost each trainer a 30 s wait
        if header.get("source") == "peer" and self.cfg.swarm.reply_compression == "wrap8":
            kind = "wrap8"
        else:
            kind = "exact"
        self._adopt(params, int(header["version"]), int(header.get("schedule_step", 0)), kind)
        if "join" in header:
            self.metrics.log({"event": "state_download", "version": self.version, **header["join"]})
        logger.info("caught up: version %d from %s (%s)", self.version, peer_id[-8:], header.get("source"))
        self.role = "evaluator" if self.opts.evaluator else "training"

    def _held_copy(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """A copy of ``params`` for ``global_params``: a peer that never trains (``--no-train``, not an
        evaluator: ``held_in_model``) keeps it in its model's own parameters, which nothing else
        writes there (one copy of θ less)."""
        if self.held_in_model:
            self.trainer.load_params(params)
            return [p.detach() for p in self.trainer.params]
        return [p.detach().clone() for p in params]

    def _catch_up_shards(self, exact: bool) -> None:
        """Each shard's part of θ̄, from its coordinator, standbys and trainers (``download_state``
        through that shard's node view), or from this peer's own state where it coordinates that
        shard; then θ is the merge of the parts at the version vector they came with."""
        idle = [st for st in self.shards if not st.service.active and st.election.role != "standby"]
        for st in idle:
            st.election.role = "catching_up"
        parts, versions, steps = [], [], []
        for st in self.shards:
            if st.service.active:
                async def own(svc=st.service):
                    async with svc.lock:
                        return [p.detach().clone() for p in svc.state.engine.dispatch_params()], svc.state.version
                params, version = st.node.run(own(), timeout=60)
                header, peer_id = {"schedule_step": st.commit_state.schedule_step(), "source": "coordinator"}, "self"
            else:
                expected = [(tuple(s), torch.float32) for s in self.plan.part([tuple(p.shape) for p in
                                                                               trainable_params(self.model)], st.shard)]
                params, header, peer_id = download_state(st.node, st.election, expected, self.stop_event,
                                                         compression="none" if exact else None,
                                                         sources=self.opts.join_sources, part_mb=self.opts.join_part_mb)
                version = int(header["version"])
            parts.append(params)
            versions.append(version)
            steps.append(int(header.get("schedule_step", 0)))
            if "join" in header:
                self.metrics.log({"event": "state_download", "shard": st.shard, "version": version, **header["join"]})
            logger.info("caught up: shard %d at version %d from %s (%s)", st.shard, version, peer_id[-8:],
                        header.get("source"))
        self._adopt(self.plan.merge(parts), tuple(versions), min(steps), "exact")
        for st in idle:
            st.election.role = "evaluator" if self.opts.evaluator else "training"

    def _download_theta(self) -> tuple[list[torch.Tensor], int]:
        """S > 1 (an evaluator): the global θ, each shard's part from that shard's peers, merged;
        its version is the lowest of the parts' (roles/shards.py ``scalar_version``)."""
        shapes = [tuple(p.shape) for p in trainable_params(self.model)]
        parts, versions = [], []
        for st in self.shards:
            expected = [(s, torch.float32) for s in self.plan.part(shapes, st.shard)]
            params, header, _ = download_state(st.node, st.election, expected, self.stop_event, model="theta")
            parts.append(params)
            versions.append(int(header["version"]))
        return self.plan.merge(parts), scalar_version(tuple(versions))

    def _adopt(self, params: list[torch.Tensor], version: int, schedule_step: int, kind: str = "exact") -> None:
        if self.held_in_model:  # the model's parameters are global_params (``_held_copy``)
            params = self._held_copy(params)
        self.global_params = params
        self.version = version
        self.held_kind = kind
        flight = self.rounds_loop.in_flight if self.rounds_loop is not None else None
        if flight is not None and flight.is_sender():
            # overlapped rounds: the model is training; the training thread folds θ in (roles/rounds.py)
            flight.hand(params, version, schedule_step)
            return
        self.trainer.load_params(params)
        self.trainer.step = max(self.trainer.step, schedule_step)

    # ------------------------------------------------------------------------------ rounds
    @property
    def overlap(self) -> bool:
        return self.cfg.swarm.overlap if self.opts.overlap is None else self.opts.overlap

    def train_loop(self) -> None:
        o, started = self.opts, time.time()
        self.schedule.start_clock(o.max_minutes)
        self.metrics.log({"event": "ready", **self._version_fields()})  # joined and holding θ (join latency)
        if not o.no_train:
            self.metrics.log({"event": "eval", **self._version_fields(), "val_loss": self.evaluate()})
        self.metrics.log({"event": "train_start"})
        if o.evaluator:
            self.role = "evaluator"
            ev = Evaluator(self.model, self.trainer.load_params, self.cfg, self.tokenizer, regions=o.eval_regions,
                           own_region=o.region)
            evaluate_forever(ev, self.node, self.election, self.name, o.eval_every, self.stop_event, self.schedule.time_left,
                             self.metrics.log, download=self._download_theta if len(self.shards) > 1 else None)
            return
        if o.no_train:
            while not self.stop_event.wait(1.0):
                if o.max_minutes and time.time() - started > 60 * o.max_minutes:
                    break
            return
        self.rounds_loop.run(self.overlap)
        self.metrics.log({"event": "train_end", "rounds": self.rounds_loop.rounds})
        self.metrics.log({"event": "eval", **self._version_fields(), "val_loss": self.evaluate()})

    def _version_fields(self) -> dict:
        """``version`` as an event logs it: one number (with shards the lowest; ``shard_versions`` each)."""
        if isinstance(self.version, tuple):
            return {"version": scalar_version(self.version), "shard_versions": list(self.version)}
        return {"version": self.version}

    def _submit(self, delta: list[torch.Tensor], base: int, stats, compute: float) -> None:
        """One round's pseudo-gradient through the submit client, and what its outcome means here."""
        if self.sharded is not None:
            self._submit_parts(delta, base, stats, compute)
            return
        out = self.submitter.submit(self.tally.seq, delta, base, stats, tensor_layout(self.global_params),
                                    True)  # release: Δ is freed once encoded (this round reads it no more)
        try:
            if out.status == "accepted":
                reply = out.reply
                self.election.run_tokens = max(self.election.run_tokens, int(reply.get("run_tokens", 0)))
                if out.resync:  # a wrap8 reply that did not decode on this peer's start point: the exact state instead
                    self.held_kind = "none"
                    self.metrics.log({"event": "reply_resync", "version": out.version, "base_version": base})
                else:
                    self._adopt(out.params, out.version, int(reply.get("schedule_step", 0)), out.held)
                self.metrics.log(self.tally.ack(out, stats, compute, self.cfg.swarm.compression))
                logger.info("round %d: v%d loss %.3f %.0f tok/s staleness %s role %s", self.rounds_loop.rounds,
                            out.version, stats.loss, stats.tokens_per_second, reply.get("staleness"), self.role)
            elif out.status == "rejected":  # a reason a retry cannot fix; start again from the current state
                self.metrics.log(self.tally.refused(out))
                logger.warning("submission rejected: %s (%s)", out.reason, out.reply.get("message"))
        finally:
            # the next round's number, before anything that can fail (a resync's download): a round
            # sent again under this acknowledged number would be answered "duplicate" and dropped
            self.tally.seq += 1
        trim_heap()  # once a round: the memory of its transient copies of θ (Δ, the encoded Δ, the reply)
        if out.status == "accepted" and out.resync:
            self._catch_up(exact=True)
        # harmful_update: the loss screen scores Δ at the coordinator's θ; a Δ from a base that θ has
        # moved far from (after a bad commit) can fail it for that reason alone: start from θ again
        if (out.status == "gave_up" or out.reason in ("too_stale", "bad_version", "harmful_update")) \
                and not self.stop_event.is_set() and self.schedule.time_left():
            self._catch_up()

    def _send_part(self, shard: int, seq: int, part: list[torch.Tensor], base: int, stats):
        return self.shards[shard].submitter.submit(seq, part, base, stats, tensor_layout(part))

    def _part_grace(self, first: float) -> float:
        """Once one shard answered, how long the others may take before their parts go on in the
        background (and this round's θ starts from their latest replies)."""
        return max(self.cfg.swarm.lease_seconds / 2, 2.0 * first)

    def _submit_parts(self, delta: list[torch.Tensor], base: tuple, stats, compute: float) -> None:
        """S > 1: the parts of Δ to their shards (roles/shard_submit.py); θ becomes the union of
        the latest reply of each shard, at the version vector of those replies."""
        try:
            outcomes = self.sharded.submit(self.tally.seq, delta, base, stats)
        finally:
            self.tally.seq += 1  # as for one shard: an acknowledged number is never sent again with another Δ
        self._settle_parts(outcomes, compute)

    def _settle_parts(self, outcomes, compute: float) -> None:
        params, versions = list(self.global_params), list(self.version)
        changed, catch_up, step = False, False, 0
        for o in outcomes:
            out, k = o.outcome, o.shard
            if out.status == "accepted":
                reply = out.reply
                self.election.run_tokens = max(self.election.run_tokens, int(reply.get("run_tokens", 0)))
                if out.params is not None and out.version >= versions[k]:
                    for i, t in zip(self.plan.indices(k), out.params):
                        params[i] = t
                    versions[k], changed = out.version, True
                    step = max(step, int(reply.get("schedule_step", 0)))
                # the round's tokens count once (with shard 0's part), each part's acknowledgement apart
                ack = self.tally.ack(out, o.part.stats, compute, self.cfg.swarm.compression, seq=o.part.seq,
                                     count=k == 0)
                self.metrics.log({**ack, "shard": k, "rounds": o.part.rounds})
                logger.info("shard %d: v%d staleness %s (%d rounds)", k, out.version, reply.get("staleness"),
                            o.part.rounds)
            elif out.status == "rejected":
                self.metrics.log({**self.tally.refused(out), "shard": k, "seq": o.part.seq})
                logger.warning("shard %d: part rejected: %s (%s)", k, out.reason, out.reply.get("message"))
                catch_up = catch_up or out.reason in ("too_stale", "bad_version", "harmful_update")
            else:
                logger.warning("shard %d: part %d not answered yet; it is sent again with the next round", k, o.part.seq)
        if changed:
            self._adopt(params, tuple(versions), step)
        if catch_up and not self.stop_event.is_set() and self.schedule.time_left():
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
        if self.maintenance is not None:
            self.maintenance.join(timeout=5)
        if self.node is None:
            return
        try:
            if self.sharded is not None:  # parts still in flight: their answers, for the log
                self._settle_parts(self.sharded.settle(timeout=10), 0.0)
                self.sharded.close()
            if self.cfg is not None:
                for st in self.shards:
                    heir = self.node.run(st.service.replication.hand_over(), timeout=30) if st.service.active else None
                    role = self.role if len(self.shards) == 1 else st.election.role
                    written = st.checkpoints.maybe_write(st.node, st.service, st.commit_state, role, force=True)
                    if written is not None and heir is None:  # no standby took the role: the checkpoint is the run
                        st.service.replication.checkpointed(written)
                if self.maintenance is not None:
                    self.maintenance.withdraw()
        except Exception as exc:
            logger.debug("leaving: %s", exc)
        self.node.shutdown()
        if self._reaper is not None:
            stop_reaper(self._reaper)
        logger.info("left the swarm")
