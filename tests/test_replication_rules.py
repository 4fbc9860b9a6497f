"""The replication rules of an open swarm, unit-tested without a network (tests/fakes.py):

- no forged state: only the holder of the lease a standby believes, in that term, may replicate to
  it or hand it the role; a higher term in a message is never proof;
- acknowledged means replicated: a submission is acknowledged only once ``min_replicas`` standbys
  hold its commit (a lone peer excepted), and a frozen standby delays commits by a bounded time;
- no coordinator outlives its lease: nothing is acknowledged once the lease could have lapsed;
- the one lease-belief rule (roles/lease.py).
"""
from __future__ import annotations

import asyncio
import time

import pytest
import torch

from heloco_p2p.config import load_config
from heloco_p2p.outer import build_engine
from heloco_p2p.roles import lease as lease_rules
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits, params_digest
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.swarm.records import LeaseRecord
from heloco_p2p.swarm.wire import encode_tensors

from fakes import ScriptedNode

SHAPES = [(4,), (2, 3)]
HOLDER, ATTACKER, STANDBY = "QmHolder", "QmAttacker", "QmStandby"


def _state() -> CommitState:
    return CommitState(build_engine([torch.ones(s) for s in SHAPES], "lookahead"))


def _params(state):
    return [p.clone() for p in state.engine.params]


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b))


def _submission(state, seq, value=0.01):
    meta, payload = encode_tensors([torch.full(s, value) for s in SHAPES], "none")
    return {"run_id": "fenced", "seq": seq, "base_version": state.version, "steps": 5, "term": 1,
            "tensors": meta, "stats": {"seconds": 1.0}}, payload


def _commit_header(state, term, value=0.01):
    meta, payload = encode_tensors([torch.full(s, value) for s in SHAPES], "none")
    return {"kind": "commit", "term": term, "version_before": state.version, "base_version": state.version,
            "peer": "QmPeer", "seq": 0, "steps": 5, "tensors": meta, "digest": "0" * 32}, payload


def _standby(believed=(HOLDER, 1)):
    state = _state()
    svc = CoordinatorService(ScriptedNode({}, peer_id=STANDBY), state, SHAPES, SubmissionLimits(submit_rate=0.0))
    svc.term.believed = believed
    svc.term.highest_seen = believed[1] if believed else 0
    svc.verifications = []
    svc.term.verify_lease = lambda: svc.verifications.append(time.monotonic())  # the DHT shows nothing new
    return svc, state


def _coordinator(script=None, lease_seconds=4.0, min_replicas=1, standbys=(STANDBY,)):
    state = _state()
    node = ScriptedNode(script or {})
    svc = CoordinatorService(node, state, SHAPES, SubmissionLimits(submit_rate=0.0), min_replicas=min_replicas,
                             lease_seconds=lease_seconds)
    svc.replication.standbys = list(standbys)
    svc.activate(1)
    return svc, state, node


def run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- no forged state
def test_a_participants_forged_full_state_is_not_loaded():
    svc, state = _standby()
    before, version = _params(state), state.version
    zero = CommitState(build_engine([torch.zeros(s) for s in SHAPES], "lookahead"))
    reply, _ = run(svc.standby.handle_replicate({"kind": "full", "term": 2, "version": 0}, zero.to_bytes(), ATTACKER))
    assert reply["status"] == "refused" and reply["reason"] == "not_lease_holder"
    assert _same(_params(state), before) and state.version == version
    assert state.term == 0 and svc.term.highest_seen == 1  # the forged term 2 is followed nowhere
    assert len(svc.verifications) == 1  # it re-read the lease once before refusing


def test_a_forged_commit_of_a_higher_or_the_same_term_is_refused():
    svc, state = _standby()
    before = _params(state)
    for term in (1, 2, 7):
        header, payload = _commit_header(state, term)
        reply, _ = run(svc.standby.handle_replicate(header, payload, ATTACKER))
        assert reply["status"] == "refused" and reply["reason"] == "not_lease_holder", term
    assert _same(_params(state), before) and state.version == 0 and svc.term.highest_seen == 1


