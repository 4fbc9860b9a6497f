"""A peer's checkpoints of the run's commit state: ``--resume`` and ``--checkpoint-dir``
(docs/reliability.md, "Checkpoints"). The file format, sealing and the resume decision are
``heloco_p2p/checkpoint.py``; this module is what a peer does with them.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from heloco_p2p.checkpoint import (
    Checkpointer,
    CheckpointError,
    ResumePlan,
    SavedCheckpoint,
    load_checkpoint,
    plan_resume,
)
from heloco_p2p.config import RunConfig, load_config
from heloco_p2p.data import tokenizer_digest
from heloco_p2p.roles.commit_state import CommitState
from heloco_p2p.roles.joining import JoinError, swarm_holds
from heloco_p2p.swarm.records import GenesisRecord

logger = logging.getLogger(__name__)


class Checkpoints:
    """One peer's checkpoints, in the order a peer uses them:

    1. made before the peer touches the network: with ``resume``, the sealed checkpoint is read
       and checked now (``saved``), so a bad one fails at once;
    2. ``run_files``: the resumed run's config and tokenizer, which must be those of ``--config``
       and of the run in the DHT when there is one;
    3. ``open``: the checkpoint directory (``--checkpoint-dir``; by default the resumed
       checkpoint's own, so the run keeps checkpointing where it left off) is checked and prepared;
    4. ``plan`` / ``restore``: from what live peers hold, take the coordinator role from the
       checkpoint, join normally, or refuse (``checkpoint.plan_resume``); ``restore`` loads it
       into the commit state;
    5. ``maybe_write``: the commit state every ``swarm.checkpoint_every`` commits while the peer is
       coordinator or standby (the maintenance thread), and once more when it leaves (``force``):
       one sealed file, written atomically.

    :param log_metric: ``log_metric(event)`` for the ``resume`` and ``checkpoint`` events
    """

    def __init__(self, run_id: str, directory: str | None, resume: str | None, log_metric: Callable[[dict], None]):
        self.run_id, self.log_metric = run_id, log_metric
        self.saved: SavedCheckpoint | None = None
        if resume:
            try:
                self.saved = load_checkpoint(resume, run_id=run_id)
            except CheckpointError as exc:
                raise JoinError(f"--resume: {exc}") from None
        self.directory = str(self.saved.path.parent) if directory is None and self.saved is not None else directory
        self.writer: Checkpointer | None = None

    def run_files(self, genesis: GenesisRecord | None, config_path: str | None, overrides: dict):
        """(config, tokenizer) from the resumed checkpoint; with a run in the DHT they must be the run's."""
        saved = self.saved
        try:
            cfg, tok = saved.config(), saved.tokenizer()
        except (CheckpointError, OSError, ValueError) as exc:
            raise JoinError(f"--resume: {exc}") from None
        if config_path and load_config(config_path, overrides=overrides).digest() != cfg.digest():
            raise JoinError(f"--config {config_path} differs from the config in {saved.path}; drop --config to "
                            "resume with the run's own")
        if genesis is not None and (genesis.config_digest, genesis.tokenizer_digest) != (saved.config_digest,
                                                                                         tokenizer_digest(tok)):
            raise JoinError(f"--resume: {saved.path} is not a checkpoint of the run {self.run_id!r} in the DHT "
                            f"(config {saved.config_digest[:12]} vs the run's {genesis.config_digest[:12]}, tokenizer "
                            f"{tokenizer_digest(tok)[:12]} vs {genesis.tokenizer_digest[:12]}); join without --resume")
        return cfg, tok

    def open(self, cfg: RunConfig, tokenizer, tokenizer_file: bytes, param_names: list[str]) -> None:
        """Prepare the checkpoint directory, if there is one (``checkpoint.Checkpointer.prepare``)."""
        if not self.directory:
            return
        ck = Checkpointer(self.directory, run_id=self.run_id, config_yaml=cfg.to_yaml(), config_digest=cfg.digest(),
                          tokenizer_json=tokenizer_file.decode("utf-8"), tokenizer_digest=tokenizer_digest(tokenizer),
                          param_names=param_names, every=cfg.swarm.checkpoint_every)
        try:
            ck.prepare()
        except CheckpointError as exc:
            raise JoinError(str(exc)) from None
        self.writer = ck

    def plan(self, node, election, swarm, founder: bool) -> ResumePlan:
        """What ``--resume`` does here: ``take_over`` (in ``plan.term``) or ``join``, from what live
        peers hold (none when this peer ``founder``-ed the run again). ``JoinError`` on ``refuse``:
        the swarm went on from older state."""
        saved = self.saved
        claims, highest, swarm_version = ([], 0, 0) if founder else swarm_holds(node, election, swarm)
        plan = plan_resume(saved, claims, highest, swarm_version)
        logger.warning("resume: %s", plan.message)
        self.log_metric({"event": "resume", "action": plan.action, "term": plan.term, "checkpoint_version": saved.version,
                         "checkpoint_term": saved.term, "swarm_version": swarm_version, "message": plan.message})
        if plan.action == "refuse":
            raise JoinError(plan.message)
        return plan

    def restore(self, state: CommitState) -> list[torch.Tensor]:
        """Load the checkpoint into ``state``; returns a copy of its θ."""
        try:
            state.load_state_dict(self.saved.commit_state)
        except (KeyError, TypeError, ValueError) as exc:
            raise JoinError(f"--resume: {self.saved.path} does not fit this run's model and outer optimizer: "
                            f"{exc}") from None
        return [p.detach().clone() for p in state.engine.params]

    def maybe_write(self, node, service, state: CommitState, role: str, force: bool = False) -> int | None:
        """Write the commit state if a checkpoint is due (or ``force``: leaving), while this peer
        coordinates or stands by; returns the version written, or None. Leaving (``force``) with the
        current state already on disk returns its version too: that checkpoint holds every commit."""
        ck = self.writer
        if ck is None or state.engine.hollow or not (force or service.active or role == "standby"):
            return None
        if not ck.due(state.term, state.version, force):
            return state.version if force and ck.last == (state.term, state.version) else None
        t0 = time.perf_counter()

        async def snapshot():
            async with service.lock:  # never a state between a commit's parameter update and its version
                return state.state_dict()

        taken = node.run(snapshot(), timeout=60)
        if ck.write(taken) is None:
            return None
        self.log_metric({"event": "checkpoint", "version": taken["engine"]["version"], "term": taken["term"],
                         "role": role, "seconds": time.perf_counter() - t0})
        return taken["engine"]["version"]
