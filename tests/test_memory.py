"""How many fp32 copies of θ each role holds (issue 15: five processes of a 125M run on a 24 GiB
machine), with values: a coordinator's objects hold θ, the outer momentum and the wrap8 window's
previous θ̄ and nothing more between commits (no scratch, no loss-screen model copy), a standby θ
and m; and what removed the copies changes no result: the engine working in a consumed Δ commits
bitwise the same θ, the parameter-less loss screen scores bitwise the same, a no-clone full state
loads to the same replica."""
from __future__ import annotations

import asyncio
import gc
import io

import torch

from heloco_p2p.algorithms import build_outer_engine, get_algorithm
from heloco_p2p.local import build_model, trainable_params
from heloco_p2p.local.evaluate import validation_loss
from heloco_p2p.local.model import param_names
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits, params_digest
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.defence import DefenceLimits, DefenceState, LossScreen
from heloco_p2p.swarm.wire import encode_tensors

from fakes import ScriptedNode

PEERS = ("QmA", "QmB", "QmC")


def _copies_of(shape: tuple[int, ...]) -> int:
    """Distinct fp32 storages of tensors of ``shape`` alive in this process: with a shape only one
    parameter has (the embedding), the number of copies of θ held."""
    gc.collect()
    return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and tuple(t.shape) == shape
                and not t.is_meta})  # a meta tensor (a released engine's layout) holds no memory


def _heloco_state(tiny_cfg, screen: bool) -> tuple[CommitState, list[tuple[int, ...]], list[str]]:
    """The published HeLoCo's engine (look-ahead dispatch, ρ = 1/√K before the correction: the
    engine's scratch would be used by every commit of K ≥ 2) over the tiny model's θ0."""
    model = build_model(tiny_cfg.model, seed=0)
    names, shapes = param_names(model), [tuple(p.shape) for p in trainable_params(model)]
    engine = build_outer_engine(get_algorithm("heloco"), [p.detach() for p in trainable_params(model)], names=names)
    del model
    state = CommitState(engine, defence=DefenceState(DefenceLimits()))
    if screen:
        g = torch.Generator().manual_seed(1)
        blocks = torch.randint(0, tiny_cfg.model.vocab_size, (2, 17), generator=g)
        state.screen = LossScreen(lambda: build_model(tiny_cfg.model, seed=0), lambda region: blocks)
    return state, shapes, names