def test_a_forged_handover_is_refused():
    svc, state = _standby()
    handed = []
    svc.standby.on_handover = handed.append
    svc.standby.term_sources[1] = ATTACKER  # even a sender that once replicated in the term is not the holder
    reply, _ = run(svc.standby.handle_handover({"term": 1, "version": 0, "standbys": []}, b"", ATTACKER))
    assert reply["status"] == "refused" and handed == [] and not svc.active


def test_the_believed_holder_replicates_and_hands_over():
    svc, state = _standby()
    holder = _state()
    reply, _ = run(svc.standby.handle_replicate({"kind": "full", "term": 1, "version": 0}, holder.to_bytes(), HOLDER))
    assert reply["status"] == "ok"
    header, payload = _commit_header(state, 1)
    holder.apply([torch.full(s, 0.01) for s in SHAPES], 0, "QmPeer", 0, 5, 0.1)
    header["digest"] = params_digest(holder.engine.params)
    replicas = []
    svc.standby.on_replica = replicas.append
    reply, _ = run(svc.standby.handle_replicate(header, payload, HOLDER))
    assert reply["status"] == "ok" and state.version == 1 and _same(_params(state), _params(holder))
    # the standby's record of what it holds (the audit of a holder killed before it logged the commit)
    assert replicas == [{"version": 1, "term": 1, "peer": header["peer"], "seq": header["seq"],
                         "digest": header["digest"], "source": HOLDER}]
    assert run(svc.standby.handle_replicate(header, payload, HOLDER))[0]["status"] == "ok"
    assert len(replicas) == 1  # a resend is held already: not applied, not recorded twice
    handed = []
    svc.standby.on_handover = handed.append
    reply, _ = run(svc.standby.handle_handover({"term": 1, "version": 1, "standbys": []}, b"", HOLDER))
    assert reply["status"] == "ok" and handed == [2] and svc.active and state.term == 2


def test_a_full_state_load_records_the_commits_it_brought():
    """A standby out of sync gets the whole state: the commits it did not hold (those its commit
    log keeps) are on record as replica events, not those it held already."""
    svc, state = _standby()
    holder = _state()
    for seq in range(3):
        holder.apply([torch.full(s, 0.01) for s in SHAPES], holder.version, "QmPeer", seq, 5, 0.1)
        holder.log.append(holder.version, 1, "QmPeer", seq, holder.version - 1, params_digest(holder.engine.params))
        if seq == 0:
            assert run(svc.standby.handle_replicate({"kind": "full", "term": 1, "version": 1}, holder.to_bytes(),
                                                    HOLDER))[0]["status"] == "ok"
    replicas = []
    svc.standby.on_replica = replicas.append
    reply, _ = run(svc.standby.handle_replicate({"kind": "full", "term": 1, "version": 3}, holder.to_bytes(), HOLDER))
    assert reply["status"] == "ok" and state.version == 3
    assert [(r["version"], r["seq"], r["full"], r["source"]) for r in replicas] == [(2, 1, True, HOLDER),
                                                                                     (3, 2, True, HOLDER)]
    assert replicas[-1]["digest"] == params_digest(holder.engine.params)


def test_a_new_holder_is_believed_after_one_fresh_read_of_the_lease():
    svc, state = _standby(believed=(HOLDER, 1))

    def read_dht():  # the DHT holds the claim of term 2 by STANDBY's successor
        svc.term.believed = ("QmHeir", 2)
        svc.term.note_term(2)

    svc.term.verify_lease = read_dht
    header, payload = _commit_header(state, 2)
    header["digest"] = "x"
    reply, _ = run(svc.standby.handle_replicate(header, payload, "QmHeir"))
    assert reply["status"] == "out_of_sync"  # it is followed now (the digest is made up: a full state is asked)


def test_a_forged_replicate_does_not_depose_a_coordinator():
    svc, state, _ = _coordinator()
    header, payload = _commit_header(state, 5)
    reply, _ = run(svc.standby.handle_replicate(header, payload, ATTACKER))
    assert reply["status"] == "refused" and svc.active and state.term == 1 and svc.term.highest_seen == 1


