"""Runs a simulator config: the grid of runs, the outer-lr sweep, parallel processes, outputs.

Outer learning rates of different rules live on different scales (ALGORITHMS.md), so for every
algorithm with an ``lr_grid`` each lr is run once (first seed, non-IID, at ``sweep_heterogeneity``),
the best (lowest mean of the final validation losses at the two budgets) is kept, and every cell
and seed of that algorithm runs at that lr. Every algorithm is thus compared at its own best lr.

Outputs in ``out_dir``: results.json (final values), curves.jsonl (evaluations along the way),
commits.jsonl (one line per commit), results.md and plots (heloco_p2p.report).

Every run is appended to ``out_dir/runs.jsonl`` the moment it finishes (one line, flushed and
fsynced), so a long comparison stopped or crashed half-way loses only the runs in progress:
``resume=True`` (``heloco-peer simulate --resume``) reuses every logged run whose full
specification (algorithm preset with all its arguments, lr, speeds, seed, budgets, ...) equals one
the config asks for, and runs the rest. A line cut short by a crash is skipped.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from multiprocessing import get_context
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from heloco_p2p.data import TokenBlocks, books_shard, load_tokenizer, open_source, validation_blocks
from heloco_p2p.fsutil import atomic_write_json, atomic_write_text
from heloco_p2p.local import build_model, count_params
from heloco_p2p.local.solo import source_spec
from heloco_p2p.sim.config import SimConfig
from heloco_p2p.sim.engine import SimResult, SimSpec, Simulation

logger = logging.getLogger(__name__)

_CACHE: dict = {}  # per process: tokenizer, validation blocks


def _data(cfg: SimConfig):
    """Tokenizer, block-stream factory and validation blocks, built once per process."""
    key = (cfg.base, json.dumps(cfg.overrides, sort_keys=True), tuple(cfg.regions))
    if key not in _CACHE:
        run_cfg = cfg.run_config()
        tok = load_tokenizer(run_cfg.data.tokenizer, vocab_size=run_cfg.data.vocab_size)
        sources = {r: open_source(source_spec(run_cfg, r)) for r in cfg.regions}
        val = {r: validation_blocks(s, tok, run_cfg.data.seq_len, run_cfg.data.val_blocks) for r, s in sources.items()}

        def streams(region: str, seed: int, shard: tuple[int, int] | None = None):
            source = sources[region] if shard is None else books_shard(sources[region], *shard)
            return iter(TokenBlocks(source, tok, seq_len=run_cfg.data.seq_len, split="train", seed=seed))

        _CACHE[key] = (run_cfg, tok, streams, val)
    return _CACHE[key]


def _init_process(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_spec(cfg: SimConfig, spec: SimSpec) -> SimResult:
    run_cfg, tok, streams, val = _data(cfg)
    return Simulation(run_cfg, spec, cfg.regions, streams, val, tokenizer=tok).run()


RUN_LOG = "runs.jsonl"


def _spec_key(cfg: SimConfig, spec: SimSpec) -> str:
    """The identity of a run: its whole specification (the preset's arguments included) and
    everything of the config it depends on: the run config (model, inner loop, data settings:
    its digest) and the regions."""
    d = asdict(spec)
    if d.get("uplink") is None:  # runs logged before the uplink option keep their keys
        d.pop("uplink", None)
    if d.get("shards") == 1 and d.get("shard_delay") is None:  # and those before the shard model
        d.pop("shards", None)
        d.pop("shard_delay", None)
    return json.dumps({"spec": d, "run_config": cfg.run_config().digest(), "regions": list(cfg.regions)},
                      sort_keys=True)


_LINE_FIELDS = ("key", "run_id", "at_tokens", "at_time", "curve", "commits", "workers")


def _result_from_line(line: dict, spec: SimSpec) -> SimResult:
    return SimResult(spec, line["at_tokens"], line["at_time"], line["curve"], line["commits"], line["workers"])


class RunLog:
    """``runs.jsonl``: one line per finished run (spec, final values, curve, commits, workers)."""

    def __init__(self, cfg: SimConfig, path: Path, resume: bool):
        self.cfg, self.path = cfg, path
        self.lines: dict[str, dict] = {}
        if resume and path.exists():
            kept, skipped = [], 0
            for raw in path.read_text().splitlines():
                try:
                    line = json.loads(raw)
                    if not isinstance(line, dict) or any(k not in line for k in _LINE_FIELDS):
                        raise ValueError("a field is missing")
                except ValueError:  # JSONDecodeError is a ValueError
                    skipped += 1
                    continue
                self.lines[line["key"]] = line
                kept.append(raw)
            if skipped:
                logger.warning("%s: skipped %d lines that do not parse (cut short by a crash?)", path, skipped)
            # rewrite the log with its good lines only: new lines never land on a fragment
            atomic_write_text(path, "".join(raw + "\n" for raw in kept))
            logger.info("resuming: %d finished runs in %s", len(self.lines), path)
        elif path.exists():
            path.unlink()

    def get(self, spec: SimSpec) -> SimResult | None:
        line = self.lines.get(_spec_key(self.cfg, spec))
        return None if line is None else _result_from_line(line, spec)

    def add(self, res: SimResult, seconds: float) -> None:
        line = {"key": _spec_key(self.cfg, res.spec), "run_id": res.spec.run_id, "seconds": seconds, "at_tokens": res.at_tokens,
                "at_time": res.at_time, "curve": res.curve, "commits": res.commits, "workers": res.workers}
        self.lines[line["key"]] = line
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()
            os.fsync(f.fileno())


def run_spec_job(args) -> dict:
    """One run in a worker process: ``(cfg, spec)`` -> ``{"result": SimResult, "seconds": wall time}``."""
    cfg, spec = args
    t0 = time.perf_counter()
    res = run_spec(cfg, spec)
    return {"result": res, "seconds": time.perf_counter() - t0}


def make_spec(cfg: SimConfig, algorithm: str, heterogeneity: str, data: str, seed: int, lr: float | None) -> SimSpec:
    run_cfg = cfg.run_config()
    # DyLU's floor comes from the run config's outer section, as in the swarm (algorithms.resolve_outer)
    preset = replace(cfg.algorithms()[algorithm], dylu_min_steps=run_cfg.outer.dylu_min_steps)
    levels = cfg.levels()
    uplink = cfg.uplink_for(algorithm)
    comm = [0.0] * len(cfg.regions)
    if cfg.bandwidth:
        from heloco_p2p.local.model import trainable_params
        with torch.device("meta"):
            model = build_model(run_cfg.model)
        n_params = count_params(model)
        up = uplink_bytes([tuple(p.shape) for p in trainable_params(model)], uplink)
        comm = [(up + 4 * n_params) / cfg.bandwidth] * len(cfg.regions)  # Δ up, fp32 θ down
    shards, shard_delay = cfg.shards_for(algorithm), None
    delay = cfg.shard_delay_for(algorithm)
    if delay is not None:
        from heloco_p2p.sim.config import shard_shapes

        link = None
        if delay.link is not None:  # part k's bytes on the wire over its holder's link
            link = [uplink_bytes(shapes, uplink) / delay.link for shapes in shard_shapes(run_cfg, shards)]
        shard_delay = {"latency_s": delay.latencies(shards, len(cfg.regions)), "jitter_s": float(delay.jitter_s), "link_seconds": link}
    return SimSpec(algorithm=preset, lr=preset.lr if lr is None else lr, heterogeneity=heterogeneity,
                   slowness=list(levels[heterogeneity]), data=data, seed=seed,
                   steps_per_round=cfg.steps_for(algorithm), step_time=cfg.step_time, comm_seconds=comm,
                   token_budget=cfg.token_budget, time_budget=cfg.time_budgets.get(heterogeneity, cfg.time_budget),
                   eval_points=cfg.eval_points,
                   overlap=cfg.overlap_for(algorithm),
                   uplink=None if uplink.compression == "none" else uplink.model_dump(),
                   shards=shards, shard_delay=shard_delay)


def uplink_bytes(shapes: list[tuple[int, ...]], uplink) -> int:
    """Bytes of one Δ's tensor blobs on the wire for ``uplink`` (framing and metadata not counted)."""
    import math

    from heloco_p2p.swarm.sparse import TopkCodec

    codec = TopkCodec(uplink.density, uplink.bits, uplink.chunk) if uplink.compression == "topk" else None
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if uplink.compression == "topk" and len(shape) >= 2 and n >= codec.chunk:
            total += codec.blob_bytes(n)
        elif uplink.compression == "fp16":
            total += 2 * n
        elif uplink.compression == "8bit" and len(shape) >= 2 and n >= 4096:
            total += n + 4 * (-(-n // 4096)) + 1040
        else:
            total += 4 * n
    return total


def _cells(cfg: SimConfig) -> list[tuple[str, str, str]]:
    seen, cells = set(), []
    for exp in cfg.experiments:
        for a in exp.algorithms:
            for h in exp.heterogeneity:
                for d in exp.data:
                    if (a, h, d) not in seen:
                        seen.add((a, h, d))
                        cells.append((a, h, d))
    return cells


def _lr_key(cfg: SimConfig, w: tuple) -> tuple:
    a, h, d, s, lr = w
    return (a, h, d, s, cfg.algorithms()[a].lr if lr is None else lr)


def _score(res: SimResult) -> float:
    return 0.5 * (res.at_tokens["val_loss"]["mean"] + res.at_time["val_loss"]["mean"])


class _Pool:
    """Runs jobs in worker processes (or inline for one process), with a progress bar and ETA."""

    def __init__(self, cfg: SimConfig, total: int, progress: bool, log: RunLog):
        self.cfg = cfg
        self.progress = Progress(TextColumn("[bold]simulate"), BarColumn(), MofNCompleteColumn(), TextColumn("runs"),
                                 TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                 TextColumn("{task.fields[last]}"), disable=not progress)
        self.task = self.progress.add_task("runs", total=total, last="")
        self.log = log
        # without a live bar (no terminal: nohup, CI, a pipe) each finished run is one log line
        self.log_lines = not (progress and sys.stderr.isatty())
        self.t0 = time.perf_counter()
        self.reused = 0
        self.executor = None
        if cfg.processes > 1:
            self.executor = ProcessPoolExecutor(cfg.processes, mp_context=get_context("spawn"),
                                                initializer=_init_process, initargs=(cfg.threads_per_process,))

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.executor is not None:
            self.executor.shutdown(cancel_futures=True)
        self.progress.__exit__(*exc)

    def map(self, specs: list[SimSpec]) -> list[SimResult]:
        """Results in the order of ``specs``; runs already in the log are not run again."""
        outs: list[SimResult | None] = [self.log.get(s) for s in specs]
        reused = sum(o is not None for o in outs)
        self.reused += reused
        if reused:
            self.progress.update(self.task, advance=reused, last=f"{reused} runs reused from {RUN_LOG}")
        missing = [i for i, o in enumerate(outs) if o is None]
        if self.executor is None:
            _init_process(self.cfg.threads_per_process)
            for i in missing:
                outs[i] = self._done(run_spec_job((self.cfg, specs[i])))
            return outs
        futures = {self.executor.submit(run_spec_job, (self.cfg, specs[i])): i for i in missing}
        for f in as_completed(futures):  # logged as they finish, not in submission order
            outs[futures[f]] = self._done(f.result())
        return outs

    def _done(self, out: dict) -> SimResult:
        res = out["result"]
        self.log.add(res, out["seconds"])
        last = f"{res.spec.run_id}: {res.at_time['val_loss']['mean']:.3f} ({out['seconds']:.0f}s)"
        self.progress.update(self.task, advance=1, last=last)
        if self.log_lines:
            task = self.progress.tasks[0]
            done, total = int(task.completed), int(task.total or 0)
            elapsed = time.perf_counter() - self.t0
            ran = done - self.reused  # the ETA counts only runs made in this invocation
            eta = elapsed / ran * (total - done) if ran > 0 else None
            logger.info("run %d/%d done: %s; elapsed %.0f s%s", done, total, last, elapsed,
                        f", ETA {eta:.0f} s" if eta is not None else "")
        return res


def run_config(cfg: SimConfig, out_dir: str | Path, progress: bool = True, resume: bool = False) -> dict:
    """Run every cell of ``cfg`` (with the lr sweep) and write the outputs; returns results.json's dict.
    ``resume``: reuse the finished runs logged in ``out_dir/runs.jsonl`` (module docstring)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = _cells(cfg)
    seed0 = cfg.seeds[0]
    sweep_het = cfg.sweep_heterogeneity or cells[0][1]
    swept = [a for a in dict.fromkeys(a for a, _, _ in cells) if len(cfg.lr_grid.get(a) or []) > 1]
    phase1 = [make_spec(cfg, a, sweep_het, "non-iid", seed0, lr) for a in swept for lr in cfg.lr_grid[a]]
    t0 = time.perf_counter()
    log = RunLog(cfg, out / RUN_LOG, resume)
    with _Pool(cfg, len(phase1) + len(cells) * len(cfg.seeds), progress, log) as pool:
        sweep = pool.map(phase1)
        best_lr: dict[str, float] = {}
        for a in swept:
            mine = [r for r in sweep if r.spec.algorithm.name == a]
            best_lr[a] = min(mine, key=_score).spec.lr
        done = {(r.spec.algorithm.name, r.spec.heterogeneity, r.spec.data, r.spec.seed, r.spec.lr): r for r in sweep}
        wanted = [(a, h, d, s, best_lr.get(a, (cfg.lr_grid.get(a) or [None])[0])) for a, h, d in cells for s in cfg.seeds]
        todo = [make_spec(cfg, *w) for w in wanted if _lr_key(cfg, w) not in done]
        pool.progress.update(pool.task, total=len(phase1) + len(todo))
        for r in pool.map(todo):
            done[(r.spec.algorithm.name, r.spec.heterogeneity, r.spec.data, r.spec.seed, r.spec.lr)] = r
    chosen = [done[_lr_key(cfg, w)] for w in wanted]
    results = {
        "config": cfg.model_dump(mode="json"),
        "runs": [entry for r in chosen for entry in _entries(r)],
        "lr_sweep": [{"algorithm": r.spec.algorithm.name, "heterogeneity": r.spec.heterogeneity, "data": r.spec.data,
                      "seed": r.spec.seed, "outer_lr": r.spec.lr, "score": _score(r),
                      "chosen": best_lr[r.spec.algorithm.name] == r.spec.lr} for r in sweep],
        "wall_seconds": time.perf_counter() - t0,  # of this invocation
        "reused_runs": pool.reused,
    }
    atomic_write_json(out / "results.json", results)
    with open(out / "curves.jsonl", "w") as f:
        for r in chosen:
            for point in r.curve:
                f.write(json.dumps({**_key(r), **point}) + "\n")
    with open(out / "commits.jsonl", "w") as f:
        for r in chosen:
            for c in r.commits:
                f.write(json.dumps({**_key(r), **c}) + "\n")
    with open(out / "workers.jsonl", "w") as f:
        for r in chosen:
            for w in r.workers:
                f.write(json.dumps({**_key(r), **w}) + "\n")
    return results


def _key(r: SimResult) -> dict:
    s = r.spec
    return {"algorithm": s.algorithm.name, "heterogeneity": s.heterogeneity, "data": s.data, "seed": s.seed,
            "outer_lr": s.lr}


def _entries(r: SimResult) -> list[dict]:
    a = r.spec.algorithm
    extra = {}
    if r.spec.shards > 1 or r.spec.shard_delay is not None:  # the shard model: its staleness per shard
        extra = {"shards": r.spec.shards, "shard_staleness": shard_staleness(r.commits, r.spec.shards)}
    return [{**_key(r), "budget": budget, "tokens": int(point["tokens"]), "virtual_seconds": float(point["virtual_seconds"]),
             "val_loss": point["val_loss"], "staleness_weight": a.staleness_weight, "dispatch": a.dispatch,
             "weight_order": a.weight_order, **extra}
            for budget, point in (("tokens", r.at_tokens), ("time", r.at_time))]


def shard_staleness(commits: list[dict], shards: int) -> dict:
    """Per shard, the mean and max staleness of the parts committed in a run (its commits' lists),
    and the same over all parts."""
    per = [[c["shard_staleness"][k] for c in commits] for k in range(shards)]
    every = [t for p in per for t in p]
    return {"mean": [sum(p) / len(p) if p else 0.0 for p in per], "max": [max(p, default=0) for p in per],
            "all_mean": sum(every) / len(every) if every else 0.0, "all_max": max(every, default=0)}


def spec_dict(spec: SimSpec) -> dict:
    d = asdict(spec)
    d["algorithm"] = spec.algorithm.name
    return d
