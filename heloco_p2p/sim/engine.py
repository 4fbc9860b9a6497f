"""A virtual-clock simulator of a heterogeneous swarm (after the HALoS simulator, Kim et al. 2025:
a heap of worker finish times is all it needs).

Worker w's round of H_w inner steps takes ``H_w × step_time × slowness_w + comm_w`` virtual
seconds. The training is real: each worker is the same ``local.InnerTrainer`` a swarm peer runs,
with its own model and inner optimizer state, and every commit goes through the same
``outer.OuterEngine`` the coordinator uses. Rounds run one at a time on this machine, in the
order the virtual clock says they finish.

A worker's model holds the global parameters it started its round from until its finish event is
popped, so running the round lazily at that moment gives exactly what running it at its start
would have: its result depends only on its start parameters, its data and its optimizer state.

Where a round starts is the engine's ``dispatch_params()``: θ, or θ̄ = θ − η·μ·m for a
look-ahead dispatch (HeLoCo). The worker's Δ is measured from that point (Δ = θ̄ − θ_local) and
the engine applies it to θ. The engine, its DyLU and its ρ come from the same factories as the
swarm's (``heloco_p2p.algorithms.build_outer_engine`` / ``build_dylu``), and K, the number of
workers, goes with every commit for weights that need it (``staleness_weight: base``).

Overlapped rounds (``SimSpec.overlap``, asynchronous algorithms only) model a peer that does not
wait for its reply: after its last step it submits and starts the next round at once from its
local θ; the reply (θ right after its commit, ``comm_w`` later) is folded in after the first
``ceil(comm_w / step_w)`` steps of that round (``InnerTrainer.fold_in``), or after the round's
last step, waiting for it, when it comes later than that. The reply is the dispatch point right
after that commit (θ̄ for a look-ahead dispatch), so the folded-in round's Δ is measured from the
point it now stands on, as in a blocking round.

Sharded coordinators (``SimSpec.shards`` = S > 1, or any ``shard_delay``; asynchronous
blocking rounds only), as ``swarm.shards`` in the swarm (docs/protocol.md, "Sharded
coordinators"): the blocks are split by bytes (``roles.shards.ShardPlan``) over S outer engines,
each from the same factory, each with its own version counter v_k. A round's Δ is split into S
parts; part k leaves at the time a whole Δ would be committed without shards, arrives at shard k
after ``latency[w][k]`` plus an exponential jitter (mean ``jitter_s``, drawn from the run's seeded
RNG in event order), crosses the holder's link in ``link_seconds[k]`` (first come first served:
it waits while the link carries an earlier part) and is committed then, with base v0_k = the
shard-k version the round started from, so its staleness is τ_k = v_k − v0_k at that commit.
The reply to part k is shard k's dispatch point right after that commit (at its new v_k) and
arrives ``latency[w][k]`` later; the worker starts its next round when every reply is in, from the
union of the S replies (its H, with DyLU, decided then). Tokens, DyLU's speed, the token-budget
evaluations and the commit record count a round when its last part is committed. With S = 1 and no delays the shard model is the unsharded one
bitwise (tests/test_sim_shards.py); without a ``shard_delay`` (and S = 1) the unsharded loop
runs, as before the model existed.

Data splits: ``non-iid`` (worker w trains on its region's language), ``iid`` (every batch mixes
all languages), ``non-iid-disjoint`` (its language AND a disjoint share of the content: worker w
of n gets the train books b with b's position ≡ w mod n, ``block_streams(region, seed, (w, n))``).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from heloco_p2p.algorithms import AlgorithmPreset, build_dylu, build_outer_engine
from heloco_p2p.config import RunConfig
from heloco_p2p.local import InnerTrainer, build_model, evaluate_regions
from heloco_p2p.local.model import param_names, trainable_params

logger = logging.getLogger(__name__)


@dataclass
class SimSpec:
    """One simulated run. ``slowness[w]`` is worker w's relative step time (1 = the fastest)."""

    algorithm: AlgorithmPreset
    lr: float
    heterogeneity: str
    slowness: list[float]
    data: str  # "non-iid" | "iid" | "non-iid-disjoint"
    seed: int
    steps_per_round: int
    step_time: float  # virtual seconds per inner step at slowness 1
    comm_seconds: list[float]  # per worker, per round (2 × model bytes / bandwidth)
    token_budget: int
    time_budget: float
    eval_points: int = 5  # evaluations along each budget axis
    overlap: bool = False  # overlapped rounds (see the module docstring)
    # Δ on the wire: None (fp32, exact) or a sim.config.UplinkConfig as a dict (see Simulation._send)
    uplink: dict | None = None
    shards: int = 1  # S shard coordinators (the module docstring)
    # None (S = 1: the unsharded loop; S > 1: parts arrive at once), or {"latency_s": [[S values] per worker],
    # "jitter_s": mean of the exponential extra delay, "link_seconds": [S values] or None}
    shard_delay: dict | None = None

    @property
    def run_id(self) -> str:
        return f"{self.algorithm.name}|{self.heterogeneity}|{self.data}|seed{self.seed}|lr{self.lr:g}"