# ---------------------------------------------------------------- acknowledged means replicated
def test_a_frozen_standby_delays_one_commit_by_a_bounded_time_and_it_is_not_acknowledged():
    svc, state, _ = _coordinator({STANDBY: 600.0}, lease_seconds=4.0)  # SIGSTOPped: never answers
    logged = []
    svc.on_commit = logged.append  # the run's history: durable commits only
    header, payload = _submission(state, 0)
    t0 = time.monotonic()
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    stalled = time.monotonic() - t0
    assert reply["status"] == "rejected" and reply["reason"] == "busy" and reply["retry_after"] > 0
    assert stalled < 2 * 4.0 and stalled >= svc.replication.floor - 0.1  # the floor (half a lease), not 30 s
    assert list(svc.acknowledged) == [] and svc.replication.standbys == [] and state.version == 1 and svc.replication.replicated_version == 0
    assert logged == []
    assert svc.replication.snapshot[1] == 0  # the lease names no version that no standby holds
    # the sender keeps its Δ and resubmits the same number: not acknowledged while no standby holds it
    svc.term.lease_until = time.monotonic() + 10
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["reason"] == "busy" and state.version == 1
    # a new standby is recruited (full state): now the retry is acknowledged, and applied no second time
    run(svc.replication.recruit("QmOther"))
    assert svc.replication.standbys == ["QmOther"] and svc.replication.replicated_version == 1
    assert [e["version"] for e in logged] == [1]  # durable now: in the history once
    assert svc.replication.snapshot[1] == 1
    reply, data = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "accepted" and reply["duplicate"] and state.version == 1 and len(data) > 0


def test_no_standby_while_others_are_alive_means_busy_and_no_change():
    svc, state, _ = _coordinator(standbys=())
    svc.replication.others_alive = 3
    before = _params(state)
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "rejected" and reply["reason"] == "busy" and "waiting for a standby" in reply["message"]
    assert state.version == 0 and _same(_params(state), before) and svc.replication.waiting_for_standby()


def test_a_lone_peer_commits_unreplicated():
    svc, state, _ = _coordinator(standbys=())
    svc.replication.others_alive = 0  # the peer's maintenance saw nobody else alive
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "accepted" and state.version == 1 and not svc.replication.waiting_for_standby()


def test_min_replicas_zero_acknowledges_without_a_standby():
    svc, state, _ = _coordinator(standbys=(), min_replicas=0)
    svc.replication.others_alive = 3
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "accepted" and state.version == 1


def test_min_replicas_above_num_standbys_is_a_config_error():
    with pytest.raises(ValueError, match="min_replicas"):
        load_config("configs/tiny.yaml", overrides={"swarm.num_standbys": 1, "swarm.min_replicas": 2})


def test_replication_timeout_follows_the_measured_round_trip():
    svc, state, _ = _coordinator(lease_seconds=4.0)
    assert svc.replication.timeout() == pytest.approx(2.0)  # the floor: half a lease
    svc.replication.rtts.extend([0.01, 0.02])
    assert svc.replication.timeout() == pytest.approx(2.0)
    svc.replication.rtts.append(3.0)  # a large model on a slow link
    assert svc.replication.timeout() == pytest.approx(15.0)


def test_the_lease_snapshot_follows_each_commit():
    svc, state, _ = _coordinator()
    header, payload = _submission(state, 0)
    run(svc.handle_submit(header, payload, "QmPeer"))
    assert svc.replication.snapshot == (1, 1, params_digest(state.engine.params), 0)


# ---------------------------------------------------------------- no coordinator outlives its lease
def test_nothing_is_acknowledged_once_the_lease_could_have_lapsed():
    svc, state, _ = _coordinator()
    svc.term.lease_until = time.monotonic() - 1  # frozen past its lease, or its renewals failed
    before = _params(state)
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["reason"] == "busy" and state.version == 0 and _same(_params(state), before)
    assert list(svc.acknowledged) == []


def test_a_commit_whose_replication_outlasts_the_lease_is_not_acknowledged():
    svc, state, _ = _coordinator({STANDBY: 1.7}, lease_seconds=2.0)  # the lease holds 1.5 s from now
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["reason"] == "busy" and list(svc.acknowledged) == []
    svc.term.renewed(time.monotonic())  # renewed: the retry is answered as the duplicate it is
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "accepted" and reply["duplicate"] and state.version == 1


# ---------------------------------------------------------------- the lease-belief rule
def _claim(peer, term, renewed, standbys=()):
    return LeaseRecord(peer_id=peer, term=term, version=0, digest="", standbys=list(standbys), maddrs=[],
                       renewed=float(renewed), commits=0, rejected=0, commits_per_minute=0.0, mean_staleness=0.0,
                       branches={})


