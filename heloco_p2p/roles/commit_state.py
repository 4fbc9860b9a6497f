"""The replicated state machine of a run: θ and the outer optimizer (``outer/``), the version,
the term, the ledger of applied submissions, the token count, the norm history and each peer's
contribution credit. Pure: it knows nothing of the network (``roles/coordinator.py`` serves it).

A submission is identified by (peer id, sequence number). The ledger makes a retry idempotent:
a peer whose reply was lost (its coordinator died after replicating) resubmits and is told
"accepted (duplicate)" instead of having its update applied twice. ``CommitState.check`` refuses
values that must not be committed (``bad_version``, ``too_stale``, ``not_finite``,
``norm_too_large``, and with ``swarm.defence`` the poisoning rules of roles/defence.py: ``busy``
over the sender's commit share, ``replayed_update``, ``harmful_update``) before anything changes;
what those rules remember (``defence``) is replicated with the rest.
"""
from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import statistics
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from heloco_p2p.outer import OuterEngine
from heloco_p2p.roles.commit_log import CommitLog
from heloco_p2p.roles.defence import DefenceLimits, DefenceState, LossScreen
from heloco_p2p.roles.messages import MAX_WORKERS

logger = logging.getLogger(__name__)
UNSCREENED = "unscreened"  # the region-fair key of submissions whose language the screen cannot check


DIGEST_CHUNK = 16 << 20  # bytes of θ per leaf of the digest's tree
_digest_pool: ThreadPoolExecutor | None = None


def _leaf(piece: memoryview) -> bytes:
    return hashlib.blake2b(piece, digest_size=16).digest()  # hashlib releases the GIL on large buffers


def params_digest(params: list[torch.Tensor]) -> str:
    """A blake2b tree over θ's bytes: equal digests mean bitwise-equal replicas.

    Each tensor's buffer is cut into ``DIGEST_CHUNK`` leaves, hashed on up to 4 threads (no copy
    of θ), and the root hashes the leaf digests with each tensor's byte length. At 125M
    parameters one pass over 500 MB took ~0.6 s on one core; the coordinator computes it on every
    commit, so the leaves use the cores there are."""
    global _digest_pool
    pieces, lengths = [], []
    for p in params:
        buf = memoryview(p.detach().contiguous().cpu().numpy()).cast("B")  # the buffer itself
        lengths.append(len(buf))
        pieces += [buf[i:i + DIGEST_CHUNK] for i in range(0, len(buf), DIGEST_CHUNK)] or [buf]
    if len(pieces) > 1:
        if _digest_pool is None:
            _digest_pool = ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1), thread_name_prefix="digest")
        leaves = list(_digest_pool.map(_leaf, pieces))
    else:
        leaves = [_leaf(piece) for piece in pieces]
    root = hashlib.blake2b(digest_size=16, person=b"heloco-theta-v2")
    for n in lengths:
        root.update(n.to_bytes(8, "big"))
    for leaf in leaves:
        root.update(leaf)
    return root.hexdigest()


