"""A killed peer leaves nothing running: a reaper for its children, and process-group shutdown.

A peer owns a ``hivemind.DHT`` child process (a fork) and a ``p2pd`` daemon (started by
``hivemind.P2P.create`` with ``asyncio.create_subprocess_exec``, in the peer's own session).
Neither notices when the peer is SIGKILLed: both keep running, holding ports and a DHT identity.

:func:`guard_children` starts a tiny reaper process that sleeps until the peer dies for any
reason and then stops the guarded processes (SIGTERM, a grace period, SIGKILL) together with
their descendants at that moment (so guarding a DHT process also covers a ``p2pd`` it started).
A peer that shuts down cleanly stops its children itself and then calls :func:`stop_reaper`::

    dht = hivemind.DHT(p2p=p2p, start=True)
    reaper = guard_children([dht.pid, p2p_daemon_pid(p2p)])
    ...
    dht.shutdown(); await p2p.shutdown()
    stop_reaper(reaper)

How the reaper learns that its parent died: ``prctl(PR_SET_PDEATHSIG, SIGTERM)``, which the
reaper calls on itself at start (no ``preexec_fn``, which can deadlock a parent that has
threads), then it compares ``os.getppid()`` with the parent's pid, so a parent that died before
the ``prctl`` is noticed too. The kernel sends the death signal when the *thread* that forked the
reaper exits, not the process: called from a worker thread, it would fire when that thread ends.
The reaper therefore treats the signal only as a prompt to check ``getppid()``, and ignores it
while the parent process lives on (the signal fires again when the next owning thread ends).
So :func:`guard_children` may be called from any thread; the main thread is simplest.
While the parent lives the reaper blocks in ``select`` on its command pipe and a signal wakeup
fd, waking once a minute as a safety net; it costs no CPU.

Launchers (testnet, tests) start each peer with ``start_new_session=True`` and end it with
:func:`terminate_group` (or :func:`kill_group`, a machine that dies); :func:`child_pids` and
:func:`group_pids` read ``/proc`` (:func:`proc_stat`, the one reader of it) to check that nothing
is left. Linux only.

This module imports only the standard library: the reaper runs it as a script
(``python -I lifetime.py``) without importing the package, torch or hivemind.
"""
from __future__ import annotations

import argparse
import ctypes
import logging
import os
import select
import signal
import subprocess
import sys
import time
from typing import Iterable, NamedTuple

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_SAFETY_NET_S = 60.0  # a lost signal still gets noticed; not needed for correctness
_POLL_S = 0.02  # only while waiting for processes to exit, never while the parent lives