def _deltas(shapes, n: int, seed: int = 0) -> list[list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [[1e-3 * torch.randn(s, generator=g) for s in shapes] for _ in range(n)]


def _run(coro):
    return asyncio.new_event_loop().run_until_complete(coro)


def test_a_no_train_coordinator_holds_theta_momentum_and_the_previous_dispatch_only(tiny_cfg):
    """After six wrap8 commits of three peers, screened and forwarded to a standby, the
    coordinator's objects hold 3 fp32 copies of θ: θ, m and the wrap8 window's θ̄ of the last
    version. Before: 5 (the engine's scratch for ρ·Δ and the loss screen's model besides)."""
    # bitsandbytes' first use may log a warning with a traceback (pytest keeps it, and so the frames'
    # tensors): on a small tensor, before any of θ's size exists
    encode_tensors([torch.zeros(64, 64)], "8bit")
    state, shapes, names = _heloco_state(tiny_cfg, screen=True)
    limits = SubmissionLimits(submit_rate=0.0, defence=DefenceLimits(screen_blocks=2, share_factor=1e9))
    node = ScriptedNode({})
    node.run_id = "mem"
    coord = CoordinatorService(node, state, shapes, limits, reply_compression="wrap8", lease_seconds=3600.0)
    coord.replication.standbys = ["QmStandby"]
    coord.activate(1)
    for seq, delta in enumerate(_deltas(shapes, 6)):
        meta, payload = encode_tensors(delta, "8bit")
        header = {"run_id": "mem", "seq": seq, "base_version": state.version, "steps": 5, "term": 1, "names": names,
                  "tensors": meta, "region": "de", "held": "exact", "stats": {"seconds": 1.0}}
        reply, _ = _run(coord.handle_submit(header, payload, PEERS[seq % 3]))
        assert reply["status"] == "accepted", reply
    del delta, payload, reply
    assert state.version == 6 and state.last_screen["regions"] == 1  # every commit was screened
    assert coord.downlink.payload.version == 6
    assert _copies_of(shapes[0]) == 3
    assert state.engine._work is None  # the scratch was never made
    assert all(p.numel() == 0 for p in trainable_params(state.screen.model))  # the screen's model holds no θ


def test_a_standby_holds_theta_and_momentum_only(tiny_cfg):
    """A standby that took the full state and applied four forwarded commits: 2 copies (θ, m).
    Before: 3 (the engine's scratch)."""
    coord_state, shapes, names = _heloco_state(tiny_cfg, screen=False)
    standby_state, _, _ = _heloco_state(tiny_cfg, screen=False)
    limits = SubmissionLimits(submit_rate=0.0, defence=DefenceLimits(screen=False, share_factor=1e9))
    for seq, delta in enumerate(_deltas(shapes, 2)):
        coord_state.apply(delta, coord_state.version, PEERS[seq], seq, 5, 1.0)
    standby = CoordinatorService(ScriptedNode({}, peer_id="QmStandby"), standby_state, shapes, limits)
    standby.term.believed = ("QmCoordinator", 1)
    full = {"kind": "full", "term": 1, "version": coord_state.version}
    reply, _ = _run(standby.standby.handle_replicate(full, coord_state.to_bytes(), "QmCoordinator"))
    assert reply["status"] == "ok", reply
    del coord_state
    state = standby_state
    for seq, delta in enumerate(_deltas(shapes, 4, seed=1), start=2):
        # the coordinator's digest of the same commit, from a copy of the replica
        ref = CommitState(build_outer_engine(get_algorithm("heloco"), state.engine.params, names=names))
        ref.load_state_dict(state.state_dict())
        ref.apply([d.clone() for d in delta], state.version, PEERS[seq % 3], seq, 5, 1.0, num_workers=3)
        digest = params_digest(ref.engine.params)
        del ref
        meta, payload = encode_tensors(delta, "none")
        header = {"kind": "commit", "term": 1, "version_before": state.version, "base_version": state.version,
                  "peer": PEERS[seq % 3], "seq": seq, "steps": 5, "tensors": meta, "digest": digest, "num_workers": 3}
        reply, _ = _run(standby.standby.handle_replicate(header, payload, "QmCoordinator"))
        assert reply["status"] == "ok", reply
    del delta, payload
    assert state.version == 6
    assert _copies_of(shapes[0]) == 2
    assert state.engine._work is None


def test_a_consumed_pseudo_gradient_commits_bitwise_the_same_theta(tiny_cfg):
    state_a, shapes, _ = _heloco_state(tiny_cfg, screen=False)
    state_b, _, _ = _heloco_state(tiny_cfg, screen=False)
    for seq, delta in enumerate(_deltas(shapes, 8, seed=3)):
        base = max(0, state_a.version - seq % 3)  # stale ones too: ρ and the correction's branches vary
        info_a = state_a.apply([d.clone() for d in delta], base, PEERS[seq % 3], seq, 5, 1.0, num_workers=3)
        info_b = state_b.apply([d.clone() for d in delta], base, PEERS[seq % 3], seq, 5, 1.0, num_workers=3,
                               consume=True)
        assert info_a.summary() == info_b.summary()
    assert state_a.engine._work is not None and state_b.engine._work is None
    assert params_digest(state_a.engine.params) == params_digest(state_b.engine.params)
    assert params_digest(state_a.engine.momentum) == params_digest(state_b.engine.momentum)
    assert set(info_a.branches) - {"keep", "skip"}  # some blocks were corrected (written into Δ with consume)


def test_the_parameter_less_loss_screen_scores_bitwise_as_a_model_copy(tiny_cfg):
    """The screen's scores are those of a model holding a copy of the scored parameters (what it
    did before), to the last bit, at θ − s·Δ and at θ − Δ."""
    state, shapes, _ = _heloco_state(tiny_cfg, screen=True)
    theta = state.engine.params
    delta = _deltas(shapes, 1, seed=4)[0]
    got = state.screen.score(theta, delta, "de", version=0, scale=0.1, full_own=True)
    blocks = state.screen.blocks["de"]
    reference = build_model(tiny_cfg.model, seed=0).eval()

    def loss_at(params):
        with torch.no_grad():
            for p, q in zip(trainable_params(reference), params):
                p.copy_(q)
        return validation_loss(reference, blocks)

    base = loss_at(theta)
    assert got["own"] == loss_at([p - 0.1 * d for p, d in zip(theta, delta)]) - base
    assert got["own_full"] == loss_at([p - d for p, d in zip(theta, delta)]) - base
    assert all(p.numel() == 0 for p in trainable_params(state.screen.model))


def test_the_full_state_without_copies_loads_to_the_same_replica(tiny_cfg):
    state, shapes, names = _heloco_state(tiny_cfg, screen=False)
    for seq, delta in enumerate(_deltas(shapes, 3, seed=5)):
        state.apply(delta, state.version, PEERS[seq], seq, 5, 1.0)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)  # the copies' way
    copy, _, _ = _heloco_state(tiny_cfg, screen=False)
    copy.load_bytes(state.to_bytes())
    again, _, _ = _heloco_state(tiny_cfg, screen=False)
    again.load_bytes(buf.getvalue())
    for replica in (copy, again):
        assert params_digest(replica.engine.params) == params_digest(state.engine.params)
        assert params_digest(replica.engine.momentum) == params_digest(state.engine.momentum)
        assert replica.version == state.version and replica.applied == state.applied


