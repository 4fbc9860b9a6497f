"""A joiner fetches the state in parts, compressed, from several peers at once (roles/joining.py):

- parts cover every value exactly once; fp32 parts reassemble bitwise, fp16 parts within fp16
  rounding of θ̄;
- a download from three servers, one of which dies mid-way, completes from the others with the
  same result and counts the part fetched again;
- a part of another version is never mixed in: a server that no longer holds the plan's version
  says so (``gone``), one whose state differs says ``mismatch``, and the joiner plans again;
- malformed part requests get a clear rejection, never a crash.

Servers are real ``StateServer``s over a real ``CoordinatorService`` (tests/fakes.py
``ScriptedNode``), reached through ``PartNode``, which calls their handlers in process.
"""
from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import threading
from types import SimpleNamespace

import pytest
import torch

from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.joining import (
    MAX_BUSY,
    MAX_PINNED,
    MAX_PLANS_KEPT,
    JoinError,
    StateServer,
    download_state,
    part_ranges,
    parts_for,
    plan_problem,
    wire_digest,
    write_slice,
)
from heloco_p2p.roles.messages import MAX_PARTS, StateRequest
from heloco_p2p.swarm.lifetime import p2p_daemon_pid
from heloco_p2p.swarm.wire import WireError, unpack_params

from fakes import ScriptedNode, load_script

SHAPES = [(33, 17), (17,), (5, 7, 3), (1,), (250,)]  # 1,192 values: parts cross tensor boundaries
LAYOUT = [(s, torch.float32) for s in SHAPES]
NUMEL = sum(math.prod(s) for s in SHAPES)
COORD, STANDBY, PEER = "QmCoordinator", "QmStandby", "QmPeer"


def _theta(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g) * 0.3 for s in SHAPES]


def _server(role: str = "coordinator", theta=None, held=None, version: int = 0) -> StateServer:
    state = CommitState(build_engine(theta or _theta(), "lookahead", {"lr": 0.7, "momentum": 0.9},
                                     dispatch="lookahead"))
    state.apply([torch.full(s, 0.01) for s in SHAPES], 0, "QmPeer", 0, 5, 0.1)  # momentum: θ̄ ≠ θ
    state.engine.version = version  # the versions a test names
    svc = CoordinatorService(ScriptedNode({}), state, SHAPES, SubmissionLimits(submit_rate=0.0))
    if role == "coordinator":
        svc.activate(1)
    return StateServer("name: t\n", b"{}", svc, lambda: role, held or (lambda: (None, 0)), b"k")


class Dies(Exception):
    pass


class PartNode:
    """What ``download_state`` uses of a ``SwarmNode``: a loop thread (``run``), ``call`` and
    ``acall`` to in-process ``StateServer``s, and the DHT's peer records. ``fail_after[peer] = n``:
    that peer serves n parts, then every call fails as a dead peer's would."""

    run_id, peer_id = "parts", "QmJoiner"

    def __init__(self, servers: dict, records=()):
        self.servers, self.fail_after, self.calls = servers, {}, []
        self.records = SimpleNamespace(peers=lambda: list(records))
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def acall(self, peer_id, name, header, payload=b"", **kwargs):
        assert name == "state"
        self.calls.append((peer_id, header.get("part"), header.get("version")))
        if peer_id not in self.servers:
            raise ConnectionError(f"no route to {peer_id}")
        if "part" in header and peer_id in self.fail_after:
            if self.fail_after[peer_id] <= 0:
                raise Dies(f"{peer_id} died")
            self.fail_after[peer_id] -= 1
        await asyncio.sleep(0.002)  # let the other sources take parts
        return await self.servers[peer_id].serve_state(dict(header), payload, self.peer_id)

    def call(self, peer_id, name, header, payload=b"", timeout=60.0, **kwargs):
        return self.run(asyncio.wait_for(self.acall(peer_id, name, header, payload), timeout))

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def _election(coordinator=COORD, standbys=(STANDBY,)):
    lease = SimpleNamespace(peer_id=coordinator, standbys=list(standbys))
    return SimpleNamespace(wait_for_lease=lambda s: lease, refresh=lambda: lease)


def _record(peer_id, version):
    return SimpleNamespace(peer_id=peer_id, version=version)


