"""The poisoning rules (heloco_p2p/roles/defence.py) through ``CommitState.check`` / ``apply``,
with values: a peer cannot raise its own norm bound, two identities cannot move it, the commit
share is capped, replays are refused, the loss screen refuses what makes the model worse, and the
rules' state survives a state_dict round trip bitwise and is the same on a standby."""
from __future__ import annotations

import asyncio
import io
import math

import pytest
import torch

from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, Rejection, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.defence import DefenceLimits, DefenceState, LossScreen, Sketcher, cosine
from heloco_p2p.swarm.wire import encode_tensors

from fakes import ScriptedNode

SHAPES = [(64,), (16, 8)]
HONEST = {"QmA": 1.0, "QmB": 1.2, "QmC": 0.9, "QmD": 1.1}
F = 3.0  # the norm factor these tests use


def _state(d: DefenceLimits | None = None) -> CommitState:
    return CommitState(build_engine([torch.zeros(s) for s in SHAPES], "lookahead"), defence=DefenceState(d or DefenceLimits()))


def _limits(**kw) -> SubmissionLimits:
    return SubmissionLimits(submit_rate=0.0, defence=DefenceLimits(screen=False, **{"norm_factor": F, **kw}))


def _delta(norm: float, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ts = [torch.randn(s, generator=g) for s in SHAPES]
    total = math.sqrt(sum(float((t * t).sum()) for t in ts))
    return [t * (norm / total) for t in ts]


def _commit(state, limits, peer, norm, seed, now=None, seq=None):
    d = _delta(norm, seed)
    n = state.check(d, state.version, limits, peer=peer, now=now)
    state.apply(d, state.version, peer, seq if seq is not None else seed, 1, n, commit_time=now)
    return n


def _warm(state, limits, rounds=3, t0=1000.0):
    """Each honest peer commits ``rounds`` times at its own norm."""
    seed = 0
    for r in range(rounds):
        for i, (peer, norm) in enumerate(HONEST.items()):
            seed += 1
            _commit(state, limits, peer, norm, seed, now=t0 + 10 * r + i, seq=r)
    return seed


def _probe(state, limits, peer, start, seed, now=None, steps=60):
    """A ratcheting attacker: each round it sends 1.5 × its last accepted norm, halving after a
    refusal. Returns its accepted norms."""
    accepted, norm = [], start
    for k in range(steps):
        d = _delta(norm, seed + k)
        try:
            n = state.check(d, state.version, limits, peer=peer, now=now)
        except Rejection as exc:
            assert exc.code == "norm_too_large"
            norm *= 0.5
            continue
        state.apply(d, state.version, peer, k, 1, n, commit_time=now)
        accepted.append(n)
        norm = 1.5 * n
    return accepted


def test_one_peer_cannot_raise_its_own_norm_bound():
    limits = _limits(share_factor=1e9)
    state = _state()
    seed = _warm(state, limits)
    # honest medians 1.0, 1.2, 0.9, 1.1: the attacker's bound is 3 × median(1.0, 1.2, 0.9, 1.1) = 3.15
    assert state.defence.norm_bound("QmMallory", limits.defence) == pytest.approx(3 * 1.05)
    accepted = _probe(state, limits, "QmMallory", 2.0, seed + 100)
    assert accepted and max(accepted) <= 3 * 1.05 + 1e-9
    assert state.defence.norm_bound("QmMallory", limits.defence) == pytest.approx(3.15)  # 60 tries later: unchanged
    # its inflated vote moves an honest peer's bound by one rank only: others of A are B, C, D, M
    assert state.defence.norm_bound("QmA", limits.defence) == pytest.approx(3 * statistics_median([1.2, 0.9, 1.1, max(accepted)]))


def statistics_median(xs):
    import statistics

    return statistics.median(xs)


def test_without_the_defence_the_run_wide_bound_ratchets():
    limits = SubmissionLimits(submit_rate=0.0)  # the run-wide rule alone: 10 × median of recent norms
    state = _state()
    _warm(state, limits)
    accepted = _probe(state, limits, "QmMallory", 2.0, 500, steps=120)
    assert max(accepted) > 1e3  # the median of recent norms is its own: the bound walks away


def test_two_identities_cannot_move_the_bound():
    limits = _limits(share_factor=1e9)
    state = _state()
    _warm(state, limits)
    got = []
    for k in range(40):  # the two sybils take turns ratcheting
        for sybil in ("QmSybil1", "QmSybil2"):
            got += _probe(state, limits, sybil, 2.0, 10_000 + 1000 * k + (7 if sybil.endswith("2") else 0), steps=1)
    # a sybil's voters: 4 honest and the other sybil; the median of 5 is an honest median (≤ 1.2)
    for sybil in ("QmSybil1", "QmSybil2"):
        assert state.defence.norm_bound(sybil, limits.defence) <= 3 * 1.2 * (1 + 1e-6)
    assert max(got) <= 3 * 1.2 * (1 + 1e-6)
    # an honest peer's voters: 3 honest and 2 sybils: still at most the largest honest median
    assert state.defence.norm_bound("QmC", limits.defence) <= 3 * 1.2 * (1 + 1e-6)


def test_with_too_few_other_voters_the_bound_is_the_factor_times_the_runs_median():
    limits = _limits()
    state = _state()
    for i, norm in enumerate((1.0, 2.0, 1.5)):
        _commit(state, limits, "QmA", norm, i, now=1.0 + i, seq=i)
    assert state.defence.norm_bound("QmB", limits.defence) is None  # one voter (A) of the 2 needed
    # then ‖Δ‖ ≤ 3 × median(1.0, 2.0, 1.5) = 4.5, whoever sends it (A too)
    for peer in ("QmB", "QmA"):
        with pytest.raises(Rejection) as exc:
            state.check(_delta(4.6, 9), state.version, limits, peer=peer, now=5.0)
        assert exc.value.code == "norm_too_large" and "= 4.5 (too few voters yet)" in exc.value.detail
    assert state.check(_delta(4.4, 9), state.version, limits, peer="QmB", now=5.0) == pytest.approx(4.4)
    # before any accepted norm: the run-wide rule, 10 × max(‖θ‖, 1)
    fresh = _state()
    with pytest.raises(Rejection) as exc:
        fresh.check(_delta(10.1, 9), 0, limits, peer="QmB", now=5.0)
    assert "fewer than 5 accepted norms" in exc.value.detail
    assert fresh.check(_delta(9.9, 9), 0, limits, peer="QmB", now=5.0) == pytest.approx(9.9)


def test_refusals_carry_no_thresholds():
    limits = _limits(share_factor=1e9)
    state = _state()
    _warm(state, limits)
    with pytest.raises(Rejection) as exc:
        state.check(_delta(50.0, 77), state.version, limits, peer="QmMallory", now=2000.0)
    assert exc.value.code == "norm_too_large"
    assert not any(ch.isdigit() for ch in str(exc.value))  # what the peer sees
    assert "3.15" in exc.value.detail  # what the operator sees


def test_commit_share_is_capped_and_answered_busy_with_retry_after():
    limits = _limits(share_window=100.0, share_factor=2.0, share_min=2)
    state = _state()
    now = 1000.0
    # honest peers: 3 commits each in the last 100 s
    seed = 0
    for r in range(3):
        for peer in HONEST:
            seed += 1
            _commit(state, limits, peer, HONEST[peer], seed, now=now - 90 + 30 * r, seq=r)
    # a flooder may commit 2 × 3 = 6 times in the window
    for k in range(6):
        _commit(state, limits, "QmFlood", 1.0, 100 + k, now=now + k, seq=k)
    with pytest.raises(Rejection) as exc:
        state.check(_delta(1.0, 200), state.version, limits, peer="QmFlood", now=now + 6)
    assert exc.value.code == "busy"
    # its oldest commit in the window (at now) ages out at now + 100: 94 s away, clamped to 10 s
    assert exc.value.retry_after == 10.0
    # 95 s later only its commits at now+0..now+5 are... still in the window, the honest ones are gone:
    # with nobody else active the floor share_min (2) applies
    with pytest.raises(Rejection):
        state.check(_delta(1.0, 201), state.version, limits, peer="QmFlood", now=now + 95)
    # an honest peer with 3 commits is well inside its share
    assert state.check(_delta(1.0, 202), state.version, limits, peer="QmA", now=now + 6) == pytest.approx(1.0)
    # a retry after the window passed: accepted
    assert state.check(_delta(1.0, 203), state.version, limits, peer="QmFlood", now=now + 200) == pytest.approx(1.0)


def test_share_wait_points_at_the_commit_that_must_age_out():
    d = DefenceState(DefenceLimits(share_window=60.0, share_factor=2.0, share_min=1))
    for t in (0.0, 10.0, 20.0):
        d.record("QmA", 1.0, None, t)
    for t in (5.0, 7.0, 9.0, 11.0, 13.0, 15.0):
        d.record("QmM", 1.0, None, t)
    assert d.allowed_share("QmM", 30.0) == 6.0  # 2 × A's 3
    # 6 in the window, one more needs the oldest (5.0) to leave: at 65, 35 s after 30 (clamped to 10)
    assert d.share_wait("QmM", 30.0) == 10.0
    # at 64 A's commit at 0 left the window: 4 allowed, so three of M's must leave; the third (9.0) at 69
    assert d.share_wait("QmM", 64.0) == pytest.approx(5.0)
    assert d.share_wait("QmA", 30.0) is None


def test_replays_are_refused_and_fresh_updates_are_not():
    limits = _limits(share_factor=1e9)
    state = _state()
    _warm(state, limits)
    old = _delta(1.0, 3)  # QmC's commit in the first round (seed 3)
    # exact, rescaled, and with 1% noise (cosine 0.99995): refused
    for replay in (old, [3.0 * t for t in old], [t + 0.01 * n for t, n in zip(old, _delta(1.0, 999))]):
        with pytest.raises(Rejection) as exc:
            state.check(replay, state.version, limits, peer="QmMallory", now=2000.0)
        assert exc.value.code == "replayed_update"
    # with 20% noise (cosine 0.98: honest consecutive rounds of one peer reach 0.99) it is no replay any more
    assert state.check([t + 0.2 * n for t, n in zip(old, _delta(1.0, 999))], state.version, limits,
                       peer="QmMallory", now=2000.0) > 0
    assert state.check(_delta(1.0, 4242), state.version, limits, peer="QmMallory", now=2000.0) == pytest.approx(1.0)


def test_sketch_cosines_estimate_the_true_cosines():
    shapes = [(256, 256), (1000,)]
    sk = Sketcher(shapes, dim=256, per_bucket=256)
    g = torch.Generator().manual_seed(1)
    a = [torch.randn(s, generator=g) for s in shapes]
    noise = [torch.randn(s, generator=g) for s in shapes]
    for w, want in ((0.0, 1.0), (1.0, 1 / math.sqrt(2)), (100.0, 0.01)):
        b = [x + w * n for x, n in zip(a, noise)]
        true = sum(float((x * y).sum()) for x, y in zip(a, b)) / math.sqrt(
            sum(float((x * x).sum()) for x in a) * sum(float((y * y).sum()) for y in b))
        assert true == pytest.approx(want, abs=0.01)
        assert cosine(sk(a), sk(b)) == pytest.approx(true, abs=0.1)


def test_state_dict_round_trip_is_bitwise():
    limits = _limits(share_factor=1e9)
    state = _state()
    _warm(state, limits)
    blob = state.to_bytes()
    other = _state()
    other.load_bytes(blob)

    def saved(d) -> bytes:
        buf = io.BytesIO()
        torch.save(d.state_dict(), buf)
        return buf.getvalue()

    assert saved(other.defence) == saved(state.defence)  # the rules' state, bitwise
    assert other.to_bytes() == other.to_bytes()
    assert other.defence.norm_bound("QmMallory", limits.defence) == state.defence.norm_bound("QmMallory", limits.defence) > 0
    assert other.defence.state_dict()["norms"] == state.defence.state_dict()["norms"]
    assert torch.equal(other.defence.state_dict()["sketches"], state.defence.state_dict()["sketches"])
    # a state written before the defence existed loads with an empty one
    legacy = state.state_dict()
    del legacy["defence"]
    fresh = _state()
    fresh.load_state_dict(legacy)
    assert fresh.defence.norms == {} and len(fresh.defence.sketches) == 0


def test_a_malformed_defence_state_changes_nothing():
    state = _state()
    _warm(state, _limits(share_factor=1e9))
    before = state.to_bytes()
    bad = state.state_dict()
    bad["defence"] = {**bad["defence"], "norms": {"QmA": [float("nan")]}}
    with pytest.raises(ValueError):
        state.load_state_dict(bad)
    bad["defence"] = {**state.defence.state_dict(), "sketches": torch.zeros(3, 7)}
    with pytest.raises(ValueError):
        state.load_state_dict(bad)
    assert state.to_bytes() == before


def _coordinator_and_standby(limits):
    """A coordinator in term 1 (its node records what it forwards) and the standby that believes it."""
    node = ScriptedNode({})
    node.run_id = "fenced"
    coord = CoordinatorService(node, _state(), SHAPES, limits)
    coord.replication.standbys = ["QmStandby"]
    coord.activate(1)
    standby = CoordinatorService(ScriptedNode({}, peer_id="QmStandby"), _state(), SHAPES, limits)
    standby.term.believed = ("QmCoordinator", 1)
    return coord, standby, node


def test_a_standby_applying_the_forwarded_commits_has_the_same_defence_state():
    def run(coro):
        return asyncio.new_event_loop().run_until_complete(coro)

    limits = _limits(share_factor=1e9)
    coord, standby, node = _coordinator_and_standby(limits)
    coord_state, standby_state = coord.state, standby.state
    for seq in range(3):
        for i, (peer, norm) in enumerate(HONEST.items()):
            meta, payload = encode_tensors(_delta(norm, 10 * seq + i), "none")
            header = {"run_id": "fenced", "seq": seq, "base_version": coord_state.version, "steps": 5, "term": 1,
                      "tensors": meta, "region": "de", "stats": {"seconds": 1.0}}
            reply, _ = run(coord.handle_submit(header, payload, peer))
            assert reply["status"] == "accepted", reply
            forwarded = node.headers[-1]
            assert isinstance(forwarded["commit_time"], float)  # the coordinator's clock travels with the commit
            assert run(standby.standby.handle_replicate(forwarded, payload, "QmCoordinator"))[0]["status"] == "ok"
    a, b = coord_state.defence.state_dict(), standby_state.defence.state_dict()
    assert a["norms"] == b["norms"] and a["times"] == b["times"] and a["sketch_peers"] == b["sketch_peers"]
    assert torch.equal(a["sketches"], b["sketches"]) and a["sketches"].shape == (12, 256)
    assert len(a["times"]["QmA"]) == 3
    # a replay sent to the coordinator is refused with its reason code, and changes nothing
    before = coord_state.to_bytes()
    meta, payload = encode_tensors(_delta(1.0, 0), "none")  # QmA's first Δ, from another identity
    header = {"run_id": "fenced", "seq": 0, "base_version": coord_state.version, "steps": 5, "term": 1,
              "tensors": meta, "region": "de", "stats": {"seconds": 1.0}}
    reply, _ = run(coord.handle_submit(header, payload, "QmMallory"))
    assert reply["reason"] == "replayed_update" and coord_state.to_bytes() == before


def test_a_commit_time_that_is_not_a_positive_number_is_malformed():
    standby = CoordinatorService(ScriptedNode({}, peer_id="QmStandby"), _state(), SHAPES, _limits())
    header = {"kind": "commit", "term": 1, "version_before": 0, "base_version": 0, "peer": "QmP", "seq": 0,
              "steps": 1, "tensors": [], "digest": "0" * 32, "commit_time": "yesterday"}
    reply, _ = asyncio.new_event_loop().run_until_complete(standby.standby.handle_replicate(header, b"", "QmCoordinator"))
    assert reply["reason"] == "malformed"


class _Bigram(torch.nn.Module):
    """Stands in for the run's model in the loss screen: logits from a table of the last token."""

    def __init__(self, vocab=32):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(vocab, vocab))

    def forward(self, input_ids):
        from types import SimpleNamespace

        return SimpleNamespace(logits=self.table[input_ids])


