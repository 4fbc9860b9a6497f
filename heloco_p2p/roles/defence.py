"""Bounds on what one participant of an open run can do to the model with plausible-looking
pseudo-gradients (docs/security.md, "Poisoning"). Four rules, checked by ``CommitState.check``
after the value checks and before anything is committed:

1. **Per-peer norm bound** that a peer's own submissions cannot raise: ‖Δ‖ ≤ ``norm_factor`` ×
   the median, over the *other* peers, of each peer's median recent accepted norm (one vote per
   peer identity); and an accepted Δ above ``clip_factor`` × that median is scaled down to it
   (the norm clip: an amplified honest Δ, which improves its sender's language and so passes
   the loss screen, moves θ at most as far as a large honest one; the norm recorded is the
   clipped one, so a peer's vote cannot climb through its own clipped submissions; before enough
   peers vote, the clip's reference is the median of the other peers' recent accepted norms). A ratcheting peer moves only its own vote, which its own bound ignores; k
   identities of one attacker are k votes, which move the median only once they are half of the
   voters. With fewer than ``min_voters`` other peers with history the run-wide rule of
   ``CommitState`` applies (``swarm.norm_factor`` × the median of recent accepted norms, or
   × ‖θ‖ before 5 were accepted).
2. **Commit share tied to observed work**: a peer's commits over the last ``share_window``
   seconds (commit times as the coordinator saw them, never claims) may not exceed
   ``share_factor`` × the median count of the other active peers (at least ``share_min``).
   Over it, the submission is answered ``busy`` with ``retry_after``: an honest sender keeps its
   Δ and resends it (a speed burst costs it a wait, not its round); a flooder is slowed to the
   swarm's pace.
3. **Replay**: a 256-float random-projection sketch (fixed seed) of each accepted Δ is kept for
   the last ``replay_window`` commits; a Δ whose sketch has a cosine above ``replay_cosine`` with
   one of them is refused ``replayed_update``.
4. **Loss screening** (``LossScreen``): the candidate's loss change on a small held-out batch per
   language (validation blocks after those evaluators use): loss at θ − Δ minus loss at θ, on the
   sender's claimed language and as the mean over the languages the coordinator has seen; over
   ``screen_own_margin`` / ``screen_mean_margin``, or when the whole update (θ − Δ) makes the
   sender's own language worse by more than ``screen_full_own_margin``, it is refused
   ``harmful_update``. Only the
   coordinator screens; standbys apply what was committed.

The state the rules keep (per-peer norms, commit times, sketches) is ``DefenceState``: pure and
deterministic (times are passed in), updated in ``CommitState.apply`` from what travels in the
forwarded commit, and saved in ``CommitState.state_dict`` (failover and checkpoints keep it).
Refusals carry a reason code and a message without thresholds; the exact bound is in the
Rejection's ``detail``, for the operator's log.
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

logger = logging.getLogger(__name__)

SKETCH_SEED = 0x5EED_DEF  # fixed: every replica projects the same way
MAX_PEERS = 1024  # peers whose history is kept (the least recently committing are forgotten)
MAX_TIMES = 256  # commit times kept per peer


@dataclass
class DefenceLimits:
    """The knobs (``swarm.defence``; docs/security.md, "Poisoning")."""

    enabled: bool = True
    norm_factor: float = 5.0  # ‖Δ‖ ≤ this × median over other peers of their median recent accepted norm
    clip_factor: float | None = 1.0  # an accepted Δ is scaled down to at most this × the same reference
    norm_window: int = 8  # accepted norms kept per peer
    min_norms: int = 2  # accepted norms a peer needs before it votes
    min_voters: int = 2  # other voting peers needed for the per-peer bound (else the run-wide rule)
    share_factor: float = 2.0  # commits in the window ≤ this × the other active peers' median count
    share_window: float = 120.0  # seconds
    share_min: int = 4  # commits in the window any peer may make whatever the others do
    replay_window: int = 256  # accepted sketches compared against
    replay_cosine: float = 0.999
    sketch_dim: int = 256
    screen: bool = True  # loss screening at the coordinator
    screen_blocks: int = 2  # held-out blocks per language
    screen_tokens: int = 128  # of each block, the first this many tokens
    screen_scale: float = 0.1  # the candidate is scored at θ − screen_scale × Δ
    screen_own_margin: float = 0.05  # nats: loss(θ − sΔ) − loss(θ) on the sender's language may not exceed this
    screen_mean_margin: float = 0.5  # nats: nor, on the mean over languages, this
    # nats: loss(θ − Δ) − loss(θ) on the sender's language (the whole update applied) may not exceed this
    screen_full_own_margin: float | None = None  # off by default (config.DefenceConfig says why)

    @classmethod
    def from_config(cls, cfg) -> "DefenceLimits":
        names = [f for f in cls.__dataclass_fields__ if hasattr(cfg, f)]
        return cls(**{n: getattr(cfg, n) for n in names})


class Sketcher:
    """A linear sketch of a tensor list: ``dim`` sums of ``per_bucket`` coordinates each, drawn with
    replacement over all coordinates and given random signs (fixed seed). Cost: a gather of
    dim × per_bucket values, whatever the model size (65,536 floats by default). Cosines of sketches
    estimate cosines of the full vectors (error about 1/√dim for dense vectors)."""

    def __init__(self, shapes: list[tuple[int, ...]], dim: int = 256, per_bucket: int = 256, seed: int = SKETCH_SEED):
        self.dim, self.per_bucket = dim, per_bucket
        sizes = [math.prod(s) for s in shapes]
        total = sum(sizes)
        g = torch.Generator().manual_seed(seed)
        n = dim * per_bucket
        idx = torch.randint(0, max(1, total), (n,), generator=g)
        self.sign = torch.randint(0, 2, (n,), generator=g).float() * 2 - 1
        self.parts = []  # (tensor index, positions in the sample, coordinates in the tensor)
        offset = 0
        for i, size in enumerate(sizes):
            mask = (idx >= offset) & (idx < offset + size)
            pos = mask.nonzero().flatten()
            if len(pos):
                self.parts.append((i, pos, idx[pos] - offset))
            offset += size
        self.shapes = [tuple(s) for s in shapes]

    def __call__(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        vals = torch.zeros(self.dim * self.per_bucket)
        for i, pos, local in self.parts:
            vals[pos] = tensors[i].detach().reshape(-1).float().cpu()[local]
        return (vals * self.sign).view(self.dim, self.per_bucket).sum(dim=1)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    na, nb = float(torch.linalg.vector_norm(a)), float(torch.linalg.vector_norm(b))
    if na == 0 or nb == 0 or not math.isfinite(na * nb):
        return 0.0
    return float(torch.dot(a, b)) / (na * nb)


class DefenceState:
    """What the rules remember, replicated with the commit state. Pure: times are arguments."""

    def __init__(self, limits: DefenceLimits | None = None):
        self.limits = limits or DefenceLimits()
        self.norms: dict[str, deque] = {}  # peer -> its recent accepted norms
        self.times: dict[str, deque] = {}  # peer -> coordinator-observed times of its recent commits
        self.sketches: deque = deque(maxlen=self.limits.replay_window)  # (peer, sketch) of recent commits
        self._sketcher: Sketcher | None = None

    # ------------------------------------------------------------------------------ rules
    def norm_bound(self, peer: str, limits: DefenceLimits | None = None) -> float | None:
        """The per-peer bound for ``peer``, or None when too few other peers have history (``limits``:
        the thresholds to apply; default this state's)."""
        lim = limits or self.limits
        votes = [statistics.median(n) for p, n in self.norms.items() if p != peer and len(n) >= lim.min_norms]
        if len(votes) < lim.min_voters:
            return None
        return lim.norm_factor * statistics.median(votes)

    def clip_scale(self, peer: str, norm: float, limits: DefenceLimits | None = None) -> float:
        """The factor (≤ 1) that brings ``norm`` down to ``clip_factor`` × the other peers' median
        recent accepted norm (one vote per peer, as in :meth:`norm_bound`); 1 when the Δ is within
        it or the clip is off. With too few voters yet (the first commits of a run), the reference
        is the median of every recent accepted norm of the *other* peers (still none of the
        sender's own); 1 when no other peer has committed yet."""
        lim = limits or self.limits
        if lim.clip_factor is None or not (norm > 0 and math.isfinite(norm)):
            return 1.0
        bound = self.norm_bound(peer, lim)
        if bound is not None:
            reference = bound / lim.norm_factor
        else:
            others = [x for p, n in self.norms.items() if p != peer for x in n]
            if not others:
                return 1.0
            reference = statistics.median(others)
        cap = lim.clip_factor * reference
        return 1.0 if norm <= cap else cap / norm

    def share_wait(self, peer: str, now: float, limits: DefenceLimits | None = None) -> float | None:
        """Seconds ``peer`` must wait before another commit of its is within its share; None: now."""
        lim = limits or self.limits
        start = now - lim.share_window
        mine = [t for t in self.times.get(peer, ()) if start < t <= now]
        allowed = self.allowed_share(peer, now, lim)
        if len(mine) + 1 <= allowed:
            return None
        # the commit that must age out of the window for one more to fit
        k = len(mine) - int(math.floor(allowed)) if allowed >= 1 else len(mine) - 1
        k = min(max(k, 0), len(mine) - 1)
        return min(10.0, max(0.5, sorted(mine)[k] + lim.share_window - now))

    def allowed_share(self, peer: str, now: float, limits: DefenceLimits | None = None) -> float:
        """How many commits ``peer`` may make in the current window: ``share_factor`` × the median
        count of the other peers with a commit in it, at least ``share_min``."""
        lim = limits or self.limits
        start = now - lim.share_window
        counts = [c for p, ts in self.times.items() if p != peer and (c := sum(1 for t in ts if start < t <= now))]
        return max(float(lim.share_min), lim.share_factor * statistics.median(counts) if counts else 0.0)

    def sketch(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        shapes = [tuple(t.shape) for t in tensors]
        if self._sketcher is None or self._sketcher.shapes != shapes:
            self._sketcher = Sketcher(shapes, dim=self.limits.sketch_dim)
        return self._sketcher(tensors)

    def max_cosine(self, sketch: torch.Tensor) -> float:
        """The largest cosine of ``sketch`` with a recent accepted one (0 when none)."""
        if not self.sketches:
            return 0.0
        stack = torch.stack([s for _, s in self.sketches])
        norms = torch.linalg.vector_norm(stack, dim=1) * torch.linalg.vector_norm(sketch)
        cos = (stack @ sketch) / torch.where(norms > 0, norms, torch.ones_like(norms))
        return float(cos.max())

    # ------------------------------------------------------------------------------ updates
    def record(self, peer: str, norm: float, sketch: torch.Tensor | None, commit_time: float | None) -> None:
        """One accepted commit (``CommitState.apply``, on the coordinator and every standby alike)."""
        lim = self.limits
        if math.isfinite(norm):
            self.norms.setdefault(peer, deque(maxlen=lim.norm_window)).append(float(norm))
        if commit_time is not None and math.isfinite(commit_time):
            self.times.setdefault(peer, deque(maxlen=MAX_TIMES)).append(float(commit_time))
        if sketch is not None:
            self.sketches.append((peer, sketch.detach().float().clone()))
        self._forget(peer)

    def _forget(self, newest: str) -> None:
        """At most MAX_PEERS peers remembered: drop those whose last commit is oldest (by position)."""
        for table in (self.norms, self.times):
            if newest in table:  # most recently updated last: dict order is the eviction order
                table[newest] = table.pop(newest)
            while len(table) > MAX_PEERS:
                del table[next(iter(table))]

    # ------------------------------------------------------------------------------ replication
    def state_dict(self) -> dict:
        return {"norms": {p: list(n) for p, n in self.norms.items()},
                "times": {p: list(t) for p, t in self.times.items()},
                "sketch_peers": [p for p, _ in self.sketches],
                "sketches": torch.stack([s for _, s in self.sketches]) if self.sketches
                else torch.zeros(0, self.limits.sketch_dim)}

    def load_state_dict(self, state) -> None:
        """Restore ``state_dict()``, checked before anything changes. :raises ValueError:"""
        if not isinstance(state, dict):
            raise ValueError("commit state: defence must be a dict")

        def table(key: str, check) -> dict:
            value = state.get(key, {})
            if not isinstance(value, dict) or len(value) > MAX_PEERS or not all(
                    isinstance(p, str) and isinstance(v, (list, tuple)) and len(v) <= MAX_TIMES
                    and all(check(x) for x in v) for p, v in value.items()):
                raise ValueError(f"commit state: defence.{key} must map at most {MAX_PEERS} peer ids to finite floats")
            return value

        finite = lambda x: type(x) is float and math.isfinite(x)  # noqa: E731
        norms, times = table("norms", finite), table("times", finite)
        peers, sketches = state.get("sketch_peers", []), state.get("sketches")
        if sketches is None:
            sketches = torch.zeros(0, self.limits.sketch_dim)
        if not isinstance(peers, (list, tuple)) or not all(isinstance(p, str) for p in peers) or \
                not isinstance(sketches, torch.Tensor) or sketches.dtype != torch.float32 or sketches.dim() != 2 or \
                sketches.shape[0] != len(peers) or (len(peers) and sketches.shape[1] != self.limits.sketch_dim) or \
                not bool(torch.isfinite(sketches).all()):
            raise ValueError("commit state: defence sketches must be a finite float32 [n, sketch_dim] tensor with n peers")
        lim = self.limits
        self.norms = {p: deque(v, maxlen=lim.norm_window) for p, v in norms.items()}
        self.times = {p: deque(v, maxlen=MAX_TIMES) for p, v in times.items()}
        self.sketches = deque(((p, sketches[i].clone()) for i, p in enumerate(peers)), maxlen=lim.replay_window)


class LossScreen:
    """Loss change a candidate Δ causes on small held-out batches, one per language: loss at θ − Δ
    minus loss at θ (the loss at θ is computed once per version). The coordinator's own model
    (``make_model``, built on first use) does the forward passes, so training is not disturbed;
    it holds no parameters of its own: each pass runs it on the tensors it scores (θ itself, or
    θ − scale·Δ made once per candidate), which its parameters point to for the pass, so the
    screen costs one transient copy of θ rather than a full model copy besides (at 125M, 500 MB).
    ``blocks_for(region)`` gives that language's held-out blocks (None: no data).

    Cost per submission: one forward pass over ``screen_blocks`` × languages blocks (plus one at θ
    per version): docs/security.md, "Poisoning"."""

    def __init__(self, make_model: Callable[[], torch.nn.Module], blocks_for: Callable[[str], torch.Tensor | None],
                 max_regions: int = 64):
        self.make_model, self.blocks_for, self.max_regions = make_model, blocks_for, max_regions
        self.model: torch.nn.Module | None = None
        self.blocks: dict[str, torch.Tensor | None] = {}
        self._base: tuple[int, tuple, dict] | None = None  # (version, regions, losses at θ)
        self._params: list[torch.nn.Parameter] = []  # the model's trainable parameters (layout order)
        self._shapes: list[tuple[int, ...]] = []  # and their shapes
        self.seconds: deque = deque(maxlen=200)  # wall time of recent screenings

    def _region_blocks(self, region: str | None) -> dict[str, torch.Tensor]:
        if region and region not in self.blocks and len(self.blocks) < self.max_regions:
            try:
                self.blocks[region] = self.blocks_for(region)
            except Exception as exc:  # a region with no corpus here: screened on the others
                logger.info("loss screen: no held-out data for region %r (%s)", region[:64], exc)
                self.blocks[region] = None
        return {r: b for r, b in self.blocks.items() if b is not None and b.numel()}

    def _losses(self, params: list[torch.Tensor], blocks: dict[str, torch.Tensor]) -> dict[str, float]:
        """Losses of the model at ``params``: its parameters point to them for the passes (a copy
        only where one is on another device or in another dtype), and to empty tensors after."""
        from heloco_p2p.local.evaluate import validation_loss

        if len(params) != len(self._params):
            raise ValueError(f"loss screen: {len(params)} tensors for a model of {len(self._params)} parameters")
        try:
            with torch.no_grad():
                for p, q, shape in zip(self._params, params, self._shapes):
                    if tuple(q.shape) != shape:
                        raise ValueError(f"loss screen: a tensor of shape {tuple(q.shape)} for a parameter of shape {shape}")
                    p.data = q.detach().to(p.device, p.dtype).contiguous()
            return {r: validation_loss(self.model, b) for r, b in blocks.items()}
        finally:
            self._release()

    def _release(self) -> None:
        """Point the model's parameters to empty tensors: it keeps no copy of θ between passes."""
        for p in self._params:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)

    def score(self, params: list[torch.Tensor], delta: list[torch.Tensor], region: str | None,
              version: int, scale: float = 1.0, full_own: bool = False) -> dict | None:
        """``{"own": change on the sender's language or None, "mean": change of the mean over
        languages, "regions": n}`` at θ − scale·Δ, and with ``full_own`` ``"own_full"``: the change on
        the sender's language at θ − Δ; None when no language has held-out data."""
        t0 = time.perf_counter()
        blocks = self._region_blocks(region)
        if not blocks:
            return None
        if self.model is None:
            from heloco_p2p.local.model import trainable_params

            self.model = self.make_model()
            self.model.eval()
            self._params = trainable_params(self.model)
            self._shapes = [tuple(p.shape) for p in self._params]
            self._release()  # built with parameters of its own: freed at once (the layout is kept)
        key = tuple(sorted(blocks))
        if self._base is None or self._base[0] != version or self._base[1] != key:
            self._base = (version, key, self._losses(params, blocks))
        base = self._base[2]
        with torch.no_grad():
            moved = [p - scale * d.to(p.dtype) for p, d in zip(params, delta)]
        after = self._losses(moved, blocks)
        del moved  # before the whole update below is made: one copy of θ at a time
        change = {r: after[r] - base[r] for r in blocks}
        finite = all(math.isfinite(v) for v in change.values())
        own = change.get(region) if region else None
        out = {"own": own if finite else math.inf, "mean": statistics.fmean(change.values()) if finite else math.inf,
               "regions": len(blocks), "seconds": time.perf_counter() - t0}
        if full_own and region in blocks:  # the whole update on the sender's own language: one more pass there
            with torch.no_grad():
                whole = [p - d.to(p.dtype) for p, d in zip(params, delta)]
            value = self._losses(whole, {region: blocks[region]})[region] - base[region]
            out["own_full"] = value if math.isfinite(value) else math.inf
            out["seconds"] = time.perf_counter() - t0
        self.seconds.append(out["seconds"])
        return out
