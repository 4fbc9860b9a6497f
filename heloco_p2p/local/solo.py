"""One peer training alone on its region: the "no communication" baseline, and ``heloco-peer train``.

A run directory holds everything needed to continue or inspect it::

    DIR/run_config.yaml      the validated config, plus region and seed
    DIR/metrics.jsonl        one JSON object per log interval and per validation
    DIR/checkpoint/state.pt  model, inner optimizer and step (written atomically)
    DIR/config.json, model.safetensors, tokenizer.json ...   the final save_pretrained model

    run = SoloRun.create(cfg, region="de", out_dir="runs/de", seed=0)
    run.train(max_steps=300)
"""
from __future__ import annotations

import itertools
import json
import logging
import time
from pathlib import Path

import torch
import yaml
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from heloco_p2p.config import RunConfig, config_from_dict, read_yaml
from heloco_p2p.data import TokenBlocks, load_tokenizer, open_source, tokenizer_digest, validation_blocks
from heloco_p2p.fsutil import atomic_torch_save, atomic_write_text
from heloco_p2p.local.evaluate import evaluate_regions
from heloco_p2p.local.inner import InnerTrainer
from heloco_p2p.local.model import build_model, count_params

logger = logging.getLogger(__name__)


def source_spec(cfg: RunConfig, region: str) -> str:
    """The data source of a region: ``data.regions[region]`` or the built-in Bible of that language."""
    return cfg.data.regions.get(region, f"bible:{region}")


