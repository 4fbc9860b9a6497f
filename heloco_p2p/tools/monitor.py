"""The live swarm view, read only from the run's DHT records (docs/protocol.md, "DHT records").

A monitor joins the DHT as a client: it serves nothing, writes no record and calls no peer, so
it cannot disturb training. What it shows is a pure function of the records it read::

    snap = snapshot(peers, claims, now=time.time(), silent_after=10, lease_seconds=10)
    snap["coordinator"]   # {"peer_id", "term", "version", "commits_per_min", "standbys"} or None
    snap["peers"]         # one dict per peer, keys PEER_KEYS (+ "shards" in a sharded run), sorted by name
    snap["commit_log"]    # Monitor only: the audit of the published commit logs (roles/commit_log.py), or None

``Monitor`` polls ``RunRecords`` and keeps what a single read cannot give: the mean staleness
over the submissions it saw (a peer record carries only its last one) and peers whose records
have expired (shown as silent rather than vanishing). ``render`` turns a snapshot into a rich
table. Times are the peers' own wall clocks: a peer whose clock runs behind the monitor's by
more than ``silent_after`` looks silent. The table fits the console it is printed on: columns
are abbreviated or dropped in a fixed order of priority (``NARROWING``) rather than every cell
being cut.
"""
from __future__ import annotations

import math
import time
from typing import Collection, Iterable, Mapping, Optional

from rich import box
from rich.console import Console, ConsoleOptions, Group
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.roles.commit_log import LogEntry, audit
from heloco_p2p.swarm.records import EvalRecord, GenesisRecord, LeaseRecord, PeerRecord

COORDINATOR_KEYS = ("peer_id", "term", "version", "commits_per_min", "standbys", "min_replicas", "replicas",
                    "waiting_for_standby")
PEER_KEYS = ("peer_id", "name", "region", "role", "device", "speed", "inner_steps", "staleness_last",
             "staleness_mean", "tokens", "last_loss", "bytes_in", "bytes_out", "last_seen", "alive", "rejected",
             "reachability", "client")

# peer_id -> (accepted count when last sampled, samples, sum of staleness over the samples)
StalenessHistory = Mapping[str, tuple[int, int, int]]


# ---------------------------------------------------------------------------- pure: records -> snapshot
def live_coordinator(claims: Iterable[LeaseRecord], now: float, lease_seconds: float) -> Optional[LeaseRecord]:
    """The claim a reader with no earlier belief and no holder keys would believe (roles/lease.py):
    the highest-term live claim; equal terms: the most recently renewed. ``Monitor`` applies the
    whole rule (earlier belief, holder binding) when it has a ``HolderKeys``."""
    return lease_rules.believe(None, [(b"", c) for c in claims], now, lease_seconds, lambda owner, peer: True)


def credit_view(lease: Optional[LeaseRecord], names: Mapping[str, str], refused: Mapping[str, Mapping[str, int]]) -> dict:
    """``{"peers": {peer_id: {...}}, "regions": {region: {...}}}``: the contribution credit the
    coordinator publishes in its lease (accepted commits and tokens, share of the run's tokens, the
    pseudo-gradients' mean cosine to the momentum, shares of blocks kept / rotated / shrunk, mean
    ‖Δ̂‖/‖Δ‖) with each peer's refusals, summed per region."""
    if lease is None:
        return {"peers": {}, "regions": {}}
    peers, regions = {}, {}
    for pid, c in lease.credit.items():
        region = lease.credit_regions.get(pid, "")
        row = {"name": names.get(pid, pid[-8:]), "region": region, "commits": int(c.get("commits", 0)),
               "tokens": int(c.get("tokens", 0)), "share": float(c.get("share", 0.0)),
               "rejected": int(sum(refused.get(pid, {}).values())),
               **{k: float(c.get(k, 0.0)) for k in ("cosine_mean", "kept", "rotated", "shrunk", "norm_ratio")}}
        peers[pid] = row
        agg = regions.setdefault(region or "?", {"peers": 0, "commits": 0, "tokens": 0, "share": 0.0, "rejected": 0})
        agg["peers"] += 1
        for k in ("commits", "tokens", "share", "rejected"):
            agg[k] += row[k]
    return {"peers": peers, "regions": dict(sorted(regions.items()))}