def _signed(owner, peer_id):
    return owner == peer_id.encode()


def test_a_claim_counts_only_if_its_holder_signed_it():
    now = 100.0
    claim = _claim("QmA", 1, now)
    assert lease_rules.believe(None, [(b"QmA", claim)], now, 6.0, _signed) is claim
    assert lease_rules.believe(None, [(b"QmB", claim)], now, 6.0, _signed) is None


def test_a_later_term_is_believed_from_an_heir_only_while_the_lease_is_fresh():
    now = 100.0
    current = _claim(HOLDER, 2, now - 1, standbys=[STANDBY])
    heir = _claim(STANDBY, 3, now)
    stranger = _claim(ATTACKER, 9, now)
    claims = [(b"QmStandby", heir), (b"QmAttacker", stranger)]
    assert lease_rules.believe(current, claims, now, 6.0, _signed) is heir  # the stranger's higher term is not
    assert lease_rules.believe(current, [(b"QmAttacker", stranger)], now, 6.0, _signed) is None
    # a coordinator that dropped the standby that then took over still follows it (heirs of its term)
    dropped = _claim(HOLDER, 2, now - 1, standbys=[])
    assert lease_rules.believe(dropped, claims, now, 6.0, _signed, heirs={STANDBY}) is heir
    assert lease_rules.believe(dropped, claims, now, 6.0, _signed) is None
    # a reader whose lease was not renewed for 3 lease periods may follow anyone holder-bound
    old = _claim(HOLDER, 2, now - 3 * 6.0 - 1, standbys=[STANDBY])
    assert lease_rules.believe(old, claims, now, 6.0, _signed) is stranger


def test_lapsed_claims_and_lower_terms_are_not_believed():
    now = 100.0
    current = _claim(HOLDER, 2, now - 1, standbys=[STANDBY])
    assert lease_rules.believe(current, [(b"QmStandby", _claim(STANDBY, 3, now - 7))], now, 6.0, _signed) is None
    assert lease_rules.believe(current, [(b"QmStandby", _claim(STANDBY, 1, now))], now, 6.0, _signed) is None
    renewal = _claim(HOLDER, 2, now)
    assert lease_rules.believe(current, [(b"QmHolder", renewal)], now, 6.0, _signed) is renewal
    assert lease_rules.lapsed_for(current, now, 6.0) == pytest.approx(-5.0)