class SoloRun:
    """Training state of one solo run; see module docstring."""

    def __init__(self, cfg: RunConfig, region: str, out_dir: Path, seed: int):
        self.cfg, self.region, self.out_dir, self.seed = cfg, region, Path(out_dir), seed
        self.tokenizer = load_tokenizer(cfg.data.tokenizer, vocab_size=cfg.data.vocab_size)
        self.source = open_source(source_spec(cfg, region))
        self.blocks = TokenBlocks(self.source, self.tokenizer, seq_len=cfg.data.seq_len, split="train", seed=seed)
        self.model = build_model(cfg.model, self.tokenizer, seed=seed)
        self.trainer = InnerTrainer(self.model, cfg.inner, iter(()), start_step=0)
        self._val = {region: validation_blocks(self.source, self.tokenizer, cfg.data.seq_len, cfg.data.val_blocks)}

    # -- construction ---------------------------------------------------------------------
    @classmethod
    def create(cls, cfg: RunConfig, region: str, out_dir: str | Path, seed: int = 0) -> "SoloRun":
        out = Path(out_dir)
        if (out / "checkpoint" / "state.pt").exists():
            raise FileExistsError(f"{out} already holds a run; continue it with --resume {out} or choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        run = cls(cfg, region, out, seed)
        meta = {"region": region, "seed": seed, "config": cfg.model_dump(mode="json"),
                "tokenizer_digest": tokenizer_digest(run.tokenizer)}
        atomic_write_text(out / "run_config.yaml", yaml.safe_dump(meta, sort_keys=False))
        run._start_data(0)
        return run

    @classmethod
    def resume(cls, out_dir: str | Path) -> "SoloRun":
        out = Path(out_dir)
        meta_path, state_path = out / "run_config.yaml", out / "checkpoint" / "state.pt"
        if not meta_path.exists() or not state_path.exists():
            raise FileNotFoundError(f"{out} is not a resumable run (needs run_config.yaml and checkpoint/state.pt)")
        meta = read_yaml(meta_path)
        cfg = config_from_dict(meta["config"], source=str(meta_path))
        run = cls(cfg, meta["region"], out, int(meta["seed"]))
        digest = tokenizer_digest(run.tokenizer)
        if digest != meta["tokenizer_digest"]:
            raise ValueError(f"{out}: tokenizer changed since the run started ({meta['tokenizer_digest'][:12]} -> {digest[:12]})")
        state = torch.load(state_path, map_location=run.trainer.device, weights_only=False)
        run.model.load_state_dict(state["model"])
        run.trainer.load_state_dict(state["trainer"])
        run._start_data(run.trainer.step)
        logger.info("resumed %s at step %d", out, run.trainer.step)
        return run

    def _start_data(self, skip_batches: int) -> None:
        # The batch sequence is a pure function of the seed: skipping `step` batches resumes it exactly.
        batches = self.blocks.batches(self.cfg.inner.batch_size)
        self.trainer.batches = itertools.islice(batches, skip_batches, None)

    # -- training ---------------------------------------------------------------------------
    def evaluate(self, regions: list[str] | None = None) -> dict:
        for r in regions or []:
            if r not in self._val:
                src = open_source(source_spec(self.cfg, r))
                self._val[r] = validation_blocks(src, self.tokenizer, self.cfg.data.seq_len, self.cfg.data.val_blocks)
        wanted = {r: self._val[r] for r in (regions or [self.region])}
        return evaluate_regions(self.model, wanted, batch_size=self.cfg.inner.batch_size)

    def save_checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "trainer": self.trainer.state_dict()}
        atomic_torch_save(self.out_dir / "checkpoint" / "state.pt", state)

    def save_model(self) -> None:
        """The final model as a ``save_pretrained`` directory (+ tokenizer) in ``out_dir``."""
        self.model.save_pretrained(self.out_dir)
        self.tokenizer.save_pretrained(self.out_dir)

    def _log(self, record: dict) -> None:
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def train(self, max_steps: int, eval_every: int = 100, log_every: int = 10,
              final_regions: list[str] | None = None, progress: bool = True) -> dict:
        """Train until the global step reaches ``max_steps``; validate every ``eval_every`` steps,
        checkpoint at each validation and at the end, then save the model. Returns the final
        validation losses (own region, plus ``final_regions``)."""
        start_step = self.trainer.step
        if start_step >= max_steps:
            logger.info("already at step %d >= --max-steps %d; nothing to train", start_step, max_steps)
        logger.info("training %s (%d parameters) on %s from step %d to %d",
                    self.cfg.name, count_params(self.model), self.source.spec, start_step, max_steps)
        columns = [TextColumn("[bold]step {task.completed:.0f}/{task.total:.0f}"), BarColumn(),
                   TextColumn("loss {task.fields[loss]:.3f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                   TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        window_loss, window_tokens, t_window = [], 0, time.perf_counter()
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("train", total=max_steps, completed=start_step, loss=float("nan"), tps=0.0)
            while self.trainer.step < max_steps:
                loss, gnorm, tokens = self.trainer.train_step()
                window_loss.append(loss)
                window_tokens += tokens
                step = self.trainer.step
                if step % log_every == 0 or step == max_steps:
                    dt = time.perf_counter() - t_window
                    tps = window_tokens / dt if dt > 0 else 0.0
                    mean_loss = sum(window_loss) / len(window_loss)
                    self._log({"step": step, "loss": mean_loss, "tokens_per_second": tps, "grad_norm": gnorm,
                               "lr": self.trainer.optimizer.param_groups[0]["lr"], "time": time.time()})
                    bar.update(task, completed=step, loss=mean_loss, tps=tps)
                    window_loss, window_tokens, t_window = [], 0, time.perf_counter()
                if step % eval_every == 0 and step < max_steps:
                    val = self.evaluate()
                    self._log({"step": step, "val_loss": val["mean"], "time": time.time()})
                    logger.info("step %d: validation loss %.4f (%s)", step, val["mean"], self.region)
                    self.save_checkpoint()
        self.save_checkpoint()
        regions = [self.region] + [r for r in (final_regions or []) if r != self.region]
        val = self.evaluate(regions)
        self._log({"step": self.trainer.step, "val_loss": val["mean"], "val_loss_per_language": val["per_language"],
                   "time": time.time()})
        self.save_model()
        return val
