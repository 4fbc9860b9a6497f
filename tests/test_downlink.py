"""``wrap8`` replies (swarm/downlink.py): θ̄ at 8 bits per parameter on a power-of-two grid per
block, decoded exactly (n' = n) against any start point within the window, failures caught by
the block checksums, the drift from θ̄ at most half a grid step per value; the coordinator's
reply path (one payload per version, fp32 for what the window cannot bound) and the peer's
decode with its fall-back to the exact state."""
from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import uuid
from types import SimpleNamespace

import pytest
import torch

from heloco_p2p.config import load_config
from heloco_p2p.outer import build_engine
from heloco_p2p.roles import messages
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.submit import SubmitClient
from heloco_p2p.swarm import downlink as D
from heloco_p2p.swarm.wire import WireError, encode_tensors, unpack_params

from fakes import ScriptedNode

# a small llama's layout: embedding, per layer 4 attention and 3 MLP matrices and 2 norms, final norm
HIDDEN, FFN, VOCAB = 256, 704, 4096


def llama_shapes(layers: int = 2) -> list[tuple[int, ...]]:
    per_layer = [(HIDDEN, HIDDEN)] * 4 + [(FFN, HIDDEN), (FFN, HIDDEN), (HIDDEN, FFN), (HIDDEN,), (HIDDEN,)]
    return [(VOCAB, HIDDEN)] + per_layer * layers + [(HIDDEN,)]


def init_params(shapes, g: torch.Generator) -> list[torch.Tensor]:
    """Weights ~ N(0, 0.02²), norm gains 1 (as the model factory's)."""
    return [torch.ones(s) if len(s) == 1 else torch.randn(s, generator=g) * 0.02 for s in shapes]


def split(e: torch.Tensor, params) -> list[torch.Tensor]:
    out, off = [], 0
    for p in params:
        k = D.num_blocks(p.numel())
        out.append(e[off:off + k])
        off += k
    return out


def grid_of(params, payload: D.Wrap8Payload) -> list[torch.Tensor]:
    """n · s of every value: what a peer that decodes the payload must hold, bit for bit."""
    return [D.grid_values(p, e) for p, e in zip(params, split(payload.e, params))]