@dataclass
class Worker:
    index: int
    region: str  # the worker's language ("mix" for IID)
    slowness: float
    trainer: InnerTrainer
    steps: int = 0  # H for the round in flight
    base_version: int = 0
    rounds: int = 0
    tokens: int = 0
    staleness: list[int] = field(default_factory=list)
    # overlapped rounds: θ and version of the reply to fold into the round in flight, and when that round ends
    fold_params: list[torch.Tensor] | None = None
    fold_version: int = 0
    round_end: float = 0.0
    uplink: object | None = None  # swarm.uplink.Uplink: the worker's sender and its residual
    # the shard model: per shard, the base version of the round in flight, the latest reply
    # (dispatch point, version), the staleness of each committed part; the round in flight
    shard_base: list[int] = field(default_factory=list)
    replies: list[tuple[list[torch.Tensor], int]] = field(default_factory=list)
    shard_staleness: list[list[int]] = field(default_factory=list)
    flight: dict | None = None


@dataclass
class SimResult:
    spec: SimSpec
    at_tokens: dict  # {"tokens", "virtual_seconds", "val_loss": {...}} at the token budget
    at_time: dict  # the same at the virtual-time budget
    curve: list[dict]  # evaluations along the way
    commits: list[dict]  # one per commit: time, worker, staleness, branches, cosine
    workers: list[dict]  # per worker: region, slowness, rounds, tokens, staleness_mean


def mixture_batches(streams: list[Iterator[torch.Tensor]], batch_size: int, offset: int) -> Iterator[torch.Tensor]:
    """IID control: each batch takes its blocks from every language in turn (starting at ``offset``
    so workers do not all start on the same language)."""
    i = offset
    while True:
        rows = []
        for _ in range(batch_size):
            rows.append(next(streams[i % len(streams)]))
            i += 1
        yield torch.stack(rows)


class ShardedEngine:
    """S outer engines over the blocks of a ``ShardPlan`` (the coordinators of the shard model).
    ``params`` is θ in ``trainable_params`` order (the engines' live tensors), ``version`` the
    lowest shard version, ``versions`` all of them."""

    def __init__(self, engines: list, plan):
        self.engines, self.plan = engines, plan

    @property
    def params(self) -> list[torch.Tensor]:
        return self.plan.merge([e.params for e in self.engines])

    @property
    def version(self) -> int:
        return min(e.version for e in self.engines)

    @property
    def versions(self) -> list[int]:
        return [e.version for e in self.engines]

    def dispatch_params(self) -> list[torch.Tensor]:
        return self.plan.merge([e.dispatch_params() for e in self.engines])

    def reply(self, k: int) -> tuple[list[torch.Tensor], int]:
        """Shard k's reply now: its dispatch point (a copy) and its version."""
        e = self.engines[k]
        return [p.detach().clone() for p in e.dispatch_params()], e.version