@pytest.fixture
def node_for():
    made = []

    def make(servers, records=()):
        made.append(PartNode(servers, records))
        return made[-1]

    yield make
    for n in made:
        n.close()


def _serve(server, header):
    return asyncio.run(server.serve_state(header, b"", "QmJoiner"))


def _dispatch(server) -> list[torch.Tensor]:
    return [p.clone() for p in server.service.state.engine.dispatch_params()]


# ---------------------------------------------------------------- parts and their reassembly
def test_parts_cover_every_value_of_every_tensor_exactly_once():
    for parts in (1, 2, 3, 7, 64, NUMEL):
        ranges = part_ranges(NUMEL, parts)
        assert ranges[0][0] == 0 and ranges[-1][1] == NUMEL
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))  # contiguous, no overlap, no gap
        sizes = [b - a for a, b in ranges]
        assert max(sizes) - min(sizes) <= 1 and sum(sizes) == NUMEL
    # written back, each value of each tensor is touched exactly once
    counts = [torch.zeros(s) for s in SHAPES]
    for a, b in part_ranges(NUMEL, 7):
        view = torch.cat([c.reshape(-1) for c in counts])[a:b] + 1
        write_slice(counts, a, view)
    assert all(torch.equal(c, torch.ones(s)) for c, s in zip(counts, SHAPES))
    assert parts_for(125_000_000, "fp16", 16.0) == 16 and parts_for(125_000_000, "none", 16.0) == 32
    assert parts_for(10, "fp16", 16.0) == 1 and parts_for(10 ** 12, "none", 1.0) == MAX_PARTS


@pytest.mark.parametrize("compression", ["none", "fp16"])
def test_served_parts_reassemble_bitwise_in_fp32_and_within_fp16_rounding(compression):
    server = _server()
    want = _dispatch(server)
    plan, _ = _serve(server, {"plan": True, "parts": 5, "compression": compression})
    assert plan["status"] == "ok" and plan["numel"] == NUMEL and plan["layout"] == [list(s) for s in SHAPES]
    assert plan["version"] == 0 and plan["term"] == 1 and len(plan["part_digests"]) == 5
    out = [torch.full(s, float("nan")) for s in SHAPES]
    for i in range(5):
        reply, data = _serve(server, {"part": i, "parts": 5, "compression": compression, "version": 0,
                                      "digest": plan["digest"]})
        assert reply["status"] == "ok" and reply["digest"] == plan["digest"] and reply["part"] == i
        assert reply["part_digest"] == plan["part_digests"][i]
        assert (reply["start"], reply["stop"]) == part_ranges(NUMEL, 5)[i]
        values = unpack_params(data, [((reply["stop"] - reply["start"],), torch.float32)])[0]
        assert len(data) < (reply["stop"] - reply["start"]) * (2 if compression == "fp16" else 4) + 200
        write_slice(out, reply["start"], values)
    if compression == "none":
        assert all(torch.equal(a, b) for a, b in zip(out, want))
        assert plan["digest"] == wire_digest([p.reshape(-1) for p in want])  # the digest of the whole θ̄
    else:
        for a, b in zip(out, want):
            assert torch.equal(a, b.half().float())  # fp16 rounding, nothing else
            assert torch.allclose(a, b, rtol=2 ** -11, atol=2 ** -24)
        assert not all(torch.equal(a, b) for a, b in zip(out, want))
        assert plan["digest"] == wire_digest([p.reshape(-1).half() for p in out])


def test_theta_stays_exact_fp32_and_a_training_peer_serves_only_what_it_received():
    server = _server()
    assert _serve(server, {"model": "theta", "compression": "fp16", "plan": True, "parts": 2})[0]["reason"] == "malformed"
    plan, _ = _serve(server, {"model": "theta", "plan": True, "parts": 2})
    assert plan["digest"] == wire_digest(server.service.state.engine.params) != wire_digest(_dispatch(server))
    received = _theta(5)
    peer = _server("training", held=lambda: (received, 9))
    plan, _ = _serve(peer, {"plan": True, "parts": 3, "compression": "none"})
    assert plan["source"] == "peer" and plan["version"] == 9 and plan["digest"] == wire_digest(received)
    assert _serve(peer, {"model": "theta", "plan": True, "parts": 2})[0]["status"] == "unavailable"


