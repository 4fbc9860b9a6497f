"""A standby that answers ``fenced`` makes its coordinator re-read the lease at once: it steps down
only on a later claim it verifies there, and never acknowledges the commit the standby refused."""
from __future__ import annotations

import asyncio

import torch

from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.swarm.wire import encode_tensors

from fakes import FakeNode

SHAPES = [(4,), (2, 3)]


def _submit(service, state, seq):
    meta, payload = encode_tensors([torch.full(s, 0.01) for s in SHAPES], "none")
    header = {"run_id": "fenced", "seq": seq, "base_version": state.version, "steps": 5, "term": 1,
              "tensors": meta, "stats": {"seconds": 1.0}}
    return asyncio.run(service.handle_submit(header, payload, "QmPeer"))


def _service(reply):
    state = CommitState(build_engine([torch.zeros(s) for s in SHAPES], "lookahead"))
    node = FakeNode(reply)
    service = CoordinatorService(node, state, SHAPES, SubmissionLimits(submit_rate=0.0))
    service.replication.standbys = ["QmStandby"]
    service.activate(1)
    return service, state, node


def test_fenced_standby_with_a_verified_later_claim_means_no_ack_and_step_down():
    service, state, node = _service({"status": "fenced", "term": 2})
    verified = []
    service.term.verify_lease = lambda: (verified.append(1), service.term.note_term(2))  # the DHT holds term 2's claim
    reply, data = _submit(service, state, 0)
    assert node.calls == [("QmStandby", "replicate", "commit")]
    assert verified == [1]
    assert reply["status"] == "not_coordinator" and data == b""
    assert not service.active and service.term.highest_seen == 2
    assert len(service.acknowledged) == 0  # nothing acknowledged


def test_fenced_reply_alone_deposes_no_one_and_acknowledges_nothing():
    service, state, node = _service({"status": "fenced", "term": 99})
    service.term.verify_lease = lambda: None  # the DHT shows no later claim: 99 is only a number in a reply
    reply, data = _submit(service, state, 0)
    assert reply["status"] == "rejected" and reply["reason"] == "busy" and data == b""
    assert service.active and service.term.highest_seen == 1 and service.state.term == 1
    assert service.replication.standbys == [] and len(service.acknowledged) == 0


def test_healthy_standby_gets_the_commit_and_the_sender_an_ack():
    service, state, node = _service({"status": "ok"})
    reply, data = _submit(service, state, 0)
    assert reply["status"] == "accepted" and reply["version"] == 1 and len(data) > 0
    assert service.active and node.calls == [("QmStandby", "replicate", "commit")]
    assert service.replication.replicated_version == 1