def test_the_loss_screen_refuses_what_makes_the_model_worse():
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 32, (4, 17), generator=g)
    seqs[:, 1::2] = (seqs[:, 0::2][:, :8] + 1) % 32  # a learnable bigram: every other token is the previous + 1
    screen = LossScreen(_Bigram, lambda region: seqs if region in ("de", "fr") else None)
    theta = [torch.ones(32, 32)]  # uniform logits; ‖θ‖ = 32 bounds Δ until norms are known
    good = torch.zeros(32, 32)
    good[torch.arange(32), (torch.arange(32) + 1) % 32] = -3.0  # Δ = θ − θ_trained: θ − Δ favours the bigram
    s = screen.score(theta, [good], "de", version=0)
    assert s["own"] < -0.5 and s["mean"] < -0.5 and s["regions"] == 1
    s = screen.score(theta, [-good], "fr", version=0)  # sign-flipped: worse on both languages now known
    assert s["own"] > 0.5 and s["mean"] > 0.5 and s["regions"] == 2
    assert screen.score(theta, [good], "xx", version=0)["own"] is None  # no data for a claimed region

    state = CommitState(build_engine([torch.ones(32, 32)], "lookahead"), screen=screen)
    limits = SubmissionLimits(submit_rate=0.0, defence=DefenceLimits())
    assert state.check([good], 0, limits, peer="QmA", region="de", now=1.0) > 0
    with pytest.raises(Rejection) as exc:
        state.check([-good], 0, limits, peer="QmM", region="de", now=1.0)
    # scored at θ − 0.1·Δ (screen_scale): own language +0.15 nats, over the 0.05 margin
    assert exc.value.code == "harmful_update" and state.last_screen["own"] == pytest.approx(0.1466, abs=1e-3)