def test_a_plan_for_another_layout_or_another_request_is_refused_by_the_joiner():
    plan, _ = _serve(_server(), {"plan": True, "parts": 3, "compression": "fp16"})
    assert plan_problem(plan, LAYOUT, "fp16", 3) is None
    assert "layout" in plan_problem(plan, LAYOUT[:-1], "fp16", 3)  # the joiner's model has other tensors
    assert "layout" in plan_problem(plan, [((33, 17), torch.float32)] + LAYOUT[1:-1] + [((251,), torch.float32)],
                                    "fp16", 3)
    assert "parts" in plan_problem(plan, LAYOUT, "fp16", 4) and "parts" in plan_problem(plan, LAYOUT, "none", 3)
    assert plan_problem({**plan, "part_digests": plan["part_digests"][:2]}, LAYOUT, "fp16", 3) == "no digest per part"
    assert plan_problem({**plan, "version": "0"}, LAYOUT, "fp16", 3) == "no version or digest"


# ---------------------------------------------------------------- downloads from several peers
def test_a_download_from_three_peers_survives_one_dying_midway(node_for, caplog):
    theta = _theta(1)
    coordinator, standby = _server("coordinator", theta), _server("standby", theta)
    dispatch = _dispatch(coordinator)
    peer = _server("training", held=lambda: (dispatch, 0))  # it received exactly version 0
    node = node_for({COORD: coordinator, STANDBY: standby, PEER: peer}, records=[_record(PEER, 0)])
    node.fail_after[STANDBY] = 2  # serves two parts, then dies
    caplog.set_level("INFO", logger="heloco_p2p.roles.joining")
    params, header, source = download_state(node, _election(), LAYOUT, threading.Event(), timeout=10,
                                            compression="none", part_mb=NUMEL * 4 / 12 / 1e6)  # 12 parts
    assert source == COORD and header["version"] == 0 and header["parts"] == 12
    assert all(torch.equal(a, b) for a, b in zip(params, dispatch))
    join = header["join"]
    assert join["retried"] == 1 and list(join["failed"]) == [STANDBY[-8:]]
    assert join["sources"][STANDBY[-8:]] == 2 and sum(join["sources"].values()) == 12
    assert join["sources"][COORD[-8:]] >= 1 and join["sources"][PEER[-8:]] >= 1  # three sources at once
    assert len({p for p, part, _ in node.calls if part is not None}) == 3
    assert any("MB/s" in r.getMessage() and "downloaded state v0" in r.getMessage() for r in caplog.records)


def test_fp16_is_the_default_and_the_result_is_within_fp16_rounding(node_for):
    server = _server()
    node = node_for({COORD: server})
    params, header, _ = download_state(node, _election(standbys=()), LAYOUT, threading.Event(), timeout=10)
    assert header["compression"] == "fp16" and header["join"]["bytes"] < NUMEL * 2 + 400
    assert all(torch.equal(a, b.half().float()) for a, b in zip(params, _dispatch(server)))


def test_a_part_of_another_version_is_refused_and_the_joiner_plans_again(node_for):
    coordinator = _server("coordinator", _theta(2))
    at_v0 = _dispatch(coordinator)
    other = _theta(3)  # a training peer that claims version 0 but holds other values
    liar = _server("training", held=lambda: (other, 0))
    moved = _server("training", held=lambda: (at_v0, 1))  # it received version 1 since its record
    # the peer's state differs: "mismatch", and no values are sent
    reply, data = _serve(liar, {"part": 0, "parts": 2, "version": 0, "digest": "0" * 32})
    assert reply["status"] == "mismatch" and data == b""
    reply, data = _serve(moved, {"part": 0, "parts": 2, "version": 0})
    assert reply["status"] == "gone" and reply["version"] == 1 and data == b""
    node = node_for({COORD: coordinator, "QmLiar": liar, "QmMoved": moved},
                    records=[_record("QmLiar", 0), _record("QmMoved", 0)])
    params, header, _ = download_state(node, _election(standbys=()), LAYOUT, threading.Event(), timeout=10,
                                       compression="none", part_mb=NUMEL * 4 / 6 / 1e6)
    assert all(torch.equal(a, b) for a, b in zip(params, at_v0))
    assert set(header["join"]["failed"]) <= {"QmLiar"[-8:], "QmMoved"[-8:]}
    assert set(header["join"]["sources"]) == {COORD[-8:]}


