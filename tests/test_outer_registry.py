"""Registries: names, argument checks and their messages, adding a class with a decorator."""
from __future__ import annotations

import re

import pytest

from heloco_p2p.outer import Correction, Decision, build_engine, registry
from heloco_p2p.outer.registry import Arg, register


def test_registered_names():
    assert registry.names("optimizer") == ["delayed_nesterov", "lookahead", "nesterov"]
    assert registry.names("correction") == ["heloco", "heloco_smooth", "none", "pcgrad", "staleness"]
    assert registry.names("staleness_weight") == ["base", "base_inverse_sqrt", "inverse_sqrt", "none", "power"]


def test_unknown_name_is_named_with_the_allowed_names():
    with pytest.raises(ValueError) as err:
        registry.check_args("optimizer", "adam", {})
    assert str(err.value) == "optimizer: unknown optimizer 'adam'; allowed: delayed_nesterov, lookahead, nesterov"
    with pytest.raises(ValueError, match=r"^correction: unknown correction 'helco'; allowed: heloco, heloco_smooth"):
        registry.check_args("correction", "helco", {})


def test_unexpected_argument_is_named_with_the_allowed_arguments():
    with pytest.raises(ValueError) as err:
        registry.check_args("optimizer", "nesterov", {"lr": 0.5, "nesterov": True})
    assert str(err.value) == (
        "optimizer_args.nesterov: unexpected argument for optimizer 'nesterov'; allowed: lr, momentum"
    )


@pytest.mark.parametrize(
    "kind,name,args,start",
    [
        ("optimizer", "nesterov", {"lr": 0}, "optimizer_args.lr: must be a number > 0, got 0"),
        ("optimizer", "lookahead", {"momentum": 1.0}, "optimizer_args.momentum: must be a number in [0, 1), got 1.0"),
        ("optimizer", "delayed_nesterov", {"buffer_size": 2.5}, "optimizer_args.buffer_size: must be an integer >= 1"),
        ("optimizer", "delayed_nesterov", {"buffer_size": 4, "c": 0.3}, "optimizer_args.c: must be in [0, 1/buff"),
        ("correction", "heloco", {"c_ok": 1.5}, "correction_args.c_ok: must be a number in [0, 1], got 1.5"),
        ("correction", "heloco", {"kappa": True}, "correction_args.kappa: must be a number >= 0, got True"),
        ("correction", "heloco", {"eps": float("nan")}, "correction_args.eps: must be a number >= 0, got nan"),
        ("correction", "pcgrad", {"momentum_floor": "1e-6"}, "correction_args.momentum_floor: must be a number in"),
        ("staleness_weight", "power", {"alpha": -1}, "staleness_weight_args.alpha: must be a number >= 0, got -1"),
    ],
)
def test_invalid_argument_value_is_named_with_the_allowed_values(kind, name, args, start):
    with pytest.raises(ValueError) as err:
        registry.check_args(kind, name, args)
    assert str(err.value).startswith(start), str(err.value)
    assert f"({kind} {name!r})" in str(err.value)


def test_yaml_text_numbers_get_a_hint():
    with pytest.raises(ValueError, match=re.escape("write 1.0e-3")):
        registry.check_args("optimizer", "nesterov", {"lr": "1e-3"})


def test_check_args_fills_defaults_and_normalises_types():
    assert registry.check_args("optimizer", "nesterov", None) == {"lr": 0.7, "momentum": 0.9}
    got = registry.check_args("optimizer", "delayed_nesterov", {"lr": 1, "buffer_size": 8, "c": 0.125})
    assert got == {"lr": 1.0, "momentum": 0.9, "buffer_size": 8, "c": 0.125}
    assert isinstance(got["lr"], float) and isinstance(got["buffer_size"], int)


def test_args_must_be_a_mapping():
    with pytest.raises(ValueError, match=r"^correction_args: must be a mapping"):
        registry.check_args("correction", "heloco", [("c_ok", 0.1)])


@pytest.mark.parametrize("kind", registry.KINDS)
def test_every_registered_class_documents_its_formula_and_source(kind):
    for name in registry.names(kind):
        cls = registry.get(kind, name)
        doc = cls.__doc__ or ""
        assert any(ch in doc for ch in "=←"), f"{kind} {name}: no formula in docstring"
        if name != "none":
            assert "Source:" in doc, f"{kind} {name}: no source in docstring"
        for key, arg in cls.ARGS.items():
            assert arg.doc, f"{kind} {name}.{key}: undocumented"
            arg.check(arg.default)  # defaults are valid


def test_adding_a_correction_is_adding_one_decorated_class():
    @register("correction", "test_halve_opposed")
    class HalveOpposed(Correction):
        """Δ̂ = Δ/2 when c < 0. Source: this test."""

        ARGS = {"momentum_floor": Arg(1e-6, "skip floor", min=0.0, max=1.0, min_open=True)}

        def rule(self, block):
            return Decision("halve", 0.5, 0.0) if block.cosine < 0 else Decision("keep")

    try:
        assert "test_halve_opposed" in registry.names("correction")
        import torch

        engine = build_engine([torch.ones(2, dtype=torch.float64)], "lookahead", {}, "test_halve_opposed")
        engine.commit([torch.ones(2, dtype=torch.float64)], 0)
        assert engine.commit([-torch.ones(2, dtype=torch.float64)], 1).branches == ["halve"]
    finally:
        registry.unregister("correction", "test_halve_opposed")


def test_registering_a_taken_name_with_another_class_fails():
    with pytest.raises(ValueError, match="already registered"):
        @register("correction", "heloco")
        class Impostor(Correction):
            pass


def test_describe_lists_defaults_for_docs():
    d = registry.describe("correction")["heloco"]
    assert d["args"]["c_ok"][0] == 0.2 and "c_ok" in d["args"]["c_ok"][2]  # Table 3