@pytest.mark.slow
def test_a_sign_flipper_in_a_real_open_swarm_is_refused_and_the_model_still_learns(tmp_path):
    """scripts/poison.py's sign_flip attacker (a real ``join`` process whose submit path sends −k·Δ,
    probing k) against 3 honest peers of the tiny test model, defence on: most of its submissions
    are refused, its accepted ones are a small share of the run, few honest submissions are refused,
    and the final θ is well below the untrained loss on every language."""
    from argparse import Namespace

    import yaml

    from heloco_p2p.tools.launcher import write_test_config

    from fakes import load_script

    poison = load_script("poison")
    for name, region in (("a", "de"), ("b", "fr"), ("c", "es")):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"name": name, "region": region, "speed": 1.0,
                                                                "device": "cpu", "batch_size": 8}))
    (tmp_path / "config").mkdir()
    # not among the profiles (*.yaml); the testnet's outer lr (0.1): at the tiny config's 0.7, θ moves so far between
    # a peer's base and the commit that the whole-update rule refused honest Δs too (3 in one run)
    config = write_test_config(tmp_path / "config" / "cfg.yaml", outer={"optimizer_args": {"lr": 0.1, "momentum": 0.9}},
                               defence={"screen_full_own_margin": 0.0})  # the rules as measured on the testnet
    args = Namespace(peers=str(tmp_path / "*.yaml"), config=str(config), rounds=8, max_minutes=1.6, set=[])
    rec = poison.one_run("sign_flip", True, args, tmp_path / "run")
    assert min(rec["honest_rounds"].values()) >= 8, rec  # the run ended by rounds, not by time
    assert rec["attacker_submissions"] >= 4, rec
    refused = rec["attacker_submissions"] - rec["attacker_accepted"]
    assert refused >= rec["attacker_submissions"] / 2, rec
    assert set(rec["attacker_reasons"]) <= {"accepted", "gave_up", "norm_too_large", "harmful_update"}, rec
    assert rec["attacker_share"] <= 0.2, rec
    # the tiny model's honest Δs are noisier than the testnet's: the whole-update rule refused 1 of ~30 in a run here
    assert rec["honest_refused_pct"] < 10, rec
    for region, loss in rec["per_language"].items():
        assert loss < rec["untrained_per_language"][region] - 0.5, rec