def test_a_version_the_coordinator_no_longer_holds_makes_the_joiner_plan_again(node_for):
    server = _server()
    node = node_for({COORD: server})
    plan, _ = _serve(server, {"plan": True, "parts": 4, "compression": "none"})
    server.pinned.clear()  # its copy expired, and it committed since
    server.service.state.engine.version = 1
    reply, _ = _serve(server, {"part": 0, "parts": 4, "version": 0, "digest": plan["digest"]})
    assert reply["status"] == "gone" and reply["version"] == 1
    # the coordinator keeps a version it planned while joiners fetch it, even after newer commits
    plan, _ = _serve(server, {"plan": True, "parts": 4, "compression": "none"})
    server.service.state.engine.version = 2
    reply, _ = _serve(server, {"part": 3, "parts": 4, "version": 1, "digest": plan["digest"]})
    assert reply["status"] == "ok" and reply["version"] == 1
    # a joiner whose first plan's parts are all gone plans again and gets the newer version
    calls = []
    real = server.serve_state

    async def forgetting(header, payload, remote):
        if header.get("part") is not None and not calls:
            calls.append(1)
            server.pinned.clear()
            server.service.state.engine.version += 1
        return await real(header, payload, remote)

    server.serve_state = forgetting
    params, header, _ = download_state(node, _election(standbys=()), LAYOUT, threading.Event(), timeout=10,
                                       compression="none")
    assert header["version"] == 3 and all(torch.equal(a, b) for a, b in zip(params, _dispatch(server)))


def test_a_version_number_a_failover_reused_is_copied_again_not_served_from_the_old_term():
    """The dead coordinator's last commit (version 1, term 1) was never replicated; the next term
    commits another version 1. A standby's kept copy of term 1's version 1 must not be served as
    the current state: the plan, its digest and the parts are of term 2's values."""
    server = _server()
    state = server.service.state
    state.engine.version, state.term = 1, 1
    old_plan, _ = _serve(server, {"plan": True, "parts": 2, "compression": "none"})
    assert old_plan["term"] == 1
    with torch.no_grad():  # term 2 reuses version 1 for other values
        for p in state.engine.params:
            p.add_(0.5)
    state.term = 2
    plan, _ = _serve(server, {"plan": True, "parts": 2, "compression": "none"})
    assert plan["version"] == 1 and plan["term"] == 2 and plan["digest"] != old_plan["digest"]
    reply, data = _serve(server, {"part": 0, "parts": 2, "version": 1, "digest": plan["digest"]})
    assert reply["status"] == "ok" and reply["term"] == 2
    part = unpack_params(data, [((reply["stop"] - reply["start"],), torch.float32)])[0]
    flat = torch.cat([p.reshape(-1) for p in _dispatch(server)])
    assert reply["start"] == 0 and torch.equal(part, flat[: reply["stop"]])  # term 2's θ̄, not term 1's
    # a joiner still holding the old plan is told its version 1 differs here
    reply, data = _serve(server, {"part": 1, "parts": 2, "version": 1, "digest": old_plan["digest"]})
    assert reply["status"] == "mismatch" and data == b""


def test_a_busy_peer_is_asked_again_later_and_dropped_only_when_it_stays_busy(node_for):
    coordinator, standby = _server("coordinator"), _server("standby")
    busy = {"n": 0}

    def answers_busy(server, times):
        real = server.serve_state

        async def maybe_busy(header, payload, remote):
            if header.get("part") is not None and busy["n"] < times:
                busy["n"] += 1
                return {"status": "rejected", "reason": "busy", "retry_after": 0.01, "message": "busy"}, b""
            return await real(header, payload, remote)
        server.serve_state = maybe_busy

    answers_busy(standby, 3)  # busy three times, then serves
    coordinator.serve_state = _delayed(coordinator.serve_state, 0.05)  # so that the standby has parts left
    node = node_for({COORD: coordinator, STANDBY: standby})
    params, header, _ = download_state(node, _election(), LAYOUT, threading.Event(), timeout=10, compression="none",
                                       part_mb=NUMEL * 4 / 16 / 1e6)
    assert header["join"]["retried"] == 0 and header["join"]["failed"] == {} and busy["n"] == 3
    assert header["join"]["sources"][STANDBY[-8:]] >= 1
    busy["n"] = 0
    answers_busy(standby, 10 ** 6)  # busy for good: dropped after MAX_BUSY, the coordinator serves it all
    params, header, _ = download_state(node, _election(), LAYOUT, threading.Event(), timeout=10, compression="none",
                                       part_mb=NUMEL * 4 / 16 / 1e6)
    assert "in a row" in header["join"]["failed"][STANDBY[-8:]] and busy["n"] == MAX_BUSY + 1
    assert header["join"]["sources"] == {COORD[-8:]: 16} and header["join"]["retried"] == 1
    assert all(torch.equal(a, b) for a, b in zip(params, _dispatch(coordinator)))


