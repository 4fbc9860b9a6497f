"""Coordinator checkpoints: the replicated commit state on disk, sealed by a content digest.

A ``--checkpoint-dir`` of ``heloco-peer join`` holds::

    coordinator.pt   one torch.save dict (FORMAT): run id, version, term, config and tokenizer
                     digests, parameter names, the commit state (θ, outer optimizer state, the
                     ledger of applied submissions), the run's config YAML and tokenizer.json
                     text, and ``digest``: blake2b over all of it (``content_digest``)
    config.yaml      copies of the embedded config and tokenizer, for people and tools
    tokenizer.json   (``heloco-peer export`` reads them; they must match the digests)

Why one file. A checkpoint is written to a temporary file beside the target, fsynced and
renamed (``fsutil.atomic_write_bytes``), and a rename is atomic for one file only. A digest in a
sidecar file could be left from the previous write after a crash between the two renames, and
the good new checkpoint would then look corrupted (or a bad one sound). So the digest, the config
and the tokenizer travel inside the file they describe: a crash at any moment leaves the previous
checkpoint or the new one, whole. config.yaml and tokenizer.json are written after it, and only
when their content differs, which within one run it never does (``Checkpointer.prepare`` refuses
a directory that holds another run's checkpoint).

A torn or altered file fails torch's own zip checks or the digest, and ``load_checkpoint`` says
which file and what to do. The digest is of the content (tensor bytes, dtypes, shapes, and every
other value), so it does not depend on how torch lays out the zip archive.

    ck = Checkpointer("runs/x/ckpt", run_id="demo", config_yaml=cfg.to_yaml(), config_digest=cfg.digest(),
                      tokenizer_json=text, tokenizer_digest=digest, param_names=names, every=50)
    ck.prepare()                                 # refuses another run's directory
    if ck.due(state.term, state.version): ck.write(state.state_dict())
    saved = load_checkpoint("runs/x/ckpt", config_digest=cfg.digest())   # CheckpointError if bad
    saved.version, saved.term, saved.params
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from heloco_p2p.config import ConfigError, config_from_dict
from heloco_p2p.data import load_tokenizer, tokenizer_digest
from heloco_p2p.fsutil import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)

CHECKPOINT_FILE = "coordinator.pt"
CONFIG_FILE = "config.yaml"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "heloco_p2p.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or used; the message names the file and what to do."""


# ---------------------------------------------------------------------------------- digest
def content_digest(obj: Any) -> str:
    """blake2b of a canonical encoding of ``obj`` (dicts by sorted key, lists, tensors as dtype,
    shape and bytes, scalars by type and value): equal digests mean bitwise-equal content."""
    h = hashlib.blake2b(digest_size=32)
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().contiguous().cpu()
        h.update(b"T" + f"{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for key in sorted(obj, key=lambda k: (type(k).__name__, repr(k))):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for item in obj:
            _feed(h, item)
    elif isinstance(obj, (str, bytes)):
        data = obj.encode() if isinstance(obj, str) else obj
        h.update((b"S" if isinstance(obj, str) else b"B") + struct.pack("<q", len(data)) + data)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__}:{obj!r};".encode())  # repr of a float round-trips exactly
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__}")


def seal(state: dict) -> dict:
    """``state`` with ``digest`` set to the content digest of everything else in it."""
    body = {k: v for k, v in state.items() if k != "digest"}
    return {**body, "digest": content_digest(body)}


