"""A minimal network-namespace testnet: one Linux network namespace per peer on a bridge of its
own, so that links between peers can be cut, healed and (optionally) rate-shaped for real.

    with NetnsTestnet(["a", "b", "c"]) as net:      # needs root (CAP_NET_ADMIN)
        net.address("a")                             # "10.77.0.1"
        net.exec_args("a", ["python", "-c", "..."])  # ["ip", "netns", "exec", "hl-1a2b3c-a", ...]
        net.cut("a", "b"); net.heal("a", "b")        # blackhole routes both ways, then removed
        net.isolate("a"); net.rejoin("a")            # a's bridge port down, then up
        net.link_bytes("a")                          # (bytes a sent, bytes a received) so far

Layout: a bridge ``hl-<6 hex>-br`` in the root namespace holding ``10.77.K.254/24`` (K: the
first /24 of 10.77.0.0/16 no address or route here uses yet, so parallel runs do not collide),
and per peer a namespace ``hl-<6 hex>-<name>`` with its loopback up and a veth pair
(``hl-<6 hex>-h<i>`` on the bridge, ``hl-<6 hex>-n<i>`` inside) holding ``10.77.K.<i>/24``. The
root namespace reaches every peer over the bridge (an observer or a monitor can run there).
Only addresses of the bridge's /24, inside namespaces this module created, are ever touched.

Rate shaping (``uplink_mbit`` / ``downlink_mbit`` per peer): a ``tbf`` qdisc on the veth's
egress inside the namespace (uplink) and on its bridge side (downlink). ``netem`` is not in every
kernel (not in this machine's), so there is no delay or loss emulation.

Everything created is removed when the context manager exits, whatever the exit (an exception,
SIGINT, SIGTERM: the manager turns SIGTERM into ``SystemExit`` while it is open, and an atexit hook
covers a forgotten ``close``). What a SIGKILLed run leaves behind is removed by
``cleanup_leftovers()`` (``python -m heloco_p2p.tools.netns cleanup``): each run writes its
prefix and pid under /run/heloco-netns, and leftovers are those whose pid is gone.
"""
from __future__ import annotations

import argparse
import atexit
import fcntl
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess
import threading
from pathlib import Path

STATE_DIR = Path(os.environ.get("HELOCO_NETNS_STATE", "/run/heloco-netns"))
PREFIX_RE = re.compile(r"^hl-[0-9a-f]{6}-")
BASE = ipaddress.ip_network("10.77.0.0/16")


class NetnsError(RuntimeError):
    pass


def _ip(*args: str, check: bool = True, ns: str | None = None) -> subprocess.CompletedProcess:
    argv = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return _run(argv, check)