def validation_view(evals: Iterable[EvalRecord]) -> Optional[dict]:
    """The newest evaluator record: ``{"evaluator", "name", "version", "time", "mean", "per_language",
    "history": [{"version", "time", "mean", "per_language"}, ...]}``, or None without one."""
    latest = max(evals, key=lambda r: r.time, default=None)
    if latest is None:
        return None
    history = [{"version": v, "time": t, "mean": m, "per_language": dict(pl)} for v, t, m, pl in
               zip(latest.history_versions, latest.history_times, latest.history_means, latest.history_losses)]
    return {"evaluator": latest.peer_id, "name": latest.name, "version": latest.version, "time": latest.time,
            "mean": latest.mean, "per_language": dict(latest.losses), "history": history}


def peer_state(record: PeerRecord, now: float, silent_after: float) -> str:
    """``left`` (it withdrew), ``silent`` (no heartbeat for ``silent_after`` s) or ``alive``."""
    if record.role == "left":
        return "left"
    return "alive" if now - record.heartbeat <= silent_after else "silent"


def latest_per_peer(records: Iterable[PeerRecord]) -> dict[str, PeerRecord]:
    """One record per peer id: the one with the latest heartbeat."""
    out: dict[str, PeerRecord] = {}
    for r in records:
        if r.peer_id not in out or r.heartbeat > out[r.peer_id].heartbeat:
            out[r.peer_id] = r
    return out


def observe_staleness(history: StalenessHistory, peers: Iterable[PeerRecord]) -> dict[str, tuple[int, int, int]]:
    """``history`` with one more sample for each peer whose accepted count changed since the last
    sample (a record read twice counts once). Returns a new dict; ``history`` is not modified."""
    out = dict(history)
    for r in peers:
        if r.accepted <= 0:
            continue  # no accepted submission yet: its staleness field means nothing
        last_accepted, n, total = out.get(r.peer_id, (-1, 0, 0))
        if r.accepted != last_accepted:
            out[r.peer_id] = (r.accepted, n + 1, total + r.staleness)
    return out


def reachability(maddrs: Iterable[str]) -> str:
    """How others can dial a peer, from the addresses its record announces: ``direct`` (at least
    one address of its own), ``relayed`` (only through a relay's ``/p2p-circuit``) or ``none``."""
    maddrs = list(maddrs)
    if not maddrs:
        return "none"
    return "relayed" if all("/p2p-circuit" in m for m in maddrs) else "direct"


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) and x >= 0 else None  # peers publish -1 before their first loss


def peer_row(r: PeerRecord, now: float, silent_after: float, history: StalenessHistory, present: bool = True,
             refused: dict[str, int] | None = None) -> dict:
    """One peer's row; ``refused`` is what the live coordinator refused from it, by reason."""
    has_submitted = r.accepted > 0
    _, n, total = history.get(r.peer_id, (0, 0, 0))
    mean = total / n if n else (float(r.staleness) if has_submitted else None)
    row = {
        "peer_id": r.peer_id, "name": r.name, "region": r.region, "role": r.role, "device": r.device,
        "speed": float(r.steps_per_second), "inner_steps": r.inner_steps,
        "staleness_last": r.staleness if has_submitted else None, "staleness_mean": mean,
        "tokens": r.tokens, "last_loss": _finite_or_none(r.loss), "bytes_in": r.bytes_in, "bytes_out": r.bytes_out,
        "last_seen": r.heartbeat, "alive": present and peer_state(r, now, silent_after) == "alive",
        # refusals of this peer's requests: its own count of rejected submissions, or what the
        # coordinator's lease reports for it (by reason) when that is more
        "rejected": {"total": max(r.rejected, sum((refused or {}).values())), **dict(sorted((refused or {}).items()))},
        "reachability": reachability(r.maddrs),
        "client": bool(r.client),  # joined with --client-mode: nobody dials it; it never stands by or coordinates
    }
    if r.shards:  # swarm.shards > 1: its role in each shard it coordinates or stands by for
        row["shards"] = dict(r.shards)
    return row


