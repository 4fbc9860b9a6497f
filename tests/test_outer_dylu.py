"""DyLU: inner steps per peer from smoothed speeds."""
from __future__ import annotations

import math

import pytest

from heloco_p2p.outer import DyLU


def test_steps_are_proportional_to_speed_rounded_up():
    dylu = DyLU(min_steps=1, decay=0.0)
    for peer, speed in {"a": 10.0, "b": 5.0, "c": 3.0, "d": 0.3}.items():
        dylu.update(peer, speed)
    assert [dylu.steps_for(p, 500) for p in "abcd"] == [500, 250, 150, 15]
    assert dylu.steps_for("c", 7) == math.ceil(7 * 3 / 10)  # 2.1 -> 3


def test_float_noise_does_not_add_a_step():
    dylu = DyLU(decay=0.0)
    dylu.update("fast", 0.6)
    dylu.update("slow", 0.3)
    assert dylu.steps_for("slow", 500) == 250  # 500·0.3/0.6 = 250.00000000000003 in floats


def test_floor_applies_to_very_slow_peers():
    dylu = DyLU(min_steps=20, decay=0.0)
    dylu.update("gpu", 100.0)
    dylu.update("phone", 0.1)
    assert dylu.steps_for("phone", 500) == 20
    assert dylu.steps_for("gpu", 500) == 500


def test_speed_is_an_ema_of_measurements():
    dylu = DyLU(decay=0.75)
    assert dylu.update("a", 8.0) == 8.0  # first measurement sets the estimate
    assert dylu.update("a", 4.0) == pytest.approx(0.75 * 8 + 0.25 * 4)  # 7
    assert dylu.update("a", 11.0) == pytest.approx(0.75 * 7 + 0.25 * 11)  # 8
    dylu.update("b", 2.0)
    assert dylu.steps_for("b", 100) == 25  # 100 · 2/8


def test_unmeasured_peer_runs_the_full_round_and_forget_drops_the_fastest():
    dylu = DyLU(decay=0.0)
    assert dylu.steps_for("new", 50) == 50
    dylu.update("fast", 10.0)
    dylu.update("slow", 2.0)
    assert dylu.steps_for("slow", 50) == 10
    dylu.forget("fast")
    assert dylu.steps_for("slow", 50) == 50
    assert dylu.peers == ["slow"]


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf])
def test_bad_speed_is_rejected_and_the_estimate_kept(bad):
    dylu = DyLU()
    dylu.update("a", 3.0)
    with pytest.raises(ValueError, match="steps_per_second"):
        dylu.update("a", bad)
    assert dylu.speed("a") == 3.0


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="min_steps"):
        DyLU(min_steps=0)
    with pytest.raises(ValueError, match="decay"):
        DyLU(decay=1.0)
    with pytest.raises(ValueError, match="inner_steps"):
        DyLU().steps_for("a", 0)


def test_state_round_trip():
    a = DyLU(min_steps=2, decay=0.5)
    a.update("x", 4.0)
    a.update("y", 1.0)
    b = DyLU()
    b.load_state_dict(a.state_dict())
    assert (b.min_steps, b.decay, b.speed("x"), b.steps_for("y", 40)) == (2, 0.5, 4.0, 10)
