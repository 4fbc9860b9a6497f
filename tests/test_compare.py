"""scripts/compare.py: variant parsing, and the table's tail means checked by hand on fake runs."""
import json
from pathlib import Path

import click
import pytest

from fakes import load_script


@pytest.fixture(scope="module")
def compare():
    return load_script("compare")


def test_variants_parse_to_dotted_overrides(compare):
    assert compare.parse_variant("base:") == ("base", {})
    assert compare.parse_variant("fair:outer.algorithm=heloco_fair, outer.optimizer_args.lr=0.2") == \
        ("fair", {"outer.algorithm": "heloco_fair", "outer.optimizer_args.lr": 0.2})
    for bad in (":x=1", "a:b", "a/b:x=1"):
        with pytest.raises(click.BadParameter):
            compare.parse_variant(bad)


def fake_run(d: Path, losses: list[dict], commits: int):
    d.mkdir(parents=True)
    peers = [{"name": "a", "tokens": 1000, "utilization": 0.99}, {"name": "b", "tokens": 500, "utilization": 0.95}]
    (d / "summary.json").write_text(json.dumps({"wall_seconds": 300.0, "commits": commits, "peers": peers,
                                                "val_loss": {"start": {"mean": 8.3}, "end": {"mean": losses[-1]["mean"]}}}))
    lines = [{"event": "val", "time": float(i), "val_loss": {"mean": x["mean"], "per_language": x["per"]}}
             for i, x in enumerate(losses)]
    (d / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in reversed(lines)) + "\n")  # any order


def test_table_averages_the_last_evaluations_by_hand(compare, tmp_path):
    ev = lambda de, fr: {"mean": (de + fr) / 2, "per": {"de": de, "fr": fr}}  # noqa: E731
    fake_run(tmp_path / "x", [ev(8.3, 8.3), ev(7, 9), ev(6, 8), ev(5, 7)], commits=10)
    fake_run(tmp_path / "y.r0", [ev(8.3, 8.3), ev(7, 7), ev(7, 7), ev(6, 6)], commits=20)
    fake_run(tmp_path / "y.r1", [ev(8.3, 8.3), ev(6, 6), ev(6, 6), ev(5, 5)], commits=30)
    text = compare.table(tmp_path, ["x", "y"], tail=2)
    rows = json.loads((tmp_path / "compare.json").read_text())
    # x: last 2 → de (6+5)/2 = 5.5, fr (8+7)/2 = 7.5: mean 6.5, worst fr 7.5
    assert rows["x"][0]["tail_mean"] == 6.5 and rows["x"][0]["tail_worst"] == 7.5
    assert rows["x"][0]["tail_worst_language"] == "fr"
    # y: two runs, tail means 6.5 and 5.5 → 6.000 ± 0.50; commits 25
    assert [r["tail_mean"] for r in rows["y"]] == [6.5, 5.5]
    assert "| y | 2 | 25 | 5.500 ± 0.50 | 6.000 ± 0.50 |" in text
    assert "| x | 1 | 10 | 6.000 | 6.500 | 7.500 (fr) | 1,500 | 0.95 |" in text