def test_noise_that_a_small_step_hides_is_refused_by_the_whole_update_on_its_own_language():
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 32, (4, 17), generator=g)
    screen = LossScreen(_Bigram, lambda region: seqs)
    theta = [torch.ones(32, 32)]
    noise = [torch.randn(32, 32, generator=torch.Generator().manual_seed(5)) * 0.6]
    s = screen.score(theta, noise, "de", version=0, scale=0.1, full_own=True)
    assert abs(s["own"]) < 0.05 and abs(s["mean"]) < 0.05  # at θ − 0.1·Δ it looks harmless
    assert s["own_full"] > 0.1  # at θ − Δ it is not
    state = CommitState(build_engine([torch.ones(32, 32)], "lookahead"), screen=screen)
    with pytest.raises(Rejection) as exc:
        state.check(noise, 0, SubmissionLimits(submit_rate=0.0, defence=DefenceLimits(screen_full_own_margin=0.0)),
                    peer="QmN", region="de", now=1.0)
    assert exc.value.code == "harmful_update"
    # with that rule off (the default: docs/security.md), the same noise is committed
    off = DefenceLimits()
    assert off.screen_full_own_margin is None
    assert state.check(noise, 0, SubmissionLimits(submit_rate=0.0, defence=off), peer="QmN", region="de", now=1.0) > 0


