"""Start real peers as separate processes on 127.0.0.1, read their metrics, stop them all.
With ``netns`` (a ``heloco_p2p.tools.netns.NetnsTestnet``), each peer runs in a network namespace
of its own and listens on its bridge address instead, so links between peers can be cut.

Each peer runs in its own session (process group) so that stopping it, even with SIGKILL,
reaches its DHT process and p2pd too. Used by the tests, the benchmarks and the testnet.

    sw = LocalSwarm(Path("runs/x"), "demo")
    sw.start("a", "de", "--config", "configs/tiny.yaml")
    sw.start("b", "fr")                       # joins through a's address
    sw.wait_until(lambda: len(sw.events("a", "commit")) >= 10, 120, "10 commits")
    sw.close()
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from heloco_p2p.config import read_yaml
from heloco_p2p.swarm.lifetime import group_pids, kill_group

ROOT = Path(__file__).resolve().parents[2]


def write_test_config(path: Path, outer: dict | None = None, **swarm) -> Path:
    """The tiny model with short rounds and a short lease, so a swarm test takes seconds.
    ``outer`` updates the outer section (e.g. ``{"algorithm": "sync_diloco"}``)."""
    tree = read_yaml(ROOT / "configs" / "tiny.yaml")
    tree["outer"].update(outer or {})
    tree["data"].update(seq_len=64, val_blocks=8)
    tree["inner"].update(batch_size=8, steps_per_round=10, warmup_steps=10, total_steps=2000)
    tree["swarm"] = {"lease_seconds": 4.0, "heartbeat_seconds": 1.0, **swarm}
    path.write_text(yaml.safe_dump(tree))
    return path


class LocalSwarm:
    def __init__(self, workdir: Path, run_id: str, swarm_key_file: str | Path | None = None, netns=None):
        self.dir, self.run_id = workdir, run_id
        self.swarm_key_file = swarm_key_file  # given to every peer started (docs/security.md)
        self.netns = netns  # None: every peer on 127.0.0.1; else a NetnsTestnet: one namespace per peer
        self.procs: dict[str, subprocess.Popen] = {}
        self.maddr: str | None = None
        # how a peer is started, by name: the interpreter's arguments before ``join`` (default
        # ``-m heloco_p2p``; scripts/poison.py starts its attackers through its own entry point)
        self.entry: dict[str, list[str]] = {}

    def start(self, name: str, region: str, *extra: str, initial: bool = True) -> subprocess.Popen:
        args = [sys.executable, *self.entry.get(name, ["-m", "heloco_p2p"]), "join", "--run-id", self.run_id, "--region", region, "--name", name,
                "--threads", "1", "--metrics", str(self.dir / f"{name}.jsonl"),
                "--checkpoint-dir", str(self.dir / f"ckpt-{name}"), "--identity", str(self.dir / f"id-{name}"), *extra]
        if initial and self.maddr:
            args += ["--initial-peers", self.live_maddr(exclude=name) or self.maddr]
        if self.swarm_key_file and "--swarm-key-file" not in extra:
            args += ["--swarm-key-file", str(self.swarm_key_file)]
        if self.netns is not None:
            address = self.netns.add(name)  # the same namespace (and address) for a restarted peer
            if "--host-maddrs" not in extra:
                args += ["--host-maddrs", f"/ip4/{address}/tcp/0"]
            args = self.netns.exec_args(name, args)
        path = self.dir / f"{name}.log"
        if path.exists():  # a restarted peer: the earlier process's log is kept as NAME.log.N
            path.rename(self.dir / f"{name}.log.{len(list(self.dir.glob(f'{name}.log.*')))}")
        log = open(path, "w")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        self.procs[name] = proc
        if self.maddr is None:
            self.maddr = self.wait_for_maddr(name)
        return proc

    def live_maddr(self, exclude: str | None = None) -> str | None:
        """The address of a peer that is still running (a restarted peer must not dial a dead one)."""
        for other, proc in self.procs.items():
            if other != exclude and proc.poll() is None:
                m = re.search(self._maddr_pattern(other), (self.dir / f"{other}.log").read_text())
                if m:
                    return m.group(0)
        return None

    def wait_for_maddr(self, name: str, timeout: float = 90) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            m = re.search(self._maddr_pattern(name), (self.dir / f"{name}.log").read_text())
            if m:
                return m.group(0)
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"{name} exited: {(self.dir / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.3)
        raise TimeoutError(f"{name} printed no address")

    def _maddr_pattern(self, name: str) -> str:
        host = "127.0.0.1" if self.netns is None else self.netns.address(name)
        return r"/ip4/" + re.escape(host) + r"/tcp/\d+/p2p/\w+"

    def events(self, name: str, kind: str | None = None) -> list[dict]:
        path = self.dir / f"{name}.jsonl"
        if not path.exists():
            return []
        text = path.read_text()
        lines = text.split("\n")
        if not text.endswith("\n"):
            lines.pop()  # a line the peer is still writing: read it next time, whole
        out = [json.loads(line) for line in lines if line.strip()]
        return [e for e in out if kind is None or e.get("event") == kind]

    def all_events(self, kind: str) -> list[dict]:
        return [e for name in self.procs for e in self.events(name, kind)]

    def peer_names(self) -> dict[str, str]:
        """peer id → name, from the events each peer logs about itself."""
        out = {}
        for name in self.procs:
            for e in self.events(name, "heartbeat")[:1] + self.events(name, "train_start")[:1]:
                if e.get("peer"):
                    out[e["peer"]] = name
        return out

    def wait_until(self, predicate, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            for name, p in self.procs.items():
                if p.poll() not in (None, 0, -signal.SIGKILL, -signal.SIGTERM):
                    raise RuntimeError(f"{name} died ({p.returncode}): {(self.dir / f'{name}.log').read_text()[-3000:]}")
            time.sleep(0.5)
        logs = "\n".join(f"--- {n}\n" + (self.dir / f"{n}.log").read_text()[-2000:] for n in self.procs)
        raise TimeoutError(f"timed out waiting for {what}\n{logs}")

    def kill(self, name: str) -> None:
        """SIGKILL the peer's whole process group (peer, DHT process, p2pd)."""
        kill_group(self.procs[name].pid)
        self.procs[name].wait(10)

    def freeze(self, name: str) -> None:
        """SIGSTOP the peer's whole process group: a frozen machine (the peer, its DHT, its p2pd)."""
        os.killpg(self.procs[name].pid, signal.SIGSTOP)

    def thaw(self, name: str) -> None:
        os.killpg(self.procs[name].pid, signal.SIGCONT)

    def stop(self, name: str, sig=signal.SIGTERM, timeout: float = 60) -> int:
        self.procs[name].send_signal(sig)
        return self.procs[name].wait(timeout)

    def group_alive(self, name: str) -> bool:
        """Whether any process of the peer's group still runs (zombies, already dead, don't count)."""
        return bool(group_pids(self.procs[name].pid))

    def terminate(self, names, timeout: float) -> None:
        """SIGTERM these peers together (each leaves cleanly: it stops its DHT process and p2pd itself)
        and wait up to ``timeout`` seconds in all for them to exit; one still running is left running."""
        procs = [self.procs[n] for n in names if self.procs[n].poll() is None]
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGCONT)  # a frozen peer cannot handle SIGTERM
            except ProcessLookupError:
                pass
            p.send_signal(signal.SIGTERM)
        deadline = time.time() + timeout
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass

    def close(self) -> None:
        self.terminate(list(self.procs), 30)
        for p in self.procs.values():
            kill_group(p.pid)  # the whole group: nothing of ours stays behind
        deadline = time.time() + 10  # SIGKILL is delivered at once, but dying takes a moment under load
        while time.time() < deadline and any(self.group_alive(n) for n in self.procs):
            time.sleep(0.1)