# ---------------------------------------------------------------- refusals teach an attacker nothing
def test_a_norm_refusal_names_its_reason_but_not_the_bound():
    svc, state, _ = _coordinator(standbys=())
    svc.replication.others_alive = 0
    for seq in range(6):  # a history of accepted norms (‖Δ‖ = 0.01 × √10)
        header, payload = _submission(state, seq)
        assert run(svc.handle_submit(header, payload, "QmPeer"))[0]["status"] == "accepted"
    header, payload = _submission(state, 6, value=5.0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "rejected" and reply["reason"] == "norm_too_large"
    assert not any(ch.isdigit() for ch in reply["message"]), reply["message"]  # no bound, no norm


def test_a_coordinator_cut_off_after_it_had_a_standby_is_not_a_lone_peer():
    svc, state, _ = _coordinator({STANDBY: 600.0}, lease_seconds=4.0)
    header, payload = _submission(state, 0)
    assert run(svc.handle_submit(header, payload, "QmPeer"))[0]["reason"] == "busy"  # the standby froze: dropped
    svc.replication.others_alive = 0  # isolated: it reads no peer records at all
    svc.term.lease_until = time.monotonic() + 10
    header, payload = _submission(state, 1)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["reason"] == "busy" and list(svc.acknowledged) == [] and state.version == 1  # nothing unreplicated


# ---------------------------------------------------------------- look-ahead dispatch in the swarm
def _published(shapes=SHAPES):
    from heloco_p2p.algorithms import ALGORITHMS, build_outer_engine

    return CommitState(build_outer_engine(ALGORITHMS["heloco"], [torch.ones(s) for s in shapes], num_workers=None))


def test_replies_carry_the_dispatch_point_and_standbys_stay_bitwise_equal():
    from heloco_p2p.swarm.wire import unpack_params

    coord_state, standby_state = _published(), _published()
    node = ScriptedNode({})
    coord = CoordinatorService(node, coord_state, SHAPES, SubmissionLimits(submit_rate=0.0))
    coord.replication.standbys = [STANDBY]
    coord.activate(1)
    standby = CoordinatorService(ScriptedNode({}, peer_id=STANDBY), standby_state, SHAPES,
                                 SubmissionLimits(submit_rate=0.0))
    standby.term.believed = ("QmCoordinator", 1)
    logged = []
    coord.on_commit = logged.append
    for seq, peer_id in enumerate(["QmP1", "QmP2", "QmP1", "QmP3"]):
        header, payload = _submission(coord_state, seq, value=0.01 * (seq + 1))
        reply, data = run(coord.handle_submit(header, payload, peer_id))
        assert reply["status"] == "accepted", reply
        got = unpack_params(data)
        want = coord_state.engine.dispatch_params()
        assert all(torch.equal(a, b) for a, b in zip(got, want))  # θ̄ = θ − η·μ·m, not θ
        if seq > 0:
            assert not all(torch.equal(a, b) for a, b in zip(got, coord_state.engine.params))
        forwarded = node.headers[-1]
        assert forwarded["num_workers"] == [1, 2, 2, 3][seq]  # K travels with the commit
        assert run(standby.standby.handle_replicate(forwarded, payload, "QmCoordinator"))[0]["status"] == "ok"
    assert all(torch.equal(a, b) for a, b in zip(coord_state.engine.params, standby_state.engine.params))
    assert coord_state.engine.state_dict().keys() == standby_state.engine.state_dict().keys()
    assert [e["num_workers"] for e in logged] == [1, 2, 2, 3]  # K: distinct recent senders
    # what the norm bound and the credit depend on is replicated too: a failover resets neither
    assert list(standby_state.recent_norms) == list(coord_state.recent_norms) and len(coord_state.recent_norms) == 4
    assert standby_state.credit == coord_state.credit and list(standby_state.recent_senders) == ["QmP1", "QmP2", "QmP1", "QmP3"]
    assert logged[-1]["dispatch_digest"] == params_digest(coord_state.engine.dispatch_params())
    assert logged[-1]["digest"] == params_digest(coord_state.engine.params) != logged[-1]["dispatch_digest"]
    # the commit log: one hash chain, the same on both, ending at the θ both hold
    assert coord_state.log.head == standby_state.log.head and len(coord_state.log.entries) == 4
    assert [e.version for e in standby_state.log.entries] == [1, 2, 3, 4]
    assert standby_state.log.entries[-1].digest == params_digest(standby_state.engine.params)


class _LossyLink(ScriptedNode):
    """The coordinator's node, wired to a real standby: the first forwarded commit is applied
    there but its reply is lost (the stream ends before it), as a reset stream does."""

    def __init__(self, standby):
        super().__init__({})
        self.standby, self.lost = standby, 0

    async def acall(self, peer_id, name, header, payload=b"", **kwargs):
        from heloco_p2p.swarm.wire import WireError

        self.calls.append((peer_id, name, header.get("kind")))
        reply, data = await self.standby.standby.handle_replicate(header, payload, "QmCoordinator")
        if header.get("kind") == "commit" and not self.lost:
            self.lost += 1
            raise WireError("closed", "stream ended before a message")
        return reply, data


def test_a_lost_replication_reply_is_resent_once_and_applied_once():
    coord_state, standby_state = _published(), _published()
    standby = CoordinatorService(ScriptedNode({}, peer_id=STANDBY), standby_state, SHAPES,
                                 SubmissionLimits(submit_rate=0.0))
    standby.term.believed = ("QmCoordinator", 1)
    node = _LossyLink(standby)
    coord = CoordinatorService(node, coord_state, SHAPES, SubmissionLimits(submit_rate=0.0))
    coord.replication.standbys = [STANDBY]
    coord.activate(1)
    for seq in range(3):
        header, payload = _submission(coord_state, seq, value=0.01 * (seq + 1))
        reply, _ = run(coord.handle_submit(header, payload, "QmP1"))
        assert reply["status"] == "accepted", reply
    assert node.lost == 1
    # the standby was kept (not dropped for one broken stream) and got no full state
    assert coord.replication.standbys == [STANDBY]
    assert [c[2] for c in node.calls] == ["commit", "commit", "commit", "commit"]  # 3 commits, one resent
    # applied once: the same versions, θ and chain on both
    assert standby_state.version == coord_state.version == 3
    assert all(torch.equal(a, b) for a, b in zip(coord_state.engine.params, standby_state.engine.params))
    assert standby_state.log.head == coord_state.log.head
    assert [e.version for e in standby_state.log.entries] == [1, 2, 3]


def test_the_theta_digest_is_a_tree_that_sees_every_byte_and_the_tensor_boundaries(monkeypatch):
    from heloco_p2p.roles import commit_state

    monkeypatch.setattr(commit_state, "DIGEST_CHUNK", 64)  # many leaves on small tensors: the threaded path
    g = torch.Generator().manual_seed(3)
    params = [torch.randn(100, generator=g), torch.randn(7, 9, generator=g), torch.zeros(0)]
    d = params_digest(params)
    assert d == params_digest([p.clone() for p in params])  # a function of the bytes only
    for i in range(2):  # one bit of any tensor changes it
        changed = [p.clone() for p in params]
        changed[i].view(-1)[-1] = torch.nextafter(changed[i].view(-1)[-1], torch.tensor(1e9))
        assert params_digest(changed) != d
    # the same bytes cut at another tensor boundary are another θ
    flat = torch.cat([p.flatten() for p in params])
    assert params_digest([flat[:50], flat[50:]]) != params_digest([flat[:51], flat[51:]])


def _training_record(pid: str, heartbeat: float):
    from heloco_p2p.swarm.records import PeerRecord

    return PeerRecord(peer_id=pid, name=pid, region="de", device="cpu", role="training", steps_per_second=1.0,
                      inner_steps=5, version=0, rounds=1, tokens=1, loss=1.0, staleness=0, accepted=1, rejected=0,
                      bytes_in=0, bytes_out=0, heartbeat=heartbeat, maddrs=[])


def _election(svc, lease_seconds: float, live_peers):
    """An Election of ``svc`` without a network: one standby wanted, ``live_peers()`` its view."""
    from types import SimpleNamespace

    from heloco_p2p.roles.election import Election

    el = object.__new__(Election)
    el.service, el._recruit_failed = svc, {}
    el.cfg = SimpleNamespace(swarm=SimpleNamespace(num_standbys=1, lease_seconds=lease_seconds))
    el.node = SimpleNamespace(run=lambda coro, timeout=None: asyncio.run(coro))
    el.live_peers = live_peers
    return el


def test_a_reachable_peer_is_recruited_before_the_standby_just_dropped():
    """A standby dropped because its link to the coordinator is cut still heartbeats (other peers
    relay its records): it goes after every peer dropped less recently, so the reachable one is
    recruited during the cut instead of after it."""


    svc, state, node = _coordinator(standbys=())
    now = time.time()

    def peer(pid, heartbeat):
        return _training_record(pid, heartbeat)

    svc.replication.dropped_at = {"QmA-cut": now - 5.0}  # dropped 5 s ago, heartbeating since
    recruited = []

    async def recruit(pid):
        recruited.append(pid)
        svc.replication.standbys.append(pid)

    svc.replication.recruit = recruit
    el = _election(svc, 6.0, lambda: [peer("QmA-cut", now - 1.0), peer("QmZ-reachable", now - 1.0)])
    el.choose_standbys()
    assert recruited == ["QmZ-reachable"]  # not the dropped one, though its id sorts first
    svc.replication.standbys.clear()
    svc.replication.dropped_at["QmZ-reachable"] = now - 1.0  # both dropped: the least recent first
    el.choose_standbys()
    assert recruited == ["QmZ-reachable", "QmA-cut"]


def test_a_client_mode_peer_is_never_recruited_and_refuses_a_full_state():
    """A --client-mode peer (record ``client: true``) cannot be dialled: the coordinator recruits the
    reachable peer instead, and a full state sent to a client-mode peer anyway is refused and not
    loaded; such a peer never claims the lease either (``Election.serves``)."""
    svc, state, node = _coordinator(standbys=())
    now = time.time()
    client = _training_record("QmA-client", now - 1.0).copy(update={"client": True})
    recruited = []

    async def recruit(pid):
        recruited.append(pid)
        svc.replication.standbys.append(pid)

    svc.replication.recruit = recruit
    el = _election(svc, 6.0, lambda: [client, _training_record("QmZ-reachable", now - 1.0)])
    el.choose_standbys()
    assert recruited == ["QmZ-reachable"]
    svc.replication.standbys.clear()
    el.live_peers = lambda: [client]
    el.choose_standbys()  # the client-mode peer is the only one left: still not recruited
    assert recruited == ["QmZ-reachable"] and svc.replication.standbys == []
    # and it does not count as a peer that could hold a replica: nobody can, so the coordinator is
    # lone (acknowledges without one) instead of answering busy while it waits for a standby forever
    fresh, _, _ = _coordinator(standbys=())
    fresh.replication.recruit = recruit
    lone = _election(fresh, 6.0, lambda: [client])
    lone.choose_standbys()
    assert fresh.replication.others_alive == 0 and fresh.replication.required() == 0
    assert not fresh.replication.waiting_for_standby()

    standby, held = _standby()
    standby.standby.accepts_replicas = False
    before, version = _params(held), held.version
    holder = _state()
    holder.apply([torch.full(s, 0.01) for s in SHAPES], 0, "QmPeer", 0, 5, 0.1)
    reply, _ = run(standby.standby.handle_replicate({"kind": "full", "term": 1, "version": 1}, holder.to_bytes(),
                                                    HOLDER))
    assert reply["status"] == "rejected" and reply["reason"] == "client_mode"
    assert _same(_params(held), before) and held.version == version and held.term == 0


def test_a_failed_recruitment_is_retried_after_a_lease_once_the_peer_heartbeats_again():


    svc, state, node = _coordinator(standbys=())
    beats = {"QmCut": time.time() - 1.0}

    def peer(pid):
        return _training_record(pid, beats[pid])

    tries = []

    async def recruit(pid):
        tries.append(pid)
        if len(tries) == 1:
            raise TimeoutError()  # the link is cut
        svc.replication.standbys.append(pid)

    svc.replication.recruit = recruit
    el = _election(svc, 0.2, lambda: [peer("QmCut")])
    el.choose_standbys()
    assert tries == ["QmCut"] and svc.replication.standbys == []
    el.choose_standbys()  # within the lease, and no heartbeat since the failure: not tried
    time.sleep(0.25)
    el.choose_standbys()  # a lease later, still no heartbeat since: not tried
    assert tries == ["QmCut"]
    beats["QmCut"] = time.time()  # it heartbeats again (the cut healed): tried, not 30 s later
    el.choose_standbys()
    assert tries == ["QmCut", "QmCut"] and svc.replication.standbys == ["QmCut"]


def test_a_standby_that_times_out_is_not_sent_the_commit_again():
    svc, state, node = _coordinator({STANDBY: 600.0}, lease_seconds=4.0)  # frozen: never answers
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["reason"] == "busy"
    assert [c for c in node.calls if c[0] == STANDBY and c[2] == "commit"] == [(STANDBY, "replicate", "commit")]


def test_a_synchronous_commit_no_standby_took_is_logged_once_a_standby_holds_it():
    state = _state()
    svc = CoordinatorService(ScriptedNode({STANDBY: 600.0}), state, SHAPES, SubmissionLimits(submit_rate=0.0),
                             min_replicas=1, lease_seconds=4.0, mode="sync")
    svc.replication.standbys = [STANDBY]  # frozen: the full state never arrives
    svc.activate(1)
    svc.barrier.participants = {"QmPeer"}
    logged = []
    svc.on_commit = logged.append
    header, payload = _submission(state, 0)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "rejected" and reply["reason"] == "busy"
    assert state.version == 1 and logged == [] and svc.replication.standbys == []
    # a new standby takes the state: version 1 is the run's now, and in the history once
    run(svc.replication.recruit("QmOther"))
    assert [e["version"] for e in logged] == [1] and logged[0]["peers"] == 1
    svc.term.lease_until = time.monotonic() + 10
    header, payload = _submission(state, 1)
    reply, _ = run(svc.handle_submit(header, payload, "QmPeer"))
    assert reply["status"] == "accepted" and state.version == 2
    assert [e["version"] for e in logged] == [1, 2]