class Rejection(Exception):
    """A submission refused before it touched state; ``code`` is the reason sent to the peer."""

    def __init__(self, code: str, message: str, detail: str = "", retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.detail = detail  # for the operator's log only: what an attacker could learn from (exact bounds)
        self.retry_after = retry_after  # ``busy`` only: when the same submission may come back


@dataclass
class SubmissionLimits:
    """What a submission may be, and how many the coordinator takes at once (``swarm`` config)."""

    max_staleness: int = 64
    # reject ‖Δ‖ > norm_factor × median of recent accepted norms; before norm_min_history
    # accepted norms exist, ‖Δ‖ > norm_factor × max(‖θ‖, 1)
    norm_factor: float = 10.0
    norm_window: int = 32
    norm_min_history: int = 5
    max_steps: int = 100_000  # inner steps one submission may claim (they set the run's schedule)
    submit_rate: float = 2.0  # submissions per second per peer (token bucket); 0: unlimited
    submit_burst: float = 10.0
    max_pending_submits: int = 8  # submissions admitted and not yet answered; more are told busy
    # the poisoning rules (roles/defence.py); None: the run-wide norm rule alone
    defence: DefenceLimits | None = None

    @classmethod
    def from_config(cls, swarm) -> "SubmissionLimits":
        """From a ``SwarmConfig`` (fields of the same names; missing ones keep their defaults)."""
        names = ("max_staleness", "norm_factor", "max_steps", "submit_rate", "submit_burst", "max_pending_submits")
        limits = cls(**{n: getattr(swarm, n) for n in names if hasattr(swarm, n)})
        if getattr(swarm, "defence", None) is not None:
            limits.defence = DefenceLimits.from_config(swarm.defence)
        return limits


WORKERS_WINDOW = 64  # commits over which the swarm counts its workers K


@dataclass
class CommitState:
    """θ and the outer optimizer (``engine``), the term, and who submitted what."""

    engine: OuterEngine
    term: int = 0
    applied: dict[str, int] = field(default_factory=dict)  # peer id -> last applied sequence number
    applied_count: dict[str, int] = field(default_factory=dict)  # peer id -> submissions committed
    total_steps: int = 0  # inner steps in all committed pseudo-gradients
    total_tokens: int = 0  # tokens in all committed pseudo-gradients (as their senders counted them)
    contributors: set = field(default_factory=set)
    recent_norms: deque = field(default_factory=lambda: deque(maxlen=64))
    # contribution credit per peer, as this coordinator saw its pseudo-gradients (replicated: a
    # failover keeps it): {"region", "commits", "tokens", "cos_sum", "cos_n", "keep", "rotate",
    # "shrink", "blocks", "ratio_sum"}; see ``credit_summary``
    credit: dict = field(default_factory=dict)
    # who sent the last WORKERS_WINDOW commits: K, the number of workers a staleness weight such as
    # ρ = 1/√K (``staleness_weight: base``) needs, is the number of distinct peers among them
    recent_senders: deque = field(default_factory=lambda: deque(maxlen=WORKERS_WINDOW))
    # the hash chain over the commits (roles/commit_log.py): appended by whoever applies a commit,
    # once its θ digest is known, replicated with the rest
    log: CommitLog = field(default_factory=CommitLog)
    # what the poisoning rules remember (per-peer norms, commit times, sketches): replicated
    defence: DefenceState = field(default_factory=DefenceState)
    # the coordinator's loss screen (not replicated: standbys never screen); None: no screening
    screen: LossScreen | None = None
    last_screen: dict | None = None  # the last screening's scores (for the operator's log and metrics)

    @property
    def version(self) -> int:
        return self.engine.version

    def schedule_step(self) -> int:
        """Where a peer's inner learning-rate schedule should be: the run's inner steps per peer."""
        return self.total_steps // max(1, len(self.contributors))

    def check(self, pseudo_grad: list[torch.Tensor], base_version: int, limits: SubmissionLimits,
              peer: str | None = None, region: str | None = None, now: float | None = None) -> float:
        """Raise Rejection unless the submission may be committed; returns its norm. Reads only.
        With ``limits.defence`` enabled and the sender ``peer`` known, the poisoning rules apply
        (roles/defence.py): the per-peer norm bound, the commit share at ``now`` (the coordinator's
        clock; skipped when None), replay, and the loss screen on ``region`` (the claimed one)."""
        if base_version < 0 or base_version > self.version:
            raise Rejection("bad_version", f"base version {base_version} is not in [0, {self.version}]")
        staleness = self.version - base_version
        if staleness > limits.max_staleness:
            raise Rejection("too_stale", f"staleness {staleness} exceeds the bound {limits.max_staleness}; download the current state")
        norm = tensor_norm(pseudo_grad)
        if not math.isfinite(norm):
            raise Rejection("not_finite", "the pseudo-gradient contains NaN or Inf")
        d = limits.defence
        defended = d is not None and d.enabled and peer is not None
        if defended and now is not None:
            wait = self.defence.share_wait(peer, now, d)
            if wait is not None:
                raise Rejection("busy", "this peer's share of recent commits is above its share of the swarm's work; "
                                        "resend the same submission later",
                                detail=f"commit share: over {self.defence.allowed_share(peer, now, d):.3g} commits in "
                                       f"{d.share_window:g} s", retry_after=wait)
        peer_bound = self.defence.norm_bound(peer, d) if defended else None
        if peer_bound is not None:
            if norm > peer_bound:
                raise Rejection("norm_too_large", "‖Δ‖ is above this peer's norm bound (a multiple of the other peers' "
                                                  "recent accepted norms)",
                                detail=f"‖Δ‖ = {norm:.4g} > {d.norm_factor:g} × median over other peers of their median "
                                       f"recent accepted norm = {peer_bound:.4g}")
        else:
            if defended and self.recent_norms:  # too few voters yet: at most the defence's factor × the run's median
                bound = d.norm_factor * statistics.median(list(self.recent_norms)[-d.norm_window:])
                if norm > bound:
                    raise Rejection("norm_too_large", "‖Δ‖ is above the run's norm bound (a multiple of recent "
                                                      "accepted norms)",
                                    detail=f"‖Δ‖ = {norm:.4g} > {d.norm_factor:g} × median of the last "
                                           f"{d.norm_window} accepted norms = {bound:.4g} (too few voters yet)")
            self._check_run_norm(norm, limits)
        if defended:
            self._check_replay_and_loss(pseudo_grad, d, region)
        return norm

    def fairness_worker(self, worker: str | None, limits: SubmissionLimits) -> str | None:
        """What the region-fair weight keys on for the submission just checked: the claimed region
        when the loss screen holds that language's held-out data, else (the defence screened the
        submission on other languages only: no region, or one nobody can check) the one bucket
        ``unscreened``, shared by every such sender. A claim the coordinator cannot check would
        otherwise be a fresh share of the step per invented region or identity. Without the
        defence, or when nothing was screened, ``worker`` is kept."""
        d = limits.defence
        last = self.last_screen or {}
        if d is None or not d.enabled or not d.screen or not last.get("regions") or last.get("own") is not None:
            return worker
        return UNSCREENED

    def clip(self, pseudo_grad: list[torch.Tensor], norm: float, limits: SubmissionLimits,
             peer: str | None = None) -> tuple[list[torch.Tensor], float, float]:
        """The defence's norm clip (roles/defence.py, rule 1) of a checked submission: returns
        (Δ to commit, its norm, the scale applied). The scale travels in the forwarded commit and
        standbys use :func:`scaled` too, so replicas stay bitwise equal."""
        d = limits.defence
        if d is None or not d.enabled or peer is None:
            return pseudo_grad, norm, 1.0
        scale = self.defence.clip_scale(peer, norm, d)
        if scale >= 1.0:
            return pseudo_grad, norm, 1.0
        delta = scaled(pseudo_grad, scale)
        return delta, tensor_norm(delta), scale

    def _check_run_norm(self, norm: float, limits: SubmissionLimits) -> None:
        """The run-wide rule: a multiple of the median of recent accepted norms (any sender's), or
        of ‖θ‖ before ``norm_min_history`` norms were accepted."""
        history = list(self.recent_norms)[-limits.norm_window:]
        if len(history) >= limits.norm_min_history:
            bound = limits.norm_factor * statistics.median(history)
            if norm > bound:
                raise Rejection("norm_too_large", "‖Δ‖ is above the run's norm bound (a multiple of recent accepted norms)",
                                detail=f"‖Δ‖ = {norm:.4g} > {limits.norm_factor:g} × median of recent accepted norms = {bound:.4g}")
        else:  # too few accepted norms for a median: bound Δ by the size of θ itself
            bound = limits.norm_factor * max(tensor_norm(self.engine.params), 1.0)
            if norm > bound:
                raise Rejection("norm_too_large", "‖Δ‖ is above the run's norm bound (a multiple of ‖θ‖ until enough "
                                                  "norms were accepted)",
                                detail=f"‖Δ‖ = {norm:.4g} > {limits.norm_factor:g} × max(‖θ‖, 1) = {bound:.4g} "
                                       f"(fewer than {limits.norm_min_history} accepted norms)")

    def _check_replay_and_loss(self, pseudo_grad: list[torch.Tensor], d: DefenceLimits, region: str | None) -> None:
        cos = self.defence.max_cosine(self.defence.sketch(pseudo_grad))
        self.last_screen = {"replay_cosine": cos}
        if cos > d.replay_cosine:
            raise Rejection("replayed_update", "the pseudo-gradient repeats a recently committed one",
                            detail=f"sketch cosine {cos:.4f} > {d.replay_cosine:g} with a recent commit")
        if not d.screen or self.screen is None:
            return
        region = region[:64] if isinstance(region, str) and region else None
        s = self.screen.score(self.engine.params, pseudo_grad, region, self.version, scale=d.screen_scale,
                              full_own=d.screen_full_own_margin is not None)
        if s is None:
            return
        self.last_screen.update(s, region=region, version=self.version)
        logger.info("loss screen: region %s own %s mean %+.4f (%d languages, %.1f ms) %s", region,
                    "-" if s["own"] is None else f"{s['own']:+.4f}", s["mean"], s["regions"], 1e3 * s["seconds"],
                    self.last_screen)
        full = s.get("own_full")
        if (s["own"] is not None and s["own"] > d.screen_own_margin) or s["mean"] > d.screen_mean_margin or \
                (full is not None and d.screen_full_own_margin is not None and full > d.screen_full_own_margin):
            raise Rejection("harmful_update", "the pseudo-gradient makes the model clearly worse on held-out data",
                            detail=f"loss change at θ − {d.screen_scale:g}·Δ: own language {s['own']}, mean "
                                   f"{s['mean']:+.4f} (margins {d.screen_own_margin:g}, {d.screen_mean_margin:g}); "
                                   f"at θ − Δ: own language {full} (margin {d.screen_full_own_margin})")

    def workers(self, peer: str) -> int:
        """K for a commit by ``peer``: the distinct senders of the last ``WORKERS_WINDOW`` commits
        and ``peer``. The coordinator forwards it with the commit, so standbys use the same K."""
        return min(MAX_WORKERS, len(set(self.recent_senders) | {peer}))

    def apply(self, pseudo_grad: list[torch.Tensor], base_version: int, peer: str, seq: int, steps: int, norm: float,
              worker: str | None = None, seconds: float | None = None, tokens: int = 0, num_workers: int | None = None,
              commit_time: float | None = None, consume: bool = False):
        """Commit one submission; ``worker``/``seconds`` feed the region-fair weight (outer.fairness):
        the sender's region and how long its round took; ``tokens`` counts toward the run's budget;
        ``num_workers`` is K (default: ``workers(peer)``); ``commit_time`` is the coordinator's clock
        at the commit (it travels in the forwarded commit; None: the commit-share rule does not
        count it); ``consume``: the caller reads ``pseudo_grad`` no more, and the engine may work in
        its tensors (``OuterEngine.commit``: no scratch copy of θ; the same θ bitwise)."""
        k = self.workers(peer) if num_workers is None else num_workers
        sketch = self.defence.sketch(pseudo_grad)  # of Δ as received: before the commit changes anything
        info = self.engine.commit(pseudo_grad, base_version, worker=worker, seconds=seconds, num_workers=k,
                                  consume=consume)
        self.recent_senders.append(peer)
        self.defence.record(peer, norm, sketch, commit_time)
        self._record(peer, seq, steps, norm, tokens)
        self._credit(peer, worker, tokens, info)
        return info

    def _credit(self, peer: str, worker: str | None, tokens: int, info) -> None:
        """What this commit says about its sender: tokens, and how HeLoCo treated its blocks."""
        c = self.credit.setdefault(peer, {"region": "", "commits": 0, "tokens": 0, "cos_sum": 0.0, "cos_n": 0,
                                          "keep": 0, "rotate": 0, "shrink": 0, "blocks": 0, "ratio_sum": 0.0})
        if worker and worker.startswith("region:"):
            c["region"] = worker[len("region:"):]
        c["commits"] += 1
        c["tokens"] += tokens
        cos = info.mean_cosine()
        if cos is not None and math.isfinite(cos):
            c["cos_sum"] += cos
            c["cos_n"] += 1
        for b in info.branches:
            c["blocks"] += 1
            if b in ("keep", "skip"):
                c["keep"] += 1
            elif b == "shrink":
                c["shrink"] += 1
            else:  # reorient / rotate
                c["rotate"] += 1
        before = info.total_norm_before
        c["ratio_sum"] += info.total_norm_after / before if before > 0 else 1.0
        if len(self.credit) > 4096:  # bounded whatever the number of identities: drop the smallest
            del self.credit[min(self.credit, key=lambda p: self.credit[p]["tokens"])]

    def credit_summary(self, top: int = 64) -> dict[str, dict]:
        """Per peer (the ``top`` with most tokens): commits, tokens, share of the run's tokens, mean
        cosine of its blocks to the momentum, shares of its blocks kept / rotated / shrunk, and the
        mean ‖Δ̂‖/‖Δ‖ (how much the correction changed its pseudo-gradients)."""
        items = list(self.credit.items())  # one C-level copy: the lease renewal reads while commits write
        total = max(1, sum(c["tokens"] for _, c in items))
        out = {}
        for peer, c in sorted(items, key=lambda kv: -kv[1]["tokens"])[:top]:
            blocks = max(1, c["blocks"])
            out[peer] = {"region": c["region"], "commits": float(c["commits"]), "tokens": float(c["tokens"]),
                         "share": c["tokens"] / total,
                         "cosine_mean": c["cos_sum"] / c["cos_n"] if c["cos_n"] else 0.0,
                         "kept": c["keep"] / blocks, "rotated": c["rotate"] / blocks, "shrunk": c["shrink"] / blocks,
                         "norm_ratio": c["ratio_sum"] / max(1, c["commits"])}
        return out

    def _record(self, peer: str, seq: int, steps: int, norm: float, tokens: int = 0) -> None:
        self.applied[peer] = seq
        self.applied_count[peer] = self.applied_count.get(peer, 0) + 1
        self.total_steps += steps
        self.total_tokens += tokens
        self.contributors.add(peer)
        self.recent_norms.append(norm)

    def apply_sync(self, items: list[tuple[str, int, int, int, float, list[torch.Tensor]]], base_version: int):
        """Synchronous DiLoCo: one outer step on the mean of one pseudo-gradient per peer.
        ``items``: (peer, seq, steps, tokens, norm, Δ) each."""
        info = self.engine.sync_commit([d for *_, d in items], base_version, num_workers=len(items))
        for peer, seq, steps, tokens, norm, delta in items:
            self._record(peer, seq, steps, norm, tokens)
            self.defence.record(peer, norm, self.defence.sketch(delta), None)
            self._credit(peer, None, tokens, info)  # the cosine and branches are those of the mean
        return info

    def is_duplicate(self, peer: str, seq: int) -> bool:
        return seq <= self.applied.get(peer, -1)

    # replication ----------------------------------------------------------------------------
    def state_dict(self, copy: bool = True) -> dict:
        """Everything replicated; ``copy`` False: θ and the optimizer buffers are the live tensors
        (``to_bytes``, which serialises at once under the commit lock), else copies."""
        return {"engine": self.engine.state_dict(copy), "term": self.term, "applied": dict(self.applied),
                "applied_count": dict(self.applied_count),
                "total_steps": self.total_steps, "total_tokens": self.total_tokens,
                "contributors": sorted(self.contributors),
                "recent_norms": list(self.recent_norms),
                "credit": {p: dict(c) for p, c in self.credit.items()},
                "recent_senders": list(self.recent_senders), "log": self.log.state_dict(),
                "defence": self.defence.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``; everything is checked before anything changes.

        :raises ValueError: a state of another layout or config, or fields of the wrong types
        """
        if not isinstance(state, dict):
            raise ValueError("commit state: not a dict")

        def ledger(key: str) -> dict:
            value = state.get(key)
            if not isinstance(value, dict) or not all(isinstance(k, str) and type(v) is int for k, v in value.items()):
                raise ValueError(f"commit state: {key} must map peer ids to integers")
            return dict(value)

        term, total_steps = state.get("term"), state.get("total_steps")
        total_tokens = state.get("total_tokens", 0)  # states written before the token budget have none
        if any(type(v) is not int or v < 0 for v in (term, total_steps, total_tokens)):
            raise ValueError("commit state: term, total_steps and total_tokens must be integers >= 0")
        applied, applied_count = ledger("applied"), ledger("applied_count")
        contributors, norms = state.get("contributors"), state.get("recent_norms")
        if not isinstance(contributors, (list, tuple, set)) or not all(isinstance(c, str) for c in contributors):
            raise ValueError("commit state: contributors must be a list of peer ids")
        if not isinstance(norms, (list, tuple)) or not all(type(n) is float and math.isfinite(n) for n in norms):
            raise ValueError("commit state: recent_norms must be a list of finite floats")
        credit = _check_credit(state.get("credit", {}))  # states written before credit have none
        senders = state.get("recent_senders", [])  # nor these
        if not isinstance(senders, (list, tuple)) or len(senders) > WORKERS_WINDOW or \
                not all(isinstance(x, str) for x in senders):
            raise ValueError(f"commit state: recent_senders must be a list of at most {WORKERS_WINDOW} peer ids")
        log = CommitLog()
        log.load_state_dict(state.get("log"))  # states written before the commit log have none
        defence = DefenceState(self.defence.limits)
        if "defence" in state:  # states written before the poisoning rules have none
            defence.load_state_dict(state["defence"])
        try:
            self.engine.load_state_dict(state.get("engine"))  # checks everything before it changes anything
        except ValueError:
            raise
        except Exception as exc:  # engine parts of the wrong shape or type
            raise ValueError(f"commit state: engine: {type(exc).__name__}: {str(exc)[:200]}") from None
        self.term = max(self.term, term)
        self.applied = applied
        self.applied_count = applied_count
        self.total_steps = total_steps
        self.total_tokens = total_tokens
        self.contributors = set(contributors)
        self.recent_norms = deque(norms, maxlen=64)
        self.credit = credit
        self.recent_senders = deque(senders, maxlen=WORKERS_WINDOW)
        self.log = log
        self.defence = defence

    def to_bytes(self) -> bytes:
        """The full state serialised (call it under the commit lock: θ and m are read in place, not
        copied first; ``getvalue`` shares the buffer's bytes). At 125M: θ and m, 1 GB, once."""
        buf = io.BytesIO()
        torch.save(self.state_dict(copy=False), buf)
        return buf.getvalue()

    def load_bytes(self, data: bytes) -> None:
        """Load a state sent by a peer: tensors and plain containers only (never pickled objects,
        which would run the sender's code here), then checked as ``load_state_dict``."""
        self.load_state_dict(parse_state(data))


_CREDIT_INTS = ("commits", "tokens", "cos_n", "keep", "rotate", "shrink", "blocks")


def _check_credit(credit) -> dict:
    """A replicated credit table, type-checked field by field (it comes from another peer)."""
    if not isinstance(credit, dict) or len(credit) > 4096:
        raise ValueError("commit state: credit must map at most 4096 peer ids to counters")
    out = {}
    for peer, c in credit.items():
        ok = isinstance(peer, str) and isinstance(c, dict) and isinstance(c.get("region"), str) \
            and all(type(c.get(k)) is int and c[k] >= 0 for k in _CREDIT_INTS) \
            and all(type(c.get(k)) is float and math.isfinite(c[k]) for k in ("cos_sum", "ratio_sum"))
        if not ok:
            raise ValueError(f"commit state: credit of {str(peer)[:20]!r} is malformed")
        out[peer] = {"region": c["region"][:64], **{k: c[k] for k in _CREDIT_INTS + ("cos_sum", "ratio_sum")}}
    return out


def scaled(tensors: list[torch.Tensor], scale: float) -> list[torch.Tensor]:
    """``tensors`` × ``scale`` (the norm clip), computed the same way on the coordinator and its standbys."""
    return [t * scale for t in tensors]


def tensor_norm(tensors: list[torch.Tensor]) -> float:
    """‖x‖ over all tensors in one float32 pass each; in float64 only when float32 overflows
    (values past ~1e19) or the input is not finite. Squaring float64 copies instead allocates
    2 × 8 bytes per parameter per norm: at 125M parameters 13× the CPU time and far more wall
    time, the largest cost of a submission (docs/scaling.md, "The coordinator path")."""
    total = sum(float(torch.linalg.vector_norm(t)) ** 2 for t in tensors)
    if math.isfinite(total):
        return math.sqrt(total)
    return math.sqrt(sum(float(torch.sum(t.double() * t.double())) for t in tensors))



class _ViewReader(io.RawIOBase):
    """A read-only file over a bytes-like object, without a copy of it (``io.BytesIO`` copies a
    bytearray, the type a large payload arrives as: swarm/wire.py)."""

    def __init__(self, data):
        super().__init__()
        self._view, self._pos = memoryview(data).cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), len(self._view) - self._pos)
        b[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


def parse_state(data: bytes) -> dict:
    """A full commit state sent by a peer: tensors and plain containers only (``weights_only``:
    never pickled objects, which would run the sender's code here)."""
    try:
        state = torch.load(_ViewReader(data), weights_only=True)
    except Exception as exc:
        raise ValueError(f"the full state does not load ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(state, dict):
        raise ValueError("the full state is not a commit state")
    return state