def _ratchet_clipped(state, limits, peer, start, seed, steps=40):
    """The ratchet through the coordinator's path (check, then the norm clip, then apply): returns
    (norms sent, norms committed)."""
    sent, committed, norm = [], [], start
    for k in range(steps):
        d = _delta(norm, seed + k)
        try:
            n = state.check(d, state.version, limits, peer=peer)
        except Rejection as exc:
            assert exc.code == "norm_too_large"
            norm *= 0.8
            continue
        d, n, _ = state.clip(d, n, limits, peer=peer)
        state.apply(d, state.version, peer, k, 1, n)
        sent.append(norm)
        committed.append(n)
        norm *= 1.5
    return sent, committed


def test_an_amplified_delta_is_clipped_and_its_senders_vote_cannot_climb():
    limits = _limits(share_factor=1e9, clip_factor=2.0)
    state = _state()
    seed = _warm(state, limits)
    ref = 1.05  # the median over the honest peers of their median norms
    assert state.defence.clip_scale("QmMallory", 1.0 * ref, limits.defence) == 1.0
    assert state.defence.clip_scale("QmMallory", 3.0 * ref, limits.defence) == pytest.approx(2 / 3)
    sent, committed = _ratchet_clipped(state, limits, "QmMallory", 2.0, seed + 100)
    assert len(committed) >= 10 and max(sent) > 2.5 * ref  # it kept sending more than the clip lets through
    assert max(committed) <= 2.0 * ref * (1 + 1e-6)  # what reached θ: at most the clip
    assert all(c == pytest.approx(min(s, 2.0 * ref), rel=1e-5) for s, c in zip(sent, committed))
    # its vote is the median of clipped norms: an honest peer's bound moves by one rank and at most to 2 × ref
    assert state.defence.norm_bound("QmA", limits.defence) <= F * statistics_median([1.2, 0.9, 1.1, 2.0 * ref]) + 1e-6
    assert state.defence.norm_bound("QmMallory", limits.defence) == pytest.approx(F * ref)  # its own: unchanged
    off = _limits(share_factor=1e9, clip_factor=None)
    assert state.clip(_delta(3.0, 1), 3.0, off, peer="QmMallory")[2] == 1.0


