"""The protocol's messages, parsed once at the edge, and the replies built in one place.

Every request a handler receives is untrusted: ``Submission.parse``, ``CommitForward.parse``,
``FullStateHeader.parse``, ``HandoverRequest.parse`` and ``StateRequest.parse`` (a joiner's
``state`` request) check each header field's type and range and raise ``WireError`` (code ``malformed``, ``unknown_run`` or ``layout_mismatch``) before any
handler logic runs; the handlers then work with typed values only. Replies are dicts on the wire
(``swarm/node.py`` frames them); the builders below are the only places their shapes are written,
so a status and its fields stay the same everywhere (docs/protocol.md lists them).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from heloco_p2p.swarm.downlink import HELD
from heloco_p2p.swarm.wire import BLOCK_SIZE_8BIT, WireError

MAX_INT = (1 << 53) - 1  # integers JSON carries exactly everywhere
MAX_TOKENS_PER_STEP = 1 << 24  # a batch of 16M tokens per inner step: far above any real one
MAX_WORKERS = 4096  # the largest K a commit may carry
MAX_PEERS_LISTED = 64  # standbys a handover may name


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def header_int(header: dict, key: str, default: int | None = None, lo: int = 0, hi: int = MAX_INT) -> int:
    """An integer header field in [lo, hi]; ``malformed`` otherwise (bool is not an integer here)."""
    value = header.get(key, default)
    if type(value) is not int or not lo <= value <= hi:
        raise WireError("malformed", f"header field {key!r} must be an integer in [{lo}, {hi}], got {str(value)[:40]!r}")
    return value


def header_str(header: dict, key: str, max_len: int = 256) -> str:
    value = header.get(key)
    if not isinstance(value, str) or len(value) > max_len:
        raise WireError("malformed", f"header field {key!r} must be a string of at most {max_len} characters")
    return value


def tensor_meta(header: dict) -> list:
    if not isinstance(header.get("tensors"), list):
        raise WireError("malformed", "header field 'tensors' must be the list of tensor metadata")
    return header["tensors"]


def fairness_inputs(header: dict, peer: str) -> tuple[str, float | None]:
    """What the region-fair weight keys on: the sender's region (its peer id when the header names
    none; at most 64 characters) and the seconds its round took (None when missing or not a finite
    number > 0; clamped to [1 ms, 1 day])."""
    region = header.get("region")
    worker = f"region:{region[:64]}" if isinstance(region, str) and region else f"peer:{peer}"
    stats = header.get("stats")
    seconds = stats.get("seconds") if isinstance(stats, dict) else None
    seconds = min(max(float(seconds), 1e-3), 86400.0) if positive(seconds) else None
    return worker, seconds


def submission_tokens(header: dict, steps: int) -> int:
    """The tokens a submission says it trained on (its ``stats.tokens``), counted toward the run's
    ``max_tokens``: 0 when missing, ``malformed`` when not an integer in [0, steps × 2^24]."""
    stats = header.get("stats")
    tokens = stats.get("tokens", 0) if isinstance(stats, dict) else 0
    if type(tokens) is not int or not 0 <= tokens <= steps * MAX_TOKENS_PER_STEP:
        raise WireError("malformed", f"stats.tokens must be an integer in [0, steps × {MAX_TOKENS_PER_STEP}], "
                                     f"got {str(tokens)[:40]!r}")
    return tokens


def max_submission_bytes(shapes: list[tuple[int, ...]]) -> int:
    """The largest payload a pseudo-gradient of this layout can take on the wire (fp32, plus each
    tensor's protobuf fields and, for 8-bit, its block table): anything larger is ``too_large``."""
    total = 4096
    for shape in shapes:
        numel = math.prod(shape)
        total += 4 * numel + 4 * (-(-numel // BLOCK_SIZE_8BIT)) + 1024 + 256 + 16 * len(shape)
    return total


# -- requests -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Submission:
    """A peer's pseudo-gradient header (``submit``). ``worker`` and ``seconds`` are what the
    region-fair weight keys on (``fairness_inputs``); ``region`` is the language the sender says it
    trained on ("" when it names none); ``held`` what its start point is, for a ``wrap8`` reply
    (swarm/downlink.py): "exact" (θ̄ of its base version), "wrap8" (that version's grid), "none"
    (nothing decodable, e.g. after a failed decode), "" when it says nothing (then it gets fp32)."""

    term: int
    seq: int
    base_version: int
    steps: int
    tokens: int
    tensors: list
    stats: dict
    worker: str
    seconds: float | None
    region: str
    held: str = ""

    @classmethod
    def parse(cls, header: dict, remote: str, run_id: str, names: list[str], max_steps: int) -> "Submission":
        if header.get("run_id") != run_id:
            raise WireError("unknown_run", f"this coordinator serves run {run_id!r}, not {str(header.get('run_id'))[:80]!r}")
        term = header_int(header, "term", default=0)
        seq = header_int(header, "seq")
        base_version = header_int(header, "base_version")
        steps = header_int(header, "steps", default=0, hi=max_steps)
        stats = header.get("stats", {})
        if not isinstance(stats, dict):
            raise WireError("malformed", "header field 'stats' must be an object")
        tokens = submission_tokens(header, steps)
        tensors = tensor_meta(header)
        sent = header.get("names")
        if sent is not None:
            if not isinstance(sent, list) or not all(isinstance(n, str) for n in sent):
                raise WireError("malformed", "header field 'names' must be a list of strings")
            if sent != names:
                bad = next((i for i, (a, b) in enumerate(zip(sent, names)) if a != b), min(len(sent), len(names)))
                raise WireError("layout_mismatch", f"{len(sent)} tensor names sent, {len(names)} expected; first "
                                                   f"difference at {bad}: {sent[bad] if bad < len(sent) else None!r} "
                                                   f"vs {names[bad] if bad < len(names) else None!r}")
        worker, seconds = fairness_inputs(header, remote)
        region = header.get("region")
        region = region[:64] if isinstance(region, str) else ""
        held = header.get("held", "")
        if held not in ("",) + HELD:
            raise WireError("malformed", f"header field 'held' must be one of {', '.join(HELD)}")
        return cls(term, seq, base_version, steps, tokens, tensors, stats, worker, seconds, region, held)


@dataclass(frozen=True)
class CommitForward:
    """One commit, as the coordinator forwards it to a standby (``replicate`` of kind ``commit``):
    everything the standby's ``CommitState.apply`` needs to reach the same state bitwise, and the
    θ digest it must reach."""

    term: int
    version_before: int
    base_version: int
    peer: str
    seq: int
    steps: int
    tensors: list
    digest: str
    worker: str | None = None
    seconds: float | None = None
    tokens: int = 0
    num_workers: int | None = None
    commit_time: float | None = None  # the coordinator's clock at the commit (the commit-share rule counts by it)
    scale: float = 1.0  # the defence's norm clip: the Δ committed is the one received × scale (0 < scale ≤ 1)

    def header(self) -> dict:
        return {"kind": "commit", **asdict(self)}

    @classmethod
    def parse(cls, header: dict) -> "CommitForward":
        worker, seconds = header.get("worker"), header.get("seconds")
        if not (worker is None or isinstance(worker, str) and len(worker) <= 256) or \
                not (seconds is None or positive(seconds)):
            raise WireError("malformed", "header fields 'worker' (a string) and 'seconds' (a number > 0) are malformed")
        commit_time = header.get("commit_time")
        if not (commit_time is None or positive(commit_time)):
            raise WireError("malformed", "header field 'commit_time' must be a number > 0")
        num_workers = header.get("num_workers")
        if num_workers is not None:
            num_workers = header_int(header, "num_workers", lo=1, hi=MAX_WORKERS)
        scale = header.get("scale", 1.0)
        if not (positive(scale) and scale <= 1.0):
            raise WireError("malformed", "header field 'scale' must be a number in (0, 1]")
        return cls(term=header_int(header, "term"), version_before=header_int(header, "version_before"),
                   base_version=header_int(header, "base_version"), peer=header_str(header, "peer"),
                   seq=header_int(header, "seq"), steps=header_int(header, "steps"), tensors=tensor_meta(header),
                   digest=header_str(header, "digest"), worker=worker, seconds=seconds,
                   tokens=header_int(header, "tokens", default=0), num_workers=num_workers, commit_time=commit_time,
                   scale=float(scale))


@dataclass(frozen=True)
class FullStateHeader:
    """The whole commit state (``replicate`` of kind ``full``; the payload is ``CommitState.to_bytes``)."""

    term: int
    version: int

    def header(self) -> dict:
        return {"kind": "full", "term": self.term, "version": self.version}

    @classmethod
    def parse(cls, header: dict) -> "FullStateHeader":
        return cls(term=header_int(header, "term"), version=header_int(header, "version", default=0))


def parse_replicate(header: dict) -> CommitForward | FullStateHeader:
    kind = header.get("kind")
    if kind == "commit":
        return CommitForward.parse(header)
    if kind == "full":
        return FullStateHeader.parse(header)
    raise WireError("malformed", "header field 'kind' must be 'full' or 'commit'")


@dataclass(frozen=True)
class HandoverRequest:
    """A leaving coordinator asks a standby to take the next term (``handover``)."""

    term: int
    version: int
    standbys: list[str]

    def header(self) -> dict:
        return asdict(self)

    @classmethod
    def parse(cls, header: dict) -> "HandoverRequest":
        standbys = header.get("standbys", [])
        if not isinstance(standbys, list) or len(standbys) > MAX_PEERS_LISTED or \
                not all(isinstance(x, str) and len(x) <= 256 for x in standbys):
            raise WireError("malformed", f"header field 'standbys' must be a list of at most {MAX_PEERS_LISTED} peer ids")
        return cls(term=header_int(header, "term"), version=header_int(header, "version"), standbys=list(standbys))


# -- replies --------------------------------------------------------------------------------------
Reply = tuple[dict, bytes]


def rejected(code: str, message: str, **where) -> Reply:
    """Refused for a reason a retry of the same request cannot fix (codes: docs/security.md)."""
    return {"status": "rejected", "reason": code, "message": message, **where}, b""


def busy(message: str, retry_after: float, term: int, version: int) -> Reply:
    """Not now, and not the sender's fault: it keeps its Δ and resubmits the same sequence number."""
    return {"status": "rejected", "reason": "busy", "retry_after": retry_after, "message": message,
            "term": term, "version": version}, b""


def not_coordinator(term: int, message: str) -> Reply:
    """This peer does not coordinate (any more): the sender reads the lease again."""
    return {"status": "not_coordinator", "term": term, "message": message}, b""


def fenced(term: int, message: str) -> Reply:
    """The request comes from an older term (or another coordinator of this one) than the replica follows."""
    return {"status": "fenced", "term": term, "message": message}, b""


def refused(message: str, **extra) -> Reply:
    return {"status": "refused", "message": message, **extra}, b""


def ok(**extra) -> Reply:
    return {"status": "ok", **extra}, b""


def accepted(version: int, term: int, staleness: int | None, schedule_step: int, run_tokens: int,
             duplicate: bool = False, **extra) -> dict:
    """The header of an acknowledgement (the payload is the packed θ the sender starts from)."""
    return {"status": "accepted", "duplicate": duplicate, "version": version, "term": term, "staleness": staleness,
            "schedule_step": schedule_step, "run_tokens": run_tokens, **extra}


MAX_PARTS = 4096  # parts a state may be cut into (a plan lists one digest per part)
STATE_COMPRESSIONS = ("none", "fp16")  # a state in parts: exact fp32, or fp16 (at most 16 bits/param)


@dataclass(frozen=True)
class StateRequest:
    """A ``state`` request, parsed once (docs/protocol.md, "Joining"): the whole state (no
    ``part`` and no ``plan``: today's reply, fp32 unless ``compression`` says otherwise), a plan
    (``plan: true`` with ``parts``), or one part (``part``, ``parts`` and the plan's ``version``,
    optionally its ``digest``)."""

    model: str = "dispatch"
    compression: str = "none"
    plan: bool = False
    part: int | None = None
    parts: int | None = None
    version: int | None = None
    digest: str | None = None

    @classmethod
    def parse(cls, header: dict) -> "StateRequest":
        """:raises WireError: ``malformed``, with the field at fault"""
        model = header.get("model", "dispatch")
        if model not in ("dispatch", "theta"):
            raise WireError("malformed", f"header field 'model' must be 'dispatch' or 'theta', got {str(model)[:40]!r}")
        compression = header.get("compression", "none")
        if compression not in STATE_COMPRESSIONS:
            raise WireError("malformed", f"header field 'compression' must be one of {STATE_COMPRESSIONS}, "
                                         f"got {str(compression)[:40]!r}")
        if model == "theta" and compression != "none":
            raise WireError("malformed", "model 'theta' is served exact (compression 'none') only")
        plan = header.get("plan", False)
        if type(plan) is not bool:
            raise WireError("malformed", "header field 'plan' must be true or false")
        part = parts = version = digest = None
        if plan or "part" in header or "parts" in header:
            parts = header_int(header, "parts", lo=1, hi=MAX_PARTS)
        if "part" in header:
            if plan:
                raise WireError("malformed", "a request is a plan or a part, not both")
            part = header_int(header, "part", lo=0, hi=parts - 1)
            version = header_int(header, "version")
            if "digest" in header:
                digest = header_str(header, "digest", max_len=64)
        elif parts is not None and not plan:
            raise WireError("malformed", "header field 'parts' needs 'part' (or 'plan': true)")
        return cls(model, compression, plan, part, parts, version, digest)
