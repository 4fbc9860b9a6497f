"""Tables and plots for people: the simulator's results.md and its PNG figures.

    write_sim_report("runs/sim-quick")   # reads results.json, curves.jsonl, commits.jsonl there
"""
from __future__ import annotations

import json
import re
import statistics
import subprocess
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no screen
import matplotlib.pyplot as plt  # noqa: E402


def git_tree(root: Path) -> str:
    """The commit a measurement ran on, and whether the working tree differed from it (for the
    "tree" every benchmark and chaos report records)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with uncommitted changes" if dirty else "")


def _save(fig, out: Path, name: str) -> str:
    """Lay out, write ``out/name`` (PNG, 110 dpi) and close the figure; returns ``name``."""
    fig.tight_layout()
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def replace_section(md: str, heading: str, body: str) -> str:
    """``md`` with the section under ``heading`` (up to the next heading of the same or a higher
    level) replaced by ``body``; the section is appended if missing. Benchmarks use it to keep
    docs/results.md current without touching the sections around theirs."""
    if heading not in md:
        return md.rstrip() + f"\n\n{heading}\n\n{body.rstrip()}\n"
    level = len(heading) - len(heading.lstrip("#"))
    start = md.index(heading)
    nxt = re.search(rf"\n#{{1,{level}}} ", md[start + len(heading):])
    end = len(md) if nxt is None else start + len(heading) + nxt.start() + 1
    return md[:start] + heading + "\n\n" + body.rstrip() + "\n\n" + md[end:]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and half the range over seeds (0 for one seed)."""
    mean = statistics.fmean(values)
    return mean, (max(values) - min(values)) / 2 if len(values) > 1 else 0.0


def _rel(baseline: float | None, value: float) -> str:
    if baseline is None:
        return "–"
    return f"{100 * (baseline - value) / baseline:+.1f}%"


def sim_table(results: dict) -> str:
    """Markdown: algorithms as rows, heterogeneity levels as columns, one table per (data, budget),
    with mean ± spread over seeds and the relative difference to async and sync DiLoCo
    ((baseline − method)/baseline: positive means the method is better)."""
    runs = results["runs"]
    groups: dict[tuple, list[float]] = defaultdict(list)
    lrs: dict[tuple, float] = {}
    for r in runs:
        groups[(r["data"], r["budget"], r["algorithm"], r["heterogeneity"])].append(r["val_loss"]["mean"])
        lrs[(r["data"], r["algorithm"], r["heterogeneity"])] = r.get("outer_lr")
    algos = list(dict.fromkeys(r["algorithm"] for r in runs))
    levels = list(dict.fromkeys(r["heterogeneity"] for r in runs))
    out = []
    for data in dict.fromkeys(r["data"] for r in runs):
        for budget in ("tokens", "time"):
            present = [h for h in levels if any((data, budget, a, h) in groups for a in algos)]
            if not present:
                continue
            label = "fixed token budget" if budget == "tokens" else "fixed virtual wall-clock budget"
            out.append(f"### {data}, {label}: mean validation loss over languages (± half-range over seeds)\n")
            out.append("| algorithm | " + " | ".join(f"{h} | vs async | vs sync" for h in present) + " |")
            out.append("|---|" + "---|---|---|" * len(present))
            for a in algos:
                cells = []
                for h in present:
                    vals = groups.get((data, budget, a, h))
                    if not vals:
                        cells += ["", "", ""]
                        continue
                    m, s = _mean_spread(vals)
                    base_a = groups.get((data, budget, "async_diloco", h))
                    base_s = groups.get((data, budget, "sync_diloco", h))
                    lr = lrs.get((data, a, h))
                    cells += [f"{m:.3f} ± {s:.3f} (lr {lr:g}, n={len(vals)})" if lr is not None else f"{m:.3f} ± {s:.3f}",
                              _rel(statistics.fmean(base_a) if base_a else None, m),
                              _rel(statistics.fmean(base_s) if base_s else None, m)]
                out.append(f"| {a} | " + " | ".join(cells) + " |")
            out.append("")
    return "\n".join(out)