def test_a_clipped_commit_is_forwarded_with_its_scale_and_the_standby_stays_bitwise_equal():
    def run(coro):
        return asyncio.new_event_loop().run_until_complete(coro)

    limits = _limits(share_factor=1e9, clip_factor=2.0)
    coord, standby, node = _coordinator_and_standby(limits)
    coord_state, standby_state = coord.state, standby.state
    sends = [(peer, norm, 10 * r + i) for r in range(2) for i, (peer, norm) in enumerate(HONEST.items())]
    sends.append(("QmMallory", 3.0, 99))  # under the refusal bound (3 × 1.05), over the clip (2 × 1.05)
    for seq, (peer, norm, seed) in enumerate(sends):
        meta, payload = encode_tensors(_delta(norm, seed), "none")
        header = {"run_id": "fenced", "seq": seq, "base_version": coord_state.version, "steps": 5, "term": 1,
                  "tensors": meta, "region": "de", "stats": {"seconds": 1.0}}
        reply, _ = run(coord.handle_submit(header, payload, peer))
        assert reply["status"] == "accepted", reply
        forwarded = node.headers[-1]
        assert run(standby.standby.handle_replicate(forwarded, payload, "QmCoordinator"))[0]["status"] == "ok"
    assert forwarded["scale"] == pytest.approx(2.0 * 1.05 / 3.0, rel=1e-4)  # the last one was clipped
    assert all(h["scale"] == 1.0 for h in node.headers[:-1])
    assert coord_state.defence.norms["QmMallory"][-1] == pytest.approx(2.1, rel=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(coord_state.engine.params, standby_state.engine.params))
    assert coord_state.defence.state_dict()["norms"] == standby_state.defence.state_dict()["norms"]
    assert coord_state.log.head == standby_state.log.head


