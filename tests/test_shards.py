"""The coordinator role sharded by parameter blocks (roles/shards.py, roles/shard_node.py), with
values: the plan balances bytes and is fixed by the sizes alone, split and merge are inverse
(bitwise), and S shard coordinators committing the parts of each Δ reach, bitwise, the θ, momentum
and replies of one coordinator committing the whole Δ (HeLoCo's rules are per block)."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from heloco_p2p.algorithms import ALGORITHMS, build_outer_engine
from heloco_p2p.config import ConfigError, load_config
from heloco_p2p.local.inner import RoundStats
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits, params_digest
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.shard_node import ShardNode, ShardRouter
from heloco_p2p.roles.shard_submit import MAX_CARRIED, ShardedSubmit
from heloco_p2p.roles.shards import ShardError, ShardPlan, scalar_version
from heloco_p2p.roles.submit import SubmitOutcome
from heloco_p2p.swarm.records import GenesisRecord, PeerRecord, record_dict
from heloco_p2p.swarm.wire import encode_tensors, unpack_params

from fakes import ScriptedNode

# a small model's layout: embeddings, blocks of matrices and vectors, a head
SHAPES = [(64, 16), (32, 16), (16,), (16,), (48, 16), (16, 16), (16,), (64, 16), (16,), (8, 16)]
PEERS = ["QmA", "QmB", "QmC"]


def _theta0(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) for s in SHAPES]


def _delta(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    return [0.01 * torch.randn(s, generator=g) for s in SHAPES]


# -- the plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shards", [1, 2, 3, 4, 10])
def test_the_plan_balances_bytes_within_one_largest_block(shards):
    plan = ShardPlan.for_shapes(SHAPES, shards)
    loads = plan.shard_bytes()
    assert plan.count == shards and sum(loads) == 4 * sum(torch.Size(s).numel() for s in SHAPES)
    assert all(plan.indices(k) for k in range(shards))  # every shard owns a tensor
    assert max(loads) - min(loads) <= max(plan.sizes)
    assert plan == ShardPlan.for_shapes(SHAPES, shards)  # the sizes and S decide it alone
    assert ShardPlan.from_record(plan.record(), SHAPES) == plan  # what genesis records gives it back


def test_two_shards_of_this_layout_split_its_bytes_evenly():
    plan = ShardPlan.for_shapes(SHAPES, 2)
    assert plan.shard_bytes() == [4 * 1920, 4 * 1856]  # of 3776 values: 50.8% / 49.2%
    assert plan.record() == list(plan.assignment) and ShardPlan.for_shapes(SHAPES, 1).record() == []


@pytest.mark.parametrize("shards", [0, -1, len(SHAPES) + 1])
def test_a_plan_of_fewer_than_one_or_more_shards_than_tensors_is_an_error(shards):
    with pytest.raises(ShardError, match="swarm.shards"):
        ShardPlan.for_shapes(SHAPES, shards)


def test_a_genesis_plan_that_does_not_fit_the_layout_is_refused():
    with pytest.raises(ShardError):
        ShardPlan.from_record([0, 1], SHAPES)
    with pytest.raises(ShardError):
        ShardPlan.from_record([0] * 5 + [2] * 5, SHAPES)  # shard 1 owns nothing


def test_split_then_merge_gives_back_the_same_tensors_bitwise():
    theta = _theta0()
    plan = ShardPlan.for_shapes(SHAPES, 3)
    parts = plan.split(theta)
    assert [len(p) for p in parts] == [len(plan.indices(k)) for k in range(3)]
    merged = plan.merge(parts)
    assert all(a is b for a, b in zip(merged, theta))
    copies = plan.merge([[t.clone() for t in p] for p in parts])
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(copies, theta))
    assert plan.part(theta, 1) == parts[1]
    with pytest.raises(ShardError):
        plan.merge(parts[:2])


def test_a_held_version_is_one_number_for_budgets_and_heartbeats():
    assert scalar_version(7) == 7 and scalar_version((5, 3, 9)) == 3


def test_shards_in_the_config_are_validated_and_one_shard_keeps_the_identity(tmp_path):
    base = load_config("configs/tiny.yaml")
    assert base.swarm.shards == 1
    assert load_config("configs/tiny.yaml", overrides={"swarm.shards": 1}).digest() == base.digest()
    two = load_config("configs/tiny.yaml", overrides={"swarm.shards": 2, "swarm.defence.screen": False})
    assert two.digest() != base.digest()
    for overrides, needle in (({"swarm.shards": 0}, "shards"),
                              ({"swarm.shards": 2}, "screen"),
                              ({"swarm.shards": 2, "swarm.defence.screen": False, "outer.algorithm": "sync_diloco"},
                               "asynchronous")):
        with pytest.raises(ConfigError, match=needle):
            load_config("configs/tiny.yaml", overrides=overrides)


def test_records_of_an_unsharded_run_are_stored_as_before():
    genesis = GenesisRecord(protocol_version=5, run_id="r", config_digest="c", tokenizer_digest="t", max_versions=0,
                            max_tokens=0, created=1.0, founder="QmA")
    assert "shards" not in record_dict(genesis)
    assert record_dict(genesis.copy(update={"shards": [0, 1, 1]}))["shards"] == [0, 1, 1]
    peer = PeerRecord(peer_id="QmA", name="a", region="de", device="cpu", role="training", steps_per_second=1.0,
                      inner_steps=1, version=0, rounds=0, tokens=0, loss=1.0, staleness=0, accepted=0, rejected=0,
                      bytes_in=0, bytes_out=0, heartbeat=1.0, maddrs=[])
    assert "shards" not in record_dict(peer)


# -- per-shard commits equal one commit -------------------------------------------------------
@pytest.mark.parametrize("algorithm", ["heloco", "heloco_fair", "heloco_region", "async_nesterov", "async_pcgrad"])
def test_shard_engines_committing_the_parts_equal_one_engine_committing_the_whole(algorithm):
    """Staleness, K and the region-fair weight (compute time, region memory) are the same on every
    shard when every shard commits every Δ in the same order: the parts then match bitwise."""
    preset, plan = ALGORITHMS[algorithm], ShardPlan.for_shapes(SHAPES, 3)
    names = [f"p{i}" for i in range(len(SHAPES))]
    whole = CommitState(build_outer_engine(preset, _theta0(), names=names))
    shards = [CommitState(build_outer_engine(preset, part, names=n))
              for part, n in zip(plan.split(_theta0()), plan.split(names))]
    bases = {p: 0 for p in PEERS}
    for step in range(12):
        peer = PEERS[step % 3]
        delta, base = _delta(step), bases[peer]
        region = f"region:{'de fr en'.split()[step % 3]}"
        whole.apply(delta, base, peer, step, 5, 1.0, region, 1.0 + step % 3)
        for st, part in zip(shards, plan.split(delta)):
            st.apply(part, base, peer, step, 5, 1.0, region, 1.0 + step % 3)
        if step % 2 == 0:
            bases[peer] = whole.version  # some peers start from the new version, some stay stale
    assert [s.version for s in shards] == [whole.version] * 3
    merged = plan.merge([s.engine.params for s in shards])
    assert all(torch.equal(a, b) for a, b in zip(merged, whole.engine.params))
    merged_m = plan.merge([s.engine.momentum for s in shards])
    assert all(torch.equal(a, b) for a, b in zip(merged_m, whole.engine.momentum))
    dispatched = plan.merge([s.engine.dispatch_params() for s in shards])
    assert all(torch.equal(a, b) for a, b in zip(dispatched, whole.engine.dispatch_params()))


class RoutingNode(ScriptedNode):
    """A ScriptedNode that keeps the handlers registered on it (to call them as the network would)."""

    def __init__(self):
        super().__init__({})
        self.handlers = {}

    def add_handler(self, name, handler, **kwargs):
        self.handlers[name] = handler
        return super().add_handler(name, handler, **kwargs)


def _service(node, params, names, shapes) -> CoordinatorService:
    state = CommitState(build_outer_engine(ALGORITHMS["heloco"], params, names=names))
    svc = CoordinatorService(node, state, shapes, SubmissionLimits(submit_rate=0.0))
    svc.replication.standbys = ["QmStandby"]
    svc.activate(1)
    return svc


def _header(seq, base, meta, names, shard=None):
    h = {"run_id": "fenced", "seq": seq, "base_version": base, "steps": 5, "term": 1, "tensors": meta, "names": names,
         "region": "de", "stats": {"seconds": 1.0}}
    return h if shard is None else {**h, "shard": shard}


def test_two_shard_coordinators_on_one_node_reply_and_replicate_as_one_coordinator_bitwise():
    """Through the wire's ``shard`` field: each part goes to its shard's ``submit`` on one node,
    is committed and forwarded (tagged with its shard) to that shard's standby on another node,
    which stays bitwise equal to it, and the merged replies are the reply of one unsharded
    coordinator to the whole Δ."""
    run = asyncio.new_event_loop().run_until_complete
    plan, names = ShardPlan.for_shapes(SHAPES, 2), [f"p{i}" for i in range(len(SHAPES))]
    whole_node = RoutingNode()
    whole = _service(whole_node, _theta0(), names, SHAPES)
    node = RoutingNode()
    router = ShardRouter(node)
    services = [_service(ShardNode(node, router, k), part, n, s)
                for k, (part, n, s) in enumerate(zip(plan.split(_theta0()), plan.split(names), plan.split(SHAPES)))]
    assert set(node.handlers) == {"submit", "replicate", "handover"}  # one route per name, not one per shard
    standby_node = RoutingNode()
    standby_router = ShardRouter(standby_node)
    standbys = []
    for k, (part, n, s) in enumerate(zip(plan.split(_theta0()), plan.split(names), plan.split(SHAPES))):
        sb = CoordinatorService(ShardNode(standby_node, standby_router, k),
                                CommitState(build_outer_engine(ALGORITHMS["heloco"], part, names=n)), s,
                                SubmissionLimits(submit_rate=0.0))
        sb.term.believed = ("QmCoordinator", 1)
        standbys.append(sb)
    for step in range(6):
        peer, delta, base = PEERS[step % 3], _delta(step), max(0, whole.state.version - step % 2)
        meta, payload = encode_tensors(delta, "none")
        want, want_data = run(whole_node.handlers["submit"](_header(step, base, meta, names), payload, peer))
        assert want["status"] == "accepted", want
        replies = []
        for k, (part, part_names) in enumerate(zip(plan.split(delta), plan.split(names))):
            meta, payload = encode_tensors(part, "none")
            reply, data = run(node.handlers["submit"](_header(step, base, meta, part_names, k or None), payload, peer))
            assert reply["status"] == "accepted" and reply["version"] == want["version"], reply
            assert reply["staleness"] == want["staleness"]
            replies.append(unpack_params(data))
            forwarded = node.headers[-1]
            assert forwarded["kind"] == "commit" and forwarded.get("shard", 0) == k
            answer, _ = run(standby_node.handlers["replicate"](forwarded, payload, "QmCoordinator"))
            assert answer == {"status": "ok", "version": want["version"]}
            assert params_digest(standbys[k].state.engine.params) == params_digest(services[k].state.engine.params)
        merged = plan.merge(replies)
        assert all(torch.equal(a, b) for a, b in zip(merged, unpack_params(want_data)))
    merged = plan.merge([s.state.engine.params for s in services])
    assert all(torch.equal(a, b) for a, b in zip(merged, whole.state.engine.params))
    # a retry of an acknowledged part is a duplicate on its shard only
    meta, payload = encode_tensors(plan.split(_delta(5))[1], "none")
    reply, _ = run(node.handlers["submit"](_header(5, 0, meta, plan.split(names)[1], 1), payload, PEERS[2]))
    assert reply["status"] == "accepted" and reply["duplicate"] is True
    assert [s.state.version for s in services] == [6, 6]


def test_a_request_for_a_shard_this_peer_does_not_serve_is_refused_with_a_reason():
    run = asyncio.new_event_loop().run_until_complete
    node = RoutingNode()
    router = ShardRouter(node)
    plan, names = ShardPlan.for_shapes(SHAPES, 2), [f"p{i}" for i in range(len(SHAPES))]
    _service(ShardNode(node, router, 0), plan.split(_theta0())[0], plan.split(names)[0], plan.split(SHAPES)[0])
    for shard in (1, "1", -1, True):
        reply, _ = run(node.handlers["submit"]({"run_id": "fenced", "shard": shard}, b"", "QmA"))
        assert reply["status"] == "rejected" and reply["reason"] == "unknown_shard"


# -- a peer's parts: a shard failing over delays only its part --------------------------------
def _stats(steps=5, tokens=100):
    return RoundStats(steps=steps, tokens=tokens, loss=1.0, first_loss=1.0, last_loss=1.0, seconds=1.0,
                      steps_per_second=5.0, tokens_per_second=100.0, lr=1e-3, grad_norm=1.0)


class ScriptedShards:
    """``send`` for ShardedSubmit: per shard, a list of statuses to answer in turn (then accepted);
    a shard's ledger dedups by (seq) as a coordinator's does."""

    def __init__(self, script, hold=None):
        self.script, self.hold = script, hold or {}
        self.sent = []  # (shard, seq, base, Δ sum)
        self.applied = {}  # shard -> [seq]

    def __call__(self, shard, seq, part, base, stats):
        self.sent.append((shard, seq, base, float(sum(t.sum() for t in part)), stats.steps))
        if shard in self.hold:
            self.hold[shard].wait(10)
        status = self.script.get(shard, []).pop(0) if self.script.get(shard) else "accepted"
        applied = self.applied.setdefault(shard, [])
        if status == "applied_then_lost":  # committed, but the reply never came
            applied.append(seq)
            return SubmitOutcome("gave_up")
        if status == "gave_up":
            return SubmitOutcome("gave_up")
        duplicate = seq in applied
        if not duplicate:
            applied.append(seq)
        return SubmitOutcome("accepted", {"version": len(applied), "term": 1, "staleness": 0, "duplicate": duplicate},
                             params=[t.clone() for t in part])


def test_a_part_that_gave_up_is_sent_again_under_its_number_before_the_parts_carried_after_it():
    plan = ShardPlan.for_shapes(SHAPES, 2)
    send = ScriptedShards({1: ["applied_then_lost", "gave_up"]})
    sub = ShardedSubmit(plan, send, grace=lambda first: 5.0)
    ones = [torch.ones(s) for s in SHAPES]
    out = sub.submit(10, ones, (0, 0), _stats())
    assert [(o.shard, o.outcome.status) for o in out] == [(0, "accepted"), (1, "gave_up")]
    assert sub.pending(1) == 1 and sub.pending(0) == 0
    out = sub.submit(11, ones, (1, 0), _stats())  # seq 10 again on shard 1: gives up again; 11 is carried
    assert [(o.shard, o.part.seq, o.outcome.status) for o in out] == [(0, 11, "accepted"), (1, 10, "gave_up")]
    assert sub.pending(1) == 2
    out = sub.submit(12, ones, (2, 0), _stats())  # 10 again (a duplicate: it was committed), then 11, then 12
    assert [(o.shard, o.part.seq, o.outcome.status, o.outcome.reply.get("duplicate")) for o in out] == [
        (0, 12, "accepted", False), (1, 10, "accepted", True), (1, 11, "accepted", False), (1, 12, "accepted", False)]
    assert all(o.part.rounds == 1 and o.part.base == 0 for o in out if o.shard == 1)  # one round's part each
    assert send.applied[1] == [10, 11, 12]  # each round's Δ of shard 1 applied once
    assert sub.pending(1) == 0
    sub.close()


def _shard1_held(grace: float):
    """A sharded submitter of 2 shards whose shard-1 sends wait for ``gate``: (plan, gate, submitter, Δ of ones)."""
    plan = ShardPlan.for_shapes(SHAPES, 2)
    gate = threading.Event()
    sub = ShardedSubmit(plan, ScriptedShards({}, hold={1: gate}), grace=lambda first: grace)
    return plan, gate, sub, [torch.ones(s) for s in SHAPES]


def test_past_the_bound_the_oldest_carried_parts_are_merged_never_a_part_already_sent():
    plan, gate, sub, ones = _shard1_held(0.05)
    sub.submit(0, ones, (0, 0), _stats())  # shard 1 holds seq 0 in flight
    for seq in range(1, MAX_CARRIED + 3):
        sub.submit(seq, ones, (seq, 0), _stats())
    carried = sub.shards[1].carried
    assert len(carried) == MAX_CARRIED and sub.pending(1) == MAX_CARRIED + 3
    assert [p.rounds for p in carried] == [3] + [1] * (MAX_CARRIED - 1)
    assert carried[0].seq == 3 and carried[0].base == 0 and carried[0].stats.steps == 15
    assert all(torch.equal(t, 3 * torch.ones(s)) for t, s in zip(carried[0].delta, plan.split(SHAPES)[1]))
    gate.set()
    assert [o.part.seq for o in sub.settle(timeout=5)] == [0]  # the part in flight was never merged
    sub.close()


def test_a_slow_shard_does_not_hold_the_round_past_the_grace():
    plan, gate, sub, ones = _shard1_held(0.2)
    t0 = time.monotonic()
    out = sub.submit(1, ones, (0, 0), _stats())
    assert time.monotonic() - t0 < 5.0
    assert [(o.shard, o.outcome.status) for o in out] == [(0, "accepted")]  # shard 1's part goes on in the background
    out = sub.submit(2, ones, (1, 0), _stats())  # shard 1 still busy: its new part is carried, not sent
    assert [o.shard for o in out] == [0] and sub.pending(1) == 2
    gate.set()
    late = sub.settle(timeout=5)
    assert [(o.shard, o.part.seq, o.outcome.status) for o in late] == [(1, 1, "accepted")]
    out = sub.submit(3, ones, (2, 1), _stats())
    assert [(o.shard, o.part.seq, o.part.base) for o in out] == [(0, 3, 2), (1, 2, 0), (1, 3, 1)]
    sub.close()


def test_standbys_are_recruited_from_free_peers_with_the_fewest_standby_roles_first():
    from heloco_p2p.roles.shards import standby_rank

    records = {"holder": {"1": "coordinator"}, "twice": {"0": "standby", "2": "standby"}, "once": {"3": "standby"},
               "free": {}, "holder_standby": {"1": "coordinator", "2": "standby"}}
    order = sorted(records, key=lambda n: standby_rank(records[n]))
    assert order == ["free", "once", "twice", "holder", "holder_standby"]


def test_a_stacked_standby_is_swapped_for_the_free_peer_standing_by_for_the_fewest_shards():
    import asyncio
    from types import SimpleNamespace

    from heloco_p2p.roles.maintenance import Maintenance
    from heloco_p2p.roles.shards import standby_rank

    def rec(pid, shards, role="training"):
        return SimpleNamespace(peer_id=pid, shards=shards, role=role)

    # shard 2's standby "h1" coordinates shard 1; "a" (first by id) already stands by for two shards
    live = [rec("a", {"0": "standby", "3": "standby"}), rec("b", {}), rec("h1", {"1": "coordinator"}, "standby"),
            rec("h2", {"2": "coordinator"}, "coordinator")]
    recruited = []

    async def recruit(pid):
        recruited.append(pid)
        rep.standbys.append(pid)

    rep = SimpleNamespace(standbys=["h1"], recruit=recruit, lock=asyncio.Lock())
    election = SimpleNamespace(live_peers=lambda: live, standby_rank=lambda p: standby_rank(p.shards),
                               may_stand_by=lambda p: True)
    m = Maintenance.__new__(Maintenance)
    m.node = SimpleNamespace(run=lambda coro, timeout=None: asyncio.run(coro))
    assert m.free_standbys(election, SimpleNamespace(replication=rep)) == "b"
    assert recruited == ["b"] and rep.standbys == ["b"]


def test_shards_recruiting_at_once_take_different_peers_of_the_best_ranked_group():
    from heloco_p2p.roles.shards import spread

    order = ["p1", "p2", "p3", "q"]  # sorted: p1-p3 ranked equally, q after them
    key = {"p1": 0, "p2": 0, "p3": 0, "q": 1}.get
    firsts = [spread(order, key, k)[0] for k in range(4)]
    assert firsts == ["p1", "p2", "p3", "p1"]
    assert spread(order, key, 1) == ["p2", "p3", "p1", "q"]
    assert spread(order, key, 0) == order and spread([], key, 2) == []