def language_table(results: dict) -> str:
    """Markdown: per (data, budget, heterogeneity), each algorithm's seed-mean loss per language,
    the mean over languages and the worst language (the highest seed-mean language loss)."""
    runs = results["runs"]
    per: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        per[(r["data"], r["budget"], r["heterogeneity"], r["algorithm"])].append(r["val_loss"]["per_language"])
    out = []
    for data, budget, het in dict.fromkeys((r["data"], r["budget"], r["heterogeneity"]) for r in runs):
        algos = [a for (d, b, h, a) in per if (d, b, h) == (data, budget, het)]
        langs = list(next(iter(per[(data, budget, het, algos[0])]))) if algos else []
        label = "fixed token budget" if budget == "tokens" else "fixed virtual wall-clock budget"
        out.append(f"### {data}, {het}, {label}: loss per language (mean over seeds)\n")
        out.append("| algorithm | " + " | ".join(langs) + " | mean | worst language |")
        out.append("|---|" + "---|" * (len(langs) + 2))
        for a in algos:
            seeds = per[(data, budget, het, a)]
            means = {lang: statistics.fmean(s[lang] for s in seeds) for lang in langs}
            worst = max(means, key=means.get)
            out.append(f"| {a} | " + " | ".join(f"{means[lang]:.3f}" for lang in langs)
                       + f" | {statistics.fmean(means.values()):.3f} | {means[worst]:.3f} ({worst}) |")
        out.append("")
    return "\n".join(out)


def paired_table(results: dict, reference: str) -> str:
    """Markdown: each algorithm minus ``reference`` on the same seed (same data order and θ_0),
    mean over seeds ± half-range, per (data, budget, heterogeneity): negative = lower loss."""
    runs = results["runs"]
    loss = {(r["data"], r["budget"], r["heterogeneity"], r["algorithm"], r["seed"]): r["val_loss"]["mean"] for r in runs}
    out = [f"### Paired differences to `{reference}` (same seed; mean over seeds ± half-range; negative = better)\n",
           "| data | budget | heterogeneity | algorithm | Δ loss | n |", "|---|---|---|---|---|---|"]
    cells = list(dict.fromkeys(k[:4] for k in loss))
    order = {h: i for i, h in enumerate(dict.fromkeys(k[2] for k in cells))}
    cells.sort(key=lambda k: (k[0], order[k[2]], k[1]))
    for (data, budget, het, algo) in cells:
        if algo == reference:
            continue
        diffs = [loss[(data, budget, het, algo, s)] - loss[(data, budget, het, reference, s)]
                 for (d, b, h, a, s) in loss if (d, b, h, a) == (data, budget, het, algo)
                 and (data, budget, het, reference, s) in loss]
        if diffs:
            m, sp = _mean_spread(diffs)
            out.append(f"| {data} | {budget} | {het} | {algo} | {m:+.3f} ± {sp:.3f} | {len(diffs)} |")
    return "\n".join(out) + "\n"


def _plot_curves(curves: list[dict], out: Path) -> list[str]:
    files = []
    by_cell = defaultdict(lambda: defaultdict(list))
    for c in curves:
        by_cell[(c["heterogeneity"], c["data"])][c["algorithm"]].append(c)
    for (het, data), algos in by_cell.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
        for algo, points in algos.items():
            for ax, xkey in zip(axes, ("tokens", "virtual_seconds")):
                seeds = defaultdict(list)
                for p in points:
                    seeds[p["seed"]].append(p)
                for i, (_seed, pts) in enumerate(sorted(seeds.items())):
                    pts = sorted(pts, key=lambda p: p[xkey])
                    ax.plot([p[xkey] for p in pts], [p["val_loss"]["mean"] for p in pts], marker="o", ms=3,
                            label=algo if i == 0 else None, alpha=0.85,
                            color=f"C{list(algos).index(algo) % 10}")
        axes[0].set_xlabel("tokens processed")
        axes[1].set_xlabel("virtual seconds")
        for ax in axes:
            ax.set_ylabel("mean validation loss")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=8)
        fig.suptitle(f"validation loss, heterogeneity={het}, data={data}")
        files.append(_save(fig, out, f"loss_{het}_{data}.png"))
    return files


def _plot_per_language(runs: list[dict], out: Path) -> list[str]:
    files = []
    cells = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        if r["budget"] == "time":
            for lang, v in r["val_loss"]["per_language"].items():
                cells[(r["heterogeneity"], r["data"])][r["algorithm"]][lang].append(v)
    for (het, data), algos in cells.items():
        langs = sorted({lang for a in algos.values() for lang in a})
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(langs) * len(algos) / 3), 4.5))
        width = 0.8 / max(1, len(algos))
        for i, (algo, per) in enumerate(algos.items()):
            xs = [j + i * width for j in range(len(langs))]
            ax.bar(xs, [statistics.fmean(per[lang]) for lang in langs], width=width, label=algo)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(langs))], langs)
        ax.set_ylabel("validation loss at the time budget")
        lo = min(statistics.fmean(v) for per in algos.values() for v in per.values())
        ax.set_ylim(bottom=max(0.0, lo - 0.5))
        ax.legend(fontsize=7, ncol=2)
        ax.set_title(f"per-language loss, heterogeneity={het}, data={data}")
        files.append(_save(fig, out, f"per_language_{het}_{data}.png"))
    return files


