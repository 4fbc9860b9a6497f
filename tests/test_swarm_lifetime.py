"""A SIGKILLed peer leaves no DHT process and no p2pd behind; process groups end completely."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from heloco_p2p.swarm import lifetime
from heloco_p2p.swarm.lifetime import (
    child_pids,
    group_pids,
    guard_children,
    is_alive,
    stop_reaper,
    terminate_group,
)

ROOT = Path(__file__).resolve().parent.parent
LIFETIME_PY = Path(lifetime.__file__).resolve()

# Light peers for the reaper's own behaviour: `sleep` children, and lifetime.py loaded by path
# (it is stdlib-only) so that each script starts in a fraction of a second.
SLEEPERS = textwrap.dedent(f"""
    import importlib.util, subprocess, sys, threading, time
    spec = importlib.util.spec_from_file_location("lifetime", {str(LIFETIME_PY)!r})
    lifetime = importlib.util.module_from_spec(spec); spec.loader.exec_module(lifetime)
    kids = [subprocess.Popen(["sleep", "600"]) for _ in range(3)]
    mode = sys.argv[1]
    if mode == "thread":  # guard from a worker thread that ends once the reaper is armed
        box = []
        def guard():
            box.append(lifetime.guard_children([k.pid for k in kids], grace=1))
            time.sleep(1.0)  # the reaper's prctl is done: the thread's end sends the death signal
        t = threading.Thread(target=guard)
        t.start(); t.join(); reaper = box[0]
    else:
        reaper = lifetime.guard_children([k.pid for k in kids[:2]], grace=1)
        if mode == "add":
            lifetime.add_pids(reaper, [kids[2].pid])
    print(reaper.pid, *[k.pid for k in kids], flush=True)
    time.sleep(600)
""")

# A peer as the swarm runs it: its own P2P (p2pd is the peer's child) handed to the DHT, or the
# DHT's own P2P (p2pd is the DHT process's child).
PEER = textwrap.dedent("""
    import asyncio, os, sys, threading, time
    import hivemind
    from hivemind.p2p import P2P
    from heloco_p2p.swarm.lifetime import guard_children, p2p_daemon_pid
    if sys.argv[1] == "peer_owns_p2pd":
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        create = P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        p2p = asyncio.run_coroutine_threadsafe(create, loop).result(60)
        dht = hivemind.DHT(p2p=p2p, start=True)
        guarded = [dht.pid, p2p_daemon_pid(p2p)]
    else:
        dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        guarded = [dht.pid]
    assert dht.get_visible_maddrs()  # the DHT works on this P2P
    reaper = guard_children(guarded, grace=2)
    print(reaper.pid, *guarded, flush=True)
    time.sleep(600)
""")


def start_script(source: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", source, *args], stdout=subprocess.PIPE,
                            start_new_session=True, env=env, cwd=ROOT)


def read_pids(proc: subprocess.Popen) -> list[int]:
    line = proc.stdout.readline()
    assert line, f"script exited with {proc.wait()} before printing its pids"
    return [int(p) for p in line.split()]


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if is_alive(p)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def cpu_ticks(pid: int) -> int:
    st = lifetime.proc_stat(pid)
    return st.utime + st.stime


def cleanup(proc: subprocess.Popen) -> None:
    """End the script's session and reap it, whatever state the test left it in."""
    terminate_group(proc.pid, grace=1)
    if proc.poll() is None:
        proc.kill()
    proc.wait(5)
    proc.stdout.close()


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["peer_owns_p2pd", "dht_owns_p2pd"])
def test_sigkilled_peer_leaves_no_dht_process_and_no_p2pd(layout):
    proc = start_script(PEER, layout)
    try:
        reaper, *guarded = read_pids(proc)
        descendants = child_pids(proc.pid)
        names = {Path(f"/proc/{p}/comm").read_text().strip() for p in descendants if is_alive(p)}
        assert "p2pd" in names  # the pids we watch include the daemon, wherever it lives
        assert reaper in descendants and all(p in descendants for p in guarded)

        os.kill(proc.pid, signal.SIGKILL)  # only the peer: its children must follow
        assert wait_gone(guarded + [reaper], timeout=5) == []
        # everything else it started too (torch's shm manager leaves by itself within seconds)
        assert wait_gone(descendants, timeout=10) == []
    finally:
        cleanup(proc)


