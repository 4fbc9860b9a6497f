"""HolderKeys: which DHT key belongs to which peer, learned without blocking, bounded, and never
dropped because of a forged claim."""
import asyncio
import threading
import time

import pytest

from heloco_p2p.swarm.holders import HolderKeys


@pytest.fixture()
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make(loop, answers, **kw):
    """``answers[peer]``: the key it gives (bytes) or an exception; ``asked`` counts requests."""
    asked = []

    async def ask(peer):
        asked.append(peer)
        answer = answers[peer]
        if isinstance(answer, Exception):
            raise answer
        return answer

    clock = Clock()
    return HolderKeys("me", b"my-key", ask, loop, clock=clock, **kw), asked, clock


def settle(keys, peer, seconds=2.0):
    """Wait for a started request to finish (without advancing the fake clock)."""
    end = time.time() + seconds
    while time.time() < end:
        with keys._lock:
            f = keys._pending.get(peer)
        if f is None or f.done():
            return
        time.sleep(0.01)


def test_learns_without_blocking_then_answers_from_memory(loop):
    keys, asked, _ = make(loop, {"b": b"kb"})
    assert keys.get("me") == b"my-key" and asked == []
    assert keys.get("b") is None  # asked in the background
    settle(keys, "b")
    assert keys.get("b") == b"kb" and keys.get("b") == b"kb"
    assert asked == ["b"]
    assert keys.signed_by_holder(b"kb", "b") and not keys.signed_by_holder(b"forged", "b")


def test_a_forged_claim_never_drops_the_key_and_a_recheck_replaces_it_only_with_the_peers_answer(loop):
    answers = {"b": b"kb"}
    keys, asked, clock = make(loop, answers, recheck_after=30.0)
    keys.get("b")
    settle(keys, "b")
    for _ in range(5):  # forged claims before the recheck time: no request, the key stays
        assert not keys.signed_by_holder(b"forged", "b")
    assert asked == ["b"] and keys.signed_by_holder(b"kb", "b")
    clock.t += 31
    assert not keys.signed_by_holder(b"forged", "b")  # starts one recheck...
    settle(keys, "b")
    assert asked == ["b", "b"]
    assert keys.signed_by_holder(b"kb", "b")  # ...which the peer answered with the same key: still valid
    answers["b"] = b"kb2"  # the peer really has a new key now
    clock.t += 31
    assert not keys.signed_by_holder(b"kb2", "b")
    settle(keys, "b")
    assert keys.signed_by_holder(b"kb2", "b") and not keys.signed_by_holder(b"kb", "b")


def test_failures_back_off_and_memory_and_requests_are_bounded(loop):
    answers = {f"p{i}": b"k%d" % i for i in range(50)}
    answers["dead"] = ConnectionError("no route")
    keys, asked, clock = make(loop, answers, max_peers=10, max_pending=4, retry_after=5.0)
    assert keys.get("dead") is None
    settle(keys, "dead")
    for _ in range(3):
        assert keys.get("dead") is None  # failed: not asked again within 5 s
    assert asked.count("dead") == 1
    clock.t += 6
    keys.get("dead")
    settle(keys, "dead")
    assert asked.count("dead") == 2
    for i in range(50):  # a flood of claims naming 50 peers: at most 4 requests in flight at once
        keys.get(f"p{i}")
        assert len(keys._pending) <= 4
    for _ in range(20):
        for i in range(50):
            keys.get(f"p{i}")
        time.sleep(0.01)
    assert len(keys._keys) <= 10 and len(keys._pending) <= 4


def test_get_blocking_waits_for_the_answer(loop):
    keys, asked, _ = make(loop, {"b": b"kb", "dead": TimeoutError()})
    keys.clock = time.time  # real time for the wait
    assert keys.get_blocking("b", timeout=5) == b"kb"
    assert keys.get_blocking("dead", timeout=5) is None
    keys.learn("c", b"kc")
    assert keys.get("c") == b"kc" and "c" not in asked


def test_threads_reading_at_once_do_not_break_it(loop):
    keys, _, _ = make(loop, {f"p{i}": b"k" for i in range(200)}, max_peers=50, max_pending=8)
    errors = []

    def reader():
        try:
            for _ in range(30):
                for i in range(200):
                    keys.signed_by_holder(b"k" if i % 2 else b"x", f"p{i}")
        except Exception as exc:  # pragma: no cover - the assertion below reports it
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == [] and len(keys._keys) <= 50
