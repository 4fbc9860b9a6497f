"""Registries of outer optimizers, pseudo-gradient corrections and staleness weights, by name.

A run config names its algorithms (``outer.optimizer: delayed_nesterov``,
``outer.correction: heloco``); this module maps a name to its class and checks the arguments
against the class's declared ``ARGS`` before anything is built, so a typo fails at config load
with the key and what is allowed. Adding an algorithm is adding one class with a decorator::

    @register("correction", "my_rule")
    class MyRule(Correction):
        ARGS = {"strength": Arg(0.5, "how hard to pull", min=0.0)}
        ...

    registry.check_args("correction", "my_rule", {"strength": 2})   # -> {"strength": 2.0}
    registry.build("correction", "my_rule", {})                     # -> MyRule(strength=0.5)

Every error is a ``ValueError`` whose message starts with the key it is about, e.g.
``optimizer: unknown optimizer 'adam'; allowed: delayed_nesterov, lookahead, nesterov`` or
``correction_args.c_ok: must be a number in [0, 1], got 1.5 (correction 'heloco')``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

KINDS = ("optimizer", "correction", "staleness_weight", "fairness")

_REGISTRY: dict[str, dict[str, type]] = {kind: {} for kind in KINDS}

T = TypeVar("T", bound=type)


@dataclass(frozen=True)
class Arg:
    """One argument of a registered class: its default, what it means, and its allowed range.

    :param default: value used when the config does not give one
    :param doc: one line for users (shown in docs and ``describe``)
    :param min: lower bound, inclusive unless ``min_open``
    :param max: upper bound, inclusive unless ``max_open``
    :param integer: accept only integers (otherwise any finite real number)
    :param choices: accept only these strings (a named option, e.g. ``lambda_rule``)
    """

    default: float | int | str
    doc: str
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    max_open: bool = False
    integer: bool = False
    choices: tuple[str, ...] | None = None

    def allowed(self) -> str:
        """Human-readable allowed values, e.g. ``a number in [0, 1)``."""
        if self.choices is not None:
            return "one of " + ", ".join(self.choices)
        what = "an integer" if self.integer else "a number"
        if self.min is not None and self.max is not None:
            lo, hi = "(" if self.min_open else "[", ")" if self.max_open else "]"
            return f"{what} in {lo}{_fmt(self.min)}, {_fmt(self.max)}{hi}"
        if self.min is not None:
            return f"{what} {'>' if self.min_open else '>='} {_fmt(self.min)}"
        if self.max is not None:
            return f"{what} {'<' if self.max_open else '<='} {_fmt(self.max)}"
        return what

    def check(self, value: Any) -> float | int:
        """Return ``value`` as int/float if allowed; raise ValueError(``must be ..., got ...``)."""
        if self.choices is not None:
            if isinstance(value, str) and value in self.choices:
                return value
            raise ValueError(f"must be {self.allowed()}, got {value!r}")
        if self.integer:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok:
            v = float(value) if not self.integer else int(value)
            lo_bad = self.min is not None and (v < self.min or (self.min_open and v == self.min))
            hi_bad = self.max is not None and (v > self.max or (self.max_open and v == self.max))
            if not (lo_bad or hi_bad):
                return v
        hint = ""
        if isinstance(value, str) and _looks_numeric(value):
            # PyYAML (YAML 1.1) reads 1e-3 as a string; 1.0e-3 is a float.
            hint = " (YAML reads numbers like 1e-3 as text: write 1.0e-3)"
        raise ValueError(f"must be {self.allowed()}, got {value!r}{hint}")


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def register(kind: str, name: str) -> Callable[[T], T]:
    """Class decorator: make ``cls`` available as ``name`` in the ``kind`` registry.

    :param kind: one of ``optimizer``, ``correction``, ``staleness_weight``
    :param name: the name configs use (lowercase, no spaces)
    """
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; allowed: {', '.join(KINDS)}")

    def decorate(cls: T) -> T:
        if name in _REGISTRY[kind] and _REGISTRY[kind][name] is not cls:
            raise ValueError(f"{kind} {name!r} is already registered by {_REGISTRY[kind][name].__qualname__}")
        cls.name = name
        cls.kind = kind
        cls.ARGS = dict(getattr(cls, "ARGS", {}))
        _REGISTRY[kind][name] = cls
        return cls

    return decorate


def unregister(kind: str, name: str) -> None:
    """Remove ``name`` from the ``kind`` registry (a class registered for a test or an experiment); absent: no-op."""
    _kind(kind).pop(name, None)


def names(kind: str) -> list[str]:
    """Sorted registered names of ``kind``."""
    return sorted(_kind(kind))


def get(kind: str, name: str) -> type:
    """The class registered as ``name``; ValueError listing the allowed names otherwise."""
    table = _kind(kind)
    if not isinstance(name, str) or name not in table:
        raise ValueError(f"{kind}: unknown {kind} {name!r}; allowed: {', '.join(sorted(table))}")
    return table[name]


def check_args(kind: str, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """Validate ``args`` for the class registered as ``name``; return them with defaults filled in.

    :param kind: ``optimizer``, ``correction`` or ``staleness_weight``
    :param name: registered name, e.g. ``heloco``
    :param args: the ``<kind>_args`` mapping from the config (None means {})
    :raises ValueError: message starts with ``<kind>: `` (unknown name) or ``<kind>_args.<key>: ``
    """
    cls = get(kind, name)
    args = {} if args is None else args
    if not isinstance(args, dict):
        raise ValueError(f"{kind}_args: must be a mapping of argument names to values, got {type(args).__name__}")
    spec: dict[str, Arg] = cls.ARGS
    resolved: dict[str, Any] = {key: arg.default for key, arg in spec.items()}
    for key, value in args.items():
        if key not in spec:
            allowed = ", ".join(spec) if spec else "(none: it takes no arguments)"
            raise ValueError(f"{kind}_args.{key}: unexpected argument for {kind} {name!r}; allowed: {allowed}")
        try:
            resolved[key] = spec[key].check(value)
        except ValueError as exc:
            raise ValueError(f"{kind}_args.{key}: {exc} ({kind} {name!r})") from None
    try:
        cls.check_combined(resolved)  # rules between arguments, e.g. delayed_nesterov's c <= 1/N
    except ValueError as exc:
        raise ValueError(f"{kind}_args.{exc} ({kind} {name!r})") from None
    return resolved


def build(kind: str, name: str, args: dict[str, Any] | None = None) -> Any:
    """An instance of the class registered as ``name``, built from checked ``args``."""
    return get(kind, name)(**check_args(kind, name, args))


def describe(kind: str) -> dict[str, dict[str, Any]]:
    """For docs and CLIs: ``{name: {"doc": first docstring line, "args": {key: (default, allowed, doc)}}}``."""
    out = {}
    for name in names(kind):
        cls = _REGISTRY[kind][name]
        first = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        out[name] = {"doc": first, "args": {k: (a.default, a.allowed(), a.doc) for k, a in cls.ARGS.items()}}
    return out


def _kind(kind: str) -> dict[str, type]:
    if kind not in _REGISTRY:
        raise ValueError(f"unknown registry kind {kind!r}; allowed: {', '.join(KINDS)}")
    return _REGISTRY[kind]


class Registered:
    """Base of every registered class: validated arguments in ``self.args``.

    Subclasses declare ``ARGS`` and read what they need from ``self.args`` in ``__init__``.
    """

    name: str = "?"
    kind: str = "?"
    ARGS: dict[str, Arg] = {}

    def __init__(self, **args: Any) -> None:
        self.args: dict[str, Any] = check_args(self.kind, self.name, args)

    @classmethod
    def check_combined(cls, args: dict[str, Any]) -> None:
        """Override to check rules between arguments; raise ValueError("<key>: <why>")."""

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={v!r}" for k, v in self.args.items())
        return f"{type(self).__name__}({inner})"
