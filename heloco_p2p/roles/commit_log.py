"""The run's auditable commit log: a hash chain over every commit, replicated with the commit
state, its last entries published in the DHT by the coordinator (signed: the record lives under
the coordinator's owner subkey, which only its key can write), checked by anyone.

Entry i carries the hash of entry i − 1, and its own hash covers that link, the version, the
term, the sender, its sequence number, the base version and the digest of θ after the commit.
Coordinator and standbys append the same entries (the standby only once its θ digest equals the
coordinator's), so their chain heads are equal; a takeover continues the chain. Two entries of
the same version with different hashes are a fork: two lineages of the run (``find_forks``).
Pure: no I/O.
"""
from __future__ import annotations

import hashlib
import json
from collections import deque
from dataclasses import asdict, dataclass

ROOT = "0" * 32  # the link of the first entry of a run
LOG_KEPT = 64  # entries kept (and replicated); the DHT record carries the newest PUBLISHED of them
PUBLISHED = 32


def entry_hash(prev: str, version: int, term: int, peer: str, seq: int, base_version: int, digest: str) -> str:
    body = json.dumps([prev, version, term, peer, seq, base_version, digest], separators=(",", ":"))
    return hashlib.blake2b(body.encode(), digest_size=16).hexdigest()


@dataclass(frozen=True)
class LogEntry:
    version: int
    term: int
    peer: str  # the sender (a synchronous commit: the senders joined by commas)
    seq: int  # its sequence number (-1 for a synchronous commit)
    base_version: int
    digest: str  # θ after the commit
    prev: str  # the previous entry's hash (ROOT for the run's first)
    hash: str

    def valid(self) -> bool:
        return self.hash == entry_hash(self.prev, self.version, self.term, self.peer, self.seq, self.base_version,
                                       self.digest)

    @classmethod
    def from_dict(cls, d: dict) -> "LogEntry":
        """:raises ValueError: fields missing or of the wrong type"""
        try:
            entry = cls(**{k: d[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError) as exc:
            raise ValueError(f"commit log entry: {exc}") from None
        ints = (entry.version, entry.term, entry.seq, entry.base_version)
        strs = (entry.peer, entry.digest, entry.prev, entry.hash)
        if not all(type(v) is int for v in ints) or not all(isinstance(s, str) and len(s) <= 4096 for s in strs):
            raise ValueError("commit log entry: fields of the wrong type")
        return entry


class CommitLog:
    """The newest ``LOG_KEPT`` entries and the chain head (the hash of the newest entry)."""

    def __init__(self):
        self.entries: deque[LogEntry] = deque(maxlen=LOG_KEPT)
        self.head = ROOT

    def append(self, version: int, term: int, peer: str, seq: int, base_version: int, digest: str) -> LogEntry:
        h = entry_hash(self.head, version, term, peer, seq, base_version, digest)
        entry = LogEntry(version, term, peer, seq, base_version, digest, self.head, h)
        self.entries.append(entry)
        self.head = h
        return entry

    def up_to(self, version: int, n: int = PUBLISHED) -> list[LogEntry]:
        """The newest ``n`` entries at or below ``version`` (what enough standbys hold)."""
        entries = list(self.entries)  # one C-level copy: the maintenance thread reads while commits append
        return [e for e in entries if e.version <= version][-n:]

    def state_dict(self) -> dict:
        return {"head": self.head, "entries": [asdict(e) for e in self.entries]}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore ``state_dict()`` (None: a state written before the log existed: a new chain).

        :raises ValueError: malformed entries, or a chain that does not link"""
        if state is None:
            self.entries, self.head = deque(maxlen=LOG_KEPT), ROOT
            return
        if not isinstance(state, dict) or not isinstance(state.get("head"), str) or \
                not isinstance(state.get("entries"), list) or len(state["entries"]) > LOG_KEPT:
            raise ValueError(f"commit log: must be {{'head': str, 'entries': [at most {LOG_KEPT}]}}")
        entries = [LogEntry.from_dict(e) if isinstance(e, dict) else None for e in state["entries"]]
        if None in entries:
            raise ValueError("commit log: entries must be objects")
        problems = check_chain(entries)
        if problems or (entries and entries[-1].hash != state["head"]):
            raise ValueError(f"commit log: {problems[0] if problems else 'the head is not the last entry'}")
        self.entries, self.head = deque(entries, maxlen=LOG_KEPT), state["head"]


def check_chain(entries: list[LogEntry]) -> list[str]:
    """What is wrong with a run of consecutive entries (empty: it is one valid chain)."""
    problems = []
    for i, e in enumerate(entries):
        if not e.valid():
            problems.append(f"version {e.version}: the entry's hash does not match its contents")
        if i and (e.prev != entries[i - 1].hash or e.version != entries[i - 1].version + 1):
            problems.append(f"version {e.version}: does not follow version {entries[i - 1].version}")
    return problems


def find_forks(logs: list[list[LogEntry]]) -> list[dict]:
    """Versions at which the given logs (e.g. the records of several coordinators) disagree:
    ``[{"version": v, "hashes": [...], "terms": [...]}]``, oldest first."""
    seen: dict[int, dict[str, int]] = {}
    for log in logs:
        for e in log:
            seen.setdefault(e.version, {})[e.hash] = e.term
    return [{"version": v, "hashes": sorted(h), "terms": sorted(set(h.values()))}
            for v, h in sorted(seen.items()) if len(h) > 1]


def audit(logs: list[list[LogEntry]], lease_version: int | None = None, lease_digest: str | None = None) -> dict:
    """Everything a reader can check: each log is one valid chain, the logs agree at every version,
    and the believed lease names the θ digest the log has at its version. ``ok`` is False on any
    problem; a log that does not reach the lease's version is not a problem (it is published later)."""
    problems = [p for log in logs for p in check_chain(log)]
    forks = find_forks(logs)
    latest = {}
    for log in logs:
        for e in log:
            latest[e.version] = e
    if lease_version is not None and lease_digest and lease_version in latest \
            and latest[lease_version].digest != lease_digest:
        problems.append(f"the lease names θ {lease_digest[:12]} at version {lease_version}, the log "
                        f"{latest[lease_version].digest[:12]}")
    versions = sorted(latest)
    return {"ok": not problems and not forks, "problems": problems, "forks": forks,
            "first": versions[0] if versions else None, "last": versions[-1] if versions else None,
            "head": latest[versions[-1]].hash if versions else None}
