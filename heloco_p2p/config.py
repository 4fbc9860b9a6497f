"""Run configuration: YAML files in configs/, validated by a schema at load time.

A run config says which model to train, on which regional data, with which inner and outer
optimizers. Every section forbids unknown keys and checks types and ranges, so a typo or an
impossible value fails at load with the file, the key and what is allowed::

    cfg = load_config("configs/tiny.yaml")
    cfg.model.hidden_size, cfg.inner.lr, cfg.outer.optimizer

Overrides use dotted keys: ``load_config(path, overrides={"inner.lr": 1e-3})``.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from heloco_p2p.algorithms import ALGORITHMS, resolve_outer
from heloco_p2p.outer import registry
from heloco_p2p.swarm.sparse import TopkCodec, check_params

REPO_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=False, validate_assignment=True)


class ModelConfig(_Section):
    """A LlamaForCausalLM shape. ``nominal_params`` is the size the config declares (embeddings
    included); tests check the built model is within 20% of it."""

    arch: Literal["llama"] = "llama"
    nominal_params: int = Field(gt=0)
    vocab_size: int = Field(4096, gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(None, gt=0)
    max_seq_len: int = Field(512, gt=0)
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "ModelConfig":
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        kv = self.num_kv_heads or self.num_heads
        if self.num_heads % kv:
            raise ValueError(f"num_heads ({self.num_heads}) must be divisible by num_kv_heads ({kv})")
        return self


class DataConfig(_Section):
    """Where each region's text comes from and how it is cut into token blocks.

    ``regions`` maps a region name to a source spec (see heloco_p2p.data.sources):
    ``bible:<lang>[:<translation>]``, ``files:<glob>`` or ``hf:<dataset>[:<config>]``.
    A region not listed falls back to ``bible:<region>``.
    """

    tokenizer: str = "builtin"  # "builtin" (trained on the built-in corpus, cached) or a path
    vocab_size: int = Field(4096, gt=256)
    seq_len: int = Field(128, gt=1)
    regions: dict[str, str] = Field(default_factory=dict)
    val_blocks: int = Field(32, gt=0)  # validation blocks per language (fixed, same every time)


class InnerConfig(_Section):
    """The inner loop: AdamW (or bitsandbytes 8-bit AdamW), warmup + cosine, clipping.

    The cosine ends at ``min_lr_ratio``·lr (default 0.1), or at the absolute ``min_lr`` when that
    is given (HeLoCo's paper: 1e-6 with no warm-up); giving both is an error. The schedule counts
    the worker's own inner steps over ``total_steps`` and stays at the floor after them.
    ``fresh_optimizer``: a new AdamW every round (HeLoCo's paper) instead of one kept across rounds.
    """

    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_steps: int = Field(50, ge=0)
    total_steps: int = Field(10_000, gt=0)  # horizon of the cosine schedule
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    min_lr: float | None = Field(None, ge=0)  # absolute floor of the cosine (exclusive with min_lr_ratio)
    fresh_optimizer: bool = False  # a new inner optimizer (no moments) at the start of every round
    grad_clip: float = Field(1.0, ge=0)  # 0 disables clipping
    batch_size: int = Field(16, gt=0)
    steps_per_round: int = Field(50, gt=0)  # H
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    device: str = "auto"
    threads: int = Field(0, ge=0)  # torch.set_num_threads; 0 leaves torch's default

    @model_validator(mode="after")
    def _betas_in_range(self) -> "InnerConfig":
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must each be in [0, 1), got {self.betas}")
        if self.warmup_steps >= self.total_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be < total_steps ({self.total_steps})")
        if self.min_lr is not None:
            if "min_lr_ratio" in self.model_fields_set:
                raise ValueError(f"min_lr ({self.min_lr}) and min_lr_ratio ({self.min_lr_ratio}) are both set: the "
                                 f"floor of the cosine is one or the other; remove one")
            if self.min_lr > self.lr:
                raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        return self


class OuterConfig(_Section):
    """The outer optimizer and the correction of incoming pseudo-gradients, chosen by name from
    the registries in heloco_p2p.outer (e.g. ``optimizer: lookahead``, ``correction: heloco``).
    ``optimizer_args`` / ``correction_args`` go to the chosen class and are checked against it.
    ``algorithm`` names a preset instead (heloco_p2p.algorithms; ``heloco-peer algorithms`` lists
    them); it sets the mode (sync or async), optimizer, correction, dispatch, staleness weight and
    DyLU, and ``optimizer_args`` / ``correction_args`` given here are checked against the preset's
    components and override its arguments; ``dispatch``, ``staleness_weight``, ``weight_order``
    and ``fairness`` given here replace the preset's (left out: the preset's). With a preset,
    ``optimizer``, ``correction`` and ``dylu`` here are not used."""

    algorithm: str | None = None  # a named preset (heloco_p2p.algorithms), e.g. heloco or sync_diloco
    optimizer: str = "lookahead"
    optimizer_args: dict[str, Any] = Field(default_factory=dict)
    correction: str = "none"
    correction_args: dict[str, Any] = Field(default_factory=dict)
    # where a round starts: current (θ) | lookahead (θ̄ = θ − η·μ·m, HeLoCo's Eq. 5); None: the preset's, else current
    dispatch: Literal["current", "lookahead"] | None = None
    # ρ: none | inverse_sqrt | power | base (1/√K) | base_inverse_sqrt; None: the preset's, else none
    staleness_weight: str | None = None
    staleness_weight_args: dict[str, Any] = Field(default_factory=dict)
    # ρ applied after the correction (G = ρ·Δ̂) or before it (Δ̂ of ρΔ); None: the preset's, else after
    weight_order: Literal["after", "before"] | None = None
    # region-fair weight ρ_w per sender: none | compute_time | commit_share (None: the preset's, else none)
    fairness: str | None = None
    fairness_args: dict[str, Any] = Field(default_factory=dict)
    dylu: bool = False
    dylu_min_steps: int = Field(1, gt=0)


class DefenceConfig(_Section):
    """Bounds on poisoned pseudo-gradients (heloco_p2p/roles/defence.py; docs/security.md,
    "Poisoning"). On by default, in open and keyed runs alike (a key holder can go bad too)."""

    enabled: bool = True
    # per-peer norm bound: ‖Δ‖ ≤ norm_factor × the median, over the other peers, of each peer's median
    # of its last norm_window accepted norms (peers with min_norms of them vote; with fewer than
    # min_voters voters the run-wide rule, swarm.norm_factor, applies)
    norm_factor: float = Field(5.0, gt=1)
    # norm clip: an accepted Δ above clip_factor × the same median is scaled down to it (None: off);
    # at most norm_factor (above it the Δ is refused)
    clip_factor: float | None = Field(1.0, gt=0)
    norm_window: int = Field(8, gt=0)
    min_norms: int = Field(2, gt=0)
    min_voters: int = Field(2, gt=0)
    # commit share: a peer's commits in the last share_window seconds ≤ share_factor × the other active
    # peers' median count (at least share_min); over it the submission is answered busy (retry_after)
    share_factor: float = Field(2.0, gt=1)
    share_window: float = Field(120.0, gt=0)
    share_min: int = Field(4, gt=0)
    # replay: refuse a Δ whose sketch has a cosine above replay_cosine with one of the last replay_window commits
    replay_window: int = Field(256, gt=0)
    replay_cosine: float = Field(0.999, gt=0, le=1)
    sketch_dim: int = Field(256, gt=0)
    # loss screening at the coordinator: refuse a Δ whose loss change at θ−Δ on screen_blocks held-out
    # blocks per language exceeds the margin (nats) on the sender's language or on the mean over languages
    screen: bool = True
    screen_blocks: int = Field(2, gt=0)
    screen_tokens: int = Field(128, gt=1)  # of each block, the first this many tokens
    screen_scale: float = Field(0.1, gt=0)  # the candidate is scored at θ − screen_scale × Δ
    screen_own_margin: float = Field(0.05, ge=0)
    screen_mean_margin: float = Field(0.5, ge=0)
    # and refuse one whose whole update (θ − Δ) makes the sender's own language worse by more than this (None: off).
    # Off by default: at a large outer lr (0.7) θ moves far between a peer's base and the commit and it refuses
    # honest Δs too; configs/testnet.yaml (outer lr 0.1, where it was measured) turns it on
    screen_full_own_margin: float | None = None

    @model_validator(mode="after")
    def _clip_below_refusal(self):
        if self.clip_factor is not None and self.clip_factor > self.norm_factor:
            raise ValueError(f"swarm.defence.clip_factor ({self.clip_factor:g}) is above norm_factor "
                             f"({self.norm_factor:g}): a Δ that large is refused, not clipped; lower clip_factor "
                             "or set it to null (off)")
        return self


TOPK_KEYS = ("topk_density", "topk_bits", "topk_chunk")


class SwarmConfig(_Section):
    """Timing and limits of the real swarm (heloco-peer join).

    ``compression: topk`` sends pseudo-gradients sparse and low-bit with error feedback on the
    sender (swarm/sparse.py, swarm/uplink.py): per chunk of ``topk_chunk`` values the
    ``topk_density`` share of largest magnitudes, each in ``topk_bits`` bits plus its index, one
    bf16 scale per chunk; ``topk_bits: 1`` sends the sign only (scaled by the chunk's mean kept
    magnitude), and a chunk that keeps all its values (``topk_density: 1``) sends no indices
    (bits 1, chunk 128: 1.125 bits per parameter); ``sparse.bits_per_param`` gives the cost."""

    compression: Literal["none", "fp16", "8bit", "topk"] = "none"  # pseudo-gradients on the wire
    topk_density: float = Field(0.02, gt=0, le=1)  # share of each chunk's values sent (topk)
    topk_bits: int = Field(2, ge=1, le=8)  # bits per sent value, sign included; 1: sign only (topk)
    topk_chunk: int = Field(128, ge=16, le=4096)  # values per chunk, a power of two (topk)
    # θ̄ in replies: "none" (fp32, exact), "fp16", "8bit" (lossy, re-encoded per reply), or "wrap8" (8 bits per
    # parameter on a power-of-two grid chosen once per version, within half a grid step of θ̄: swarm/downlink.py)
    reply_compression: Literal["none", "fp16", "8bit", "wrap8"] = "none"
    # wrap8: a sender whose base is at most this many versions old gets the 8-bit reply, an older one fp32
    reply_window: int = Field(16, ge=1, le=1024)
    lease_seconds: float = Field(10.0, gt=0)  # a coordinator lease lapses this long after its last renewal
    heartbeat_seconds: float = Field(3.0, gt=0)
    num_standbys: int = Field(1, ge=0)
    # a submission is acknowledged only once this many standbys hold its commit (0: acknowledge
    # unreplicated commits, which a coordinator's death loses: docs/reliability.md)
    min_replicas: int = Field(1, ge=0)
    max_staleness: int = Field(64, ge=0)
    norm_factor: float = Field(10.0, gt=1)  # reject ‖Δ‖ above this × the median of recent accepted norms
    max_steps: int = Field(100_000, gt=0)  # inner steps one submission may claim (they set the run's lr schedule)
    # flood control at the coordinator (docs/security.md): per peer, a token bucket of submit_burst
    # submissions refilled at submit_rate per second ("rate_limited"); in all, max_pending_submits
    # admitted and not yet answered ("busy"), which bounds the memory submissions can take
    submit_rate: float = Field(2.0, ge=0)  # 0: no per-peer limit
    submit_burst: float = Field(10.0, ge=1)
    max_pending_submits: int = Field(8, gt=0)
    submit_timeout: float = Field(120.0, gt=0)
    barrier_timeout: float = Field(300.0, gt=0)  # sync mode: commit what arrived after this long
    max_versions: int = Field(0, ge=0)  # the run's budget in commits (0: none)
    max_tokens: int = Field(0, ge=0)  # the run's budget in tokens (0: none)
    checkpoint_every: int = Field(50, gt=0)  # commits between coordinator checkpoints
    # train the next round while a submission travels, folding its reply in mid-round (docs/protocol.md)
    overlap: bool = True
    # the coordinator role sharded by parameter blocks (roles/shards.py, docs/protocol.md "Sharded
    # coordinators"): S shard coordinators, each with its own lease, term, standbys and version
    shards: int = Field(1, ge=1, le=32)
    defence: DefenceConfig = Field(default_factory=DefenceConfig)  # poisoning bounds (docs/security.md)

    @model_validator(mode="after")
    def _topk(self) -> "SwarmConfig":
        try:
            check_params(self.topk_density, self.topk_bits, self.topk_chunk)
        except ValueError as exc:
            raise ValueError(f"swarm.{exc}") from None
        # a value other than the default, not merely a key present: a dumped config (to_yaml, the
        # genesis files, checkpoints) lists every key and must load again
        fields = type(self).model_fields
        given = [k for k in TOPK_KEYS if getattr(self, k) != fields[k].default]
        if given and self.compression != "topk":
            raise ValueError(f"{', '.join(given)} only apply to compression: topk (compression is "
                             f"{self.compression!r}); set compression: topk or remove them")
        if self.reply_window != fields["reply_window"].default and self.reply_compression != "wrap8":
            raise ValueError(f"reply_window only applies to reply_compression: wrap8 (reply_compression is "
                             f"{self.reply_compression!r}); set reply_compression: wrap8 or remove it")
        return self

    def topk_codec(self) -> TopkCodec:
        return TopkCodec(self.topk_density, self.topk_bits, self.topk_chunk)


class RunConfig(_Section):
    name: str = "run"
    model: ModelConfig
    data: DataConfig = Field(default_factory=DataConfig)
    inner: InnerConfig = Field(default_factory=InnerConfig)
    outer: OuterConfig = Field(default_factory=OuterConfig)
    swarm: SwarmConfig = Field(default_factory=SwarmConfig)

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.model.vocab_size != self.data.vocab_size:
            raise ValueError(
                f"model.vocab_size ({self.model.vocab_size}) must equal data.vocab_size ({self.data.vocab_size})"
            )
        if self.swarm.min_replicas > self.swarm.num_standbys:
            raise ValueError(f"swarm.min_replicas ({self.swarm.min_replicas}) exceeds swarm.num_standbys "
                             f"({self.swarm.num_standbys}): no commit could ever be acknowledged")
        if self.swarm.shards > 1:
            mode, _ = resolve_outer(self.outer)
            if mode == "sync":
                raise ValueError("swarm.shards > 1 needs an asynchronous outer algorithm (the sync barrier is one "
                                 "commit over all blocks)")
            if self.swarm.defence.enabled and self.swarm.defence.screen:
                raise ValueError("swarm.shards > 1 cannot use swarm.defence.screen (the loss screen scores the whole "
                                 "model; no shard coordinator holds it): set swarm.defence.screen: false")
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")
        return self

    def digest(self) -> str:
        """sha256 of the canonical JSON of this config: part of a run's identity. Sections added
        later are left out while they hold their defaults (``swarm.topk_*`` without topk,
        ``swarm.reply_window`` without wrap8, ``swarm.defence``), so that runs, checkpoints and simulator logs from before they existed
        keep their identity."""
        tree = self.model_dump(mode="json")
        if self.swarm.compression != "topk":
            for key in TOPK_KEYS:
                tree["swarm"].pop(key, None)
        if self.swarm.reply_compression != "wrap8":
            tree["swarm"].pop("reply_window", None)
        if tree["swarm"].get("shards") == 1:  # unsharded runs keep the identity they had
            tree["swarm"].pop("shards")
        if tree["swarm"].get("defence") == DefenceConfig().model_dump(mode="json"):
            tree["swarm"].pop("defence")
        blob = json.dumps(tree, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def resolve_config_path(path: str | Path) -> Path:
    """A path as given, or a bare name (``tiny``, ``tiny.yaml``) looked up in the repository's configs/."""
    p = Path(path)
    if p.exists():
        return p
    for candidate in (REPO_CONFIG_DIR / p.name, REPO_CONFIG_DIR / f"{p.name}.yaml"):
        if candidate.exists():
            return candidate
    raise ConfigError(f"{path}: no such config file (also looked in {REPO_CONFIG_DIR})")


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key}: {part} is not a section")
    node[parts[-1]] = value