def test_a_joiners_released_commit_state_holds_no_theta_until_it_is_made_a_standby(tiny_cfg):
    """A training peer that joined holds no θ in its commit state (released), refuses to commit or
    serve from it, answers a forwarded commit out_of_sync, and once sent the full state holds the
    coordinator's replica bitwise, with θ and m (2 copies) and commits on from there as usual."""
    coord_state, shapes, names = _heloco_state(tiny_cfg, screen=False)
    joiner_state, _, _ = _heloco_state(tiny_cfg, screen=False)
    joiner_state.engine.release()
    assert joiner_state.engine.hollow and _copies_of(shapes[0]) == 1  # the coordinator's θ only
    for call in (joiner_state.engine.dispatch_params, joiner_state.state_dict):
        try:
            call()
        except RuntimeError as exc:
            assert "holds no state" in str(exc)
        else:
            raise AssertionError(f"{call.__name__} of a released engine did not raise")
    limits = SubmissionLimits(submit_rate=0.0, defence=DefenceLimits(screen=False, share_factor=1e9))
    standby = CoordinatorService(ScriptedNode({}, peer_id="QmStandby"), joiner_state, shapes, limits)
    standby.term.believed = ("QmCoordinator", 1)
    meta, payload = encode_tensors([torch.zeros(s) for s in shapes], "none")
    forwarded = {"kind": "commit", "term": 1, "version_before": 0, "base_version": 0, "peer": "QmA", "seq": 0,
                 "steps": 5, "tensors": meta, "digest": "0" * 32}
    reply, _ = _run(standby.standby.handle_replicate(forwarded, payload, "QmCoordinator"))
    assert reply["status"] == "out_of_sync" and joiner_state.engine.hollow  # version 0 = 0, but no replica
    for seq, delta in enumerate(_deltas(shapes, 2)):
        coord_state.apply(delta, coord_state.version, PEERS[seq], seq, 5, 1.0)
    full = {"kind": "full", "term": 1, "version": coord_state.version}
    del payload, reply
    before = _copies_of(shapes[0])  # the coordinator's (θ, m, its scratch)
    reply, _ = _run(standby.standby.handle_replicate(full, coord_state.to_bytes(), "QmCoordinator"))
    assert reply["status"] == "ok" and not joiner_state.engine.hollow, reply
    assert params_digest(joiner_state.engine.params) == params_digest(coord_state.engine.params)
    assert all(torch.equal(a, b) for a, b in zip(joiner_state.engine.optimizer.momentum,
                                                 coord_state.engine.optimizer.momentum))
    assert _copies_of(shapes[0]) == before + 2  # θ and m of the replica: the parsed state kept no copy
    delta = _deltas(shapes, 1, seed=5)[0]
    coord_state.apply([d.clone() for d in delta], coord_state.version, "QmC", 9, 5, 1.0, num_workers=3)
    joiner_state.apply(delta, joiner_state.version, "QmC", 9, 5, 1.0, num_workers=3)
    assert params_digest(joiner_state.engine.params) == params_digest(coord_state.engine.params)