def snapshot(peers: Iterable[PeerRecord], claims: Iterable[LeaseRecord], now: float, *, silent_after: float = 10.0,
             lease_seconds: float = 10.0, staleness_history: StalenessHistory | None = None,
             absent: Collection[str] = (), lease: Optional[LeaseRecord] = None,
             evals: Iterable[EvalRecord] = (), commit_log: Optional[dict] = None) -> dict:
    """The swarm as the records describe it at time ``now`` (see the module docstring).

    :param peers: peer records (several per peer id are allowed: the latest heartbeat wins)
    :param claims: lease claims (DHT-unexpired ones; lapsed leases are filtered here too)
    :param now: the monitor's wall clock (unix seconds)
    :param silent_after: a peer whose heartbeat is older than this is not alive
    :param lease_seconds: a claim is live until ``renewed + lease_seconds``
    :param staleness_history: from ``observe_staleness``; without it the mean is the last value
    :param absent: ids of peers whose records were read earlier but have left the DHT since
        (withdrawn or expired): shown, never alive
    :param lease: the claim the reader believes (``Monitor``: the holder-bound rule); default:
        ``live_coordinator(claims)``
    :param evals: evaluator records (``validation``)
    :param commit_log: ``roles.commit_log.audit`` of the coordinators' published logs (``Monitor``)
    :return: ``{"coordinator": dict | None, "peers": [dict, ...], "credit": dict, "validation": dict | None}``
        with keys COORDINATOR_KEYS / PEER_KEYS;
        ``last_seen`` is the heartbeat's unix time; ``staleness_*`` and ``last_loss`` are None before
        the peer's first accepted submission / first round
    """
    history = staleness_history or {}
    if lease is None:
        lease = live_coordinator(claims, now, lease_seconds)
    coordinator = None if lease is None else {
        "peer_id": lease.peer_id, "term": lease.term, "version": lease.version,
        "commits_per_min": float(lease.commits_per_minute), "standbys": list(lease.standbys),
        "min_replicas": lease.min_replicas, "replicas": lease.replicas, "waiting_for_standby": lease.waiting_for_standby,
    }
    refused = lease.rejections if lease is not None else {}
    latest = latest_per_peer(peers)
    rows = [peer_row(r, now, silent_after, history, present=r.peer_id not in absent, refused=refused.get(r.peer_id))
            for r in latest.values()]
    rows.sort(key=lambda row: (row["name"], row["peer_id"]))
    names = {pid: r.name for pid, r in latest.items()}
    return {"coordinator": coordinator, "peers": rows, "credit": credit_view(lease, names, refused),
            "validation": validation_view(evals), "commit_log": commit_log}


