"""From a coordinator checkpoint to a model anyone can load, and text from it.

A ``--checkpoint-dir`` of ``heloco-peer join`` is self-describing (heloco_p2p/checkpoint.py)::

    coordinator.pt   one sealed file: θ and the outer optimizer state, version, term, run id,
                     config and tokenizer digests and copies, and the digest of all of it
    config.yaml      the run config
    tokenizer.json   the run's tokenizer

``export_checkpoint`` checks the checkpoint (digest, config), rebuilds the model from the config,
loads θ into it (names and shapes checked), and writes a ``save_pretrained`` directory that
``AutoModelForCausalLM.from_pretrained`` loads, with the tokenizer and ``heloco_export.json``
(run, version, term, digests)::

    meta = export_checkpoint("ckpt-a", "model-v120")
    texts = generate_text("model-v120", "In the beginning", seed=0)

A run with ``swarm.shards`` > 1 has one checkpoint per shard (``<checkpoint-dir>/shard-<k>/``,
each written by that shard's holder or standbys, usually on different peers): give every
directory that holds some (``export_checkpoint(["ckpt-a", "ckpt-c"], out)``). θ is assembled at
one consistent cut: for each shard the newest checkpoint found (highest version, then term), each
one whole version of its shard (written under that shard's commit lock, never mid-commit), all of
the same run and config; the cut is named by the vector of shard versions. Shards commit
independently (each part of a Δ is its own commit), so every such vector is a state of the run:
the θ a training peer holds is one too (docs/protocol.md, "Sharded coordinators").
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from transformers import AutoModelForCausalLM

from heloco_p2p.checkpoint import CHECKPOINT_FILE, CONFIG_FILE, TOKENIZER_FILE, CheckpointError, load_checkpoint
from heloco_p2p.config import ConfigError, config_from_dict, read_yaml
from heloco_p2p.data import load_tokenizer, tokenizer_digest
from heloco_p2p.local import build_model, count_params, param_names, trainable_params
from heloco_p2p.roles.shards import ShardPlan

logger = logging.getLogger(__name__)

EXPORT_META = "heloco_export.json"


class ExportError(Exception):
    """The checkpoint or model cannot be used; the message says why."""


@dataclass
class Checkpoint:
    """What a coordinator checkpoint directory holds, read and checked."""

    path: Path
    cfg: object  # RunConfig
    tokenizer: object  # PreTrainedTokenizerFast
    params: list[torch.Tensor]
    names: list[str]
    run_id: str
    version: int  # with shards: the lowest shard version (``versions`` has each)
    term: int
    config_digest: str
    versions: list[int] | None = None  # swarm.shards > 1: the cut, one version per shard
    terms: list[int] | None = None


def read_checkpoint(ckpt_dir: str | os.PathLike | list) -> Checkpoint:
    """Read and check a checkpoint directory (or, for a sharded run, the directories holding its
    ``shard-<k>`` checkpoints); raise ExportError saying what is wrong."""
    dirs = [Path(d) for d in (ckpt_dir if isinstance(ckpt_dir, (list, tuple)) else [ckpt_dir])]
    shard_dirs = sorted(p for d in dirs for p in d.glob("shard-*") if (p / CHECKPOINT_FILE).is_file())
    if shard_dirs:
        return read_sharded_checkpoint(shard_dirs)
    if len(dirs) != 1:
        raise ExportError(f"{', '.join(map(str, dirs))}: several checkpoint directories are for a sharded run "
                          f"(swarm.shards > 1), and none holds a shard-<k>/{CHECKPOINT_FILE}")
    d = dirs[0]
    if not (d / CHECKPOINT_FILE).is_file():
        missing = [f for f in (CHECKPOINT_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (d / f).is_file()]
        raise ExportError(f"{d}: no {', '.join(missing)} there; a coordinator's --checkpoint-dir holds "
                          f"{CHECKPOINT_FILE}, config.yaml and tokenizer.json (written every swarm.checkpoint_every "
                          "commits and when it leaves)")
    try:
        saved = load_checkpoint(d)
        cfg, tokenizer = saved.config(), saved.tokenizer()
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    path = saved.path
    # the copies beside coordinator.pt are what people read and edit: they must be the run's
    beside = d / CONFIG_FILE
    if beside.is_file():
        try:
            other = config_from_dict(read_yaml(beside), source=str(beside)).digest()
        except ConfigError as exc:
            raise ExportError(f"{beside}: {exc}") from None
        if other != saved.config_digest:
            raise ExportError(f"{path}: checkpoint was written for another config (its config digest "
                              f"{saved.config_digest[:12]}, config.yaml's {other[:12]}); put the run's own config.yaml "
                              "beside it, or remove it (coordinator.pt holds a copy)")
    if (d / TOKENIZER_FILE).is_file():
        try:
            other_tok = load_tokenizer(str(d / TOKENIZER_FILE))
        except (OSError, ValueError) as exc:
            raise ExportError(f"{d / 'tokenizer.json'}: cannot load the tokenizer: {exc}") from None
        if tokenizer_digest(other_tok) != tokenizer_digest(tokenizer):
            raise ExportError(f"{d / 'tokenizer.json'} is not the run's tokenizer (digest {tokenizer_digest(other_tok)[:12]}, "
                              f"the checkpoint's {tokenizer_digest(tokenizer)[:12]}); remove it (coordinator.pt holds a copy)")
    return Checkpoint(d, cfg, tokenizer, saved.params, saved.param_names, saved.run_id, saved.version, saved.term,
                      saved.config_digest)


def read_sharded_checkpoint(shard_dirs: list[Path]) -> Checkpoint:
    """θ of a sharded run from ``shard-<k>`` checkpoint directories (the module docstring's cut)."""
    newest: dict[int, Checkpoint] = {}
    for d in shard_dirs:
        try:
            k = int(d.name.split("-", 1)[1])
        except ValueError:
            raise ExportError(f"{d}: not a shard checkpoint directory (shard-<k>)") from None
        ck = read_checkpoint(d)
        if k not in newest or (ck.version, ck.term) > (newest[k].version, newest[k].term):
            newest[k] = ck
    first = next(iter(newest.values()))
    plan_count = first.cfg.swarm.shards
    if sorted(newest) != list(range(plan_count)):
        raise ExportError(f"the run has {plan_count} shards; checkpoints found for shards {sorted(newest)} only "
                          f"(give every --checkpoint directory that holds one)")
    if len({(c.run_id, c.config_digest) for c in newest.values()}) != 1:
        raise ExportError("the shard checkpoints are of different runs or configs")
    model = build_model(first.cfg.model, first.tokenizer)
    names = param_names(model)
    plan = ShardPlan.for_shapes([tuple(p.shape) for p in trainable_params(model)], plan_count)
    for k, ck in newest.items():
        if ck.names != plan.part(names, k):
            raise ExportError(f"{ck.path}: its tensors are not shard {k}'s of this run's plan")
    params = plan.merge([newest[k].params for k in range(plan_count)])
    versions, terms = [newest[k].version for k in range(plan_count)], [newest[k].term for k in range(plan_count)]
    return Checkpoint(newest[0].path.parent, first.cfg, first.tokenizer, params, names, first.run_id, min(versions),
                      max(terms), first.config_digest, versions, terms)


def model_from_checkpoint(ckpt: Checkpoint):
    """The run's model with θ of the checkpoint; names, shapes and finiteness checked first."""
    model = build_model(ckpt.cfg.model, ckpt.tokenizer)
    expected = param_names(model)
    targets = trainable_params(model)
    if ckpt.names != expected or len(ckpt.params) != len(targets):
        diff = next((f"#{i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(ckpt.names, expected)) if a != b),
                    f"{len(ckpt.params)} tensors ({len(ckpt.names)} names) vs {len(targets)}")
        raise ExportError(f"{ckpt.path}: the checkpoint's parameters do not match the model of config.yaml ({diff})")
    for name, src, dst in zip(expected, ckpt.params, targets):
        if tuple(src.shape) != tuple(dst.shape):
            raise ExportError(f"{ckpt.path}: parameter {name} has shape {tuple(src.shape)} in the checkpoint, "
                              f"{tuple(dst.shape)} in the model of config.yaml")
        if not src.is_floating_point() or not torch.isfinite(src).all():
            raise ExportError(f"{ckpt.path}: parameter {name} is not finite floating point")
    with torch.no_grad():
        for src, dst in zip(ckpt.params, targets):
            dst.copy_(src)
    return model


def export_checkpoint(ckpt_dir: str | os.PathLike | list, out_dir: str | os.PathLike) -> dict:
    """Write the checkpoint's model as a ``save_pretrained`` directory; returns the export metadata.

    The directory is built beside ``out_dir`` and renamed into place, so an interrupted export
    leaves no half-written model (its files need no atomic writes of their own). ``out_dir``
    must not exist, be empty, or hold an earlier export (which is replaced).
    """
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / EXPORT_META).exists())):
        raise ExportError(f"{out} exists and is not an earlier export; choose another --out")
    ckpt = read_checkpoint(ckpt_dir)
    model = model_from_checkpoint(ckpt)
    meta = {"run_id": ckpt.run_id, "version": ckpt.version, "term": ckpt.term, "config_digest": ckpt.config_digest,
            "tokenizer_digest": tokenizer_digest(ckpt.tokenizer), "parameters": count_params(model),
            "checkpoint": str(ckpt.path.resolve()), "exported_at": time.time()}
    if ckpt.versions is not None:
        meta.update(shard_versions=ckpt.versions, shard_terms=ckpt.terms)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; an exported model is meant to be shared
        model.save_pretrained(tmp)
        ckpt.tokenizer.save_pretrained(tmp)
        # run_config.yaml as `heloco-peer train` writes it, so `heloco-peer eval` uses the run's data settings
        run_config = {"run_id": ckpt.run_id, "version": ckpt.version, "config": ckpt.cfg.model_dump(mode="json")}
        (tmp / "run_config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False))
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.debug("exported run %s version %d (term %d) to %s", ckpt.run_id, ckpt.version, ckpt.term, out)
    return meta


def generate_text(model_dir: str | os.PathLike, prompt: str, max_new_tokens: int = 60, temperature: float = 0.8,
                  top_k: int = 50, seed: int = 0, num_samples: int = 1) -> list[str]:
    """Sample continuations of ``prompt`` (prompt included) from a saved model. The same seed
    gives the same texts (on the same machine and torch build). ``temperature`` 0: greedy."""
    if temperature == 0 and num_samples > 1:
        raise ExportError("temperature 0 is greedy decoding: every sample would be the same; use num_samples 1")
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = load_tokenizer(str(model_dir))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{model_dir}: cannot load model and tokenizer: {exc}") from None
    model.eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:  # an empty prompt starts a new document
        ids = torch.tensor([[tok.bos_token_id]])
    context = getattr(model.config, "max_position_embeddings", None)
    if context and ids.shape[1] + max_new_tokens > context:
        logger.warning("prompt (%d tokens) + %d new tokens exceed the model's context of %d tokens",
                       ids.shape[1], max_new_tokens, context)
    sampling = dict(do_sample=True, temperature=temperature, top_k=top_k) if temperature > 0 else dict(do_sample=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             num_return_sequences=num_samples, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, use_cache=True, **sampling)
    return [tok.decode(seq, skip_special_tokens=True) for seq in out]

