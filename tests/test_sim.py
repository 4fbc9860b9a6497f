"""The simulator: virtual clock order, sync DiLoCo by hand, determinism, and an end-to-end run."""
import json
import math

import pytest
import torch
import yaml

from heloco_p2p.algorithms import ALGORITHMS
from heloco_p2p.local import InnerTrainer, build_model
from heloco_p2p.local.model import trainable_params
from heloco_p2p.sim import SimSpec, Simulation, load_sim_config, run_config

from fakes import SEQ
from fakes import synthetic_streams as streams
from fakes import synthetic_val_blocks as val_blocks


@pytest.fixture(scope="module")
def cfg(sim_run_cfg):
    return sim_run_cfg


def batched(blocks, n):
    while True:
        yield torch.stack([next(blocks) for _ in range(n)])


def spec(algo, slowness, H=1, tokens=1, time=12.0, seed=0, data="non-iid"):
    return SimSpec(algorithm=ALGORITHMS[algo], lr=ALGORITHMS[algo].lr, heterogeneity="test", slowness=slowness,
                   data=data, seed=seed, steps_per_round=H, step_time=1.0, comm_seconds=[0.0] * len(slowness),
                   token_budget=tokens, time_budget=time, eval_points=2)


def test_twice_as_slow_worker_commits_half_as_often_with_known_staleness(cfg):
    regions = ["a", "b"]
    res = Simulation(cfg, spec("async_diloco", [1.0, 2.0], time=12.5), regions, streams, val_blocks(regions)).run()
    w0 = [c for c in res.commits if c["worker"] == 0]
    w1 = [c for c in res.commits if c["worker"] == 1]
    assert len(w0) == 12 and len(w1) == 6
    # Events in time order; on a tie the lower worker index commits first.
    assert [c["t"] for c in res.commits] == sorted(c["t"] for c in res.commits)
    # Worker 1 always starts one commit of worker 0 before, and worker 0 commits twice meanwhile: τ = 2.
    assert [c["staleness"] for c in w1] == [2] * 6
    # Worker 0: τ = 0 at odd multiples of H (nobody committed since it started), 1 at even ones.
    assert [c["staleness"] for c in w0] == [0, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert res.workers[0]["rounds"] == 12 and res.workers[1]["rounds"] == 6


def test_sync_diloco_equals_averaged_nesterov_by_hand(cfg):
    regions = ["a", "b", "c"]
    H, rounds = 2, 3
    s = spec("sync_diloco", [1.0, 1.0, 1.0], H=H, time=rounds * H + 0.5)
    sim = Simulation(cfg, s, regions, streams, val_blocks(regions))
    sim.run()
    # By hand: same initial model, same per-worker streams, the averaged update, SGD Nesterov.
    lr, mu = ALGORITHMS["sync_diloco"].optimizer_args["lr"], ALGORITHMS["sync_diloco"].optimizer_args["momentum"]
    theta = [p.detach().clone() for p in trainable_params(build_model(cfg.model, seed=0))]
    buf = [torch.zeros_like(t) for t in theta]
    trainers = []
    for w, r in enumerate(regions):
        trainers.append(InnerTrainer(build_model(cfg.model, seed=0), cfg.inner,
                                     batched(streams(r, 0 * 1000 + w), cfg.inner.batch_size)))
    for _ in range(rounds):
        deltas = [t.run_round(theta, H)[0] for t in trainers]
        mean = [sum(ds) / len(ds) for ds in zip(*deltas)]
        for i in range(len(theta)):
            buf[i] = mu * buf[i] + mean[i]
            theta[i] = theta[i] - lr * (mean[i] + mu * buf[i])
    assert sim.engine.version == rounds
    for got, want in zip(sim.engine.params, theta):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_identical_seeds_give_identical_results(cfg):
    regions = ["a", "b"]
    runs = [Simulation(cfg, spec("heloco_dylu", [1.0, 3.0], H=2, time=10), regions, streams, val_blocks(regions)).run()
            for _ in range(2)]
    assert runs[0].curve == runs[1].curve
    assert runs[0].commits == runs[1].commits
    for a, b in zip(*(r.curve for r in runs)):
        assert a["val_loss"]["mean"] == b["val_loss"]["mean"]


def test_dylu_gives_slow_workers_fewer_steps(cfg):
    regions = ["a", "b"]
    res = Simulation(cfg, spec("async_dn_dylu", [1.0, 4.0], H=8, time=40), regions, streams, val_blocks(regions)).run()
    steps = {w: {c["steps"] for c in res.commits if c["worker"] == w} for w in (0, 1)}
    assert steps[0] == {8} and steps[1] == {2}


def test_budgets_are_both_reached(cfg):
    regions = ["a", "b"]
    res = Simulation(cfg, spec("async_mla", [1.0, 2.0], tokens=600, time=5.0), regions, streams, val_blocks(regions)).run()
    assert res.at_tokens["tokens"] >= 600
    assert res.at_time["virtual_seconds"] == 5.0
    assert res.at_time["tokens"] == sum(c["steps"] for c in res.commits if c["t"] < 5.0) * 2 * (SEQ - 1)


@pytest.mark.slow
def test_quick_style_config_end_to_end_losses_fall(tmp_path):
    sim_cfg = {
        "name": "test", "base": "configs/tiny.yaml",
        "overrides": {"data.seq_len": 32, "data.val_blocks": 4, "inner.batch_size": 4, "inner.warmup_steps": 5,
                      "inner.total_steps": 200},
        "regions": ["de", "fr"], "steps_per_round": 5, "step_time": 1.0,
        "experiments": [{"algorithms": ["sync_diloco", "heloco"], "heterogeneity": ["h"], "data": ["non-iid", "iid"]}],
        "heterogeneity_levels": {"h": [1.0, 2.0]},
        "seeds": [0], "token_budget": 12000, "time_budget": 60, "eval_points": 2,
        "lr_grid": {"heloco": [0.5, 0.7]}, "processes": 1,
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(sim_cfg))
    results = run_config(load_sim_config(path), tmp_path / "out", progress=False)
    on_disk = json.loads((tmp_path / "out" / "results.json").read_text())
    assert on_disk["runs"] == results["runs"]
    # one entry per algorithm × heterogeneity × data × seed × budget
    assert len(results["runs"]) == 2 * 1 * 2 * 1 * 2
    # the sweep runs once per algorithm (first seed, non-IID); every heloco cell then uses the chosen lr
    assert len(results["lr_sweep"]) == 2 and sum(r["chosen"] for r in results["lr_sweep"]) == 1
    chosen_lr = next(r["outer_lr"] for r in results["lr_sweep"] if r["chosen"])
    assert {r["outer_lr"] for r in results["runs"] if r["algorithm"] == "heloco"} == {chosen_lr}
    for r in results["runs"]:
        assert set(r) >= {"algorithm", "heterogeneity", "data", "seed", "budget", "tokens", "virtual_seconds", "val_loss"}
        assert set(r["val_loss"]["per_language"]) == {"de", "fr"}
        assert r["val_loss"]["mean"] < math.log(4096) - 1.0  # untrained ≈ ln(vocab) = 8.3
    from heloco_p2p.tools.report import write_sim_report

    md = write_sim_report(tmp_path / "out").read_text()
    assert "| heloco |" in md and "| sync_diloco |" in md
    assert list((tmp_path / "out").glob("loss_h_non-iid.png"))


def test_region_fair_weights_follow_round_times_in_the_simulator(cfg):
    # heloco_fair: DyLU + compute_time weights. Worker 1 is 4× slower; DyLU gives it 2 of H = 8 steps,
    # so its rounds take 2·4 = 8 s against the fast worker's 8 s: equal times, ρ = 1 for both.
    regions = ["a", "b"]
    res = Simulation(cfg, spec("heloco_fair", [1.0, 4.0], H=8, time=40), regions, streams, val_blocks(regions)).run()
    assert {round(c["fairness_weight"], 9) for c in res.commits} == {1.0}
    # Without DyLU (dn + compute_time via a variant-like preset), round times 3 s and 12 s:
    # c = (1/3 + 1/12)/2 = 5/24 → ρ_fast = 3·5/24 = 0.625, ρ_slow = 12·5/24 = 2.5 once both are known.
    from dataclasses import replace

    preset = replace(ALGORITHMS["heloco_fair"], name="fair_no_dylu", dylu=False, fairness_args={"decay": 0.0})
    s = replace(spec("heloco_fair", [1.0, 4.0], H=3, time=30), algorithm=preset)
    res = Simulation(cfg, s, regions, streams, val_blocks(regions)).run()
    first_slow = min(i for i, c in enumerate(res.commits) if c["worker"] == 1)
    later = res.commits[first_slow:]
    assert {round(c["fairness_weight"], 9) for c in later if c["worker"] == 0} == {0.625}
    assert {round(c["fairness_weight"], 9) for c in later if c["worker"] == 1} == {2.5}


def test_runs_are_logged_as_they_finish_and_resume_reuses_them(tmp_path, monkeypatch):
    from heloco_p2p.sim import runner

    sim_cfg = {
        "name": "resume", "base": "configs/tiny.yaml",
        "overrides": {"data.seq_len": 32, "data.val_blocks": 2, "inner.batch_size": 2, "inner.warmup_steps": 2,
                      "inner.total_steps": 50},
        "regions": ["de", "fr"], "steps_per_round": 2, "step_time": 1.0,
        "experiments": [{"algorithms": ["heloco"], "heterogeneity": ["h"], "data": ["non-iid"]}],
        "heterogeneity_levels": {"h": [1.0, 2.0]},
        "seeds": [0, 1], "token_budget": 600, "time_budget": 6, "eval_points": 1, "processes": 1,
    }
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(sim_cfg))
    ran = []
    real = runner.run_spec_job
    monkeypatch.setattr(runner, "run_spec_job", lambda job: ran.append(job[1].run_id) or real(job))
    out = tmp_path / "out"
    first = run_config(load_sim_config(path), out, progress=False)
    assert len(ran) == 2
    lines = (out / "runs.jsonl").read_text().splitlines()
    assert [json.loads(x)["run_id"] for x in lines] == ran  # one line per finished run

    # a resumed run reuses both and writes the same results
    ran.clear()
    again = run_config(load_sim_config(path), out, progress=False, resume=True)
    assert ran == [] and again["runs"] == first["runs"]
    assert first["reused_runs"] == 0 and again["reused_runs"] == 2

    # a crash cut the last line short, and the config now asks for one more seed: only the cut run
    # and the new seed run; the intact one is reused
    (out / "runs.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    sim_cfg["seeds"] = [0, 1, 2]
    path.write_text(yaml.safe_dump(sim_cfg))
    ran.clear()
    third = run_config(load_sim_config(path), out, progress=False, resume=True)
    assert [r.split("|")[3] for r in ran] == ["seed1", "seed2"]
    assert third["runs"][:4] == first["runs"]

    # lines that do not parse or lack fields are skipped, and dropped from the log, so that new lines
    # never land on a fragment; a changed run config (the model, the data settings) is never reused
    good = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(good) + "\n" + json.dumps({"key": "k"}) + "\n" + good[0][:40])
    ran.clear()
    run_config(load_sim_config(path), out, progress=False, resume=True)
    assert ran == [] and (out / "runs.jsonl").read_text().splitlines() == good
    sim_cfg["overrides"]["inner.batch_size"] = 3
    path.write_text(yaml.safe_dump(sim_cfg))
    run_config(load_sim_config(path), out, progress=False, resume=True)
    assert len(ran) == 3
    sim_cfg["overrides"]["inner.batch_size"] = 2

    # a changed specification (another lr) is a new run, never a reused one; without --resume the log starts afresh
    sim_cfg["lr_grid"] = {"heloco": [0.3]}
    sim_cfg["seeds"] = [0]
    path.write_text(yaml.safe_dump(sim_cfg))
    ran.clear()
    run_config(load_sim_config(path), out, progress=False, resume=True)
    assert ran == ["heloco|h|non-iid|seed0|lr0.3"]
    ran.clear()
    run_config(load_sim_config(path), out, progress=False)
    assert len(ran) == 1 and len((out / "runs.jsonl").read_text().splitlines()) == 1