# ---------------------------------------------------------------------------------- reading
@dataclass
class SavedCheckpoint:
    """A checkpoint read back and checked (digest, fields, config)."""

    path: Path
    run_id: str
    version: int
    term: int
    config_digest: str
    tokenizer_digest: str
    param_names: list[str]
    commit_state: dict  # CommitState.state_dict(): {"engine": {...}, "term", "applied", ...}
    config_yaml: str
    tokenizer_json: str
    written_at: float
    digest: str

    @property
    def params(self) -> list[torch.Tensor]:
        return list(self.commit_state["engine"]["params"])

    def config(self):
        """The run's RunConfig: the embedded YAML (a checkpoint from before configs were embedded:
        config.yaml beside it), checked against the checkpoint's config digest."""
        source = f"{self.path} (embedded config)" if self.config_yaml else str(self.path.parent / CONFIG_FILE)
        try:
            text = self.config_yaml or (self.path.parent / CONFIG_FILE).read_text(encoding="utf-8")
            cfg = config_from_dict(yaml.safe_load(text), source=source)
        except (OSError, ConfigError, yaml.YAMLError) as exc:
            raise CheckpointError(f"{source}: cannot read the run's config: {exc}") from None
        if cfg.digest() != self.config_digest:
            raise CheckpointError(f"{self.path}: checkpoint was written for another config (its config digest "
                                  f"{self.config_digest[:12]}, {source}'s {cfg.digest()[:12]})")
        return cfg

    def tokenizer(self):
        """The run's tokenizer: the embedded tokenizer.json (or the file beside it), digest checked."""
        try:
            if self.tokenizer_json:
                with tempfile.TemporaryDirectory(prefix="heloco-ckpt-tok-") as d:
                    (Path(d) / TOKENIZER_FILE).write_text(self.tokenizer_json, encoding="utf-8")
                    tok = load_tokenizer(str(Path(d) / TOKENIZER_FILE))
            else:
                tok = load_tokenizer(str(self.path.parent / TOKENIZER_FILE))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{self.path}: cannot load the run's tokenizer: {exc}") from None
        if self.tokenizer_digest and tokenizer_digest(tok) != self.tokenizer_digest:
            raise CheckpointError(f"{self.path}: the tokenizer does not match the checkpoint's tokenizer digest "
                                  f"({tokenizer_digest(tok)[:12]} vs {self.tokenizer_digest[:12]})")
        return tok


def checkpoint_path(path: str | os.PathLike) -> Path:
    """``DIR/coordinator.pt`` for a directory, the path itself for a file."""
    p = Path(path)
    return p / CHECKPOINT_FILE if p.is_dir() or not p.suffix else p