def _run(argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise NetnsError(f"{' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def available() -> tuple[bool, str]:
    """Whether network namespaces can be created here, and why not."""
    if os.geteuid() != 0:
        return False, "network namespaces need root (CAP_NET_ADMIN); running as uid %d" % os.geteuid()
    try:
        _run(["ip", "-V"])
    except (OSError, NetnsError) as exc:
        return False, f"iproute2 (`ip`) is not usable: {exc}"
    probe = f"hl-{secrets.token_hex(3)}-probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return False, f"`ip netns add` fails here: {exc}"
    _ip("netns", "del", probe, check=False)
    return True, ""


def _used_subnets() -> set[int]:
    """Third octets of 10.77.K.0/24 already used by an address or a route of the root namespace."""
    text = _ip("-4", "addr").stdout + _ip("-4", "route", "show", "table", "all").stdout
    return {int(m.group(1)) for m in re.finditer(r"\b10\.77\.(\d+)\.\d+", text)}


class NetnsTestnet:
    """See the module doc. ``peers``: names to create at once (more with ``add``); ``rates``:
    ``{name: (uplink_mbit, downlink_mbit)}`` (either may be None: unshaped)."""

    def __init__(self, peers: list[str] = (), rates: dict[str, tuple[float | None, float | None]] | None = None,
                 prefix: str | None = None):
        self.prefix = prefix or f"hl-{secrets.token_hex(3)}-"
        if not PREFIX_RE.match(self.prefix):
            raise ValueError(f"prefix must look like hl-<6 hex>-, got {self.prefix!r}")
        self.bridge = self.prefix + "br"
        self._initial, self._rates = list(peers), dict(rates or {})
        self.peers: dict[str, int] = {}  # name → host number (10.77.K.<n>)
        self.cuts: set[frozenset] = set()
        self.isolated: set[str] = set()
        self.net: ipaddress.IPv4Network | None = None
        self._namespaces: list[str] = []
        self._links: list[str] = []
        self._lock = threading.Lock()
        self._closed = True
        self._old_sigterm = None

    # -------------------------------------------------------------------------------- lifetime
    def __enter__(self) -> NetnsTestnet:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> NetnsTestnet:
        ok, why = available()
        if not ok:
            raise NetnsError(why)
        self._closed = False
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            current = signal.getsignal(signal.SIGTERM)
            if current in (signal.SIG_DFL, None):
                self._old_sigterm = current
                signal.signal(signal.SIGTERM, _sigterm_to_exit)
        try:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            with open(STATE_DIR / "lock", "w") as lock:  # two runs must not pick the same /24
                fcntl.flock(lock, fcntl.LOCK_EX)
                used = _used_subnets()
                k = next((k for k in range(256) if k not in used), None)
                if k is None:
                    raise NetnsError("every 10.77.K.0/24 is in use")
                self.net = ipaddress.ip_network(f"10.77.{k}.0/24")
                self._write_state()
                _ip("link", "add", self.bridge, "type", "bridge")
                self._links.append(self.bridge)
                _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
                _ip("link", "set", self.bridge, "up")
            for name in self._initial:
                self.add(name, *self._rates.get(name, (None, None)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Remove every namespace and link this testnet created (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        for ns in reversed(self._namespaces):  # deleting a namespace deletes the veth pair in it
            _ip("netns", "del", ns, check=False)
        for link in reversed(self._links):
            if _ip("link", "show", link, check=False).returncode == 0:
                _ip("link", "del", link, check=False)
        cleanup(self.prefix)  # anything of ours a failed step left half-made
        try:
            _state_file(self.prefix).unlink()
        except OSError:
            pass
        if self._old_sigterm is not None or signal.getsignal(signal.SIGTERM) is _sigterm_to_exit:
            try:
                signal.signal(signal.SIGTERM, self._old_sigterm or signal.SIG_DFL)
            except ValueError:  # not the main thread
                pass
        try:
            atexit.unregister(self.close)
        except Exception:
            pass

    def _write_state(self) -> None:
        _state_file(self.prefix).write_text(json.dumps({"prefix": self.prefix, "pid": os.getpid(),
                                                                  "subnet": str(self.net)}))

    # -------------------------------------------------------------------------------- peers
    @property
    def gateway(self) -> str:
        """The bridge's address in the root namespace (an observer's source address)."""
        return str(self.net.network_address + 254)

    def namespace(self, name: str) -> str:
        return self.prefix + name

    def address(self, name: str) -> str:
        return str(self.net.network_address + self.peers[name])

    def add(self, name: str, uplink_mbit: float | None = None, downlink_mbit: float | None = None) -> str:
        """A namespace for peer ``name`` on the bridge; returns its address."""
        if self._closed:
            raise NetnsError("the testnet is not open")
        if name in self.peers:
            return self.address(name)
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,40}", name):
            raise ValueError(f"peer name {name!r}: letters, digits, _ . - only")
        n = len(self.peers) + 1
        if n > 250:
            raise NetnsError("at most 250 peers per testnet")
        ns, host, inner = self.namespace(name), f"{self.prefix}h{n}", f"{self.prefix}n{n}"
        _ip("netns", "add", ns)
        self._namespaces.append(ns)
        self.peers[name] = n
        _ip("link", "set", "lo", "up", ns=ns)
        _ip("link", "add", host, "type", "veth", "peer", "name", inner)
        self._links.append(host)
        _ip("link", "set", inner, "netns", ns)
        _ip("link", "set", host, "master", self.bridge)
        _ip("link", "set", host, "up")
        _ip("addr", "add", f"{self.address(name)}/24", "dev", inner, ns=ns)
        _ip("link", "set", inner, "up", ns=ns)
        if uplink_mbit:
            _shape(inner, uplink_mbit, ns=ns)
        if downlink_mbit:
            _shape(host, downlink_mbit)
        return self.address(name)

    def exec_args(self, name: str, argv: list[str]) -> list[str]:
        """``argv`` run inside peer ``name``'s namespace (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", self.namespace(name), *argv]

    def link_bytes(self, name: str) -> tuple[int, int]:
        """(uplink, downlink) bytes so far on ``name``'s link: what it sent and what it received,
        read in the root namespace on the bridge side of its veth (``rx_bytes``, ``tx_bytes``:
        Ethernet frames, the length the tbf qdiscs count)."""
        stats = Path("/sys/class/net") / f"{self.prefix}h{self.peers[name]}" / "statistics"
        return int((stats / "rx_bytes").read_text()), int((stats / "tx_bytes").read_text())

    def run(self, name: str, *argv: str, check: bool = True, timeout: float | None = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.exec_args(name, list(argv)), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise NetnsError(f"{name}: {' '.join(argv)}: {proc.stderr.strip()}")
        return proc

    # -------------------------------------------------------------------------------- faults
    def cut(self, a: str, b: str) -> None:
        """No packet between ``a`` and ``b`` either way (both still reach everyone else)."""
        if a == b:
            raise ValueError("cut needs two peers")
        _ip("route", "replace", "blackhole", f"{self.address(b)}/32", ns=self.namespace(a))
        _ip("route", "replace", "blackhole", f"{self.address(a)}/32", ns=self.namespace(b))
        self.cuts.add(frozenset((a, b)))

    def heal(self, a: str, b: str) -> None:
        _ip("route", "del", "blackhole", f"{self.address(b)}/32", ns=self.namespace(a), check=False)
        _ip("route", "del", "blackhole", f"{self.address(a)}/32", ns=self.namespace(b), check=False)
        self.cuts.discard(frozenset((a, b)))

    def isolate(self, name: str) -> None:
        """``name`` reaches no one (other peers, the root namespace) until ``rejoin``."""
        _ip("link", "set", f"{self.prefix}h{self.peers[name]}", "down")
        self.isolated.add(name)

    def rejoin(self, name: str) -> None:
        _ip("link", "set", f"{self.prefix}h{self.peers[name]}", "up")
        self.isolated.discard(name)

    def heal_all(self) -> None:
        for pair in list(self.cuts):
            self.heal(*sorted(pair))
        for name in list(self.isolated):
            self.rejoin(name)

    def reachable(self, a: str, b: str) -> bool:
        """Whether the testnet lets ``a`` and ``b`` talk (as set here, not measured)."""
        return frozenset((a, b)) not in self.cuts and a not in self.isolated and b not in self.isolated


def _shape(dev: str, mbit: float, ns: str | None = None) -> None:
    """A tbf qdisc of ``mbit`` on ``dev``'s egress. The burst holds at least a 64 KiB GSO segment
    (a smaller one would drop it), and about 20 ms at the rate."""
    burst = max(int(mbit * 1e6 / 8 * 0.02), 128 * 1024)
    argv = ["tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit", "burst", str(burst),
            "latency", "100ms"]
    _run((["ip", "netns", "exec", ns] if ns else []) + argv)


def _state_file(prefix: str) -> Path:
    """Where a run records its prefix and pid: STATE_DIR/hl-<6 hex>.json."""
    return STATE_DIR / f"{prefix.rstrip('-')}.json"


def _sigterm_to_exit(signum, frame):
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------ leftovers
def cleanup(prefix: str) -> list[str]:
    """Remove every namespace and link named ``prefix``… (a prefix of this module's form only)."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a testnet prefix: {prefix!r}")
    removed = []
    for ns in _ip("netns", "list", check=False).stdout.split("\n"):
        ns = ns.split(" ")[0].strip()
        if ns.startswith(prefix):
            _ip("netns", "del", ns, check=False)
            removed.append(ns)
    for line in _ip("-o", "link", "show", check=False).stdout.splitlines():
        m = re.match(r"\d+:\s+([^:@\s]+)", line)
        if m and m.group(1).startswith(prefix):
            _ip("link", "del", m.group(1), check=False)
            removed.append(m.group(1))
    return removed


def cleanup_leftovers(all_prefixes: bool = False) -> list[str]:
    """Remove what testnets whose process is gone left behind (``all_prefixes``: also any
    ``hl-<6 hex>-`` name without a live owner on record, e.g. from before the state directory)."""
    live, removed = set(), []
    for f in STATE_DIR.glob("hl-*.json") if STATE_DIR.exists() else []:
        try:
            state = json.loads(f.read_text())
            os.kill(int(state["pid"]), 0)
            live.add(state["prefix"])
            continue
        except ProcessLookupError:
            pass
        except (OSError, ValueError, KeyError):
            pass
        prefix = f.name[:-len(".json")] + "-"
        if PREFIX_RE.match(prefix):
            removed += cleanup(prefix)
        f.unlink(missing_ok=True)
    if all_prefixes:
        names = [n.split(" ")[0] for n in _ip("netns", "list", check=False).stdout.split("\n")]
        names += [m.group(1) for m in (re.match(r"\d+:\s+([^:@\s]+)", x)
                                       for x in _ip("-o", "link", "show", check=False).stdout.splitlines()) if m]
        for prefix in sorted({n[:10] for n in names if PREFIX_RE.match(n)} - live):
            removed += cleanup(prefix)
    return removed


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="heloco network-namespace testnets: remove leftovers")
    ap.add_argument("command", choices=["cleanup"])
    ap.add_argument("--prefix", help="remove this run's names (hl-<6 hex>-), whoever owns them")
    ap.add_argument("--all", action="store_true", help="also hl-<6 hex>- names with no live owner on record")
    args = ap.parse_args(argv)
    removed = cleanup(args.prefix) if args.prefix else cleanup_leftovers(all_prefixes=args.all)
    print("\n".join(removed) or "nothing to remove")


if __name__ == "__main__":
    main()