@pytest.mark.slow
def test_reaper_guarding_from_a_thread_outlives_the_thread_but_not_the_process():
    proc = start_script(SLEEPERS, "thread")
    try:
        reaper, *kids = read_pids(proc)
        time.sleep(0.5)  # the guarding thread has ended and its death signal has been handled
        assert all(is_alive(p) for p in [reaper, *kids])
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_gone([reaper, *kids], timeout=5) == []
    finally:
        cleanup(proc)


@pytest.mark.slow
def test_pids_added_later_are_stopped_too():
    proc = start_script(SLEEPERS, "add")
    try:
        reaper, *kids = read_pids(proc)
        # killed at once: the reaper may not even have read its pipe, yet must apply the add
        os.kill(proc.pid, signal.SIGKILL)
        assert wait_gone([reaper, *kids], timeout=5) == []
    finally:
        cleanup(proc)


@pytest.mark.slow
def test_reaper_waits_without_cpu_and_stop_reaper_leaves_children_running():
    kid = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        reaper = guard_children([kid.pid], grace=0.5)
        time.sleep(1.0)  # past interpreter start-up: now blocked in select
        before = cpu_ticks(reaper.pid)
        time.sleep(1.0)
        assert cpu_ticks(reaper.pid) == before
        assert lifetime.proc_stat(reaper.pid).state == "S"

        stop_reaper(reaper)
        assert reaper.returncode == 0
        time.sleep(0.5)
        assert is_alive(kid.pid)
    finally:
        terminate_group(kid.pid, grace=1)
        kid.wait(5)


@pytest.mark.slow
def test_reaper_whose_parent_is_already_gone_stops_its_pids_at_once():
    kid = subprocess.Popen(["sleep", "600"], start_new_session=True)
    try:
        # the race guard_children cannot lose: the parent died before the reaper's prctl
        cmd = [sys.executable, "-I", str(LIFETIME_PY), "--parent", "999999999", "--grace", "1", str(kid.pid)]
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=10)
        assert done.returncode == 0
        assert b"is gone: stopping" in done.stderr
        assert kid.wait(5) == -signal.SIGTERM
    finally:
        terminate_group(kid.pid, grace=1)
        kid.wait(5)


def test_guard_children_refuses_its_own_pid():
    with pytest.raises(ValueError):
        guard_children([os.getpid()])


@pytest.mark.slow
def test_terminate_group_ends_every_process_of_the_session_even_those_ignoring_sigterm():
    # sh and its background children ignore SIGTERM (an ignored signal stays ignored across exec)
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 600 & sleep 600 & sleep 600 & wait"],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(group_pids(proc.pid)) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        members = group_pids(proc.pid)
        assert len(members) == 4 and proc.pid in members
        assert sorted(child_pids(proc.pid)) == sorted(p for p in members if p != proc.pid)

        t0 = time.monotonic()
        terminate_group(proc.pid, grace=0.5)
        assert group_pids(proc.pid) == []
        assert 0.5 <= time.monotonic() - t0 < 3
        assert proc.wait(5) == -signal.SIGKILL
    finally:
        terminate_group(proc.pid, grace=0.5)
        proc.wait(5)


@pytest.mark.slow
def test_terminate_group_of_a_cooperative_session_returns_quickly():
    proc = subprocess.Popen(["sh", "-c", "sleep 600 & sleep 600 & wait"], start_new_session=True)
    try:
        time.sleep(0.2)
        t0 = time.monotonic()
        terminate_group(proc.pid, grace=5)
        assert time.monotonic() - t0 < 2
        assert group_pids(proc.pid) == []
    finally:
        terminate_group(proc.pid, grace=0.5)
        proc.wait(5)


def test_terminate_group_refuses_our_own_group_and_init():
    for pgid in (os.getpgrp(), 1, 0):
        with pytest.raises(ValueError):
            terminate_group(pgid, grace=0.1)


def test_is_alive_tells_a_recycled_pid_from_the_original():
    start = lifetime.proc_stat(os.getpid()).start_time
    assert is_alive(os.getpid()) and is_alive(os.getpid(), start)
    assert not is_alive(os.getpid(), start + 1)
    assert not is_alive(999999999)
