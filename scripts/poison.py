#!/usr/bin/env python
"""Poisoning attacks on an open run of the local testnet, with and without the defence
(heloco_p2p/roles/defence.py; docs/security.md, "Poisoning").

    python scripts/poison.py --attack all --defence both --rounds 10 --clean-runs 3 --json bench/poison.json --write-results
    python scripts/poison.py --attack sign_flip --defence on --rounds 8

The cast: the 4 honest peers of --peers (peers/*.yaml, an open run: no swarm key) plus the
attacker peer(s), which join like any volunteer: a real ``heloco-peer join`` process whose
submit path is wrapped (``--as-attacker``, below); it trains honest rounds on its own language
(``de``) and sends what its attack makes of them. A run stops once every honest peer has trained
--rounds rounds (honest work is the same across runs); then the final θ (the last coordinator's
checkpoint) is evaluated on the validation blocks of every honest language.

Attacks (each probes: it lowers its scale after a refusal and raises it after an acceptance, so
it ends just under whatever bound the coordinator enforces):

- ``sign_flip``: −k·Δ of its honest Δ;
- ``sign_flip_lie``: the same, claiming another honest peer's region (ru) for it, so that the
  loss screen scores it on a language it did not train (defence on only);
- ``scaled_noise``: Gaussian noise, per tensor as large as k × that tensor of Δ;
- ``ratchet``: its honest Δ × k, k × 1.5 after every acceptance (slowly raising its norms);
- ``flood``: −k·Δ plus fresh noise (so that no two are alike), sent back to back at the rate limit;
- ``replay``: its first accepted honest Δ, resubmitted every round;
- ``sybil``: two identities running sign_flip;
- ``honest_extra``: not an attack but its control: a fifth peer of the attacker's region and speed
  that sends its honest Δ unchanged (what one more honest participant of that language does to the
  other languages at the same number of honest rounds).

Per run: the attackers' share of the commits, the final mean and worst-language validation loss
(and the untrained one), the honest submissions refused (count and %), the honest resends (busy,
rate_limited), the loss-screen cost per submission. ``--write-results`` writes the section
"## Poisoning (open run)" of docs/reliability.md.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

HEADING = "## Poisoning (open run)"
ATTACKS = ("sign_flip", "sign_flip_lie", "scaled_noise", "ratchet", "flood", "replay", "sybil", "honest_extra")
LIE_REGION = "ru"  # sign_flip_lie claims this region (another honest peer's) for its de-trained Δ
ON_ONLY = ("sign_flip_lie",)  # without the defence the claimed region changes nothing: sign_flip off is that run
ATTACKER_REGION = "de"


# ------------------------------------------------------------------------------------ the attacker
class Attack:
    """What an attacker peer sends instead of its honest Δ, and how it adapts to the answers."""

    kind = "none"
    start_scale, up, down, floor = 1.0, 1.05, 0.7, 1e-3

    def __init__(self, peer, seed: int):
        import torch

        self.peer, self.scale = peer, self.start_scale
        self.gen = torch.Generator().manual_seed(seed)

    def make(self, delta):
        raise NotImplementedError

    def learn(self, outcome) -> None:
        if outcome.status == "accepted" and not outcome.reply.get("duplicate"):
            self.scale *= self.up
        elif outcome.status == "rejected" and outcome.reason in ("norm_too_large", "harmful_update", "replayed_update"):
            self.scale = max(self.floor, self.scale * self.down)

    def log(self, outcome, sent) -> None:
        from heloco_p2p.roles.commit_state import tensor_norm

        self.peer.metrics.log({"event": "attack", "kind": self.kind, "scale": self.scale, "status": outcome.status,
                              "reason": outcome.reason, "duplicate": bool(outcome.reply.get("duplicate")),
                              "norm": tensor_norm(sent)})

    def noise_like(self, delta, factor: float):
        import torch

        out = []
        for d in delta:
            n = torch.randn(d.shape, generator=self.gen)
            out.append(n * (factor * float(torch.linalg.vector_norm(d)) / max(1e-12, float(torch.linalg.vector_norm(n)))))
        return out


class SignFlip(Attack):
    kind, start_scale = "sign_flip", 8.0  # just under the run-wide bound (10 × the median) at first

    def make(self, delta):
        return [-self.scale * d for d in delta]


class ScaledNoise(Attack):
    kind, start_scale = "scaled_noise", 8.0

    def make(self, delta):
        return self.noise_like(delta, self.scale)


class Ratchet(Attack):
    kind, start_scale, up, down = "ratchet", 2.0, 1.5, 0.8

    def make(self, delta):
        return [self.scale * d for d in delta]


class HonestExtra(Attack):
    kind = "honest_extra"

    def make(self, delta):
        return [d.clone() for d in delta]

    def learn(self, outcome) -> None:
        pass


class Replay(Attack):
    kind = "replay"

    def __init__(self, peer, seed):
        super().__init__(peer, seed)
        self.kept = None

    def make(self, delta):
        return [d.clone() for d in (self.kept if self.kept is not None else delta)]

    def learn(self, outcome) -> None:
        pass


class Flood(SignFlip):
    kind = "flood"

    def make(self, delta):
        noise = self.noise_like(delta, 0.5 * self.scale)
        return [-self.scale * d + n for d, n in zip(delta, noise)]


ATTACK_CLASSES = {"sign_flip": SignFlip, "sign_flip_lie": SignFlip, "scaled_noise": ScaledNoise, "ratchet": Ratchet, "flood": Flood,
                  "replay": Replay, "honest_extra": HonestExtra}


def run_attacker(kind: str, join_args: list[str]) -> None:
    """``--as-attacker KIND join ...``: a ``heloco-peer join`` whose submissions go through KIND."""
    from heloco_p2p.cli import main
    from heloco_p2p.peer import Peer
    from heloco_p2p.roles.submit import SubmitClient

    seed = sum(map(ord, "".join(join_args)))
    original = SubmitClient.submit

    def submit(self, seq, delta, base, stats, expected, *rest, **kw):
        out = original(self, seq, delta, base, stats, expected, *rest, **kw)
        self.last_outcome = out
        return out

    SubmitClient.submit = submit

    def _submit(self, delta, base, stats, compute):
        attack = self.__dict__.get("_attack")
        if attack is None:
            attack = self._attack = ATTACK_CLASSES[kind](self, seed)
        if kind == "flood":
            attack.latest = (delta, base, stats)
            if getattr(self, "_flooder", None) is None:
                self._flooder = threading.Thread(target=_flood, args=(self, attack, original), daemon=True)
                self._flooder.start()
            return  # the flood thread sends; the rounds only supply fresh Δs
        sent = attack.make(delta)
        if kind == "sign_flip_lie":
            self.submitter.region = LIE_REGION
        Peer._honest_submit(self, sent, base, stats, compute)
        out = getattr(self.submitter, "last_outcome", None)
        if out is not None:
            attack.log(out, sent)
            attack.learn(out)
            if kind == "replay" and attack.kept is None and out.status == "accepted":
                attack.kept = [d.clone() for d in delta]

    Peer._honest_submit = Peer._submit
    Peer._submit = _submit
    sys.argv = ["heloco-peer", *join_args]
    main()


def _flood(peer, attack: Flood, original) -> None:
    """Back to back at the rate limit: every submission a new sequence number and fresh noise."""
    import torch

    rate = peer.cfg.swarm.submit_rate or 2.0
    seq = peer.tally.seq + 10**9  # above the training thread's: its own submissions become duplicates
    version = peer.version
    while not peer.stop_event.is_set():
        t0 = time.time()
        delta, base, stats = attack.latest
        sent = attack.make(delta)
        expected = [(tuple(p.shape), torch.float32) for p in peer.global_params]
        out = original(peer.submitter, seq, sent, max(base, version, peer.version), stats, expected)
        seq += 1
        if "version" in out.reply:
            version = int(out.reply["version"])
        attack.log(out, sent)
        attack.learn(out)
        peer.stop_event.wait(max(0.0, 1.0 / rate - (time.time() - t0)))


# ------------------------------------------------------------------------------------ one run
def _names(sw) -> dict[str, str]:
    return sw.peer_names()


def one_run(attack: str | None, defence: bool, args, out: Path) -> dict:
    import yaml

    from heloco_p2p.tools.testnet import PeerProfile, load_profiles, run_testnet

    honest = load_profiles(args.peers)
    attackers = []
    if attack:
        n = 2 if attack == "sybil" else 1
        attackers = [PeerProfile(name=f"mallory{i}", region=ATTACKER_REGION, speed=1.0, device="cpu",
                                 batch_size=honest[0].batch_size) for i in range(n)]
    kind = "sign_flip" if attack == "sybil" else attack
    tree = yaml.safe_load(Path(args.config).read_text())
    tree.setdefault("swarm", {}).setdefault("defence", {})["enabled"] = defence
    for item in args.set:  # --set swarm.defence.replay_cosine=0.999
        key, _, value = item.partition("=")
        node = tree
        for part in key.split(".")[:-1]:
            node = node.setdefault(part, {})
        node[key.split(".")[-1]] = yaml.safe_load(value)
    out.mkdir(parents=True, exist_ok=True)
    config = out / "run-config.yaml"
    config.write_text(yaml.safe_dump(tree))
    entry = {a.name: [str(Path(__file__).resolve()), "--as-attacker", kind] for a in attackers}
    names = [p.name for p in honest]

    def done(sw) -> bool:
        return all(len(sw.events(n, "round")) >= args.rounds for n in names)

    t0 = time.time()
    summary = run_testnet(honest + attackers, str(config), minutes=args.max_minutes, out=out,
                          run_id=f"poison-{uuid.uuid4().hex[:6]}", live=False, eval_every=1e9, entry=entry,
                          until=done)
    from heloco_p2p.tools.launcher import LocalSwarm

    sw = LocalSwarm(out / "peers", "x")
    for p in honest + attackers:
        sw.procs[p.name] = None
    ids = _names(sw)
    commits = {}
    for c in sw.all_events("commit"):
        commits[(c["term"], c["version"])] = c
    # the run's chain: the latest term's commit at each version
    chain = {}
    for (_term, version), c in sorted(commits.items()):
        chain[version] = c
    attacker_ids = {i for i, n in ids.items() if n.startswith("mallory")}
    by_attacker = sum(1 for c in chain.values() if c["peer"] in attacker_ids)
    honest_acks = sum(1 for n in names for a in sw.events(n, "ack") if not a.get("duplicate"))
    honest_refused = [r for n in names for r in sw.events(n, "rejected")]
    resends = sum(max(0, a.get("attempts", 1) - 1) for n in names for a in sw.events(n, "ack"))
    attack_events = [e for a in attackers for e in sw.events(a.name, "attack")]
    screen_ms = [1e3 * c["screen"]["seconds"] for c in chain.values() if c.get("screen")]
    screens = [c["screen"] for c in chain.values() if c.get("screen") and c["peer"] not in attacker_ids]
    end, start = summary["val_loss"]["end"], summary["val_loss"]["start"]
    honest_regions = {p.region for p in honest}
    per = {r: v for r, v in end["per_language"].items() if r in honest_regions}
    norms = [c["norm"] for c in chain.values()]
    rec = {
        "attack": attack or "clean", "defence": defence, "rounds": args.rounds, "wall_seconds": time.time() - t0,
        "commits": len(chain), "attacker_commits": by_attacker,
        "attacker_share": by_attacker / max(1, len(chain)),
        "attacker_submissions": len(attack_events),
        "attacker_accepted": sum(1 for e in attack_events if e["status"] == "accepted" and not e["duplicate"]),
        "attacker_reasons": _count(e.get("reason") or e["status"] for e in attack_events),
        "final_version": end["version"], "mean_loss": statistics.fmean(per.values()) if per else math.nan,
        "worst_loss": max(per.values()) if per else math.nan, "per_language": per,
        "untrained_mean": start["mean"], "untrained_per_language": start["per_language"],
        "honest_submissions": honest_acks + len(honest_refused), "honest_refused": len(honest_refused),
        "honest_refused_reasons": _count(r.get("reason") for r in honest_refused),
        "honest_resends": resends,
        "screen_ms_median": statistics.median(screen_ms) if screen_ms else None,
        "screen_honest_own_max": max((s["own"] for s in screens if s.get("own") is not None), default=None),
        "screen_honest_mean_max": max((s["mean"] for s in screens), default=None),
        "max_norm": max(norms) if norms else None,
        "honest_rounds": {n: len(sw.events(n, "round")) for n in names},
        "out": str(out), "settings": list(args.set),
    }
    rec["honest_refused_pct"] = 100.0 * rec["honest_refused"] / max(1, rec["honest_submissions"])
    return rec


def _count(items) -> dict:
    out: dict = {}
    for x in items:
        out[str(x)] = out.get(str(x), 0) + 1
    return out


# ------------------------------------------------------------------------------------ the report
def _f(x, spec=".2f") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def render(results: dict) -> str:
    """The section: the current series first (its command, clean runs, table, refusals and the
    reading), then every earlier series and variant, folded."""
    runs, meta = results["runs"], results["meta"]
    invocations = results.get("invocations") or [meta]
    for r in runs:
        r.setdefault("tree", invocations[0]["tree"])
    groups: dict[tuple, list] = {}  # runs are compared with the clean runs of the same settings
    for r in runs:
        groups.setdefault(_settings(r), []).append(r)
    clean_means = {k: statistics.fmean(r["mean_loss"] for r in rs if r["attack"] == "clean")
                   for k, rs in groups.items() if any(r["attack"] == "clean" for r in rs)}
    clean = [r for r in runs if r["attack"] == "clean"]
    current = results.get("current")
    now = [r for r in runs if current and r.get("compare") == current and not r.get("settings")]
    earlier = [r for r in runs if r not in now]

    def measured(m: dict) -> list[str]:
        return [f"Measured {m['date']} on {m['machine']} (load average {m['load']} at the start; "
                f"tree {m['tree']}):", "", "```", m["command"], "```", ""]

    def clean_lines(keys) -> list[str]:
        out = []
        for key in keys:
            cl = [r for r in groups[key] if r["attack"] == "clean"]
            if cl:
                means = [r["mean_loss"] for r in cl]
                out += [f"Clean runs, settings {_settings_text(key)} ({len(cl)}): mean loss "
                        + ", ".join(_f(m) for m in means) + f" (spread {_f(max(means) - min(means))}); "
                        + "worst language " + ", ".join(_f(r["worst_loss"]) for r in cl) + ".", ""]
        return out

    def reasons(rs) -> str:
        return "Refusal reasons of the attackers' submissions, per run: " + "; ".join(
            f"{r['attack']}/{'on' if r['defence'] else 'off'}: "
            + ", ".join(f"{k} {v}" for k, v in sorted(r['attacker_reasons'].items())) for r in rs if r["attack"] != "clean")

    header = ["| attack | defence | settings | tree | attacker commits (share) | attacker submissions accepted | "
              "mean loss (Δ vs clean) | worst language | honest refused | honest resends | screen ms | loss target |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    cast = [f"The cast: the 4 honest peers of peers/*.yaml (de, es, fr, ru at speeds 1, 0.4, 0.6, 0.25) plus the "
            f"attacker(s) (region {ATTACKER_REGION}, speed 1), configs/testnet.yaml, an open run; each run stops "
            f"once every honest peer trained its rounds (8 unless the settings say otherwise). Loss: the final θ on "
            f"the validation blocks of the 4 honest languages (mean, and the worst language); untrained: "
            f"{_f(clean[0]['untrained_mean'] if clean else None)}. Settings: the `--set` overrides of "
            f"configs/testnet.yaml a run had (– none); each run is compared with the clean runs of its settings.", "",
            "Target (per run): mean loss within 0.3 nats of the clean runs' mean and below the untrained loss on "
            "every language; under 2% of the honest submissions refused is a rate over a series. Honest resends: "
            "submissions resent after `busy`/`rate_limited` or a lost reply (the client's attempts − 1); the "
            "commit-share rule answers `busy`. Screen ms: the loss screen's median time per screened commit at the "
            "coordinator, on this loaded machine.", ""]
    lines: list[str] = []
    reading = results.get("reading") or ""
    if now:
        last = [m for m in invocations if m.get("tree") == now[0]["tree"]] or [meta]
        lines += [f"**The current defaults** (series `{current}`).", ""] + measured(last[-1]) + cast
        lines += clean_lines([_settings(now[0])]) + header + [_row(r, clean_means) for r in now]
        lines += ["", refusal_line(now, f"the series `{current}`"), "", reasons(now), ""]
        head, sep, rest = reading.partition("**Earlier readings.**")
        lines += [head.strip(), ""] if head.strip() else []
        reading = (sep + rest).strip()
        lines += ["<details><summary>Every earlier series and variant (each against the clean runs of its own "
                  "settings and length)</summary>", ""]
    else:
        lines += cast
    lines += [x for m in invocations if not now or m is not last[-1] for x in measured(m)]
    lines += clean_lines([k for k in groups if not now or k != _settings(now[0])])
    lines += header + [_row(r, clean_means) for r in earlier]
    lines += ["", refusal_line(runs, "every run with the defence on"), "", reasons(earlier)]
    if reading:
        lines += ["", reading]
    if now:
        lines += ["", "</details>"]
    return "\n".join(lines)


def _row(r: dict, clean_means: dict) -> str:
    clean_mean = clean_means.get(_settings(r), math.nan)
    delta = r["mean_loss"] - clean_mean
    met = "control" if r["attack"] == "honest_extra" else "met" if target_met(r, clean_mean) else "missed"
    return (f"| {r['attack']} | {'on' if r['defence'] else 'off'} | {_settings_text(_settings(r))} | "
            f"{r['tree'][:7]} | {r['attacker_commits']} of {r['commits']} "
            f"({100 * r['attacker_share']:.0f}%) | {r['attacker_accepted']} of {r['attacker_submissions']} | "
            f"{_f(r['mean_loss'])} ({_f(delta, '+.2f')}) | {_f(r['worst_loss'])} | "
            f"{r['honest_refused']} of {r['honest_submissions']} ({r['honest_refused_pct']:.1f}%) | "
            f"{r['honest_resends']} | {_f(r['screen_ms_median'], '.1f')} | {met} |")


def _settings(r: dict) -> tuple:
    """The group a run is compared in: its --set overrides, and ``compare`` where the code under
    test changed between series (the tree it was measured on)."""
    length = () if r.get("rounds", 8) == 8 else (f"{r['rounds']} rounds",)  # 8: every series before 2026-12-02
    return tuple(sorted(r.get("settings") or ())) + length + ((f"tree {r['compare']}",) if r.get("compare") else ())


def _settings_text(key: tuple) -> str:
    return ", ".join(k if k.startswith("tree ") or k.endswith(" rounds") else f"`{k}`" for k in key) if key else "–"


def target_met(r: dict, clean_mean: float) -> bool:
    """The loss target of one run: within 0.3 nats of the clean mean and below untrained on every
    language. The honest-refusal target (< 2%) is a rate over a series (``refusal_line``): with
    ~45 honest submissions a run, one refusal is already 2.2%."""
    below = all(v < r["untrained_per_language"].get(k, math.inf) for k, v in r["per_language"].items())
    return bool(r["mean_loss"] <= clean_mean + 0.3 and below)


def refusal_line(runs: list, what: str) -> str:
    on = [r for r in runs if r["defence"]]
    refused, submitted = sum(r["honest_refused"] for r in on), sum(r["honest_submissions"] for r in on)
    pct = 100 * refused / max(1, submitted)
    reasons: dict = {}
    for r in on:
        for k, v in r.get("honest_refused_reasons", {}).items():
            reasons[k] = reasons.get(k, 0) + v
    why = (" (" + ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) + ")") if reasons else ""
    return (f"Honest submissions refused over {what}: {refused} of {submitted} ({pct:.1f}%){why}; target < 2%: "
            f"{'met' if pct < 2.0 else 'missed'}.")


def _tree() -> str:
    if os.environ.get("POISON_TREE"):  # a run from a snapshot of the tree (not a git checkout)
        return os.environ["POISON_TREE"]
    from heloco_p2p.tools.report import git_tree  # loaded by the measurement only, as the others here
    return git_tree(ROOT)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--as-attacker":
        run_attacker(sys.argv[2], sys.argv[3:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attack", action="append", default=[], choices=ATTACKS + ("all",),
                    help="an attack (repeatable), or all")
    ap.add_argument("--defence", choices=("on", "off", "both"), default="both")
    ap.add_argument("--rounds", type=int, default=10, help="rounds every honest peer trains")
    ap.add_argument("--clean-runs", type=int, default=1, help="runs without attacker (defence on)")
    ap.add_argument("--clean-off", action="store_true", help="also a clean run with the defence off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=15.0, help="a run stops after this long in any case")
    ap.add_argument("--peers", default=str(ROOT / "peers" / "*.yaml"))
    ap.add_argument("--config", default=str(ROOT / "configs" / "testnet.yaml"))
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "poison")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for the run (repeatable), e.g. swarm.defence.share_factor=1.5")
    ap.add_argument("--compare", default=None, metavar="LABEL",
                    help="compare these runs only with clean runs of the same label (the code or its defaults changed "
                         "since the earlier series in --json); the section shows this series first")
    ap.add_argument("--json", type=Path, default=None, help="write the results here (and read earlier ones to extend)")
    ap.add_argument("--write-results", action="store_true", help="the section of docs/reliability.md")
    ap.add_argument("--render-only", action="store_true", help="rewrite the section from --json, no runs")
    args = ap.parse_args()
    attacks = list(ATTACKS) if "all" in args.attack else args.attack
    defences = {"on": [True], "off": [False], "both": [True, False]}[args.defence]
    command = "python scripts/poison.py " + shlex.join(sys.argv[1:])
    results = {"runs": []}
    if args.json and args.json.exists():
        results = json.loads(args.json.read_text())
    if not args.render_only:
        if "meta" in results and not results.get("invocations"):
            results["invocations"] = [results["meta"]]
        results["meta"] = {"date": datetime.date.today().isoformat(), "machine": f"{platform.node()} "
                           f"({os.cpu_count()} CPUs, {platform.machine()})", "load": "%.2f" % os.getloadavg()[0],
                           "tree": _tree(), "command": command, "rounds": args.rounds, "seed": args.seed}
        results.setdefault("invocations", []).append(results["meta"])
        # the first clean run before the attacks, the others after them (the spread covers the series)
        plan = [(None, True)] * min(1, args.clean_runs) + ([(None, False)] if args.clean_off else []) + \
               [(a, d) for a in attacks for d in defences if d or a not in ON_ONLY] + \
               [(None, True)] * max(0, args.clean_runs - 1)
        for i, (attack, defence) in enumerate(plan):
            name = f"{attack or 'clean'}-{'on' if defence else 'off'}-{i}-{uuid.uuid4().hex[:4]}"
            print(f"[{time.strftime('%H:%M:%S')}] run {i + 1}/{len(plan)}: {name}", flush=True)
            rec = one_run(attack, defence, args, args.out / name)
            rec["tree"] = results["meta"]["tree"]
            if args.compare:
                rec["compare"] = args.compare
                results["current"] = args.compare
            results["runs"].append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k not in ("per_language", "untrained_per_language")}),
                  flush=True)
            if args.json:
                args.json.parent.mkdir(parents=True, exist_ok=True)
                args.json.write_text(json.dumps(results, indent=2))
    text = render(results)
    print(text)
    print("\n" + command)
    if args.write_results:
        from heloco_p2p.tools.report import replace_section

        rel = ROOT / "docs" / "reliability.md"
        rel.write_text(replace_section(rel.read_text(), HEADING, text))


if __name__ == "__main__":
    main()
