"""The commit log (heloco_p2p/roles/commit_log.py): a hash chain anyone can check, replicated
with the commit state, and the monitor's audit of the logs coordinators publish."""
import dataclasses
import io

import pytest
import torch
from rich.console import Console

from heloco_p2p.algorithms import ALGORITHMS, build_outer_engine
from heloco_p2p.roles.commit_log import LOG_KEPT, ROOT, CommitLog, LogEntry, audit, check_chain, find_forks
from heloco_p2p.roles.commit_state import CommitState
from heloco_p2p.swarm.records import CommitLogRecord, LogEntryRecord
from heloco_p2p.tools.monitor import Monitor, render


def _log(n: int, term: int = 1, start: CommitLog | None = None, salt: str = "") -> CommitLog:
    log = start or CommitLog()
    first = log.entries[-1].version + 1 if log.entries else 1
    for v in range(first, first + n):
        log.append(v, term, f"QmPeer{v % 3}", v, v - 1, f"digest{v}{salt}")
    return log


def test_a_chain_links_every_entry_to_the_one_before():
    log = _log(5)
    entries = list(log.entries)
    assert entries[0].prev == ROOT and log.head == entries[-1].hash
    assert all(b.prev == a.hash for a, b in zip(entries, entries[1:]))
    assert check_chain(entries) == []
    assert len({e.hash for e in entries}) == 5


def test_tampering_with_any_field_or_link_is_found():
    entries = list(_log(4).entries)
    forged = dataclasses.replace(entries[2], digest="a different theta")
    assert check_chain(entries[:2] + [forged] + entries[3:])[0].startswith("version 3: the entry's hash")
    # a consistent re-hash of the forged entry breaks the next link instead
    rehashed = CommitLog()
    for e in entries[:2]:
        rehashed.append(e.version, e.term, e.peer, e.seq, e.base_version, e.digest)
    rehashed.append(3, 1, entries[2].peer, 3, 2, "a different theta")
    problems = check_chain(list(rehashed.entries) + entries[3:])
    assert problems == ["version 4: does not follow version 3"]
    # a gap is a problem too
    assert check_chain([entries[0], entries[2]]) == ["version 3: does not follow version 1"]


def test_two_lineages_are_a_fork_and_one_lineage_read_twice_is_not():
    common = _log(3)
    a = _log(2, term=2, start=_copy(common))
    b = _log(2, term=3, start=_copy(common), salt="-other")
    assert find_forks([list(a.entries), list(a.entries)[2:]]) == []
    forks = find_forks([list(a.entries), list(b.entries)])
    assert [f["version"] for f in forks] == [4, 5] and forks[0]["terms"] == [2, 3]
    report = audit([list(a.entries), list(b.entries)])
    assert report["ok"] is False and report["problems"] == [] and len(report["forks"]) == 2


def test_the_audit_checks_the_lease_against_the_log():
    log = _log(4)
    entries = list(log.entries)
    ok = audit([entries], lease_version=4, lease_digest="digest4")
    assert ok == {"ok": True, "problems": [], "forks": [], "first": 1, "last": 4, "head": log.head}
    bad = audit([entries], lease_version=4, lease_digest="digest-of-another-model")
    assert bad["ok"] is False and "version 4" in bad["problems"][0]
    assert audit([entries], lease_version=9, lease_digest="later")["ok"] is True  # not published yet


def _copy(log: CommitLog) -> CommitLog:
    out = CommitLog()
    out.load_state_dict(log.state_dict())
    return out


def test_the_log_is_bounded_and_round_trips_through_the_state():
    log = _log(LOG_KEPT + 10)
    assert len(log.entries) == LOG_KEPT and log.entries[0].version == 11
    again = _copy(log)
    assert again.head == log.head and list(again.entries) == list(log.entries)
    assert [e.version for e in log.up_to(70, n=5)] == [66, 67, 68, 69, 70]
    # a state whose entries do not link, or whose head is not its last entry, is refused
    state = log.state_dict()
    state["entries"][5]["digest"] = "x"
    with pytest.raises(ValueError, match="hash does not match"):
        CommitLog().load_state_dict(state)
    state = log.state_dict()
    state["head"] = "f" * 32
    with pytest.raises(ValueError, match="head"):
        CommitLog().load_state_dict(state)
    with pytest.raises(ValueError, match="entries must be objects"):
        CommitLog().load_state_dict({"head": ROOT, "entries": [1]})