# ---------------------------------------------------------------------------- polling
class Monitor:
    """Polls one run's records and builds snapshots; remembers staleness samples and peers
    whose records left the DHT (shown not alive for ``forget_after`` seconds after their last
    heartbeat). A peer's record expires 4 heartbeats after its last one; a peer that leaves
    overwrites it with role ``left``.

    :param records: a ``RunRecords`` (only its ``peers()`` and ``lease_claims()`` are called)
    :param silent_after: seconds without a heartbeat after which a peer is shown silent
    :param lease_seconds: the run's lease period (a claim is live until renewed + this)
    :param forget_after: drop a silent peer from the view this long after its last heartbeat
    """

    def __init__(self, records, silent_after: float = 10.0, lease_seconds: float = 10.0, forget_after: float = 600.0,
                 holder_keys=None, shards: int = 1):
        self.records = records
        # swarm.shards > 1: one reader per further shard, over that shard's lease and commit log keys
        self.shard_monitors = [Monitor(records.for_shard(k), silent_after, lease_seconds, forget_after, holder_keys)
                               for k in range(1, shards)]
        # with a HolderKeys, the lease is believed by the peers' own rule (roles/lease.py): a claim its
        # holder did not sign, or that does not follow the lease believed before, is not shown
        self.holder_keys = holder_keys
        self.believed: Optional[LeaseRecord] = None
        self.silent_after, self.lease_seconds, self.forget_after = silent_after, lease_seconds, forget_after
        self.known: dict[str, PeerRecord] = {}
        self.history: dict[str, tuple[int, int, int]] = {}
        self.lease: Optional[LeaseRecord] = None  # the live claim of the last poll (its branch counts, run tokens)
        self.logs: dict[bytes, tuple[float, list]] = {}  # owner -> (when read, its commit log entries)

    def poll(self, now: float | None = None) -> dict:
        peers = self.records.peers()
        if self.holder_keys is not None:
            owned = self.records.lease_claims_by_owner()
            claims, checker = [c for _, c in owned], self.holder_keys.signed_by_holder
        else:
            claims = self.records.lease_claims()
            owned, checker = [(b"", c) for c in claims], (lambda owner, peer: True)
        evals = self.records.evals() if hasattr(self.records, "evals") else []
        now = time.time() if now is None else now
        self.known.update(latest_per_peer(list(self.known.values()) + peers))
        self.known = {pid: r for pid, r in self.known.items() if now - r.heartbeat <= self.forget_after}
        self.history = observe_staleness(self.history, peers)
        present = {r.peer_id for r in peers}
        believed = lease_rules.believe(self.believed, owned, now, self.lease_seconds, checker)
        if believed is not None:
            self.believed = believed
        self.lease = believed
        if self.holder_keys is not None and self.believed is not None:
            for pid in self.believed.standbys:  # learn the heirs' keys before they claim
                self.holder_keys.get(pid)
        snap = snapshot(self.known.values(), claims, now, silent_after=self.silent_after,
                        lease_seconds=self.lease_seconds, staleness_history=self.history,
                        absent=[pid for pid in self.known if pid not in present], lease=believed, evals=evals,
                        commit_log=self.audit_log(now, checker))
        if self.shard_monitors:
            views = [snap] + [m.poll(now) for m in self.shard_monitors]
            snap["shards"] = [{"shard": k, "coordinator": v["coordinator"], "commit_log": v.get("commit_log")}
                              for k, v in enumerate(views)]
            snap["placement"] = shard_placement([v["coordinator"] for v in views], snap["peers"])
        return snap

    def audit_log(self, now: float, signed_by_holder) -> Optional[dict]:
        """Check the coordinators' published commit logs (roles/commit_log.py): each one chain, all
        agreeing at every version, the believed lease's θ at its version. Only logs signed by the
        peer they name count (a participant cannot raise a false alarm); a log read once is kept
        ``forget_after`` seconds, so a deposed coordinator's log is still compared with its heir's."""
        if not hasattr(self.records, "commit_logs"):
            return None
        for owner, record in self.records.commit_logs():
            if signed_by_holder(owner, record.peer_id):
                try:
                    entries = [LogEntry.from_dict(e.dict()) for e in record.entries]
                except ValueError:
                    continue
                self.logs[owner] = (now, entries)
        self.logs = {o: (t, e) for o, (t, e) in self.logs.items() if now - t <= self.forget_after}
        if not self.logs:
            return None
        lease = self.believed
        return audit([e for _, e in self.logs.values()], lease.version if lease else None, lease.digest if lease else None)


def shard_placement(coordinators: list[Optional[dict]], peers: Iterable[dict]) -> dict:
    """Who holds which shard (swarm.shards > 1): ``holders`` peer id -> its shards, ``stacked`` the
    peers holding more than one, and ``fewer_peers``: whether that is because fewer live peers that
    accept connections (a direct or relayed address) than shards could hold one."""
    holders: dict[str, list[int]] = {}
    for k, c in enumerate(coordinators):
        if c is not None:
            holders.setdefault(c["peer_id"], []).append(k)
    able = [p for p in peers if p.get("alive") and p.get("reachability") != "none"]
    stacked = {pid: ks for pid, ks in holders.items() if len(ks) > 1}
    return {"holders": holders, "stacked": stacked, "fewer_peers": bool(stacked) and len(able) < len(coordinators)}


def wait_for_genesis(records, timeout: float, poll: float = 0.5) -> Optional[GenesisRecord]:
    """The run's genesis record, read until found or ``timeout`` seconds passed (a new DHT client
    may need a moment to find the nodes that store it)."""
    deadline = time.time() + timeout
    while True:
        genesis = records.genesis()
        if genesis is not None or time.time() >= deadline:
            return genesis
        time.sleep(poll)


# ---------------------------------------------------------------------------- rendering
def human_count(n: float) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}"


def human_bytes(n: float) -> str:
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return f"{n:.0f}B"


def human_age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _refusals(rejected: dict) -> str:
    """``3`` or ``3 (rate_limited 2, too_stale 1)``: the total, and the reasons when known."""
    reasons = ", ".join(f"{k} {v}" for k, v in rejected.items() if k != "total")
    return str(rejected["total"]) + (f" ({reasons})" if reasons else "")


