"""The run's token budget (swarm.max_tokens): committed tokens are counted by the coordinator,
replicated to standbys, kept in the commit state, reported to senders, and stop the peers."""
from __future__ import annotations

import asyncio
import copy
import threading
from types import SimpleNamespace

import pytest
import torch

from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.messages import MAX_TOKENS_PER_STEP, submission_tokens
from heloco_p2p.roles.schedule import RoundSchedule
from heloco_p2p.swarm.wire import WireError, encode_tensors

from fakes import FakeNode

SHAPES = [(4,), (2, 3)]


def _state():
    return CommitState(build_engine([torch.zeros(s) for s in SHAPES], "lookahead"))


def _header(state, seq, tokens, steps=5):
    meta, payload = encode_tensors([torch.full(s, 0.01 * (seq + 1)) for s in SHAPES], "none")
    stats = {"seconds": 1.0} if tokens is None else {"seconds": 1.0, "tokens": tokens}
    return {"run_id": "fenced", "seq": seq, "base_version": state.version, "steps": steps, "term": 1,
            "tensors": meta, "stats": stats}, payload


def test_submission_tokens_are_read_from_stats_and_bounded():
    assert submission_tokens({"stats": {"tokens": 640}}, 5) == 640
    assert submission_tokens({"stats": {}}, 5) == 0 and submission_tokens({}, 5) == 0
    assert submission_tokens({"stats": {"tokens": 5 * MAX_TOKENS_PER_STEP}}, 5) == 5 * MAX_TOKENS_PER_STEP
    for bad in (-1, 1.5, "640", True, None, 5 * MAX_TOKENS_PER_STEP + 1):
        with pytest.raises(WireError) as err:
            submission_tokens({"stats": {"tokens": bad}}, 5)
        assert err.value.code == "malformed"


def test_coordinator_counts_replicates_and_reports_the_run_tokens():
    state = _state()
    node = FakeNode({"status": "ok"})
    service = CoordinatorService(node, state, SHAPES, SubmissionLimits(submit_rate=0.0))
    service.activate(1)
    service.replication.standbys = ["QmStandby"]
    replies = []
    for seq, tokens in enumerate([640, 1280, None]):
        header, payload = _header(state, seq, tokens)
        replies.append(asyncio.run(service.handle_submit(header, payload, "QmPeer"))[0])
    assert [r["status"] for r in replies] == ["accepted"] * 3
    assert [r["run_tokens"] for r in replies] == [640, 1920, 1920]
    assert state.total_tokens == 1920
    assert [h["tokens"] for h in node.headers] == [640, 1280, 0]  # what the standby is told
    # a duplicate is answered with the run's count and counts nothing
    header, payload = _header(state, 1, 1280)
    reply, _ = asyncio.run(service.handle_submit(header, payload, "QmPeer"))
    assert reply["duplicate"] and reply["run_tokens"] == 1920 and state.total_tokens == 1920
    # a malformed count is refused and changes nothing
    before = copy.deepcopy(state.state_dict())
    header, payload = _header(state, 7, -5)
    reply, _ = asyncio.run(service.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "rejected" and reply["reason"] == "malformed"
    after = state.state_dict()
    assert after["total_tokens"] == before["total_tokens"] and after["applied"] == before["applied"]
    assert all(torch.equal(a, b) for a, b in zip(after["engine"]["params"], before["engine"]["params"]))


def test_standby_applies_the_replicated_count():
    coord_state, standby_state = _state(), _state()
    node = FakeNode({"status": "ok"})
    coord = CoordinatorService(node, coord_state, SHAPES, SubmissionLimits(submit_rate=0.0))
    coord.activate(1)
    coord.replication.standbys = ["QmStandby"]
    standby = CoordinatorService(FakeNode({"status": "ok"}), standby_state, SHAPES, SubmissionLimits(submit_rate=0.0))
    standby.term.believed = ("QmCoordinator", 1)  # the lease it reads names the coordinator, in term 1
    for seq, tokens in enumerate([300, 500]):
        header, payload = _header(coord_state, seq, tokens)
        asyncio.run(coord.handle_submit(header, payload, "QmPeer"))
        reply, _ = asyncio.run(standby.standby.handle_replicate(node.headers[-1], payload, "QmCoordinator"))
        assert reply["status"] == "ok"
    assert standby_state.total_tokens == coord_state.total_tokens == 800


def test_commit_state_keeps_the_count_and_loads_states_without_one():
    state = _state()
    d = [torch.full(s, 0.01) for s in SHAPES]
    state.apply(d, 0, "p", 0, 5, 1.0, tokens=640)
    state.apply_sync([("p", 1, 5, 100, 1.0, d), ("q", 0, 5, 60, 1.0, d)], state.version)
    assert state.total_tokens == 800
    sd = state.state_dict()
    other = _state()
    other.load_state_dict(copy.deepcopy(sd))
    assert other.total_tokens == 800
    old = {k: v for k, v in copy.deepcopy(sd).items() if k != "total_tokens"}  # written before the budget existed
    other = _state()
    other.load_state_dict(old)
    assert other.total_tokens == 0
    for bad in (-1, 2.0, True, "8"):
        other = _state()
        with pytest.raises(ValueError, match="total_tokens"):
            other.load_state_dict({**copy.deepcopy(sd), "total_tokens": bad})
        assert other.total_tokens == 0 and other.version == 0  # nothing loaded


@pytest.mark.parametrize("run_tokens, budget, more", [(999, 1000, True), (1000, 1000, False), (10 ** 9, 0, True)])
def test_peer_stops_at_the_token_budget(run_tokens, budget, more):
    schedule = RoundSchedule(node=None, steps_per_round=5, dylu=None, election=SimpleNamespace(run_tokens=run_tokens),
                             genesis=lambda: SimpleNamespace(max_versions=0, max_tokens=budget),
                             held=lambda: (None, 3), stop_event=threading.Event())
    schedule.loop = SimpleNamespace(rounds=0)
    assert schedule.more() is more