def test_no_server_at_all_is_a_join_error(node_for):
    node = node_for({})
    with pytest.raises(JoinError, match="could not download"):
        download_state(node, _election(), LAYOUT, threading.Event(), timeout=1.5)


# ---------------------------------------------------------------- malformed requests
@pytest.mark.parametrize("header, field", [
    ({"part": -1, "parts": 4, "version": 0}, "part"),
    ({"part": 4, "parts": 4, "version": 0}, "part"),
    ({"part": 0, "parts": MAX_PARTS + 1, "version": 0}, "parts"),
    ({"part": 0, "parts": 10 ** 30, "version": 0}, "parts"),
    ({"part": 0, "parts": 0, "version": 0}, "parts"),
    ({"part": "0", "parts": 4, "version": 0}, "part"),
    ({"part": True, "parts": 4, "version": 0}, "part"),
    ({"part": 0.0, "parts": 4, "version": 0}, "part"),
    ({"part": 0, "parts": [4], "version": 0}, "parts"),
    ({"part": 0, "parts": 4}, "version"),
    ({"part": 0, "parts": 4, "version": -3}, "version"),
    ({"part": 0, "parts": 4, "version": 0, "digest": 7}, "digest"),
    ({"part": 0, "parts": 4, "version": 0, "digest": "x" * 65}, "digest"),
    ({"part": 0, "parts": 4, "version": 0, "compression": "8bit"}, "compression"),
    ({"part": 0, "parts": 4, "version": 0, "compression": None}, "compression"),
    ({"part": 0, "parts": 4, "version": 0, "model": ["theta"]}, "model"),
    ({"parts": 4}, "parts"),
    ({"plan": "yes", "parts": 4}, "plan"),
    ({"plan": True}, "parts"),
    ({"plan": True, "part": 0, "parts": 4, "version": 0}, "plan"),
])
def test_a_malformed_part_request_is_rejected_with_the_field_at_fault(header, field):
    with pytest.raises(WireError) as exc:
        StateRequest.parse(header)
    assert exc.value.code == "malformed" and field in exc.value.message
    reply, data = _serve(_server(), {"run_id": "parts", **header})  # the handler answers, never raises
    assert reply["status"] == "rejected" and reply["reason"] == "malformed" and field in reply["message"] and data == b""


def test_random_state_requests_are_answered_never_raised():
    """Seeded random headers over the request's fields and JSON's types: each gets one of the
    documented answers, and a refusal names ``malformed``."""
    rng = random.Random(7)
    values = [None, -1, 0, 1, 3, NUMEL, NUMEL + 1, MAX_PARTS, 2 ** 31, 2 ** 70, 1.5, "1", "", True, False, [], {},
              [1, 2], {"a": 1}, "fp16", "none", "8bit", "theta", "dispatch", "x" * 100, "0" * 32]
    fields = ["part", "parts", "plan", "version", "digest", "compression", "model"]
    server = _server()
    statuses = set()

    async def fuzz():
        for _ in range(400):
            header = {"run_id": "parts"}
            for f in rng.sample(fields, rng.randint(1, len(fields))):
                header[f] = rng.choice(values)
            reply, data = await server.serve_state(header, b"", "QmFuzz")
            assert reply["status"] in ("ok", "rejected", "gone", "mismatch"), (header, reply)
            assert reply["status"] != "rejected" or reply["reason"] == "malformed", (header, reply)
            assert reply["status"] == "ok" or data == b""
            statuses.add(reply["status"])

    asyncio.run(fuzz())
    assert statuses >= {"ok", "rejected"}


