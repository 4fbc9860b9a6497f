"""Overlapped rounds: the fold-in arithmetic of InnerTrainer, and the simulator's overlap mode."""
import math
from types import SimpleNamespace

import pytest
import torch

from heloco_p2p.algorithms import ALGORITHMS
from heloco_p2p.config import load_config
from heloco_p2p.local import InnerTrainer, build_model
from heloco_p2p.local.model import trainable_params
from heloco_p2p.sim import SimSpec, Simulation

from fakes import SEQ
from fakes import synthetic_streams as streams
from fakes import synthetic_val_blocks as val_blocks


class Toy(torch.nn.Module):
    """A two-parameter "language model": loss = w · mean(batch), so every step moves w."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([1.0, 2.0]))

    def forward(self, input_ids, labels):
        return SimpleNamespace(loss=(self.w * input_ids.float().mean()).sum())


def toy_trainer():
    cfg = load_config("configs/tiny.yaml", overrides={"inner.warmup_steps": 0, "inner.weight_decay": 0.0}).inner
    return InnerTrainer(Toy(), cfg, iter(lambda: torch.ones(1, 2, dtype=torch.long), None))


def test_fold_in_by_hand():
    trainer = toy_trainer()
    seen = {}

    def before_delta():
        # pin the round to hand-picked values: θ_local = (1, 2), θ_start = (0.5, 0.5), θ_new = (10, 20)
        trainer.params[0].data.copy_(torch.tensor([1.0, 2.0]))
        trainer._round_start[0].copy_(torch.tensor([0.5, 0.5]))
        trainer.fold_in([torch.tensor([10.0, 20.0])])
        seen["theta"] = trainer.params[0].detach().clone()

    delta, _ = trainer.run_round(None, H=1, before_delta=before_delta)
    # θ_local += θ_new − θ_start = (1 + 9.5, 2 + 19.5); Δ = θ_new − θ_local = θ_start − θ_local (progress kept)
    assert torch.equal(seen["theta"], torch.tensor([10.5, 21.5]))
    assert torch.equal(delta[0], torch.tensor([-0.5, -1.5]))


def test_fold_in_mid_round_keeps_progress_and_measures_delta_from_the_new_base():
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.yaml", overrides={"data.seq_len": SEQ})
    model = build_model(cfg.model, seed=0)
    g = torch.Generator().manual_seed(0)
    trainer = InnerTrainer(model, cfg.inner, iter(lambda: torch.randint(0, 4096, (2, SEQ), generator=g), None))
    new_base = [p.detach().clone() + 0.01 for p in trainable_params(model)]  # a "newer global θ"
    before = {}

    def on_step(i, loss):
        assert loss.dim() == 0  # a tensor: no device sync per step
        if i == 1:
            before["start"] = [s.clone() for s in trainer._round_start]
            before["theta"] = [p.detach().clone() for p in trainer.params]
            trainer.fold_in(new_base)
            for p, s, t, n in zip(trainer.params, before["start"], before["theta"], new_base):
                torch.testing.assert_close(p.detach(), t + (n - s), rtol=0, atol=1e-7)
                torch.testing.assert_close(n - p.detach(), s - t, rtol=0, atol=1e-7)  # progress unchanged

    delta, stats = trainer.run_round(None, H=3, on_step=on_step)
    end = [p.detach() for p in trainer.params]
    for d, n, e in zip(delta, new_base, end):
        assert torch.equal(d, n - e)  # Δ is measured from the folded-in θ
    assert stats.steps == 3 and math.isfinite(stats.loss) and isinstance(stats.loss, float)


def test_fold_in_outside_a_round_is_refused():
    trainer = toy_trainer()
    with pytest.raises(RuntimeError, match="only valid during run_round"):
        trainer.fold_in([torch.zeros(2)])
    trainer.run_round(None, H=1)
    with pytest.raises(RuntimeError):
        trainer.fold_in([torch.zeros(2)])


# -- the simulator's overlap mode ---------------------------------------------------------------
@pytest.fixture(scope="module")
def sim_cfg(sim_run_cfg):
    return sim_run_cfg


def spec(algo, slowness, comm, overlap, H=2, time=12.5):
    return SimSpec(algorithm=ALGORITHMS[algo], lr=ALGORITHMS[algo].lr, heterogeneity="test", slowness=slowness,
                   data="non-iid", seed=0, steps_per_round=H, step_time=1.0, comm_seconds=comm,
                   token_budget=1, time_budget=time, eval_points=2, overlap=overlap)


def test_overlap_with_free_communication_is_blocking_mode_exactly(sim_cfg):
    regions = ["a", "b"]
    runs = [Simulation(sim_cfg, spec("heloco", [1.0, 3.0], [0.0, 0.0], overlap, time=8.5), regions, streams,
                       val_blocks(regions)).run() for overlap in (False, True)]
    assert len(runs[0].commits) == 5 and {c["worker"] for c in runs[0].commits} == {0, 1}
    assert runs[0].commits == runs[1].commits
    assert runs[0].curve == runs[1].curve


def test_overlap_hides_communication_and_counts_staleness_from_the_folded_base(sim_cfg):
    regions = ["a"]
    # H = 2 steps of 1 s, 1 s of communication: a blocking round takes 3 s, an overlapped one 2 s
    # (the reply is folded in after the first step of the next round).
    blocking, overlapped = [Simulation(sim_cfg, spec("async_mla", [1.0], [1.0], overlap), regions, streams,
                                       val_blocks(regions)).run() for overlap in (False, True)]
    assert [c["t"] for c in blocking.commits] == [3.0, 6.0, 9.0, 12.0]
    assert [c["t"] for c in overlapped.commits] == [3.0, 5.0, 7.0, 9.0, 11.0]
    # one worker: every round's base is the version its previous commit made, so staleness is 0
    assert [c["staleness"] for c in overlapped.commits] == [0] * 5
    # a reply later than the round: the round waits for it, so rounds take max(compute, comm)
    slow_link = Simulation(sim_cfg, spec("async_mla", [1.0], [5.0], True), regions, streams, val_blocks(regions)).run()
    assert [c["t"] for c in slow_link.commits] == [7.0, 12.0]


def test_two_workers_overlapped_staleness_is_the_commits_since_the_folded_version(sim_cfg):
    regions = ["a", "b"]
    res = Simulation(sim_cfg, spec("async_mla", [1.0, 1.0], [1.0, 1.0], True, time=9.5), regions, streams,
                     val_blocks(regions)).run()
    # both commit at 3, 5, 7, 9 (worker 0 first on ties); each round's base is the version of its own
    # previous commit, and the other worker commits once in between: τ = 1 (0 for the very first commit)
    assert [(c["t"], c["worker"]) for c in res.commits] == [(t, w) for t in (3.0, 5.0, 7.0, 9.0) for w in (0, 1)]
    assert [c["staleness"] for c in res.commits] == [0, 1, 1, 1, 1, 1, 1, 1]


def test_overlap_is_refused_for_synchronous_algorithms(sim_cfg):
    with pytest.raises(ValueError, match="asynchronous algorithms only"):
        Simulation(sim_cfg, spec("sync_diloco", [1.0], [1.0], True), ["a"], streams, val_blocks(["a"])).run()