def display_names(peers: Iterable[dict]) -> dict[str, str]:
    """peer id -> the name to show: its name, or ``name~<id tail>`` when several peers share it."""
    peers = list(peers)
    taken = [p["name"] for p in peers]
    return {p["peer_id"]: p["name"] if p["name"] and taken.count(p["name"]) == 1
            else f"{p['name']}~{p['peer_id'][-6:]}" for p in peers}


COLUMNS = ("peer", "reg", "role", "dev", "st/s", "H", "stale", "tokens", "loss", "rej", "in/out", "seen", "net")
# How the table narrows to fit, step by step until it does: the least useful detail goes first.
# peer, role and tokens are never dropped (what is the peer doing, and is it contributing).
NARROWING = (("abbreviate", "rej"), ("drop", "dev"), ("drop", "in/out"), ("drop", "net"), ("abbreviate", "role"),
             ("drop", "H"), ("drop", "rej"), ("drop", "st/s"), ("drop", "reg"), ("drop", "seen"), ("drop", "stale"),
             ("drop", "loss"))
SHORT_ROLES = {"coordinator": "coord", "standby": "stby", "training": "train", "catching_up": "catch",
               "observer": "obs", "silent": "silent", "left": "left"}
CAPTION = {"st/s": "st/s and H: of the last round", "stale": "stale: staleness last/mean",
           "rej": "rej: requests refused (by reason, as the coordinator reports them)", "in/out": "in/out: bytes",
           "seen": "seen: last heartbeat", "net": "net: how others dial it (direct, relayed, none)"}


class PeerTable:
    """The peer table, built for the width of the console it is printed on (see ``NARROWING``)."""

    def __init__(self, peers: list[dict], now: float):
        self.peers, self.now = peers, now
        self.names = display_names(peers)

    def cells(self, p: dict, abbreviated: set[str]) -> dict[str, Text | str]:
        if p["role"] == "left":
            role, style = "left", "dim"
        elif not p["alive"]:
            role, style = "silent", "bold red"
        else:
            role, style = p["role"], "bold cyan" if p["role"] == "coordinator" else "green"
        if "role" in abbreviated:
            role = SHORT_ROLES.get(role, role[:5])
        rejected = p["rejected"]
        return {
            "peer": self.names[p["peer_id"]], "reg": p["region"], "role": Text(role, style=style), "dev": p["device"],
            "st/s": f"{p['speed']:.2f}", "H": str(p["inner_steps"]),
            "stale": "-" if p["staleness_last"] is None else f"{p['staleness_last']}/{p['staleness_mean']:.1f}",
            "tokens": human_count(p["tokens"]), "loss": "-" if p["last_loss"] is None else f"{p['last_loss']:.3f}",
            "rej": str(rejected["total"]) if "rej" in abbreviated else _refusals(rejected),
            "in/out": f"{human_bytes(p['bytes_in'])}/{human_bytes(p['bytes_out'])}",
            "seen": human_age(self.now - p["last_seen"]), "net": p.get("reachability", "-"),
        }

    def build(self, dropped: set[str], abbreviated: set[str]) -> Table:
        shown = [c for c in COLUMNS if c not in dropped]
        caption = "; ".join(text for col, text in CAPTION.items() if col in shown)
        if dropped:
            caption += f" (not shown, to fit: {', '.join(c for c in COLUMNS if c in dropped)})"
        alive = sum(p["alive"] for p in self.peers)
        table = Table(title=f"{alive} of {len(self.peers)} peers alive", title_justify="left", box=box.SIMPLE_HEAD,
                      pad_edge=False, collapse_padding=True, caption=caption, caption_justify="left")
        for col in shown:
            table.add_column(col, justify="left" if col in ("peer", "reg", "role", "dev", "net") else "right",
                             no_wrap=True)
        for p in self.peers:
            cells = self.cells(p, abbreviated)
            table.add_row(*(cells[c] for c in shown), style="dim" if not p["alive"] else None)
        return table

    def fitted(self, console: Console, width: int) -> Table:
        """The widest form of the table (fewest steps of ``NARROWING``) that fits in ``width``."""
        dropped: set[str] = set()
        abbreviated: set[str] = set()
        wide = console.options.update_width(10_000)  # measure the natural width, not one clamped to the console's
        table = self.build(dropped, abbreviated)
        for action, col in NARROWING:
            if Measurement.get(console, wide, table).maximum <= width:
                break
            (dropped if action == "drop" else abbreviated).add(col)
            table = self.build(dropped, abbreviated)
        return table

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        yield self.fitted(console, options.max_width)