def test_the_commit_state_carries_its_log_through_bytes_and_old_states_start_a_new_chain():
    def fresh() -> CommitState:
        return CommitState(build_outer_engine(ALGORITHMS["async_mla"], [torch.zeros(3)], num_workers=None))

    state = fresh()
    for v in (1, 2):
        state.apply([torch.full((3,), 0.1)], v - 1, "QmA", v, 1, 0.17)
        state.log.append(state.version, 1, "QmA", v, v - 1, f"d{v}")
    other = fresh()
    other.load_bytes(state.to_bytes())
    assert other.log.head == state.log.head and [e.version for e in other.log.entries] == [1, 2]
    old = state.state_dict()
    del old["log"]  # written before the commit log existed
    buf = io.BytesIO()
    torch.save(old, buf)
    other.load_bytes(buf.getvalue())
    assert other.log.head == ROOT and len(other.log.entries) == 0


class _Records:
    """What the monitor reads: peers, lease claims and commit logs (owner key, record)."""

    def __init__(self, logs):
        self.logs = logs

    def peers(self):
        return []

    def lease_claims(self):
        return []

    def lease_claims_by_owner(self):
        return []

    def commit_logs(self):
        return self.logs


def _record(peer: str, term: int, log: CommitLog) -> CommitLogRecord:
    return CommitLogRecord(peer_id=peer, term=term, time=1.0, head=log.head,
                           entries=[LogEntryRecord(**dataclasses.asdict(e)) for e in log.entries])


class _Keys:
    """Owner key b"key-<peer>" belongs to <peer>."""

    def signed_by_holder(self, owner: bytes, peer: str) -> bool:
        return owner == f"key-{peer}".encode()

    def get(self, peer):
        return None


def test_the_monitor_flags_a_fork_between_coordinators_and_ignores_forged_logs():
    common = _log(3)
    heir = _log(2, term=2, start=_copy(common))
    split = _log(2, term=3, start=_copy(common), salt="-split")
    # a participant publishes a diverging log in the coordinator's name, under its own key: ignored
    forged = [(b"key-QmA", _record("QmA", 2, heir)), (b"key-QmMallory", _record("QmA", 3, split))]
    snap = Monitor(_Records(forged), holder_keys=_Keys()).poll(now=100.0)
    assert snap["commit_log"]["ok"] is True and snap["commit_log"]["last"] == 5
    # two real coordinators with different entries at versions 4 and 5: a fork
    real = [(b"key-QmA", _record("QmA", 2, heir)), (b"key-QmB", _record("QmB", 3, split))]
    snap = Monitor(_Records(real), holder_keys=_Keys()).poll(now=100.0)
    assert [f["version"] for f in snap["commit_log"]["forks"]] == [4, 5]
    console = Console(width=160, record=True)
    console.print(render(snap, "run", 100.0))
    assert "commit log: FORK at version 4 (terms 2, 3)" in console.export_text()


def test_the_monitor_remembers_a_deposed_coordinators_log():
    common = _log(3)
    old = _log(1, term=1, start=_copy(common), salt="-old")
    new = _log(1, term=2, start=_copy(common))
    records = _Records([(b"key-QmA", _record("QmA", 1, old))])
    mon = Monitor(records, holder_keys=_Keys(), forget_after=600.0)
    assert mon.poll(now=100.0)["commit_log"]["ok"] is True
    records.logs = [(b"key-QmB", _record("QmB", 2, new))]  # the old record expired meanwhile
    assert [f["version"] for f in mon.poll(now=200.0)["commit_log"]["forks"]] == [4]
    assert mon.poll(now=900.0)["commit_log"]["forks"] == []  # forgotten after forget_after
    assert LogEntry.from_dict(dataclasses.asdict(new.entries[-1])) == new.entries[-1]