def test_a_region_the_screen_cannot_check_shares_one_fairness_bucket():
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 32, (4, 17), generator=g)
    seqs[:, 1::2] = (seqs[:, 0::2][:, :8] + 1) % 32
    screen = LossScreen(_Bigram, lambda region: seqs if region == "de" else None)
    state = CommitState(build_engine([torch.ones(32, 32)], "lookahead"), screen=screen)
    good = torch.zeros(32, 32)
    good[torch.arange(32), (torch.arange(32) + 1) % 32] = -3.0
    limits = SubmissionLimits(submit_rate=0.0, defence=DefenceLimits())
    state.check([good], 0, limits, peer="QmA", region="de", now=1.0)
    assert state.fairness_worker("region:de", limits) == "region:de"
    for claim, worker in (("xx", "region:xx"), ("yy", "region:yy"), (None, "peer:QmM")):  # invented, or none
        state.check([good], 0, limits, peer="QmM", region=claim, now=1.0)
        assert state.last_screen["own"] is None and state.fairness_worker(worker, limits) == "unscreened"
    # without the defence (a closed run), or with nothing screened, the claim is kept
    off = SubmissionLimits(submit_rate=0.0, defence=DefenceLimits(enabled=False))
    assert state.fairness_worker("region:xx", off) == "region:xx"
    state.last_screen = None
    assert state.fairness_worker("region:xx", limits) == "region:xx"


def test_before_enough_peers_vote_an_amplified_delta_is_clipped_to_the_other_peers_norms():
    # the first commits of a run: one honest peer has history, the per-peer bound has too few voters
    limits = _limits(share_factor=1e9, clip_factor=2.0)
    state = _state()
    for k, norm in enumerate((1.0, 2.0, 1.5)):
        _commit(state, limits, "QmA", norm, k)
    assert state.defence.norm_bound("QmMallory", limits.defence) is None
    # an attacker's Δ at 2.8 × QmA's median (1.5), under the run-wide bound (3 × 1.5), is scaled to
    # 2 × that median before it reaches θ
    d = _delta(4.2, 50)
    n = state.check(d, state.version, limits, peer="QmMallory")
    clipped, n2, scale = state.clip(d, n, limits, peer="QmMallory")
    assert scale == pytest.approx(3.0 / 4.2) and n2 == pytest.approx(3.0, rel=1e-5)
    # the sender's own history is never its reference; with no other peer yet, nothing is clipped
    assert state.defence.clip_scale("QmA", 100.0, limits.defence) == 1.0