def format_errors(source: str, err: ValidationError) -> str:
    """pydantic's errors as ConfigError text: ``source``, then one line per bad key and what is allowed."""
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        key = ".".join(str(x) for x in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key (check the spelling; allowed keys are the fields of its section)")
        else:
            allowed = ""
            ctx = e.get("ctx") or {}
            if "expected" in ctx:
                allowed = f" (allowed: {ctx['expected']})"
            lines.append(f"  {key}: {e['msg']}{allowed}; got {e.get('input')!r}")
    return "\n".join(lines)


def config_from_dict(tree: dict, source: str = "<dict>") -> RunConfig:
    """Validate a config tree; raise ConfigError naming ``source`` and each bad key."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: a config must be a mapping at the top level, got {type(tree).__name__}")
    tree = _lists_to_tuples(tree)
    try:
        cfg = RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_errors(source, err)) from None
    _check_outer_names(cfg, source)
    return cfg


def _lists_to_tuples(tree: dict) -> dict:
    # YAML has no tuples; strict mode would refuse a list where a pair is expected.
    inner = tree.get("inner")
    if isinstance(inner, dict) and isinstance(inner.get("betas"), list):
        tree = {**tree, "inner": {**inner, "betas": tuple(inner["betas"])}}
    return tree


def _check_outer_names(cfg: RunConfig, source: str) -> None:
    """Check the outer section's names and arguments against the components it resolves to: with
    ``algorithm: heloco``, ``correction_args`` are the heloco correction's, not those of the
    section's own ``correction`` field (which a preset does not use)."""
    if cfg.outer.algorithm is not None and cfg.outer.algorithm not in ALGORITHMS:
        raise ConfigError(f"{source}: outer.algorithm: unknown algorithm {cfg.outer.algorithm!r}; "
                          f"allowed: {', '.join(ALGORITHMS)}")
    _, preset = resolve_outer(cfg.outer)
    try:
        registry.check_args("optimizer", preset.optimizer, preset.optimizer_args)
        registry.check_args("correction", preset.correction, preset.correction_args)
        registry.check_args("staleness_weight", preset.staleness_weight, preset.staleness_weight_args)
        registry.check_args("fairness", preset.fairness, preset.fairness_args)
    except ValueError as exc:
        raise ConfigError(f"{source}: outer.{exc}") from None


def read_yaml(path: str | Path) -> Any:
    """The YAML document in a file ({} for an empty one); ConfigError naming the file when it is not
    valid YAML. Every config-like file (run and simulator configs, peer profiles, run metadata) is read here."""
    try:
        return yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load and validate a YAML run config (see module docstring)."""
    p = resolve_config_path(path)
    tree = read_yaml(p)
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source=str(p))
