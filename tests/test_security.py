"""Access control and flood control: the swarm key, forged DHT records, replays, rate limits, busy.

docs/security.md says what each of these protects against.
"""
import asyncio
import concurrent.futures
import json
import stat
import struct
import subprocess
import sys
import time
import uuid
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils import get_dht_time

from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.joining import StateServer
from heloco_p2p.swarm.auth import ReplayGuard, SwarmKey, SwarmKeyError, generate_key_file, load_swarm_key
from heloco_p2p.swarm.node import Gate, HandlerLimits, SwarmNode
from heloco_p2p.swarm.records import GenesisRecord, LeaseRecord, PeerRecord
from heloco_p2p.swarm.wire import CONTINUE, MAGIC, WireError, encode_tensors, read_head, read_message, unpack_params

RUN = "sec"
SHAPES = [(4, 8), (8,)]
NAMES = ["w", "b"]
KEY = SwarmKey(b"s" * 32)


# ---------------------------------------------------------------------------- keys and MACs, no network
@pytest.mark.slow
def test_keygen_writes_a_private_key_file_that_loads(tmp_path):
    path = tmp_path / "swarm.key"
    out = subprocess.run([sys.executable, "-m", "heloco_p2p", "keygen", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    key = load_swarm_key(path)
    assert key.fingerprint in out.stdout
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    again = subprocess.run([sys.executable, "-m", "heloco_p2p", "keygen", str(path)], capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr
    assert load_swarm_key(path).fingerprint == key.fingerprint  # the refusal left the key as it was


@pytest.mark.parametrize("content, says", [(None, "does not exist"), ("not hex at all\n", "not a swarm key"),
                                           ("abcd\n", "at least 16 bytes")])
def test_a_bad_key_file_says_how_to_make_one(tmp_path, content, says):
    path = tmp_path / "k"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SwarmKeyError) as info:
        load_swarm_key(path)
    assert says in str(info.value) and "heloco-peer keygen" in str(info.value)


def test_a_request_mac_binds_run_handler_peers_and_payload():
    header = {"run_id": RUN, "seq": 1}
    signed, _ = KEY.sign_request(RUN, "submit", header, b"delta", sender="A", receiver="B")
    auth = KEY.check_request_head(RUN, "submit", signed, 5, sender="A", receiver="B", guard=ReplayGuard())
    KEY.check_body(auth, b"delta")
    for run, handler, sender, receiver in ((RUN + "x", "submit", "A", "B"), (RUN, "state", "A", "B"),
                                           (RUN, "submit", "C", "B"), (RUN, "submit", "A", "C")):
        with pytest.raises(WireError) as info:
            KEY.check_request_head(run, handler, signed, 5, sender=sender, receiver=receiver, guard=ReplayGuard())
        assert info.value.code == "unauthenticated"
    with pytest.raises(WireError) as info:
        KEY.check_body(auth, b"delts")
    assert info.value.code == "unauthenticated"


def test_replay_guard_refuses_seen_nonces_and_stays_bounded():
    guard = ReplayGuard(max_skew=100.0, max_nonces=4)
    now = 1000.0
    for i in range(4):
        guard.check_and_remember(f"n{i}", now + i, now + i)
    with pytest.raises(WireError) as info:
        guard.check_and_remember("n2", now + 2, now + 5)
    assert info.value.code == "replayed"
    guard.check_and_remember("n4", now + 4, now + 5)  # room is made by forgetting n0 ...
    assert len(guard) == 4
    with pytest.raises(WireError):  # ... and n0 cannot come back: its timestamp is at or below the floor
        guard.check_and_remember("n0", now + 0, now + 5)
    guard.check_and_remember("late", now + 300, now + 300)  # old entries expire with the skew window
    assert len(guard) == 1


# ---------------------------------------------------------------------------- flood control, no network
def test_token_bucket_limits_one_peer_and_says_when_to_retry():
    gate = Gate(HandlerLimits(rate=1.0, burst=2, max_inflight=100))
    gate.admit("p", now=0.0)
    gate.admit("p", now=0.0)
    with pytest.raises(WireError) as info:
        gate.admit("p", now=0.25)
    assert info.value.code == "rate_limited" and info.value.retry_after == pytest.approx(0.75)
    gate.admit("q", now=0.25)  # another peer has its own bucket
    gate.admit("p", now=1.0)  # one token back after 1 s
    assert gate.inflight == 4


def test_bounded_inflight_says_busy_and_costs_no_token():
    gate = Gate(HandlerLimits(rate=1.0, burst=1, max_inflight=1, busy_retry_after=lambda: 2.5))
    gate.admit("a", now=0.0)
    with pytest.raises(WireError) as info:
        gate.admit("b", now=0.0)
    assert info.value.code == "busy" and info.value.retry_after == 2.5
    gate.release()
    gate.admit("b", now=0.0)  # the refused request did not use b's only token


def test_fresh_identities_get_half_the_slots_and_contributors_the_rest():
    gate = Gate(HandlerLimits(max_inflight=4, trusted=lambda peer: peer.startswith("known")))
    gate.admit("new-1")
    gate.admit("new-2")
    with pytest.raises(WireError) as info:  # a flood of new identities stops at half the slots ...
        gate.admit("new-3")
    assert info.value.code == "busy"
    gate.admit("known-1")  # ... and a peer whose submissions were accepted still gets in
    gate.admit("known-2")
    with pytest.raises(WireError):
        gate.admit("known-3")
    assert gate.inflight == 4


# ---------------------------------------------------------------------------- real nodes
@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    made = []
    ident = tmp_path_factory.mktemp("ident")

    def node(**kw):
        # an identity directory each: nodes of one process would otherwise share one record key
        n = SwarmNode(RUN, identity_dir=ident / str(len(made)), initial_peers=made[0].visible_maddrs() if made else (),
                      **kw)
        made.append(n)
        return n

    try:
        server = node(swarm_key=KEY)
        g = torch.Generator().manual_seed(0)
        engine = build_engine([torch.randn(s, generator=g) for s in SHAPES], "lookahead", {"lr": 0.7, "momentum": 0.9},
                              "heloco", {}, names=NAMES)
        state = CommitState(engine)
        service = CoordinatorService(server, state, SHAPES, SubmissionLimits(submit_rate=0.0), lease_seconds=3600.0)
        service.replication.others_alive = 0  # a lone coordinator: commits need no standby here
        service.activate(1)
        states = StateServer("name: sec\n", b"{}", service, lambda: "coordinator", lambda: (None, 0),
                             server.records.owner)
        server.add_handler("state", states.serve_state)
        server.add_handler("genesis", states.serve_genesis)
        yield SimpleNamespace(server=server, state=state, service=service, g=g,
                              keyed=node(swarm_key=KEY), keyless=node(), other_key=node(swarm_key=SwarmKey(b"o" * 32)))
    finally:
        for n in reversed(made):
            n.shutdown()


def submission(n, seq, scale=0.01):
    meta, payload = encode_tensors([torch.randn(s, generator=n.g) * scale for s in SHAPES], "none")
    return {"run_id": RUN, "seq": seq, "base_version": n.state.version, "steps": 5, "term": 1, "tensors": meta,
            "names": NAMES}, payload


@pytest.mark.slow
def test_without_the_key_a_peer_cannot_submit_download_state_or_the_run_files(nodes):
    before = nodes.state.to_bytes()
    for caller in (nodes.keyless, nodes.other_key):
        for name, (header, payload) in (("submit", submission(nodes, 1)), ("state", ({"run_id": RUN}, b"")),
                                        ("genesis", ({"run_id": RUN}, b""))):
            if caller is nodes.keyless:
                reply, data = caller.call(nodes.server.peer_id, name, header, payload)
                assert (reply["status"], reply["reason"], data) == ("rejected", "unauthenticated", b"")
                assert "--swarm-key-file" in reply["message"]
            else:  # another key: refused, and the refusal does not verify under the caller's key either
                with pytest.raises(WireError) as info:
                    caller.call(nodes.server.peer_id, name, header, payload)
                assert info.value.code == "unauthenticated" and "swarm key" in info.value.message
    assert nodes.state.to_bytes() == before
    refused = nodes.server.rejection_summary()
    assert refused[nodes.keyless.peer_id] == {"unauthenticated": 3}
    assert refused[nodes.other_key.peer_id] == {"unauthenticated": 3}


@pytest.mark.slow
def test_with_the_key_a_peer_submits_and_downloads_the_state(nodes):
    version = nodes.state.version
    reply, data = nodes.keyed.call(nodes.server.peer_id, "submit", *submission(nodes, 10 + version))
    assert reply["status"] == "accepted" and reply["version"] == version + 1
    reply, data = nodes.keyed.call(nodes.server.peer_id, "state", {"run_id": RUN})
    params = unpack_params(data, [(s, torch.float32) for s in SHAPES])
    assert all(torch.equal(a, b) for a, b in zip(params, nodes.state.engine.params))


@pytest.mark.slow
def test_a_state_download_from_an_impostor_is_refused(nodes):
    fake = [torch.zeros(s) for s in SHAPES]

    async def impostor_state(header, payload, remote):
        from heloco_p2p.swarm.wire import pack_params

        meta, data = encode_tensors(fake, "none")
        return {"status": "ok", "version": 999, "term": 99}, pack_params(meta, data)

    nodes.keyless.add_handler("state", impostor_state)
    nodes.other_key.add_handler("state", impostor_state)
    for impostor in (nodes.keyless, nodes.other_key):
        with pytest.raises(WireError) as info:
            nodes.keyed.call(impostor.peer_id, "state", {"run_id": RUN})
        assert info.value.code == "unauthenticated"


@pytest.mark.slow
def test_a_payload_is_never_sent_to_a_server_that_cannot_prove_the_key(nodes):
    received = []

    async def greedy(_info, reader, writer):  # says "go ahead" to anything, with a made-up proof
        header, n, _ = await read_head(reader)
        writer.write(CONTINUE + bytes(32))
        await writer.drain()
        received.append(await reader.read(1 << 16))
        writer.close()

    nodes.keyless.run(nodes.keyless.p2p.add_binary_stream_handler(f"heloco.{RUN}.greedy", greedy))
    with pytest.raises(WireError) as info:
        nodes.keyed.call(nodes.keyless.peer_id, "greedy", {"x": 1}, b"secret pseudo-gradient" * 100, timeout=10)
    assert info.value.code == "unauthenticated" and "go-ahead" in info.value.message
    time.sleep(0.5)
    assert b"secret" not in b"".join(received)


def _raw(node, to, name, data):
    async def go():
        _, reader, writer = await node.p2p.call_binary_stream_handler(PeerID.from_base58(to), f"heloco.{RUN}.{name}")
        try:
            writer.write(data)
            await writer.drain()
            return await asyncio.wait_for(read_message(reader), 10)
        finally:
            writer.close()

    return node.run(go(), timeout=20)


@pytest.mark.slow
def test_a_replayed_request_is_refused(nodes):
    header, payload = submission(nodes, 1)
    header["base_version"] = -5  # a request refused for what it is, so the replay is what is measured
    signed, _ = KEY.sign_request(RUN, "submit", header, payload, sender=nodes.keyed.peer_id, receiver=nodes.server.peer_id)
    blob = json.dumps(signed).encode()
    frame = MAGIC + struct.pack(">I", len(blob)) + blob + struct.pack(">Q", len(payload)) + payload
    first, _ = _raw(nodes.keyed, nodes.server.peer_id, "submit", frame)
    second, _ = _raw(nodes.keyed, nodes.server.peer_id, "submit", frame)
    assert first["reason"] == "malformed" and second["reason"] == "replayed"


@pytest.mark.slow
def test_rate_limited_then_served_after_retry_after(nodes):
    gate = nodes.server.gates["submit"]
    gate.limits.rate, gate.limits.burst = 1.0, 2
    try:
        replies = [nodes.keyed.call(nodes.server.peer_id, "submit", *submission(nodes, 100 + i))[0] for i in range(3)]
        assert [r["status"] for r in replies] == ["accepted", "accepted", "rejected"]
        assert replies[2]["reason"] == "rate_limited" and 0 < replies[2]["retry_after"] <= 1.0
        time.sleep(replies[2]["retry_after"] + 0.05)
        again, _ = nodes.keyed.call(nodes.server.peer_id, "submit", *submission(nodes, 103))
        assert again["status"] == "accepted"
    finally:
        gate.limits.rate = 0.0


@pytest.mark.slow
def test_busy_when_the_queue_is_full_and_state_unchanged(nodes):
    gate, service = nodes.server.gates["submit"], nodes.service
    gate.max_inflight = 1
    held = asyncio.run_coroutine_threadsafe(service.lock.acquire(), nodes.server.loop)
    held.result(5)  # a commit in progress: the first submission waits for it
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        version = nodes.state.version
        first = pool.submit(nodes.keyed.call, nodes.server.peer_id, "submit", *submission(nodes, 200))
        deadline = time.time() + 10
        while gate.inflight < 1 and time.time() < deadline:
            time.sleep(0.05)
        before = nodes.state.to_bytes()
        reply, _ = nodes.keyless.call(nodes.server.peer_id, "submit", *submission(nodes, 1))
        assert reply["reason"] == "unauthenticated"  # authentication comes before the queue
        reply, _ = nodes.keyed.call(nodes.server.peer_id, "submit", *submission(nodes, 201))
        assert reply["status"] == "rejected" and reply["reason"] == "busy" and reply["retry_after"] > 0
        assert nodes.state.to_bytes() == before
    finally:
        nodes.server.loop.call_soon_threadsafe(service.lock.release)
        gate.max_inflight = 8
    assert first.result(30)[0]["status"] == "accepted" and nodes.state.version == version + 1
    pool.shutdown()


# ---------------------------------------------------------------------------- DHT records
def lease(peer_id, term):
    return LeaseRecord(peer_id=peer_id, term=term, version=3, digest="d", standbys=[], maddrs=[], renewed=time.time(),
                       commits=0, rejected=0, commits_per_minute=0.0, mean_staleness=0.0, branches={})


@pytest.mark.slow
def test_a_forged_lease_is_ignored_by_keyed_peers(nodes):
    keyed, stranger = nodes.keyed, nodes.keyless
    assert nodes.server.records.publish_lease(lease(nodes.server.peer_id, 5), ttl=30)
    # a peer without the key claims a later term in the coordinator's name (it could name a standby too)
    assert stranger.records.publish_lease(lease(nodes.server.peer_id, 6), ttl=30)
    assert [(c.peer_id, c.term) for c in keyed.records.lease_claims()] == [(nodes.server.peer_id, 5)]
    assert [c.term for c in stranger.records.lease_claims()] == [6, 5]  # an open reader would believe it
    # it copies the coordinator's authentic claim under its own subkey, and cannot write under the coordinator's
    found = stranger.dht.get(f"{RUN}_coordinator", latest=True)
    genuine = next(v.value for k, v in found.value.items() if k == nodes.server.records.owner)
    assert stranger.dht.store(f"{RUN}_coordinator", dict(genuine, term=9), expiration_time=get_dht_time() + 30,
                              subkey=stranger.records.owner)
    assert not stranger.dht.store(f"{RUN}_coordinator", dict(genuine, term=9), expiration_time=get_dht_time() + 30,
                                  subkey=nodes.server.records.owner)
    seen_by_keyed = keyed.records.lease_claims()
    assert [(c.peer_id, c.term) for c in seen_by_keyed] == [(nodes.server.peer_id, 5)]
    assert keyed.records.ignored >= 1
    assert max(c.term for c in stranger.records.lease_claims()) == 9  # an open reader sees them all


@pytest.mark.slow
def test_genesis_and_peer_records_of_a_keyless_peer_are_ignored(nodes):
    stranger = nodes.keyless
    stranger.records.publish_genesis(GenesisRecord(protocol_version=1, run_id=RUN, config_digest="fake",
                                                   tokenizer_digest="fake", max_versions=0, max_tokens=0, created=1.0,
                                                   founder=stranger.peer_id))
    stranger.records.publish_peer(PeerRecord(peer_id=stranger.peer_id, name="x", region="de", device="cpu",
                                             role="training", steps_per_second=1.0, inner_steps=1, version=0, rounds=0,
                                             tokens=0, loss=1.0, staleness=0, accepted=0, rejected=0, bytes_in=0,
                                             bytes_out=0, heartbeat=time.time(), maddrs=[]), ttl=30)
    assert nodes.keyed.records.genesis() is None
    assert stranger.peer_id not in {p.peer_id for p in nodes.keyed.records.peers()}
    assert nodes.keyless.records.genesis().config_digest == "fake"


# ---------------------------------------------------------------------------- a real keyed swarm
def _shut_down(sw, node):
    """Stop an in-test DHT node and the swarm; no peer may leave a process behind."""
    if node is not None:
        node.shutdown()
    sw.close()
    for name in sw.procs:
        assert not sw.group_alive(name), f"{name} left processes behind"


@pytest.mark.slow
def test_a_keyed_swarm_trains_rate_limits_without_losing_rounds_and_shuts_out_a_keyless_peer(tmp_path):
    from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

    key_file = tmp_path / "swarm.key"
    key = generate_key_file(key_file)
    # a peer may submit once every 5 s: faster rounds are told "rate_limited" and wait
    cfg = write_test_config(tmp_path / "cfg.yaml", submit_rate=0.2, submit_burst=1.0)
    sw = LocalSwarm(tmp_path, f"sec-{uuid.uuid4().hex[:6]}", swarm_key_file=key_file)
    observer = None
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        sw.wait_until(lambda: len(sw.events("b", "ack")) >= 4 and len(sw.events("a", "commit")) >= 8, 240,
                      "8 commits, 4 of them b's")
        sw.swarm_key_file = None
        intruder = sw.start("c", "en")  # no key
        assert intruder.wait(120) == 2
        log = (tmp_path / "c.log").read_text()
        assert "unauthenticated" in log and "--swarm-key-file" in log and "Traceback" not in log
        assert not sw.events("c", "ack") and not sw.group_alive("c")
        del sw.procs["c"]  # it exited as it should; the swarm's liveness checks are about a and b
        before = len(sw.events("a", "commit"))
        sw.wait_until(lambda: len(sw.events("a", "commit")) >= before + 3, 120, "commits after the intruder")
        assert not sw.all_events("rejected")  # rate-limited submissions were retried, not dropped
        b_acks = sw.events("b", "ack")
        assert all(x["attempts"] >= 1 for x in b_acks) and any(x["attempts"] > 1 for x in b_acks)
        observer = SwarmNode(sw.run_id, initial_peers=[sw.maddr], client_mode=True, swarm_key=key)
        deadline = time.time() + 30
        refused = {}
        while time.time() < deadline:
            claims = observer.records.lease_claims()
            refused = claims[0].rejections if claims else {}
            if any("unauthenticated" in r for r in refused.values()) and \
                    any("rate_limited" in r for r in refused.values()):
                break
            time.sleep(1.0)
        assert any("unauthenticated" in r for r in refused.values()), refused
        assert any("rate_limited" in r for r in refused.values()), refused
    finally:
        _shut_down(sw, observer)


@pytest.mark.slow
def test_a_forged_lease_claim_in_an_open_run_deposes_no_one(tmp_path):
    """Without a swarm key anyone may write lease records under their own DHT key. A claim of a
    later term naming the listed standby (the move that would depose the coordinator) is ignored:
    it is not signed by that standby's own key, which peers learn from the standby itself."""
    from heloco_p2p.tools.launcher import LocalSwarm, write_test_config

    cfg = write_test_config(tmp_path / "cfg.yaml", num_standbys=1)
    sw = LocalSwarm(tmp_path, f"open-{uuid.uuid4().hex[:6]}")
    forger = None
    try:
        sw.start("a", "de", "--config", str(cfg))
        sw.start("b", "fr")
        forger = SwarmNode(sw.run_id, initial_peers=[sw.maddr], client_mode=True)
        genuine = None

        def standby_listed():
            nonlocal genuine
            claims = forger.records.lease_claims()
            genuine = claims[0] if claims and claims[0].standbys else None
            return genuine is not None and len(sw.events("a", "commit")) >= 3

        sw.wait_until(standby_listed, 240, "3 commits and a standby in the lease")
        standby = genuine.standbys[0]
        forged = genuine.copy(update={"peer_id": standby, "term": genuine.term + 1, "standbys": [genuine.peer_id]})
        before = len(sw.events("a", "commit"))
        deadline = time.time() + 20
        while time.time() < deadline:  # kept live for 5 lease periods
            assert forger.records.publish_lease(forged.copy(update={"renewed": time.time()}), ttl=8)
            time.sleep(1.0)
        # an open reader does see it as the highest claim...
        assert forger.records.lease_claims()[0].peer_id == standby
        sw.wait_until(lambda: len(sw.events("a", "commit")) >= before + 3, 120, "commits after the forgery")
        # ...but nobody believed it: the coordinator kept its term and nobody took over
        assert {c["term"] for c in sw.events("a", "commit")} == {genuine.term}
        assert not sw.all_events("takeover")
        assert "signed by a key that is not that peer's" in (tmp_path / "a.log").read_text()
    finally:
        _shut_down(sw, forger)