class Simulation:
    """Runs one ``SimSpec``. ``block_streams(region, seed)`` gives an endless iterator of token
    blocks of one language (``block_streams(region, seed, (w, n))``: of share w of n of its
    content, for ``non-iid-disjoint``); ``val_blocks`` maps every language to its fixed
    validation blocks."""

    def __init__(self, cfg: RunConfig, spec: SimSpec, regions: list[str],
                 block_streams: Callable[[str, int], Iterator[torch.Tensor]],
                 val_blocks: dict[str, torch.Tensor], tokenizer=None):
        if len(spec.slowness) != len(regions):
            raise ValueError(f"heterogeneity {spec.heterogeneity!r} has {len(spec.slowness)} speeds for {len(regions)} workers")
        self.cfg, self.spec, self.val_blocks = cfg, spec, val_blocks
        batch = cfg.inner.batch_size
        self.workers: list[Worker] = []
        for w, (region, slow) in enumerate(zip(regions, spec.slowness)):
            seed = spec.seed * 1000 + w
            if spec.data == "iid":
                streams = [block_streams(r, seed) for r in regions]
                batches, label = mixture_batches(streams, batch, offset=w), "mix"
            elif spec.data == "non-iid-disjoint":
                batches, label = _batched(block_streams(region, seed, (w, len(regions))), batch), region
            else:
                batches, label = _batched(block_streams(region, seed), batch), region
            model = build_model(cfg.model, tokenizer, seed=spec.seed)  # every worker starts from θ_0
            self.workers.append(Worker(w, label, slow, InnerTrainer(model, cfg.inner, batches)))
        self.eval_model = build_model(cfg.model, tokenizer, seed=spec.seed)
        theta0 = [p.detach().clone() for p in trainable_params(self.eval_model)]
        self.num_workers = len(regions)  # K: fixed in a simulation
        names = param_names(self.eval_model)
        self.sharded = spec.shards > 1 or spec.shard_delay is not None
        if self.sharded:
            from heloco_p2p.swarm.shard_plan import ShardPlan

            if spec.algorithm.mode != "async" or spec.overlap:
                raise ValueError(f"{spec.algorithm.name}: shards are modelled for asynchronous blocking rounds only")
            plan = ShardPlan.for_shapes([tuple(t.shape) for t in theta0], spec.shards)
            self.engine = ShardedEngine([build_outer_engine(spec.algorithm, part, names=n, num_workers=self.num_workers,
                                                            lr=spec.lr)
                                         for part, n in zip(plan.split(theta0), plan.split(names))], plan)
            self._tau = [[0, 0, 0] for _ in range(spec.shards)]  # per shard: parts, sum and max of τ_k
        else:
            self.engine = build_outer_engine(spec.algorithm, theta0, names=names,
                                             num_workers=self.num_workers, lr=spec.lr)
        self.dylu = build_dylu(spec.algorithm)
        self.now, self.tokens = 0.0, 0
        self.curve: list[dict] = []
        self.commits: list[dict] = []
        if spec.uplink is not None:
            from heloco_p2p.swarm.sparse import TopkCodec
            from heloco_p2p.swarm.uplink import Uplink

            u = spec.uplink
            codec = TopkCodec(u["density"], u["bits"], u["chunk"]) if u["compression"] == "topk" else None
            for w in self.workers:
                w.uplink = Uplink(u["compression"], codec, error_feedback=u.get("error_feedback", True))
        self._layout = [(tuple(t.shape), torch.float32) for t in theta0]
        self._tok_marks = [spec.token_budget * (k + 1) / spec.eval_points for k in range(spec.eval_points)]
        self._time_marks = [spec.time_budget * (k + 1) / spec.eval_points for k in range(spec.eval_points)]
        self.at_tokens: dict | None = None
        self.at_time: dict | None = None

    # -- bookkeeping --------------------------------------------------------------------------
    def _round_seconds(self, w: Worker, steps: int) -> float:
        return steps * self.spec.step_time * w.slowness + self.spec.comm_seconds[w.index]

    def _evaluate(self, at_time: float) -> dict:
        with torch.no_grad():
            for p, g in zip(trainable_params(self.eval_model), self.engine.params):
                p.copy_(g)
        val = evaluate_regions(self.eval_model, self.val_blocks, batch_size=self.cfg.inner.batch_size)
        point = {"tokens": self.tokens, "virtual_seconds": at_time, "version": self.engine.version, "val_loss": val}
        if self.sharded:  # each shard's version, and its parts' staleness so far
            point["shard_versions"] = self.engine.versions
            point["shard_staleness"] = {"mean": [s / n if n else 0.0 for n, s, _ in self._tau],
                                        "max": [m for _, _, m in self._tau]}
        self.curve.append(point)
        return point

    def _evaluate_time_marks(self, until: float) -> None:
        """θ is constant between commits: evaluate every time mark passed before ``until``."""
        while self._time_marks and self._time_marks[0] <= until:
            mark = self._time_marks.pop(0)
            point = self._evaluate(mark)
            if not self._time_marks:
                self.at_time = point

    def _evaluate_token_marks(self) -> None:
        evaluated = False
        while self._tok_marks and self._tok_marks[0] <= self.tokens:
            self._tok_marks.pop(0)
            if not evaluated:
                point = self._evaluate(self.now)
                evaluated = True
            if not self._tok_marks:
                self.at_tokens = point

    def _done(self) -> bool:
        return self.at_tokens is not None and self.at_time is not None

    def _record(self, w: Worker, info, stats, bits: float | None = None) -> None:
        w.rounds += 1
        w.tokens += stats.tokens
        w.staleness.append(info.staleness)
        summary = info.summary()
        self.commits.append({"t": self.now, "worker": w.index, "region": w.region, "staleness": info.staleness,
                             "version": info.version, "steps": stats.steps, "loss": stats.loss,
                             "branches": summary["branches"], "cosine": summary["mean_cosine"],
                             "fairness_weight": summary["fairness_weight"],
                             "staleness_weight": summary["staleness_weight"]})
        if bits is not None:  # the uplink's payload (tensor blobs) per parameter, and the residual left
            self.commits[-1].update(uplink_bits_per_param=bits, residual_norm=w.uplink.residual_norm())

    def _send(self, w: Worker, delta: list[torch.Tensor]) -> tuple[list[torch.Tensor], float | None]:
        """Δ as the coordinator decodes it from w's uplink (the wire's own encoder and decoder),
        and its bits per parameter; w keeps its error-feedback residual (every commit applies)."""
        if w.uplink is None:
            return delta, None
        from heloco_p2p.swarm.wire import decode_tensors

        enc = w.uplink.prepare(delta)
        w.uplink.settle(True)
        sent = decode_tensors(enc.meta, enc.payload, self._layout)
        return sent, 8 * len(enc.payload) / sum(t.numel() for t in sent)

    def _start(self, w: Worker) -> float:
        """Worker w starts a round from the current dispatch point; returns its finish time."""
        w.trainer.load_params(self.engine.dispatch_params())
        w.base_version = self.engine.version
        H = self.spec.steps_per_round
        w.steps = self.dylu.steps_for(w.index, H) if self.dylu is not None else H
        return self.now + self._round_seconds(w, w.steps)

    # -- the two modes ------------------------------------------------------------------------
    def run(self) -> SimResult:
        torch.manual_seed(self.spec.seed)
        if self.dylu is not None:  # speeds are known to the coordinator from the first round on
            for w in self.workers:
                self.dylu.update(w.index, 1.0 / (self.spec.step_time * w.slowness))
        if self.spec.overlap and self.spec.algorithm.mode == "sync":
            raise ValueError(f"{self.spec.algorithm.name}: overlapped rounds are modelled for asynchronous algorithms only")
        (self._run_async_sharded if self.sharded else self._run_sync if self.spec.algorithm.mode == "sync" else
         self._run_async_overlapped if self.spec.overlap else self._run_async)()
        workers = [{"worker": w.index, "region": w.region, "slowness": w.slowness, "rounds": w.rounds,
                    "tokens": w.tokens, "staleness_mean": (sum(w.staleness) / len(w.staleness)) if w.staleness else 0.0}
                   for w in self.workers]
        if self.sharded:
            for d, w in zip(workers, self.workers):
                per = list(zip(*w.shard_staleness)) if w.shard_staleness else [()] * self.spec.shards
                d["shard_staleness_mean"] = [sum(p) / len(p) if p else 0.0 for p in per]
                d["shard_staleness_max"] = [max(p, default=0) for p in per]
        return SimResult(self.spec, self.at_tokens, self.at_time, self.curve, self.commits, workers)

    def _run_async(self) -> None:
        def after_commit(w: Worker, stats) -> None:
            if self.dylu is not None:
                compute = self._round_seconds(w, stats.steps) - self.spec.comm_seconds[w.index]
                self.dylu.update(w.index, stats.steps / compute)

        self._async_events(lambda w, first: self._start(w),
                           lambda w: (w.trainer.run_round(None, w.steps), w.base_version), after_commit)

    def _async_events(self, start, run_round, after_commit) -> None:
        """The asynchronous event loop both modes share: pop the next finishing worker, run its
        round (``run_round(w) -> ((Δ, stats), base version)``), commit, record, and schedule its
        next round (``start(w, first) -> finish time``)."""
        heap = [(start(w, True), w.index) for w in self.workers]
        heapq.heapify(heap)
        while not self._done():
            t, idx = heapq.heappop(heap)
            self._evaluate_time_marks(until=t)
            if self._done():
                break
            self.now = t
            w = self.workers[idx]
            (pseudo_grad, stats), base = run_round(w)
            pseudo_grad, bits = self._send(w, pseudo_grad)
            info = self.engine.commit(pseudo_grad, base, worker=str(w.index), seconds=self._round_seconds(w, stats.steps),
                                      num_workers=self.num_workers)
            self.tokens += stats.tokens
            self._record(w, info, stats, bits)
            after_commit(w, stats)
            self._evaluate_token_marks()
            heapq.heappush(heap, (start(w, False), idx))

    def _run_sync(self) -> None:
        while not self._done():
            finish = max(self._start(w) for w in self.workers)
            self._evaluate_time_marks(until=finish)
            if self._done():
                break
            self.now = finish
            results = [w.trainer.run_round(None, w.steps) for w in self.workers]
            sent = [self._send(w, d) for w, (d, _) in zip(self.workers, results)]
            info = self.engine.sync_commit([d for d, _ in sent], self.engine.version, num_workers=self.num_workers)
            for w, (_, stats), (_, bits) in zip(self.workers, results, sent):
                self.tokens += stats.tokens
                self._record(w, info, stats, bits)
            self._evaluate_token_marks()


    # -- the shard model ------------------------------------------------------------------------
    def _start_sharded(self, w: Worker, at: float) -> float:
        """Worker w starts a round at ``at`` from the union of its latest replies; returns when
        its parts leave (its compute and ``comm_w``, as an unsharded round's commit time)."""
        w.trainer.load_params(self.engine.plan.merge([params for params, _ in w.replies]))
        w.shard_base = [v for _, v in w.replies]
        H = self.spec.steps_per_round
        w.steps = self.dylu.steps_for(w.index, H) if self.dylu is not None else H
        return at + self._round_seconds(w, w.steps)

    def _run_async_sharded(self) -> None:
        """The event loop of the shard model (module docstring). Events: ``send`` (a round's
        parts leave; the round is computed then), ``arrive`` (part k reaches its holder's link),
        ``commit`` (part k has crossed it and is committed), ``start`` (the last reply is in; a
        round whose replies are in at once starts in its last commit's event). Ties in time go
        in the order the events were made (a counter), so S = 1 without delays commits as the
        unsharded loop."""
        S = self.spec.shards
        delay = self.spec.shard_delay or {}
        latency = delay.get("latency_s") or [[0.0] * S for _ in self.workers]
        jitter = float(delay.get("jitter_s") or 0.0)
        link = delay.get("link_seconds")
        rng = random.Random(self.spec.seed)  # the delays' own stream: training never draws from it
        free = [-math.inf] * S  # when each holder's link has carried its last part
        heap: list = []
        order = itertools.count()

        def push(t: float, kind: str, w: int, k: int = -1) -> None:
            heapq.heappush(heap, (t, next(order), kind, w, k))

        for w in self.workers:
            w.replies = [self.engine.reply(k) for k in range(S)]
            push(self._start_sharded(w, 0.0), "send", w.index)
        while not self._done():
            t, _, kind, idx, k = heapq.heappop(heap)
            self._evaluate_time_marks(until=t)
            if self._done():
                break
            self.now = t
            w = self.workers[idx]
            if kind == "send":
                delta, stats = w.trainer.run_round(None, w.steps)
                delta, bits = self._send(w, delta)
                w.flight = {"stats": stats, "bits": bits, "parts": self.engine.plan.split(delta),
                            "infos": [None] * S, "t": [0.0] * S, "left": S}
                for j in range(S):
                    extra = rng.expovariate(1.0 / jitter) if jitter > 0 else 0.0
                    push(t + latency[idx][j] + extra, "arrive", idx, j)
            elif kind == "arrive":
                if link is None:
                    push(t, "commit", idx, k)
                else:  # first come first served on the holder's link
                    free[k] = max(t, free[k]) + link[k]
                    push(free[k], "commit", idx, k)
            elif kind == "start":
                push(self._start_sharded(w, t), "send", idx)
            else:
                self._commit_part(w, k)
                if w.flight["left"] == 0:
                    at = max(tk + lat for tk, lat in zip(w.flight["t"], latency[idx]))  # the last reply is in
                    self._round_done(w)
                    if at > t:
                        push(at, "start", idx)
                    else:
                        push(self._start_sharded(w, t), "send", idx)

    def _commit_part(self, w: Worker, k: int) -> None:
        f, engine = w.flight, self.engine.engines[k]
        stats = f["stats"]
        info = engine.commit(f["parts"][k], w.shard_base[k], worker=str(w.index),
                             seconds=self._round_seconds(w, stats.steps), num_workers=self.num_workers)
        f["parts"][k] = None
        f["infos"][k], f["t"][k] = info, self.now
        w.replies[k] = self.engine.reply(k)  # θ̄ of shard k right after this commit, at its new version
        tau = self._tau[k]
        tau[0], tau[1], tau[2] = tau[0] + 1, tau[1] + info.staleness, max(tau[2], info.staleness)
        f["left"] -= 1

    def _round_done(self, w: Worker) -> None:
        """Every part of w's round is committed: count it, record it, update DyLU."""
        f = w.flight
        stats, infos, plan = f["stats"], f["infos"], self.engine.plan
        taus = [i.staleness for i in infos]
        w.rounds += 1
        w.tokens += stats.tokens
        w.staleness.append(max(taus))
        w.shard_staleness.append(taus)
        self.tokens += stats.tokens
        cosines = [c for c in plan.merge([i.cosines for i in infos]) if c is not None]  # in block order, as one commit
        cosine = sum(cosines) / len(cosines) if cosines else None
        fair = [i.fairness_weight for i in infos]
        rho = [i.staleness_weight for i in infos]
        self.commits.append({"t": self.now, "worker": w.index, "region": w.region, "staleness": max(taus),
                             "version": min(i.version for i in infos), "steps": stats.steps, "loss": stats.loss,
                             "branches": dict(sorted(Counter(plan.merge([i.branches for i in infos])).items())),
                             "cosine": _finite(cosine), "fairness_weight": _finite(sum(fair) / len(fair)),
                             "staleness_weight": _finite(sum(rho) / len(rho)),
                             "shard_staleness": taus, "shard_version": [i.version for i in infos],
                             "shard_t": list(f["t"]), "shard_fairness_weight": [_finite(x) for x in fair]})
        if f["bits"] is not None:
            self.commits[-1].update(uplink_bits_per_param=f["bits"], residual_norm=w.uplink.residual_norm())
        if self.dylu is not None:
            compute = self._round_seconds(w, stats.steps) - self.spec.comm_seconds[w.index]
            self.dylu.update(w.index, stats.steps / compute)
        w.flight = None
        self._evaluate_token_marks()

    # -- overlapped rounds ----------------------------------------------------------------------
    def _start_overlapped(self, w: Worker, at: float) -> float:
        """Worker w starts a round at ``at`` from its local θ; returns when its Δ is committed.
        The round ends after its steps, or when the previous reply arrives if that is later."""
        H = self.spec.steps_per_round
        w.steps = self.dylu.steps_for(w.index, H) if self.dylu is not None else H
        comm = self.spec.comm_seconds[w.index]
        compute = self._round_seconds(w, w.steps) - comm
        w.round_end = at + (max(compute, comm) if w.fold_params is not None else compute)
        return w.round_end + comm

    def _run_overlapped_round(self, w: Worker):
        """Compute w's round lazily: steps from its local θ, the previous reply folded in after
        ``ceil(comm / step time)`` of them (all of them, then a wait, if the reply comes later)."""
        if w.fold_params is None:  # the first round starts from the global θ it was given
            return w.trainer.run_round(None, w.steps), w.base_version
        step = self.spec.step_time * w.slowness
        k = min(w.steps, math.ceil(self.spec.comm_seconds[w.index] / step - 1e-9))
        if k == 0:  # free communication: the reply is there before the first step (blocking mode exactly)
            return w.trainer.run_round(w.fold_params, w.steps), w.fold_version
        fold = lambda: w.trainer.fold_in(w.fold_params)  # noqa: E731
        on_step = (lambda i, _loss: fold() if i + 1 == k else None) if k < w.steps else None
        return w.trainer.run_round(None, w.steps, on_step=on_step, before_delta=fold if k >= w.steps else None), \
            w.fold_version

    def _run_async_overlapped(self) -> None:
        for w in self.workers:
            w.trainer.load_params(self.engine.dispatch_params())
            w.base_version = self.engine.version

        def after_commit(w: Worker, stats) -> None:
            # the reply: the dispatch point right after this commit, folded in next round
            w.fold_params = [p.detach().clone() for p in self.engine.dispatch_params()]
            w.fold_version = self.engine.version
            if self.dylu is not None:
                self.dylu.update(w.index, 1.0 / (self.spec.step_time * w.slowness))

        self._async_events(lambda w, first: self._start_overlapped(w, 0.0 if first else w.round_end),
                           self._run_overlapped_round, after_commit)

def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _batched(blocks: Iterator[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    while True:
        yield torch.stack([next(blocks) for _ in range(batch_size)])