def _plot_staleness(commits: list[dict], out: Path) -> list[str]:
    files = []
    cells = defaultdict(lambda: defaultdict(list))
    for c in commits:
        if c["algorithm"] != "sync_diloco":
            cells[(c["algorithm"], c["heterogeneity"], c["data"])][c["worker"]].append(c["staleness"])
    wanted = [k for k in cells if k[0] in ("heloco", "async_diloco")]
    for algo, het, data in wanted:
        per_worker = cells[(algo, het, data)]
        fig, ax = plt.subplots(figsize=(6, 4))
        top = max(max(v) for v in per_worker.values())
        bins = range(0, top + 2)
        for w, vals in sorted(per_worker.items()):
            ax.hist(vals, bins=bins, alpha=0.5, label=f"worker {w}")
        ax.set_xlabel("staleness τ (commits)")
        ax.set_ylabel("commits")
        ax.legend(fontsize=8)
        ax.set_title(f"staleness, {algo}, heterogeneity={het}, {data}")
        files.append(_save(fig, out, f"staleness_{algo}_{het}_{data}.png"))
    return files


def _plot_branches(commits: list[dict], out: Path) -> list[str]:
    files = []
    cells = defaultdict(list)
    for c in commits:
        if c.get("branches"):
            cells[(c["algorithm"], c["heterogeneity"], c["data"])].append(c)
    for (algo, het, data), cs in cells.items():
        if not algo.startswith("heloco"):
            continue
        cs = sorted(cs, key=lambda c: c["t"])
        names = sorted({b for c in cs for b in c["branches"]})
        fig, axes = plt.subplots(1, 2, figsize=(12, 4))
        ts = [c["t"] for c in cs]
        for b in names:
            axes[0].plot(ts, [c["branches"].get(b, 0) for c in cs], label=b, marker=".", lw=0.8)
        axes[0].set_xlabel("virtual seconds")
        axes[0].set_ylabel("tensors per commit")
        axes[0].legend(fontsize=8)
        axes[0].set_title("HeLoCo branch per tensor, per commit")
        axes[1].scatter(ts, [c["cosine"] if c["cosine"] is not None else float("nan") for c in cs], s=6)
        axes[1].axhline(0, color="grey", lw=0.8)
        axes[1].set_xlabel("virtual seconds")
        axes[1].set_ylabel("mean cosine(Δ, momentum)")
        axes[1].set_title("alignment with the momentum")
        fig.suptitle(f"{algo}, heterogeneity={het}, {data}")
        files.append(_save(fig, out, f"branches_{algo}_{het}_{data}.png"))
    return files


def write_sim_report(out_dir: str | Path, command: str | None = None) -> Path:
    """Write results.md and the PNG plots next to results.json; returns results.md's path."""
    out = Path(out_dir)
    results = json.loads((out / "results.json").read_text())
    curves = _read_jsonl(out / "curves.jsonl")
    commits = _read_jsonl(out / "commits.jsonl")
    cfg = results["config"]
    plots = (_plot_curves(curves, out) + _plot_per_language(results["runs"], out)
             + _plot_staleness(commits, out) + _plot_branches(commits, out))
    lines = [f"# Simulator results: {cfg['name']}", ""]
    if command:
        lines += [f"Command: `{command}`", ""]
    lines += [f"Base config `{cfg['base']}` with overrides `{cfg['overrides']}`; workers/regions {cfg['regions']}; "
              f"H={cfg['steps_per_round']}; seeds {cfg['seeds']}; token budget {cfg['token_budget']:,}; "
              f"virtual time budget {cfg['time_budget']:g} s; wall time {results.get('wall_seconds', 0):.0f} s"
              + (f" ({results['reused_runs']} of the runs reused from runs.jsonl, made by earlier invocations)"
                 if results.get("reused_runs") else "") + ".", ""]
    if cfg.get("lr_grid"):
        lines += ["Outer learning rates were swept per algorithm on seed "
                  f"{cfg['seeds'][0]} ({cfg['lr_grid']}); each algorithm is shown at its best lr.", ""]
    lines += [sim_table(results), "## Per language", "", language_table(results)]
    algos = {r["algorithm"] for r in results["runs"]}
    for ref in ("heloco", "async_mla"):
        if ref in algos and len(algos) > 1 and len(cfg["seeds"]) > 1:
            lines += [paired_table(results, ref)]
    lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots]
    path = out / "results.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------- testnet