def test_more_parts_than_values_is_rejected_and_old_requests_get_the_whole_fp32_state():
    server = _server()
    reply, _ = _serve(server, {"plan": True, "parts": NUMEL + 1})
    assert reply["status"] == "rejected" and f"state of {NUMEL} values" in reply["message"]
    reply, data = _serve(server, {"run_id": "parts"})
    assert reply["status"] == "ok" and "parts" not in reply
    assert all(torch.equal(a, b) for a, b in zip(unpack_params(data, LAYOUT), _dispatch(server)))


def test_plans_of_many_versions_and_part_counts_keep_a_bounded_memory():
    server = _server()
    for version in range(5):
        server.service.state.engine.version = version
        for parts in range(1, 12):
            for model in ("dispatch", "theta"):
                assert _serve(server, {"plan": True, "parts": parts, "model": model})[0]["status"] == "ok"
    assert len(server.pinned) == MAX_PINNED and {v for _, v, _ in server.pinned} == {4}
    assert all(len(pin.part_digests) == MAX_PLANS_KEPT for pin in server.pinned.values())


# ---------------------------------------------------------------- real streams
def _delayed(handler, seconds):
    async def slower(header, payload, remote):
        await asyncio.sleep(seconds)
        return await handler(header, payload, remote)
    return slower


@pytest.mark.slow
def test_over_real_streams_three_peers_serve_a_joiner_and_one_dying_costs_only_its_part():
    bench = load_script("bench_join")  # its loopback servers: real SwarmNodes, p2pd and streams
    swarm = bench.LoopbackServers(3, bench.synthetic_shapes(3_000_000))
    try:
        victim_node, victim = swarm.nodes[2], swarm.servers[2]
        served, real = [], victim.serve_state

        async def stops_after_two_parts(header, payload, remote):
            if header.get("part") is not None:
                served.append(header["part"])
                if len(served) == 3:  # the peer's daemon dies: the third part is never answered
                    os.kill(p2p_daemon_pid(victim_node.p2p), signal.SIGKILL)
                    await asyncio.sleep(0.5)
            return await real(header, payload, remote)

        victim.serve_state = stops_after_two_parts
        for server in swarm.servers[:2]:  # a little slower than the victim, so that it is asked three times
            server.serve_state = _delayed(server.serve_state, 0.15)
        params, header, seconds = swarm.download(3, "fp16", part_mb=0.5)
        want = swarm.state.engine.dispatch_params()
        assert all(torch.equal(a, b.half().float()) for a, b in zip(params, want))
        join = header["join"]
        assert join["parts"] == 12 and join["retried"] == 1 and list(join["failed"]) == [victim_node.peer_id[-8:]]
        assert join["sources"][victim_node.peer_id[-8:]] == 2 and sum(join["sources"].values()) == 12
        assert seconds < 30
    finally:
        swarm.close()


def test_a_plan_waiting_for_the_commit_lock_gets_the_version_the_commit_made_and_kept_parts_are_served_meanwhile():
    server = _server()
    _serve(server, {"plan": True, "parts": 2, "compression": "none"})  # version 0 kept

    async def go():
        svc = server.service
        svc.state.engine.version = 1  # a commit since version 0 was kept
        await svc.lock.acquire()  # and another in progress
        plan = asyncio.ensure_future(server.serve_state({"plan": True, "parts": 2, "compression": "none"}, b"", "QmJ"))
        await asyncio.sleep(0.05)
        # a part of the version kept before is served while the plan waits for the commit lock
        part, _ = await asyncio.wait_for(server.serve_state({"part": 0, "parts": 2, "compression": "none", "version": 0},
                                                            b"", "QmJ2"), 2.0)
        svc.state.engine.version = 2  # the commit lands
        svc.lock.release()
        return part, await asyncio.wait_for(plan, 5.0)

    part, (plan, _) = asyncio.run(go())
    assert part["status"] == "ok" and part["version"] == 0
    assert plan["status"] == "ok" and plan["version"] == 2, plan  # not "unavailable"
