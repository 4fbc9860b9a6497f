"""scripts/wan_testnet.py --tiny for real: a coordinator and a standby (--no-train) and three
trainers, each in a network namespace of its own with tbf-shaped links, train the tiny model for
a short run. Every trainer makes rounds, no shaped link carries more than its rate, the bits per
parameter of each submission are recorded, and bench/results.json's ``wan`` key has its fields."""
import json
import math

import pytest

from heloco_p2p.config import ConfigError, config_from_dict
from heloco_p2p.tools import netns

from fakes import load_script

KEYS = ("model_params", "link_mbit", "utilization", "utilization_fp32_reply", "bits_per_param_up",
        "bits_per_param_down", "per_compression", "drift_rel_l2_max", "join_seconds",
        "coordinator_cpu_s_per_submission", "cast", "command", "date", "machine", "load")


def _reply_compression(wan) -> str:
    """wrap8 where this tree's config takes it, else 8bit (both compress θ on the way down)."""
    try:
        config_from_dict(wan.run_tree(wan.parse_args(["--tiny", "--reply-compression", "wrap8"]), "wrap8"))
        return "wrap8"
    except ConfigError:
        return "8bit"


@pytest.mark.slow
def test_tiny_cast_on_shaped_links_trains_and_stays_under_its_link_rates(tmp_path):
    ok, why = netns.available()
    if not ok:
        pytest.skip(f"network namespaces cannot be created here: {why}")
    wan = load_script("wan_testnet")
    reply = _reply_compression(wan)
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"utilization": {"berlin": 0.99}}))  # another benchmark's key: kept
    out = wan.main(["--tiny", "--minutes", "0.4", "--reply-compression", reply, "--out", str(tmp_path / "runs"),
                    "--results", str(results)])
    run = out["runs"][reply]

    for name, t in run["trainers"].items():
        assert t["rounds"] >= 2, (name, t)
        assert t["acks"] >= 1, (name, t)
        assert 0 < t["join_ready_s"] <= t["join_first_accepted_s"], (name, t)
    assert run["roles_at_end"]["coordinator"] == "coordinator" and run["roles_at_end"]["standby"] == "standby"

    for name, link in run["links"].items():
        for way in ("up", "down"):
            assert link["peak_mbit"][way] <= 1.1 * link[f"{way}_mbit"], (name, way, link)
    for name in run["trainers"]:
        link = run["links"][name]
        # each trainer downloaded θ in fp32 at least once (joining): unshaped, those bytes would pass
        # in milliseconds, far above the rate in the busiest second; shaped, they fill the link
        assert link["run_bytes"]["down"] >= 4 * out["model_params"], (name, link)
        assert link["peak_mbit"]["down"] > 0.5 * link["down_mbit"], (name, link)

    for key in ("bits_per_param_up", "bits_per_param_down"):
        assert math.isfinite(out[key]) and 4 < out[key] < 40, (key, out[key])
    assert out["coordinator_cpu_s_per_submission"]["after"] > 0
    assert run["commits"] >= 3

    saved = json.loads(results.read_text())
    assert saved["utilization"] == {"berlin": 0.99}
    assert set(KEYS) <= set(saved["wan"])
    assert saved["wan"]["model_params"] == out["model_params"] > 0


def test_a_new_wan_run_keeps_the_simulators_lowbit_figures_and_every_other_key(tmp_path):
    wan = load_script("wan_testnet")
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"wan": {"model_params": 1, "lowbit": {"loss_ratio_vs_fp32": 1.0065}}, "other": 3}))
    wan.merge_results(path, {"model_params": 2})
    assert json.loads(path.read_text()) == {"wan": {"model_params": 2, "lowbit": {"loss_ratio_vs_fp32": 1.0065}},
                                            "other": 3}
    wan.merge_results(path, {"model_params": 3, "lowbit": {"loss_ratio_vs_fp32": 1.0}})  # a run that has its own
    assert json.loads(path.read_text())["wan"]["lowbit"] == {"loss_ratio_vs_fp32": 1.0}
