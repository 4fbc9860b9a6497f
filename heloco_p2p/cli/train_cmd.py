"""``heloco-peer train`` (one peer alone) and ``heloco-peer eval`` (any saved model)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import click
import torch

from heloco_p2p.cli import log_level_option
from heloco_p2p.config import ConfigError, load_config, read_yaml
from heloco_p2p.data import builtin_regions, load_tokenizer, open_source, validation_blocks


def fail(msg: str) -> None:
    """Print ``error: MSG`` to stderr and exit 2 (click's status for a usage error); every command's."""
    click.echo(f"error: {msg}", err=True)
    sys.exit(2)


def set_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


@click.command()
@click.option("--config", "config_path", type=str, help="Run config (path or name in configs/), e.g. configs/tiny.yaml.")
@click.option("--region", type=str, help="Region / language to train on, e.g. de.")
@click.option("--max-steps", type=click.IntRange(min=1), required=True, help="Train until this global inner step.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run directory to create.")
@click.option("--resume", "resume_dir", type=click.Path(file_okay=False, exists=True), help="Continue the run in this directory.")
@click.option("--eval-every", type=click.IntRange(min=1), default=100, show_default=True, help="Validate and checkpoint every N steps.")
@click.option("--eval-regions", type=str, default="all", show_default=True,
              help="Languages to validate on at the end: 'all' built-in ones, or a comma list.")
@click.option("--threads", type=click.IntRange(min=0), default=None, help="torch threads (default: the config's inner.threads).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for model init and data order.")
@click.option("--no-progress", is_flag=True, help="No progress bar (log lines only).")
@log_level_option
def train(config_path, region, max_steps, out_dir, resume_dir, eval_every, eval_regions, threads, seed, no_progress):
    """Train one peer alone on its region's data (the no-communication baseline)."""
    from heloco_p2p.local.solo import SoloRun  # loads transformers (~2 s): only for this command

    try:
        if resume_dir:
            if config_path or out_dir:
                fail("--resume continues a run with its own config and directory; drop --config/--out")
            run = SoloRun.resume(resume_dir)
        else:
            if not (config_path and region and out_dir):
                fail("give --config, --region and --out (or --resume DIR)")
            run = SoloRun.create(load_config(config_path), region, out_dir, seed=seed)
    except (ConfigError, FileExistsError, FileNotFoundError, ValueError, KeyError) as exc:
        fail(str(exc))
    set_threads(run.cfg.inner.threads if threads is None else threads)
    final = builtin_regions() if eval_regions == "all" else [r for r in eval_regions.split(",") if r]
    try:
        val = run.train(max_steps, eval_every=eval_every, final_regions=final, progress=not no_progress)
    except KeyboardInterrupt:
        run.save_checkpoint()
        click.echo(f"\ninterrupted at step {run.trainer.step}; checkpoint saved. Continue with: "
                   f"heloco-peer train --resume {run.out_dir} --max-steps {max_steps}", err=True)
        sys.exit(130)
    click.echo(f"validation loss ({run.region}): {val['per_language'][run.region]:.4f}; "
               f"mean over {len(val['per_language'])} languages: {val['mean']:.4f}")
    click.echo(f"model saved to {run.out_dir} (AutoModelForCausalLM.from_pretrained loads it)")


@click.command("eval")
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="A save_pretrained directory (with its tokenizer).")
@click.option("--regions", type=str, default="all", show_default=True, help="'all' built-in languages or a comma list.")
@click.option("--seq-len", type=click.IntRange(min=2), default=None, help="Block length (default: the run's, else 128).")
@click.option("--val-blocks", type=click.IntRange(min=1), default=None, help="Blocks per language (default: the run's, else 32).")
@click.option("--json", "as_json", is_flag=True, help="Print {'mean', 'per_language'} as JSON.")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0: torch's default).")
@log_level_option
def eval_cmd(model_dir, regions, seq_len, val_blocks, as_json, threads):
    """Validation loss of a saved model per language and averaged over languages."""
    # transformers (~2 s to import) only for this command
    from transformers import AutoModelForCausalLM

    from heloco_p2p.local.evaluate import evaluate_regions

    set_threads(threads)
    model_dir = Path(model_dir)
    meta_path = model_dir / "run_config.yaml"
    data_cfg = read_yaml(meta_path)["config"]["data"] if meta_path.exists() else {}
    seq_len = seq_len or data_cfg.get("seq_len", 128)
    val_blocks = val_blocks or data_cfg.get("val_blocks", 32)
    specs = data_cfg.get("regions", {})
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        tok = load_tokenizer(str(model_dir))
    except (OSError, ValueError) as exc:
        fail(f"{model_dir}: cannot load model and tokenizer: {exc}")
    wanted = builtin_regions() if regions == "all" else [r for r in regions.split(",") if r]
    try:
        blocks = {r: validation_blocks(open_source(specs.get(r, f"bible:{r}")), tok, seq_len, val_blocks) for r in wanted}
    except (ValueError, KeyError) as exc:
        fail(str(exc))
    result = evaluate_regions(model, blocks)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for r, loss in result["per_language"].items():
        click.echo(f"{r:>6}  {loss:.4f}")
    click.echo(f"{'mean':>6}  {result['mean']:.4f}")