def render(snap: dict, run_id: str, now: float, genesis: GenesisRecord | None = None, note: str = ""):
    """A rich renderable: the run and its coordinator above one table row per peer, fitted to the
    console's width when printed."""
    peers = snap["peers"]
    names = display_names(peers)
    head = Text(f"run {run_id}", style="bold")
    if genesis is not None:
        budget = ", ".join(b for b in (f"{genesis.max_versions} versions" if genesis.max_versions else "",
                                       f"{human_count(genesis.max_tokens)} tokens" if genesis.max_tokens else "") if b)
        founder = names.get(genesis.founder, genesis.founder[-8:])
        head.append(f"  founded {human_age(now - genesis.created)} ago by {founder}"
                    f"  config {genesis.config_digest[:12]}  budget: {budget or 'none'}", style="dim")
    c = snap["coordinator"]
    if c is None:
        coord = Text("coordinator: none (no live lease: an election may be under way)", style="yellow")
    else:
        standbys = ", ".join(names.get(s, s[-8:]) for s in c["standbys"]) or "none"
        label = "shard 0 coordinator " if snap.get("shards") else "coordinator "
        coord = Text.assemble((label, "bold"), (names.get(c["peer_id"], c["peer_id"][-8:]), "bold cyan"),
                              f"  term {c['term']}  version {c['version']}  {c['commits_per_min']:.1f} commits/min"
                              f"  standbys: {standbys}")
    if c is not None and c.get("waiting_for_standby"):
        coord.append("  waiting for a standby: submissions are answered busy", style="bold yellow")
    elif c is not None and c.get("min_replicas") == 0:
        coord.append("  min_replicas 0: acknowledged commits are lost if the coordinator dies", style="yellow")
    elif c is not None and not c["standbys"]:
        coord.append("  no standby: commits are not replicated", style="yellow")
    parts = [head, coord]
    for view in snap.get("shards", [])[1:]:
        c = view["coordinator"]
        if c is None:
            parts.append(Text(f"shard {view['shard']}: no coordinator (no live lease: an election may be under way)",
                              style="yellow"))
            continue
        standbys = ", ".join(names.get(s, s[-8:]) for s in c["standbys"]) or "none"
        parts.append(Text.assemble((f"shard {view['shard']} coordinator ", "bold"),
                                   (names.get(c["peer_id"], c["peer_id"][-8:]), "bold cyan"),
                                   f"  term {c['term']}  version {c['version']}  {c['commits_per_min']:.1f} commits/min"
                                   f"  standbys: {standbys}"))
    placement = snap.get("placement")
    if placement and placement["stacked"]:
        held = "; ".join(f"{names.get(p, p[-8:])} holds shards {', '.join(map(str, ks))}"
                         for p, ks in placement["stacked"].items())
        why = "fewer peers that accept connections than shards" if placement["fewer_peers"] else \
            "a handover to a free standby is due"
        parts.append(Text(f"shards: {held} ({why})", style="yellow"))
    log = snap.get("commit_log")
    if log is not None:
        if log["forks"]:
            f = log["forks"][0]
            parts.append(Text(f"commit log: FORK at version {f['version']} (terms {', '.join(map(str, f['terms']))}): "
                              f"two lineages of the run; {len(log['forks'])} versions differ", style="bold red"))
        elif log["problems"]:
            parts.append(Text(f"commit log: BROKEN: {log['problems'][0]}", style="bold red"))
        else:
            parts.append(Text(f"commit log: one chain, versions {log['first']}-{log['last']}, head {log['head'][:12]}",
                              style="dim"))
    val = snap.get("validation")
    if val is not None:
        langs = "  ".join(f"{r} {v:.2f}" for r, v in sorted(val["per_language"].items()))
        parts.append(Text(f"validation (version {val['version']}, {human_age(now - val['time'])} ago): "
                          f"mean {val['mean']:.3f}  {langs}"))
    regions = snap.get("credit", {}).get("regions", {})
    if regions:
        parts.append(Text("credit by region: " + "  ".join(
            f"{r} {100 * a['share']:.0f}% ({a['commits']} commits)" for r, a in regions.items())))
    parts.append(PeerTable(peers, now))
    if note:
        parts.append(Text(note, style="yellow"))
    return Group(*parts)