def steps_of(p: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """s of each value of ``p``."""
    return torch.ldexp(torch.ones(e.numel()), e.to(torch.int32)).repeat_interleave(D.BLOCK)[:p.numel()].view(p.shape)


def outer_step(params, g, scale=2e-4):
    return [p + torch.randn(p.shape, generator=g) * scale * (50.0 if p.dim() == 1 else 1.0) for p in params]


# ---------------------------------------------------------------- the codec
def test_a_reply_decodes_exactly_on_every_start_point_the_window_bounds():
    g = torch.Generator().manual_seed(1)
    shapes = [(3000, 7), (512,), (64, 4096), (5,)]  # short last blocks, a single short block, whole blocks
    window = D.DownlinkWindow(window=4)
    versions = [init_params(shapes, g)]
    window.advance(versions[0], 0, term=1)
    held = {0: grid_of(versions[0], window.payload)}
    for v in range(1, 7):
        versions.append(outer_step(versions[-1], g))
        payload = window.advance(versions[-1], v, term=1)
        want = grid_of(versions[-1], payload)
        for base in range(max(0, v - 4), v):  # a grid start and an exact start, for every base in the window
            for kind, start in (("wrap8", held[base]), ("exact", versions[base])):
                assert window.decodable(base, kind), (v, base, kind, window.bound_steps(base, kind))
                got, bad = D.decode_wrap8(payload.data, start)
                assert bad == 0 and all(torch.equal(a, b) for a, b in zip(got, want)), (v, base, kind)
        held[v] = want
    assert not window.decodable(6 - 5, "wrap8") and not window.decodable(0, "exact")  # older than the window
    assert not window.decodable(5, "none")


def test_a_change_beyond_128_steps_is_caught_by_its_blocks_checksums_and_only_there():
    g = torch.Generator().manual_seed(2)
    theta = [torch.randn(8 * D.BLOCK, generator=g) * 0.02, torch.randn(2 * D.BLOCK + 100, generator=g) * 0.02]
    window = D.DownlinkWindow(window=2)
    window.advance(theta, 0, term=1)
    new = outer_step(theta, g)
    payload = window.advance(new, 1, term=1)
    e0, e1 = split(payload.e, new)
    start = [t.clone() for t in theta]
    # block 3 of tensor 0: one value 200 steps off (it wraps to n − 256)
    start[0][3 * D.BLOCK + 17] += 200 * 2.0 ** int(e0[3])
    # block 6 of tensor 0: four values off by ±200 steps at equal spacing, +, −, −, +: Σ n and Σ (i+1)·n
    # would both miss this; the hashed weights of c2 do not
    for i, sign in zip((100, 200, 300, 400), (1, -1, -1, 1)):
        start[0][6 * D.BLOCK + i] += sign * 200 * 2.0 ** int(e0[6])
    # the short last block of tensor 1
    start[1][2 * D.BLOCK + 99] -= 300 * 2.0 ** int(e1[2])
    parts = D.read_wrap8(payload.data, [p.shape for p in new])[1]
    _, bad0 = D.decode_tensor(start[0], *parts[0])
    _, bad1 = D.decode_tensor(start[1], *parts[1])
    assert bad0.nonzero().view(-1).tolist() == [3, 6]
    assert bad1.nonzero().view(-1).tolist() == [2]
    assert D.decode_wrap8(payload.data, start)[1] == 3
    assert D.decode_wrap8(payload.data, theta)[1] == 0


def test_the_drift_is_at_most_half_a_step_per_value_and_the_reported_figure_is_the_measured_one():
    g = torch.Generator().manual_seed(3)
    shapes = llama_shapes(layers=1)
    theta = init_params(shapes, g)
    window = D.DownlinkWindow()
    window.advance(theta, 0, term=1)
    new = outer_step(theta, g)
    payload = window.advance(new, 1, term=1)
    got, bad = D.decode_wrap8(payload.data, theta)
    assert bad == 0
    for p, q, e in zip(got, new, split(payload.e, new)):
        assert ((p - q).abs() <= steps_of(q, e) / 2).all()
    err = math.sqrt(sum(float((p.double() - q.double()).square().sum()) for p, q in zip(got, new)))
    norm = math.sqrt(sum(float(q.double().square().sum()) for q in new))
    assert payload.drift_rel_l2 == pytest.approx(err / norm, rel=1e-6)
    assert 1e-6 < payload.drift_rel_l2 < 1e-3  # finer than fp16's ~2e-4 relative and than any 8-bit codec
    print(f"\nwrap8 drift ‖P − θ̄‖/‖θ̄‖ = {payload.drift_rel_l2:.2e}")


def test_a_versions_payload_is_at_most_8_1_bits_per_parameter_with_its_exponents_checksums_and_headers():
    g = torch.Generator().manual_seed(4)
    shapes = llama_shapes(layers=2)
    theta = init_params(shapes, g)
    window = D.DownlinkWindow()
    payload = window.advance(theta, 0, term=1)
    numel = sum(math.prod(s) for s in shapes)
    header = messages.accepted(12345, 3, 2, 4000, 10 ** 9, branches={"fresh": 1}, params_encoding="wrap8",
                               drift_rel_l2=payload.drift_rel_l2,
                               timing={k: 0.123456789 for k in ("decode", "commit", "replicate", "encode_reply", "grid")})
    framing = 4 + 4 + 8 + len(json.dumps(header))  # HLC1 | u32 | header | u64
    bits = 8 * (len(payload.data) + framing) / numel
    assert len(payload.data) == 4 + len(payload.data[4:4 + int.from_bytes(payload.data[:4], "big")]) + \
        D.payload_bytes(shapes)
    assert bits <= 8.1
    print(f"\nwrap8: {bits:.4f} bits/param over {numel} params, reply header and framing included")


def test_twenty_outer_steps_two_peers_decode_every_reply_and_a_stale_peer_gets_the_exact_state():
    """A real outer optimizer (look-ahead with momentum): θ̄ moves more than θ and not uniformly."""
    g = torch.Generator().manual_seed(5)
    shapes = llama_shapes(layers=1)
    state = CommitState(build_engine(init_params(shapes, g), "lookahead"))
    window = D.DownlinkWindow(window=8)
    window.advance([p.clone() for p in state.engine.dispatch_params()], 0, term=1)
    start = [p.clone() for p in state.engine.dispatch_params()]
    peers = {"fast": (0, "exact", start), "slow": (0, "exact", start)}  # (base, held, start point)
    stale_base = 0  # a third peer, away since version 0
    resyncs, worst, drifts, moves = 0, 0.0, [], []
    for v in range(1, 21):
        before = [p.clone() for p in state.engine.dispatch_params()]
        delta = [torch.randn(s, generator=g) * 1e-3 for s in shapes]  # an inner round's Δ: ~5% of a weight's rms
        state.apply(delta, state.version, "QmP", v, 10, float(sum(d.norm() ** 2 for d in delta)) ** 0.5)
        theta_bar = state.engine.dispatch_params()
        payload = window.advance(theta_bar, v, term=1)
        assert payload.version == state.version == v
        drifts.append(payload.drift_rel_l2)
        moves.append(math.sqrt(sum(float((a - b).square().sum()) for a, b in zip(theta_bar, before)) /
                               sum(float(b.square().sum()) for b in theta_bar)))
        want = grid_of(theta_bar, payload)
        for name, every in (("fast", 1), ("slow", 3), ("stale", 4)):
            if name not in peers:
                continue
            base, held, start_point = peers[name]
            if v % every:
                continue  # this peer is still training from its base
            bound = window.bound_steps(base, held)
            assert bound is not None and bound < D.TARGET_STEPS + 1  # the e chosen for the whole window
            got, bad = D.decode_wrap8(payload.data, start_point)
            resyncs += bool(bad)
            assert bad == 0 and all(torch.equal(a, b) for a, b in zip(got, want))
            for p, q, e in zip(got, theta_bar, split(payload.e, theta_bar)):
                s = steps_of(q, e)
                assert ((p - q).abs() <= s / 2).all()
                worst = max(worst, float(((p - q).abs() / s).max()))
            peers[name] = (v, "wrap8", got)
        if v == 12:  # the stale peer comes back 12 versions later, beyond the window of 8: the exact state,
            # from which the next replies decode again
            assert window.bound_steps(stale_base, "exact") is None and not window.decodable(stale_base, "exact")
            peers["stale"] = (v, "exact", [p.clone() for p in theta_bar])
    assert resyncs == 0 and worst <= 0.5
    # bounded by construction, not accumulating: once the window is full the drift stays where it is,
    # a fraction of one version's own move (8 bits span the moves of the whole window)
    assert max(drifts[8:]) < 1.5 * min(drifts[8:])
    assert all(d < 0.5 * m for d, m in zip(drifts, moves))
    print(f"\n20 outer steps: drift ‖P − θ̄‖/‖θ̄‖ {min(drifts):.2e}..{max(drifts):.2e}, one version's move "
          f"‖θ̄_v − θ̄_v-1‖/‖θ̄‖ {min(moves):.2e}..{max(moves):.2e}, worst |P − θ̄|/s {worst:.3f}")


def test_malformed_or_damaged_payloads_are_wire_errors_or_mismatched_blocks_never_wrong_values():
    g = torch.Generator().manual_seed(6)
    shapes = [(300, 20), (40,)]
    theta = init_params(shapes, g)
    window = D.DownlinkWindow()
    window.advance(theta, 0, term=1)
    new = outer_step(theta, g)
    data = window.advance(new, 1, term=1).data
    want = grid_of(new, window.payload)
    n = int.from_bytes(data[:4], "big")

    def refused(blob, code, start=theta):
        with pytest.raises(WireError) as exc:
            D.decode_wrap8(blob, start)
        assert exc.value.code == code, exc.value

    refused(b"", "truncated")
    refused(data[:3], "truncated")
    refused(b"\xff\xff\xff\xff" + data[4:], "truncated")
    for cut in (5, 4 + n, 4 + n + 1, len(data) - 1):
        refused(data[:cut], "truncated")
    refused(data + b"\x00", "malformed")
    pre = json.loads(data[4:4 + n])

    def with_preamble(**change):
        body = json.dumps({**pre, **change}).encode()
        return len(body).to_bytes(4, "big") + body + data[4 + n:]

    refused(with_preamble(encoding="wrap4"), "malformed")
    refused(with_preamble(block=1024), "malformed")
    refused(with_preamble(version=-1), "malformed")
    refused(with_preamble(version="1"), "malformed")
    refused(with_preamble(shapes=[[20, 300], [40]]), "layout_mismatch")
    refused(with_preamble(shapes=[[300, 20]]), "layout_mismatch")
    refused(with_preamble(shapes="x"), "layout_mismatch")
    refused(b"\x00\x00\x00\x03[1," + data[4 + n:], "malformed")
    refused(b"\x00\x00\x00\x02\xff\xfe" + data[4 + n:], "malformed")
    bad_e = bytearray(data)
    bad_e[4 + n] = 0x80  # e = −128: outside [E_MIN, E_MAX]
    refused(bytes(bad_e), "bad_tensor")
    refused(data, "layout_mismatch", start=[theta[0]])
    # random damage to the body: refused, or the damaged blocks fail their checksums; never wrong values
    rng = random.Random(7)
    for _ in range(60):
        blob = bytearray(data)
        k = rng.randrange(4 + n, len(blob))
        blob[k] ^= 1 << rng.randrange(8)
        try:
            got, bad = D.decode_wrap8(bytes(blob), theta)
        except WireError as exc:
            assert exc.code == "bad_tensor"
            continue
        assert bad > 0 or all(torch.equal(a, b) for a, b in zip(got, want)), k


# ---------------------------------------------------------------- the coordinator and the submit client
SHAPES = [(2 * D.BLOCK + 10,), (64, 96)]


def _service(window=4, compression="wrap8"):
    g = torch.Generator().manual_seed(8)
    state = CommitState(build_engine(init_params(SHAPES, g), "lookahead"))
    svc = CoordinatorService(ScriptedNode({}), state, SHAPES, SubmissionLimits(submit_rate=0.0),
                             reply_compression=compression, reply_window=window)
    svc.replication.standbys = ["QmStandby"]
    svc.activate(1)
    return svc, state


def _submission(base, seq, held, g):
    meta, payload = encode_tensors([torch.randn(s, generator=g) * 1e-3 for s in SHAPES], "none")
    return {"run_id": "fenced", "seq": seq, "base_version": base, "steps": 5, "term": 1, "tensors": meta,
            "stats": {"seconds": 1.0}, "held": held}, payload


def test_the_coordinator_sends_one_wrap8_payload_per_version_and_fp32_to_what_its_window_cannot_bound():
    svc, state = _service(window=4)
    g = torch.Generator().manual_seed(9)
    events = []
    svc.on_commit = events.append
    start, base = [p.clone() for p in state.engine.dispatch_params()], 0  # a joiner's exact θ̄ from `state`
    for seq in range(6):
        header, payload = _submission(base, seq, "exact" if seq == 0 else "wrap8", g)
        reply, data = asyncio.run(svc.handle_submit(header, payload, "QmPeer"))
        assert reply["status"] == "accepted" and reply["params_encoding"] == "wrap8", reply
        theta_bar = state.engine.dispatch_params()
        got, bad = D.decode_wrap8(data, start)
        assert bad == 0 and all(torch.equal(a, b) for a, b in zip(got, grid_of(theta_bar, svc.downlink.payload)))
        err = math.sqrt(sum(float((a.double() - b.double()).square().sum()) for a, b in zip(got, theta_bar)))
        norm = math.sqrt(sum(float(b.double().square().sum()) for b in theta_bar))
        assert reply["drift_rel_l2"] == pytest.approx(err / norm, rel=1e-6) and events[-1]["reply_drift_rel_l2"] == \
            reply["drift_rel_l2"]
        assert "grid" in reply["timing"]
        start, base = got, reply["version"]
        assert 8 * len(data) / sum(math.prod(s) for s in SHAPES) < 8.2  # a small layout: the preamble weighs more
    # a duplicate (a lost reply, resent) gets the same version's payload, not a new encoding
    cached = svc.downlink.payload.data
    reply, data = asyncio.run(svc.handle_submit(*_submission(base, 5, "wrap8", g), "QmPeer"))
    assert reply["duplicate"] and reply["params_encoding"] == "wrap8" and data is cached
    # a sender that holds nothing decodable, and one whose base is older than the window: exact fp32 θ̄
    assert svc.reply_resyncs == 0
    for seq, (b, held) in enumerate(((base, "none"), (base, ""), (state.version - 5, "wrap8")), start=10):
        reply, data = asyncio.run(svc.handle_submit(*_submission(b, seq, held, g), "QmPeer"))
        assert reply["status"] == "accepted" and reply["params_encoding"] == "dense", (b, held, reply)
        assert all(torch.equal(a, b) for a, b in zip(unpack_params(data), state.engine.dispatch_params()))
    assert svc.reply_resyncs == 3


def test_standbys_replay_the_forwarded_deltas_and_stay_bitwise_equal_under_wrap8():
    svc, state = _service()
    g = torch.Generator().manual_seed(11)
    standby_state = CommitState(build_engine(init_params(SHAPES, torch.Generator().manual_seed(8)), "lookahead"))
    standby = CoordinatorService(ScriptedNode({}, peer_id="QmStandby"), standby_state, SHAPES,
                                 SubmissionLimits(submit_rate=0.0), reply_compression="wrap8")
    standby.term.believed = ("QmCoordinator", 1)
    for seq in range(4):
        header, payload = _submission(state.version, seq, "exact", g)
        assert asyncio.run(svc.handle_submit(header, payload, "QmPeer"))[0]["params_encoding"] == "wrap8"
        forwarded = svc.node.headers[-1]
        assert asyncio.run(standby.standby.handle_replicate(forwarded, payload, "QmCoordinator"))[0]["status"] == "ok"
    assert all(torch.equal(a, b) for a, b in zip(state.engine.params, standby_state.engine.params))
    assert all(torch.equal(a, b) for a, b in zip(state.engine.dispatch_params(), standby_state.engine.dispatch_params()))
    assert standby.downlink.payload is None  # a standby builds no reply payloads


def test_replies_stay_dense_and_unchanged_without_wrap8():
    svc, state = _service(compression="none")
    reply, data = asyncio.run(svc.handle_submit(*_submission(0, 0, "exact", torch.Generator()), "QmPeer"))
    assert reply["params_encoding"] == "dense" and svc.downlink is None and "drift_rel_l2" not in reply
    assert all(torch.equal(a, b) for a, b in zip(unpack_params(data), state.engine.dispatch_params()))


def _client(svc, start_point, reply_compression="wrap8"):
    """A submit client whose one coordinator is ``svc`` (its ``send`` calls the handler directly)."""
    cfg = load_config("configs/tiny.yaml", overrides={"swarm.reply_compression": reply_compression})
    node = SimpleNamespace(run_id="fenced", peer_id="QmPeer")
    election = SimpleNamespace(refresh=lambda: SimpleNamespace(peer_id="QmCoordinator", term=1), lease=None)
    client = SubmitClient(node, election, SimpleNamespace(term=SimpleNamespace(highest_seen=1)), cfg.swarm, "de",
                          svc.state.engine.names, threading.Event(), lambda: True, start_point=start_point)
    client.sent = []

    def send(lease, header, payload):
        client.sent.append(header)
        return asyncio.run(svc.handle_submit(header, payload, "QmPeer"))

    client.send = send
    return client


def test_the_submit_client_decodes_on_its_start_point_and_asks_for_the_state_when_a_block_fails():
    svc, state = _service()
    g = torch.Generator().manual_seed(10)
    expected = [(s, torch.float32) for s in SHAPES]
    stats = SimpleNamespace(loss=1.0, steps=5, tokens=10, seconds=1.0)
    held = {"params": [p.clone() for p in state.engine.dispatch_params()], "kind": "exact"}  # a joiner's θ̄
    client = _client(svc, lambda: (held["params"], held["kind"]))
    for seq in range(3):
        out = client.submit(seq, [torch.randn(s, generator=g) * 1e-3 for s in SHAPES], state.version, stats, expected)
        assert client.sent[-1]["held"] == held["kind"]
        assert out.status == "accepted" and not out.resync and out.held == "wrap8", out.reply
        assert all(torch.equal(a, b) for a, b in zip(out.params, grid_of(state.engine.dispatch_params(),
                                                                            svc.downlink.payload)))
        assert 8.0 < out.reply_bits_per_param < 8.2
        held = {"params": out.params, "kind": out.held}
    # a start point far outside the bound (the peer's state went wrong): the checksums fail, the state is asked for
    far = {"params": [p + 1.0 for p in held["params"]], "kind": "wrap8"}
    client.start_point = lambda: (far["params"], far["kind"])
    out = client.submit(3, [torch.zeros(s) + 1e-4 for s in SHAPES], state.version, stats, expected)
    assert out.status == "accepted" and out.resync and out.params is None and out.held == "none"
    # so is a truncated reply; a client with no start point says it holds nothing and gets fp32
    truncated = svc.downlink.payload.data[:-1]
    assert client.reply_params({"params_encoding": "wrap8"}, truncated, expected, held["params"]) == (None, "none")
    client.start_point = None
    out = client.submit(4, [torch.zeros(s) + 1e-4 for s in SHAPES], state.version, stats, expected)
    assert client.sent[-1]["held"] == "none" and out.reply["params_encoding"] == "dense" and out.held == "exact"
    assert all(torch.equal(a, b) for a, b in zip(out.params, state.engine.dispatch_params()))


def test_a_peer_that_cannot_decode_a_reply_downloads_the_state_and_says_so():
    """Peer._submit on a resync: the exact state (as a joiner's), held "exact" afterwards, a
    ``reply_resync`` event and an ack with ``reply_resync: true``; a decoded reply is held "wrap8"."""
    from heloco_p2p.peer import Peer
    from heloco_p2p.roles.submit import SubmitOutcome
    from heloco_p2p.roles.tally import SubmitTally

    exact_params = [torch.ones(s) for s in SHAPES]
    outcomes = iter([
        SubmitOutcome("accepted", {"version": 7, "term": 1, "staleness": 0, "params_encoding": "wrap8",
                                   "drift_rel_l2": 1e-4}, None, reply_bytes=100, resync=True, held="none",
                      param_count=100),
        SubmitOutcome("accepted", {"version": 8, "term": 1, "staleness": 0, "params_encoding": "wrap8",
                                   "drift_rel_l2": 1e-4}, [torch.zeros(s) for s in SHAPES], reply_bytes=100,
                      held="wrap8", param_count=100),
    ])
    peer = Peer.__new__(Peer)
    logged, caught_up = [], []
    peer.global_params, peer.version, peer.held_kind = [torch.zeros(s) for s in SHAPES], 6, "wrap8"
    peer.rounds_loop = SimpleNamespace(rounds=1, in_flight=None)  # a blocking round: nothing in flight
    peer.tally, peer.stop_event = SubmitTally(), threading.Event()
    peer.metrics = SimpleNamespace(log=logged.append)
    peer.submitter = SimpleNamespace(submit=lambda *args: next(outcomes))
    peer.election = SimpleNamespace(run_tokens=0, role="training")
    peer.cfg = load_config("configs/tiny.yaml", overrides={"swarm.reply_compression": "wrap8"})
    peer.trainer = SimpleNamespace(load_params=lambda params: None, step=0)

    def catch_up(exact=False):
        caught_up.append((peer.held_kind, exact, peer.tally.seq))
        peer._adopt(exact_params, 9, 0, "exact")

    peer._catch_up = catch_up
    stats = SimpleNamespace(loss=1.0, tokens=10, steps=5, tokens_per_second=1.0)
    seq0 = peer.tally.seq
    peer._submit([torch.zeros(s) for s in SHAPES], 6, stats, 1.0)
    # the exact (fp32) state, downloaded once the next round's number is taken: a failed download
    # cannot make the next round reuse the number just acknowledged
    assert caught_up == [("none", True, seq0 + 1)]
    assert peer.held_kind == "exact" and peer.version == 9 and peer.global_params is exact_params
    assert logged[0] == {"event": "reply_resync", "version": 7, "base_version": 6}
    assert logged[1]["event"] == "ack" and logged[1]["reply_resync"] is True and logged[1]["digest"] is None
    peer._submit([torch.zeros(s) for s in SHAPES], 9, stats, 1.0)
    assert peer.held_kind == "wrap8" and peer.version == 8 and len(caught_up) == 1
    assert logged[-1]["reply_resync"] is False and logged[-1]["reply_bits_per_param"] == 8.0
    assert logged[-1]["reply_encoding"] == "wrap8" and logged[-1]["reply_drift_rel_l2"] == 1e-4


def test_a_submissions_held_field_is_checked():
    header, _ = _submission(0, 0, "exact", torch.Generator())
    assert messages.Submission.parse(header, "QmP", "fenced", ["a", "b"], 100).held == "exact"
    assert messages.Submission.parse({k: v for k, v in header.items() if k != "held"}, "QmP", "fenced",
                                     ["a", "b"], 100).held == ""
    for bad in ("grid", 3, None, ["wrap8"]):
        with pytest.raises(WireError, match="held"):
            messages.Submission.parse(dict(header, held=bad), "QmP", "fenced", ["a", "b"], 100)


# ---------------------------------------------------------------- a real swarm
@pytest.mark.slow
def test_a_two_peer_swarm_trains_with_wrap8_replies_at_a_quarter_of_fp32(tmp_path):
    from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

    cfg = write_test_config(tmp_path / "cfg.yaml", reply_compression="wrap8", reply_window=8)
    sw = LocalSwarm(tmp_path, f"wrap8-{uuid.uuid4().hex[:8]}")
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.wait_until(lambda: len([x for x in sw.events("b", "ack") if x["reply_encoding"] == "wrap8"]) >= 4, 120,
                      "4 wrap8 replies to the joiner")
        acks = [x for name in "ab" for x in sw.events(name, "ack")]
        wrap8 = [x for x in acks if x["reply_encoding"] == "wrap8"]
        assert wrap8 and not any(x["reply_resync"] for x in acks) and not sw.all_events("reply_resync")
        bits = [x["reply_bits_per_param"] for x in wrap8]
        assert all(8.0 < b < 8.2 for b in bits), bits  # a quarter of fp32's 32
        # early training moves θ̄ fast, and the grid spans the window's moves: ~1e-3..1e-2 here
        assert all(0 < x["reply_drift_rel_l2"] < 2e-2 for x in wrap8)
        commits = sw.events("a", "commit")
        assert len(commits) >= 4 and all(0 < e["reply_drift_rel_l2"] < 2e-2 for e in commits)
    finally:
        sw.close()
        for name in sw.procs:
            assert not sw.group_alive(name)


def test_a_coordinator_that_steps_down_releases_the_window_and_starts_it_again_in_a_new_term():
    svc, state = _service(window=4)
    g = torch.Generator().manual_seed(12)
    reply, _ = asyncio.run(svc.handle_submit(*_submission(0, 0, "exact", g), "QmPeer"))
    assert reply["params_encoding"] == "wrap8" and svc.downlink.prev is not None and svc.downlink.payload is not None

    async def step_down():
        svc.term.step_down(2)  # a verified higher term (the election or a standby's handler calls this)
        for _ in range(20):
            await asyncio.sleep(0.01)
            if svc.downlink.prev is None:
                break

    asyncio.run(step_down())
    assert not svc.active and svc.downlink.prev is None and svc.downlink.payload is None
    assert not svc.downlink.follows(state.version, 1) and not svc.downlink.decodable(state.version, "wrap8")
    # coordinating again (a later term): the window starts over and replies are wrap8 from its first commit
    svc.activate(3)
    reply, data = asyncio.run(svc.handle_submit(*_submission(state.version, 1, "exact", g), "QmPeer"))
    assert reply["status"] == "accepted" and reply["params_encoding"] == "wrap8", reply
    assert svc.downlink.term == 3 and svc.downlink.prev is not None