def write_testnet_report(out_dir: str | Path) -> Path:
    """report.md and its PNG plots for a testnet directory (summary.json + metrics.jsonl)."""
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    events = _read_jsonl(out / "metrics.jsonl")
    t0 = min((e["time"] for e in events if "time" in e), default=0.0)
    plots = []

    vals = [e for e in events if e.get("event") == "val"]
    if vals:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for lang in vals[0]["val_loss"]["per_language"]:
            ax.plot([(e["time"] - t0) / 60 for e in vals], [e["val_loss"]["per_language"][lang] for e in vals],
                    marker="o", ms=3, label=lang)
        ax.plot([(e["time"] - t0) / 60 for e in vals], [e["val_loss"]["mean"] for e in vals], "k--", lw=2, label="mean")
        ax.set_xlabel("minutes")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_title("validation loss of the global model, per language")
        plots.append(_save(fig, out, "val_loss.png"))

    peers = summary["peers"]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar([f"{p['name']}\n{p['region']}, speed {p['speed_factor']:g}" for p in peers], [p["tokens"] for p in peers])
    ax.set_ylabel("tokens in accepted submissions")
    ax.set_title("tokens per peer")
    plots.append(_save(fig, out, "tokens.png"))

    acks = [e for e in events if e.get("event") == "ack" and not e.get("duplicate")]
    if acks:
        fig, ax = plt.subplots(figsize=(7, 4))
        by_peer = defaultdict(list)
        for a in acks:
            by_peer[a.get("name") or a["peer"][-6:]].append(a["staleness"] or 0)
        top = max(max(v) for v in by_peer.values())
        for name, v in sorted(by_peer.items()):
            ax.hist(v, bins=range(0, top + 2), alpha=0.5, label=name)
        ax.set_xlabel("staleness τ (commits between a round's start and its commit)")
        ax.set_ylabel("submissions")
        ax.legend()
        ax.set_title("staleness per peer")
        plots.append(_save(fig, out, "staleness.png"))

    commits = sorted((e for e in events if e.get("event") == "commit"), key=lambda e: e["time"])
    branch_names = sorted({b for c in commits for b in (c.get("branches") or {})})
    if commits and branch_names:
        fig, ax = plt.subplots(figsize=(7, 4))
        ts = [(c["time"] - t0) / 60 for c in commits]
        for b in branch_names:
            cum, total = [], 0
            for c in commits:
                total += (c.get("branches") or {}).get(b, 0)
                cum.append(total)
            ax.plot(ts, cum, label=b)
        ax.set_xlabel("minutes")
        ax.set_ylabel("parameter tensors (cumulative)")
        ax.set_title("correction branches over time")
        ax.legend()
        plots.append(_save(fig, out, "branches.png"))

    v = summary["val_loss"]
    lines = [f"# Testnet report ({summary.get('run_id', '')})", "",
             f"{summary['wall_seconds'] / 60:.1f} minutes, {summary['commits']} commits, {summary['rejected']} rejected, "
             f"{summary['coordinator_changes']} coordinator changes.", "",
             f"Validation loss (mean over languages): {v['start']['mean']:.3f} → {v['end']['mean']:.3f} "
             f"(version {v['end']['version']}).", "",
             "| language | start | end |", "|---|---|---|"]
    for lang, start in v["start"]["per_language"].items():
        lines.append(f"| {lang} | {start:.3f} | {v['end']['per_language'].get(lang, float('nan')):.3f} |")
    lines += ["", "| peer | region | speed | rounds | tokens | utilization | mean staleness |", "|---|---|---|---|---|---|---|"]
    for p in peers:
        lines.append(f"| {p['name']} | {p['region']} | {p['speed_factor']:g} | {p['rounds']} | {p['tokens']:,} | "
                     f"{p['utilization']:.2f} | {p['staleness_mean']:.2f} |")
    lines += ["", "Utilization = time in inner steps (emulated idling included) / wall time from the peer's first "
              "round to its last; what it misses is time spent waiting on the swarm.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