# ---------------------------------------------------------------- /proc


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` that launchers, the reaper and benchmarks read."""

    state: str  # R, S, D, T, Z (zombie), X (dead), ...
    ppid: int
    pgrp: int
    start_time: int  # clock ticks after boot: with the pid, names one process (pids are recycled)
    name: str  # the command name (comm), at most 15 characters
    utime: int  # CPU time in user mode, clock ticks (os.sysconf("SC_CLK_TCK") per second)
    stime: int  # CPU time in kernel mode, clock ticks


def proc_stat(pid: int, tid: int | None = None) -> ProcStat | None:
    """The stat of a process (of its thread ``tid``: the CPU times are then that thread's), or None
    if it does not exist (or cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat" if tid is None else f"/proc/{pid}/task/{tid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # the command name may contain spaces and parentheses: split after its last ')'
    end = data.rindex(b")")
    fields = data[end + 2:].split()
    return ProcStat(state=fields[0].decode(), ppid=int(fields[1]), pgrp=int(fields[2]), start_time=int(fields[19]),
                    name=data[data.index(b"(") + 1:end].decode(errors="replace"),
                    utime=int(fields[11]), stime=int(fields[12]))


def all_proc_stats() -> dict[int, ProcStat]:
    """pid -> stat of every process readable in ``/proc`` (zombies included)."""
    stats = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = proc_stat(int(name))
            if st is not None:
                stats[int(name)] = st
    return stats


def is_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether a process exists and is not a zombie (an exited child nobody has waited for).

    :param pid: process id
    :param start_time: if given, also require this start time (``/proc/<pid>/stat`` field 22),
        so that a recycled pid does not count as the same process
    """
    st = proc_stat(pid)
    return st is not None and st.state not in ("Z", "X") and (start_time is None or st.start_time == start_time)


def child_pids(pid: int) -> list[int]:
    """All descendants of a process (children, grandchildren, ...), zombies included, sorted.

    :param pid: the ancestor
    """
    children: dict[int, list[int]] = {}
    for child, st in all_proc_stats().items():
        children.setdefault(st.ppid, []).append(child)
    found, todo = [], list(children.get(pid, ()))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(children.get(child, ()))
    return sorted(found)


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group, sorted.

    :param pgid: process group id (for a process started with ``start_new_session=True``, its pid)
    """
    return sorted(pid for pid, st in all_proc_stats().items() if st.pgrp == pgid and st.state not in "ZX")


# ---------------------------------------------------------------- stopping processes


def _wait_gone(targets: dict[int, int | None], deadline: float) -> list[int]:
    """Poll until every target has exited or the deadline passes; returns the survivors."""
    while True:
        alive = [pid for pid, start in targets.items() if is_alive(pid, start)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(_POLL_S)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_processes(targets: dict[int, int | None], grace: float) -> list[int]:
    """SIGTERM each process, wait up to ``grace`` seconds, SIGKILL the survivors.

    :param targets: pid -> start time (or None to skip the recycled-pid check)
    :param grace: seconds between SIGTERM and SIGKILL
    :returns: the pids that needed SIGKILL
    """
    for pid, start in targets.items():
        if is_alive(pid, start):
            _signal(pid, signal.SIGTERM)
    survivors = _wait_gone(targets, time.monotonic() + grace)
    for pid in survivors:
        _signal(pid, signal.SIGKILL)
    _wait_gone({pid: targets[pid] for pid in survivors}, time.monotonic() + 1.0)
    return survivors


def terminate_group(pgid: int, grace: float) -> None:
    """SIGTERM a process group, wait up to ``grace`` seconds for it to empty, then SIGKILL it.

    For launchers that start each peer with ``start_new_session=True`` (its pgid is its pid).
    Zombies do not count as running: reaping its own children stays with the caller
    (``Popen.wait``). A member that moved itself to another group is out of reach.

    :param pgid: the process group to end
    :param grace: seconds between SIGTERM and SIGKILL
    """
    _check_group(pgid)
    try:
        os.killpg(pgid, signal.SIGTERM)
        # a stopped member acts on SIGTERM only once continued
        os.killpg(pgid, signal.SIGCONT)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while group_pids(pgid) and time.monotonic() < deadline:
        time.sleep(_POLL_S)
    if group_pids(pgid):
        logger.warning("process group %d still running %.1f s after SIGTERM: SIGKILL", pgid, grace)
        kill_group(pgid)
        deadline = time.monotonic() + 1.0
        while group_pids(pgid) and time.monotonic() < deadline:
            time.sleep(_POLL_S)


def kill_group(pgid: int) -> None:
    """SIGKILL every process of a group at once (as when its machine dies); a group already gone is
    no error. Like :func:`terminate_group`, it refuses init's group and our own.

    :param pgid: the process group (for a process started with ``start_new_session=True``, its pid)
    """
    _check_group(pgid)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _check_group(pgid: int) -> None:
    if pgid <= 1 or pgid == os.getpgrp():
        raise ValueError(f"refusing to terminate process group {pgid} (init or our own)")


# ---------------------------------------------------------------- the reaper


def p2p_daemon_pid(p2p) -> int | None:
    """The pid of the p2pd that a ``hivemind.P2P`` started (None for a replica, which owns none).

    hivemind 1.1.12 keeps it in the private ``P2P._child`` (an asyncio subprocess); reading it
    here keeps that dependency in one place.

    :param p2p: a ``hivemind.P2P`` from ``P2P.create``
    """
    child = getattr(p2p, "_child", None)
    return None if child is None else child.pid


def guard_children(pids: Iterable[int], grace: float = 2.0) -> subprocess.Popen:
    """Start a reaper that stops ``pids`` (and their descendants) when this process dies.

    The reaper is signalled through ``PR_SET_PDEATHSIG`` when this process ends for any reason,
    SIGKILL included; it then sends SIGTERM to the guarded processes and every descendant they
    have at that moment, waits ``grace`` seconds, SIGKILLs the survivors and exits. It exits at
    once, stopping them, if this process is already gone when it starts. It stays in this
    process's group, ignores SIGINT and SIGHUP, and holds none of this process's files.

    :param pids: processes to stop when this process dies (e.g. the DHT process and p2pd)
    :param grace: seconds between SIGTERM and SIGKILL
    :returns: the reaper; pass it to :func:`add_pids` and :func:`stop_reaper`
    """
    pids = [int(p) for p in pids]
    if any(p <= 1 or p == os.getpid() for p in pids):
        raise ValueError(f"cannot guard {pids}: pids must be other processes")
    cmd = [sys.executable, "-I", os.path.abspath(__file__), "--parent", str(os.getpid()),
           "--grace", repr(float(grace)), *map(str, pids)]
    # -I keeps the script's folder (heloco_p2p/swarm) and PYTHON* variables out of the reaper
    return subprocess.Popen(cmd, stdin=subprocess.PIPE, close_fds=True, cwd="/")


def add_pids(reaper: subprocess.Popen, pids: Iterable[int]) -> None:
    """Guard more processes with a running reaper (e.g. one started after it).

    :param reaper: from :func:`guard_children`
    :param pids: further processes to stop when this process dies
    """
    pids = [int(p) for p in pids]
    if pids:
        reaper.stdin.write(("add " + " ".join(map(str, pids)) + "\n").encode())
        reaper.stdin.flush()


def stop_reaper(reaper: subprocess.Popen, timeout: float = 5.0) -> None:
    """End the reaper without it stopping anything: for a clean shutdown, after the caller has
    stopped its children itself.

    :param reaper: from :func:`guard_children`
    :param timeout: seconds to wait for it to exit before killing it
    """
    try:
        reaper.stdin.write(b"stop\n")
        reaper.stdin.close()
    except (BrokenPipeError, ValueError):  # already exited, or stdin already closed
        pass
    try:
        reaper.wait(timeout)
    except subprocess.TimeoutExpired:
        logger.warning("reaper %d did not stop in %.1f s: killing it", reaper.pid, timeout)
        reaper.kill()
        reaper.wait()


# -- the heap ---------------------------------------------------------------------------------
M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
TRIM_FREE_BYTES = 64 << 20  # trim_heap returns the free heap memory to the system above this


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: nothing to tune
        return None


def one_malloc_arena() -> bool:
    """Make every thread of this process allocate from glibc's main heap (``M_ARENA_MAX`` 1),
    before any thread is started, unless ``MALLOC_ARENA_MAX`` is set. With an arena per thread, a
    peer's executor threads each keep the memory of the tensors they freed (a dispatch θ̄, a
    decoded Δ, a part of the state a joiner downloads): a no-train coordinator of a 60M-parameter
    run peaked at about 3 fp32 copies of θ more than with one arena (docs/results.md, "Memory per
    role"), and inner steps took no more CPU. Returns whether it was set (False off glibc)."""
    libc = _libc()
    if libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, 1))


def trim_heap(min_free: int = TRIM_FREE_BYTES) -> int:
    """Give the heap's free memory back to the system (``malloc_trim``) when more than ``min_free``
    bytes of it are free; returns those bytes (0: nothing done). A tensor of a few MB (θ's blocks
    at 125M) is allocated on the heap once glibc's mmap threshold has risen past it, and the
    memory of the transient copies of θ a commit, a reply or a round makes stays in the process
    when freed (holes below the top of the heap): their peaks add up instead of overlapping."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return 0
    libc.mallinfo2.restype = _Mallinfo2
    free = libc.mallinfo2().fordblks
    if free <= min_free:
        return 0
    libc.malloc_trim(0)
    return int(free)


def _set_pdeathsig(sig: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def _say(message: str) -> None:
    try:
        print(f"heloco reaper {os.getpid()}: {message}", file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):  # the parent's stderr may be gone with it
        pass


def _reaper_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="stop PIDS when the parent process dies")
    ap.add_argument("--parent", type=int, required=True)
    ap.add_argument("--grace", type=float, default=2.0)
    ap.add_argument("pids", type=int, nargs="*")
    args = ap.parse_args(argv)

    # The death signal only wakes the select below (via the wakeup fd, which cannot lose a
    # signal that arrives between two checks); what counts is getppid().
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    # Ctrl-C and a closing terminal reach the whole foreground group; the parent decides.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    _set_pdeathsig(signal.SIGTERM)

    guarded: dict[int, int] = {}

    def add(pids: Iterable[int]) -> None:
        for pid in pids:
            st = proc_stat(pid)
            if st is not None and st.state not in "ZX":
                guarded[pid] = st.start_time  # start time: a pid recycled later is not ours to kill

    def run_commands(lines: list[bytes]) -> bool:
        """Apply "add PID..." lines; True on "stop"."""
        for line in lines:
            words = line.split()
            if words[:1] == [b"stop"]:
                return True
            if words[:1] == [b"add"]:
                try:
                    add(int(w) for w in words[1:])
                except ValueError:
                    _say(f"ignoring malformed command {line!r}")
        return False

    add(args.pids)
    stdin_open, pending = True, b""
    while os.getppid() == args.parent:
        fds = [wake_r] + ([0] if stdin_open else [])
        ready, _, _ = select.select(fds, [], [], _SAFETY_NET_S)
        if wake_r in ready:
            os.read(wake_r, 4096)
        if 0 in ready:
            data = os.read(0, 65536)
            stdin_open = bool(data)  # EOF: the parent dropped the pipe; the death signal remains
            *lines, pending = (pending + data).split(b"\n")
            if run_commands(lines):
                return 0
    # Commands the parent wrote before it died may still be in the pipe (the reaper may even
    # start after its parent's death and never enter the loop): apply them before reaping.
    if stdin_open:
        os.set_blocking(0, False)
        while True:
            try:
                data = os.read(0, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            pending += data
        if run_commands(pending.split(b"\n")):
            return 0

    targets: dict[int, int | None] = {}
    for pid, start in guarded.items():
        if is_alive(pid, start):
            targets[pid] = start
            for child in child_pids(pid):
                st = proc_stat(child)
                if st is not None:
                    targets[child] = st.start_time
    if targets:
        _say(f"parent {args.parent} is gone: stopping {sorted(targets)}")
        killed = stop_processes(targets, args.grace)
        if killed:
            _say(f"needed SIGKILL: {killed}")
    return 0


if __name__ == "__main__":
    sys.exit(_reaper_main(sys.argv[1:]))
