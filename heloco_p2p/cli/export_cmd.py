"""``heloco-peer export`` (a coordinator checkpoint → a transformers model) and ``heloco-peer generate``."""
from __future__ import annotations

import click

from heloco_p2p.cli import log_level_option
from heloco_p2p.cli.train_cmd import fail, set_threads


def _quiet_transformers() -> None:
    """No progress bars for loading and saving a model of a few MB."""
    # transformers takes ~2 s to import: here and below only when export or generate runs
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


@click.command()
@click.option("--checkpoint", "ckpt_dirs", type=click.Path(file_okay=False), required=True, multiple=True,
              help="A coordinator's --checkpoint-dir (coordinator.pt, config.yaml, tokenizer.json); for a run with "
                   "swarm.shards > 1, every directory holding shard-<k> checkpoints (repeatable).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), required=True,
              help="Directory to write (new, empty, or an earlier export, which is replaced).")
@log_level_option
def export(ckpt_dirs, out_dir):
    """Write a swarm checkpoint's model as a save_pretrained directory with its tokenizer.

    AutoModelForCausalLM.from_pretrained(OUT) loads it; heloco_export.json beside it names the
    run, version and term it came from.
    """
    from heloco_p2p.tools.export import ExportError, export_checkpoint

    _quiet_transformers()
    try:
        meta = export_checkpoint(ckpt_dirs[0] if len(ckpt_dirs) == 1 else list(ckpt_dirs), out_dir)
    except ExportError as exc:
        fail(str(exc))
    click.echo(f"exported run {meta['run_id']} at version {meta['version']} (term {meta['term']}, "
               f"{meta['parameters']:,} parameters) to {out_dir}\n"
               f"try: heloco-peer generate --model {out_dir} --prompt 'In the beginning'")


@click.command()
@click.option("--model", "model_dir", type=click.Path(file_okay=False, exists=True), required=True,
              help="A save_pretrained directory with its tokenizer (heloco-peer export or train).")
@click.option("--prompt", required=True, help="Text to continue ('' starts a new document).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=60, show_default=True, help="Tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.8, show_default=True,
              help="Sampling temperature; 0 decodes greedily.")
@click.option("--top-k", type=click.IntRange(min=0), default=50, show_default=True,
              help="Sample among the k likeliest tokens (0: all).")
@click.option("--seed", type=int, default=0, show_default=True, help="The same seed gives the same text.")
@click.option("--num-samples", type=click.IntRange(min=1), default=1, show_default=True,
              help="Continuations to sample (each printed after a '--- sample N' line when more than one).")
@click.option("--threads", type=click.IntRange(min=0), default=0, help="torch threads (0: torch's default).")
@log_level_option
def generate(model_dir, prompt, max_new_tokens, temperature, top_k, seed, num_samples, threads):
    """Continue PROMPT with a saved model and print the text(s), prompt included."""
    from heloco_p2p.tools.export import ExportError, generate_text

    set_threads(threads)
    _quiet_transformers()
    try:
        texts = generate_text(model_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature,
                              top_k=top_k, seed=seed, num_samples=num_samples)
    except ExportError as exc:
        fail(str(exc))
    for i, text in enumerate(texts):
        if num_samples > 1:
            click.echo(f"--- sample {i + 1}")
        click.echo(text)