def load_checkpoint(path: str | os.PathLike, config_digest: str | None = None,
                    run_id: str | None = None) -> SavedCheckpoint:
    """Read a checkpoint (a ``--checkpoint-dir`` or its coordinator.pt) and check it.

    :param config_digest: the run's config digest, if the caller knows it: a checkpoint of
        another config is refused
    :param run_id: likewise for the run id
    :raises CheckpointError: missing, unreadable, corrupted (digest mismatch), not a heloco
        checkpoint, or of another run/config; the message names the file and what to do
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there; a peer's --checkpoint-dir holds {CHECKPOINT_FILE} once it "
                              "has been coordinator or standby for swarm.checkpoint_every commits, or has left")
    try:
        # weights_only: a checkpoint from elsewhere must not be able to run code when loaded
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{path} is corrupted or not a heloco checkpoint: cannot read the checkpoint "
                              f"({type(exc).__name__}: {first}); use an earlier copy or another peer's "
                              "--checkpoint-dir") from None
    if not isinstance(state, dict) or "commit_state" not in state:
        raise CheckpointError(f"{path}: not a heloco coordinator checkpoint (no commit_state entry)")
    if "digest" in state:
        stored, actual = state["digest"], content_digest({k: v for k, v in state.items() if k != "digest"})
        if stored != actual:
            raise CheckpointError(f"{path} is corrupted (digest mismatch: stored {str(stored)[:12]}, content "
                                  f"{actual[:12]}); use an earlier copy or another peer's --checkpoint-dir")
    else:  # written before checkpoints were sealed
        logger.warning("%s has no digest (written by an older heloco-p2p): its integrity cannot be checked", path)
        actual = ""
    try:
        saved = SavedCheckpoint(
            path=path, run_id=str(state["run_id"]), version=int(state["version"]), term=int(state["term"]),
            config_digest=str(state["config_digest"]), tokenizer_digest=str(state.get("tokenizer_digest", "")),
            param_names=[str(n) for n in state["param_names"]], commit_state=state["commit_state"],
            config_yaml=str(state.get("config_yaml", "")), tokenizer_json=str(state.get("tokenizer_json", "")),
            written_at=float(state.get("written_at", 0.0)), digest=actual)
        engine = saved.commit_state["engine"]
        params = list(engine["params"])
        if int(engine["version"]) != saved.version or int(saved.commit_state["term"]) != saved.term:
            raise ValueError("version or term differ between the header and the commit state")
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        what = f"no {exc} entry" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"{path}: not a heloco coordinator checkpoint ({what})") from None
    if not all(isinstance(p, torch.Tensor) for p in params):
        raise CheckpointError(f"{path}: not a heloco coordinator checkpoint (parameters are not all tensors)")
    if run_id is not None and saved.run_id != run_id:
        raise CheckpointError(f"{path} is a checkpoint of run {saved.run_id!r}, not {run_id!r}; "
                              f"use --run-id {saved.run_id} or another checkpoint")
    if config_digest is not None and saved.config_digest != config_digest:
        raise CheckpointError(f"{path}: checkpoint was written for another config (its config digest "
                              f"{saved.config_digest[:12]}, the run's {config_digest[:12]})")
    return saved


def read_header(path: str | os.PathLike) -> dict | None:
    """run_id, version, term and config digest of the checkpoint at ``path`` without reading
    its tensors (memory-mapped); None if there is none or it cannot be read."""
    path = checkpoint_path(path)
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return {k: state[k] for k in ("run_id", "version", "term", "config_digest")}
    except Exception:
        return None


# ---------------------------------------------------------------------------------- writing
def save_checkpoint(directory: str | os.PathLike, commit_state: dict, *, run_id: str, config_yaml: str,
                    config_digest: str, tokenizer_json: str, tokenizer_digest: str, param_names: list[str]) -> Path:
    """Write ``coordinator.pt`` atomically (then config.yaml and tokenizer.json where they differ)."""
    d = Path(directory)
    state = seal({"format": FORMAT, "run_id": run_id, "version": int(commit_state["engine"]["version"]),
                  "term": int(commit_state["term"]), "config_digest": config_digest,
                  "tokenizer_digest": tokenizer_digest, "param_names": list(param_names),
                  "commit_state": commit_state, "config_yaml": config_yaml, "tokenizer_json": tokenizer_json,
                  "written_at": time.time()})
    buf = io.BytesIO()
    torch.save(state, buf)
    path = d / CHECKPOINT_FILE
    atomic_write_bytes(path, buf.getvalue())
    for name, text in ((CONFIG_FILE, config_yaml), (TOKENIZER_FILE, tokenizer_json)):
        f = d / name
        if not f.is_file() or f.read_text(encoding="utf-8") != text:
            atomic_write_text(f, text)
    return path


class Checkpointer:
    """The peer's checkpoint writer: every ``every`` commits while coordinator or standby, and on
    leaving. A state older (by term, then version) than the one already on disk is not written:
    the directory only ever moves forward.

    :param directory: the peer's ``--checkpoint-dir``
    :param every: commits between checkpoints (``swarm.checkpoint_every``)
    """

    def __init__(self, directory: str | os.PathLike, *, run_id: str, config_yaml: str, config_digest: str,
                 tokenizer_json: str, tokenizer_digest: str, param_names: list[str], every: int):
        self.dir = Path(directory)
        self.run_id, self.config_yaml, self.config_digest = run_id, config_yaml, config_digest
        self.tokenizer_json, self.tokenizer_digest = tokenizer_json, tokenizer_digest
        self.param_names, self.every = list(param_names), every
        self.last: tuple[int, int] = (0, 0)  # (term, version) of the checkpoint on disk

    def prepare(self) -> None:
        """Check the directory before the run uses it: refuse another run's checkpoint, remove
        temporary files a killed writer left, and remember where the checkpoint on disk stands."""
        if self.dir.exists() and not self.dir.is_dir():
            raise CheckpointError(f"--checkpoint-dir {self.dir} is a file; give a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        for tmp in self.dir.glob(f".{CHECKPOINT_FILE}.*.tmp"):
            logger.info("removing %s, left by a checkpoint write that did not finish", tmp)
            tmp.unlink(missing_ok=True)
        header = read_header(self.dir)
        if header is None:
            if (self.dir / CHECKPOINT_FILE).exists():
                logger.warning("%s cannot be read; the next checkpoint replaces it", self.dir / CHECKPOINT_FILE)
            return
        if header["run_id"] != self.run_id or header["config_digest"] != self.config_digest:
            raise CheckpointError(f"--checkpoint-dir {self.dir} holds run {header['run_id']!r}'s checkpoint (version "
                                  f"{header['version']}, config {str(header['config_digest'])[:12]}); this peer would "
                                  f"overwrite it with run {self.run_id!r}'s: choose another --checkpoint-dir")
        self.last = (int(header["term"]), int(header["version"]))

    def due(self, term: int, version: int, force: bool = False) -> bool:
        """Whether a state at (term, version) should be written now: it must be newer than the
        checkpoint on disk, and ``every`` commits past it (or on leaving, ``force``, or on a new
        branch: a higher term at a lower version, after a resume from an older checkpoint)."""
        if version == 0 or (term, version) <= self.last:
            return False
        return force or version - self.last[1] >= self.every or version < self.last[1]

    def write(self, commit_state: dict) -> Path | None:
        """Write ``commit_state`` (a CommitState.state_dict() snapshot); None if it is older than
        the checkpoint already there."""
        key = (int(commit_state["term"]), int(commit_state["engine"]["version"]))
        if key < self.last:
            logger.info("not checkpointing term %d version %d over the newer term %d version %d", *key, *self.last)
            return None
        path = save_checkpoint(self.dir, commit_state, run_id=self.run_id, config_yaml=self.config_yaml,
                               config_digest=self.config_digest, tokenizer_json=self.tokenizer_json,
                               tokenizer_digest=self.tokenizer_digest, param_names=self.param_names)
        self.last = key
        return path


# ---------------------------------------------------------------------------------- resuming
@dataclass
class ResumePlan:
    """What ``heloco-peer join --resume`` does: ``take_over`` (the role, from the checkpoint, in
    ``term``), ``join`` (the swarm holds newer state: join it normally), or ``refuse``."""

    action: str
    term: int
    message: str


def plan_resume(saved: SavedCheckpoint, live_claims: list, highest_term: int, swarm_version: int) -> ResumePlan:
    """Decide what a resuming peer does, from what the swarm holds.

    :param live_claims: unexpired lease claims (``LeaseRecord``: peer_id, term, version), any order
    :param highest_term: the highest term this peer has seen (claims, peers' answers)
    :param swarm_version: the newest version any live peer reports (0 if none)

    A live coordinator at the checkpoint's version or later holds newer state: join it. A live
    coordinator behind the checkpoint means the swarm went on from older state (it was itself
    restarted from an older checkpoint): refuse rather than fork the run a second time. No live
    coordinator: take the role from the checkpoint with a term above every term seen, so every
    peer believes the claim and every older holder steps down.
    """
    at = f"the checkpoint (version {saved.version}, term {saved.term})"
    if live_claims:
        best = max(live_claims, key=lambda c: (c.term, c.version))
        if best.version >= saved.version:
            return ResumePlan("join", best.term, f"run {saved.run_id!r} has a coordinator ({best.peer_id[-8:]}, term "
                              f"{best.term}) at version {best.version}, not older than {at}: joining it normally; "
                              "the checkpoint is not used")
        return ResumePlan("refuse", best.term, f"run {saved.run_id!r} has a coordinator ({best.peer_id[-8:]}, term "
                          f"{best.term}) at version {best.version}, older than {at}: the swarm went on from older "
                          "state, and resuming would fork the run. To continue from the checkpoint, stop the run's "
                          "peers and resume again; to keep the swarm's state, join without --resume")
    term = max(saved.term, highest_term) + 1
    lost = max(0, swarm_version - saved.version)
    tail = f"; peers report version {swarm_version}: the {lost} versions after the checkpoint are lost" if lost else ""
    return ResumePlan("take_over", term, f"no coordinator holds run {saved.run_id!r}: taking the role from {at} "
                      f"in term {term}{tail}")
