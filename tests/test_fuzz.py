"""Fuzz every RPC handler (submit, replicate, handover, state, genesis) over real streams.

A keyed coordinator (a real ``SwarmNode`` with ``CoordinatorService`` and the peer's ``state`` and
``genesis`` handlers) on 127.0.0.1 receives a seeded stream of bad inputs from a keyed client and a
keyless stranger: random bytes, truncated frames, bad JSON, wrong header types, wrong shapes,
dtypes and counts, NaN/Inf, huge declared sizes, replays, missing and bad MACs. For each input:
the reason it is refused with (in the reply when one can be read, and always in the server's
per-peer rejection counters), and the commit state (θ, optimizer state, version, ledger) bitwise
unchanged. At the end the server still commits a good submission and serves the state.

``HELOCO_FUZZ_REPORT=path.json`` writes the counts (inputs tried, rejected, crashes) there.
"""
import asyncio
import copy
import io
import json
import logging
import os
import random
import struct
import time
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from hivemind.p2p import PeerID

from heloco_p2p.outer import build_engine
from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
from heloco_p2p.roles.coordinator import CoordinatorService
from heloco_p2p.roles.joining import StateServer
from heloco_p2p.swarm.auth import SwarmKey
from heloco_p2p.swarm.node import SwarmNode
from heloco_p2p.swarm.wire import MAGIC, WireError, decode_tensors, encode_tensors, read_message, unpack_params

pytestmark = pytest.mark.slow  # real SwarmNodes (p2pd, DHT processes)

RUN = "fuzz"
SHAPES = [(8, 16), (16,), (4096, 2)]  # the last one is quantized by "8bit"
NAMES = ["w", "b", "big"]
TERM = 3
PRELOADED = 6  # commits before the fuzzing starts (a norm history, a ledger)
SECRET = bytes(range(32))


def rand_delta(g: torch.Generator, scale: float = 0.01) -> list[torch.Tensor]:
    return [torch.randn(s, generator=g) * scale for s in SHAPES]


def frame(head: bytes, payload: bytes = b"", declared: int | None = None) -> bytes:
    return MAGIC + struct.pack(">I", len(head)) + head + struct.pack(">Q", len(payload) if declared is None else declared) + payload


def jframe(header: dict, payload: bytes = b"", declared: int | None = None) -> bytes:
    return frame(json.dumps(header, separators=(",", ":")).encode(), payload, declared)


def snapshot(state: CommitState) -> dict:
    return copy.deepcopy(state.state_dict())


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path} changed"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{path}: keys changed"
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: length changed"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} -> {b!r}"


class ErrorLog(logging.Handler):
    """Server-side exceptions (a handler that raised instead of refusing)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(scope="module")
def rig():
    key = SwarmKey(SECRET)
    server = SwarmNode(RUN, swarm_key=key, header_timeout=3.0, max_request_bytes=1 << 16)
    client = stranger = None
    try:
        client = SwarmNode(RUN, initial_peers=server.visible_maddrs(), swarm_key=key)
        stranger = SwarmNode(RUN, initial_peers=server.visible_maddrs())
        g = torch.Generator().manual_seed(0)
        theta0 = [torch.randn(s, generator=g) * 0.1 for s in SHAPES]
        engine = build_engine(theta0, "lookahead", {"lr": 0.7, "momentum": 0.9}, "heloco", {}, names=NAMES)
        state = CommitState(engine)
        for seq in range(PRELOADED):  # history for the norm bound, a ledger entry for the client
            d = rand_delta(g)
            state.apply(d, state.version, client.peer_id, seq, 10, float(torch.cat([t.flatten() for t in d]).norm()))
        limits = SubmissionLimits(max_staleness=4, submit_rate=0.0, max_pending_submits=64)
        service = CoordinatorService(server, state, SHAPES, limits, lease_seconds=3600.0)
        service.replication.others_alive = 0  # a lone coordinator: commits need no standby here
        service.activate(TERM)
        states = StateServer("name: fuzz\n", b'{"model": {}}', service, lambda: "coordinator",
                             lambda: (None, state.version), server.records.owner)
        server.add_handler("state", states.serve_state)
        server.add_handler("genesis", states.serve_genesis)
        errors = ErrorLog()
        logging.getLogger("heloco_p2p").addHandler(errors)
        yield SimpleNamespace(key=key, server=server, client=client, stranger=stranger, state=state,
                              service=service, g=g, errors=errors)
        logging.getLogger("heloco_p2p").removeHandler(errors)
    finally:
        for node in (stranger, client, server):
            if node is not None:
                node.shutdown()


class Fuzzer:
    """Sends inputs and checks each one's outcome; keeps the counts."""

    def __init__(self, rig):
        self.rig = rig
        self.tried = self.rejected = self.refused_other = self.served = 0
        self.reasons: Counter = Counter()
        self.failures: list[str] = []

    # -- building requests ---------------------------------------------------------------
    def sign(self, name: str, header: dict, payload: bytes = b"", ts: float | None = None, declared: int | None = None,
             key: SwarmKey | None = None) -> dict:
        """``header`` with an ``auth`` object as the client would send it (optionally lying about time or length)."""
        key = key or self.rig.key
        signed, _ = key.sign_request(RUN, name, header, payload, sender=self.rig.client.peer_id,
                                     receiver=self.rig.server.peer_id)
        if ts is not None or declared is not None:
            auth = signed["auth"]
            auth["ts"] = auth["ts"] if ts is None else ts
            auth["len"] = auth["len"] if declared is None else declared
            auth["mac"] = key._message_mac("request", RUN, name, self.rig.client.peer_id, self.rig.server.peer_id, "",
                                           signed, auth)
        return signed

    def submit_header(self, delta=None, compression="none", **fields) -> tuple[dict, bytes]:
        st = self.rig.state
        meta, payload = encode_tensors(delta if delta is not None else rand_delta(self.rig.g), compression)
        header = {"run_id": RUN, "seq": 1000 + self.tried, "base_version": st.version, "steps": 10, "term": TERM,
                  "tensors": meta, "names": NAMES, "stats": {"loss": 3.0, "tokens": 100, "seconds": 1.0}}
        header.update(fields)
        return {k: v for k, v in header.items() if v is not DROP}, payload

    # -- sending -------------------------------------------------------------------------
    async def _send(self, node: SwarmNode, name: str, data: bytes, read: bool):
        _, reader, writer = await node.p2p.call_binary_stream_handler(
            PeerID.from_base58(self.rig.server.peer_id), f"heloco.{RUN}.{name}")
        try:
            writer.write(data)
            await writer.drain()
            if not read:
                return None
            return await asyncio.wait_for(read_message(reader, max_payload_bytes=1 << 30), 30)
        finally:
            writer.close()

    def send(self, name: str, data: bytes, expect: str, *, read: bool = True, stranger: bool = False,
             status: str = "rejected", signed_nonce: str | None = None, what: str = ""):
        """One input; ``expect`` is the reason (status "rejected") or the status it must get.
        ``read=False`` closes the stream after sending (a truncated stream): the reason is then read
        from the server's rejection counters only."""
        rig = self.rig
        node = rig.stranger if stranger else rig.client
        before_state = snapshot(rig.state)
        before_counts = Counter(rig.server.rejections.get(node.peer_id, Counter()))
        self.tried += 1
        reply = None
        try:
            reply = node.run(self._send(node, name, data, read), timeout=45)
        except Exception as exc:  # the client side may see the stream go away: the server's view decides
            if read:
                self.failures.append(f"{what or expect}: no reply ({type(exc).__name__}: {exc})")
        deadline = time.time() + 20
        while True:
            now_counts = Counter(rig.server.rejections.get(node.peer_id, Counter()))
            delta = now_counts - before_counts
            if delta or status != "rejected" or time.time() > deadline:
                break
            time.sleep(0.02)
        ok = True
        if status == "rejected":
            if dict(delta) != {expect: 1}:
                ok = False
                self.failures.append(f"{what or expect}: server counted {dict(delta)}, reply {reply and reply[0]}")
            if reply is not None and reply[0].get("reason") != expect:
                ok = False
                self.failures.append(f"{what or expect}: reply {reply[0]}")
        else:
            got = reply[0].get("status") if reply else None
            if got != status or delta:
                ok = False
                self.failures.append(f"{what or status}: reply {reply and reply[0]}, counted {dict(delta)}")
        if reply is not None and reply[0].get("status") == "error":
            self.failures.append(f"{what or expect}: internal error {reply[0]}")
        if signed_nonce is not None and reply is not None:  # the reply to an authentic request is authentic
            try:
                rig.key.check_reply(RUN, name, signed_nonce, reply[0], reply[1], sender=rig.server.peer_id,
                                    receiver=node.peer_id)
            except Exception as exc:
                self.failures.append(f"{what or expect}: reply not authentic ({exc})")
        try:
            assert_same(before_state, snapshot(rig.state))
        except AssertionError as exc:
            self.failures.append(f"{what or expect}: {exc}")
            ok = False
        if ok:
            self.reasons[expect] += 1
            if status == "rejected":
                self.rejected += 1
            elif expect == "served":
                self.served += 1
            else:  # fenced, refused, out_of_sync, not_coordinator, an applied seq answered as a duplicate
                self.refused_other += 1
        return reply

    def send_signed(self, name: str, header: dict, payload: bytes, expect: str, **kw):
        signed = self.sign(name, header, payload)
        return self.send(name, jframe(signed, payload), expect, signed_nonce=signed["auth"]["nonce"], **kw)


DROP = object()  # a header field left out


def test_every_handler_refuses_bad_input_and_state_stays_bitwise_unchanged(rig):
    rng = random.Random(1234)
    fz = Fuzzer(rig)
    handlers = ["submit", "replicate", "handover", "state", "genesis"]

    # ---- 1. bytes that are not a frame, and frames cut short, to every handler
    for name in handlers:
        for _ in range(12):
            n = rng.choice([0, 1, 2, 3]) if rng.random() < 0.25 else rng.randint(4, 300)
            data = bytes(rng.getrandbits(8) for _ in range(n))
            if data[:4] == MAGIC[:len(data[:4])]:
                data = b"X" + data[1:] if data else data
            expect = "closed" if n == 0 else "truncated" if n < 4 else "bad_magic"
            fz.send(name, data, expect, read=n >= 4, what=f"{name}: {n} random bytes")
        header, payload = fz.submit_header()
        for _ in range(10):
            whole = jframe(fz.sign(name, header, payload), payload)  # a fresh nonce: a cut after the header is no replay
            cut = rng.randint(1, len(whole) - 1)
            fz.send(name, whole[:cut], "truncated", read=False, what=f"{name}: frame cut at {cut}/{len(whole)}")
        # a stream that stalls mid-header is answered after the header timeout
        fz.send(name, jframe(fz.sign(name, header, payload), payload)[:10], "truncated", what=f"{name}: stalled header")

    # ---- 2. headers that are not JSON objects, and lengths beyond the limits
    bad_heads = [b"not json", b"[1, 2]", b'"s"', b"null", b"3", b'{"x": NaN}', b"\xff\xfe{}", b"", b"[" * 5000,
                 b'{"a": Infinity}', b'{"unterminated": ']
    for name in handlers:
        for head in bad_heads:
            fz.send(name, frame(head), "malformed", what=f"{name}: header {head[:20]!r}")
        fz.send(name, MAGIC + struct.pack(">I", (1 << 20) + 1), "too_large", read=False, what=f"{name}: 1 MiB+ header")
        header, _ = fz.submit_header()
        huge = 1 << 40
        fz.send(name, jframe(fz.sign(name, header, b"", declared=huge), b"", declared=huge), "too_large",
                read=False, what=f"{name}: declared 1 TiB payload")
        fz.send(name, jframe(fz.sign(name, header, b"abc"), b"abc", declared=2), "unauthenticated", read=False,
                what=f"{name}: frame length differs from the MAC's")

    # ---- 3. authentication and replays, every handler
    for name in handlers:
        header, payload = fz.submit_header()
        fz.send(name, jframe(header, payload), "unauthenticated", what=f"{name}: no MAC")
        fz.send(name, jframe(header, payload), "unauthenticated", stranger=True, what=f"{name}: keyless peer")
        signed = fz.sign(name, header, payload)
        bad_mac = dict(signed, auth=dict(signed["auth"], mac=("0" if signed["auth"]["mac"][0] != "0" else "1")
                                         + signed["auth"]["mac"][1:]))
        fz.send(name, jframe(bad_mac, payload), "unauthenticated", what=f"{name}: MAC with one digit changed")
        other = fz.sign(name, header, payload, key=SwarmKey(b"another swarm's key, 32 bytes..."))
        fz.send(name, jframe(other, payload), "unauthenticated", what=f"{name}: another swarm's key")
        fz.send(name, jframe(dict(fz.sign(name, header, payload), seq=7), payload), "unauthenticated",
                what=f"{name}: header changed after signing")
        if payload:
            fz.send(name, jframe(fz.sign(name, header, payload), payload[:-1] + b"\x00"), "unauthenticated",
                    what=f"{name}: payload changed after signing")
        fz.send(name, jframe(fz.sign(name, header, payload, ts=time.time() - 3600), payload), "replayed",
                what=f"{name}: an hour old")
        fz.send(name, jframe(fz.sign(name, header, payload, ts=time.time() + 3600), payload), "replayed",
                what=f"{name}: an hour ahead")
        if name == "submit":  # the same bytes twice: refused for what they are, then as a replay
            nan = rand_delta(rig.g)
            nan[0][0, 0] = float("nan")
            h, p = fz.submit_header(nan)
            once = jframe(fz.sign(name, h, p), p)
            fz.send(name, once, "not_finite", what="submit: NaN, first time")
            fz.send(name, once, "replayed", what="submit: NaN, replayed")
        elif name in ("replicate", "handover"):  # no kind / no term: malformed, then a replay
            signed = fz.sign(name, {"run_id": RUN, "kind": 5}, b"")
            once = jframe(signed)
            fz.send(name, once, "malformed", signed_nonce=signed["auth"]["nonce"], what=f"{name}: first time")
            fz.send(name, once, "replayed", what=f"{name}: replayed")
        else:  # a good request, served once, refused when replayed
            signed = fz.sign(name, {"run_id": RUN}, b"")
            once = jframe(signed)
            fz.send(name, once, "served", status="ok" if name == "state" else None, signed_nonce=signed["auth"]["nonce"],
                    what=f"{name}: first time")
            fz.send(name, once, "replayed", what=f"{name}: replayed")

    # ---- 4. submissions: header types, layout, values
    st = rig.state
    for field, values in {
        "seq": ["1", 1.5, True, -1, 2 ** 60, None, DROP],
        "base_version": ["0", -1, 1.0, [], DROP],
        "steps": [10 ** 9, True, "ten", -5],
        "term": [-3, "3", 2.5],
        "tensors": [{}, "x", 5, DROP],
        "stats": [[], "s", 3],
        "names": ["w,b,big", [1, 2, 3], {"w": 1}],
        "held": ["grid", 8, ["wrap8"], True, None],  # what the sender's start point is (wrap8 replies)
    }.items():
        for value in values:
            header, payload = fz.submit_header(**{field: value})
            fz.send_signed("submit", header, payload, "malformed", what=f"submit: {field}={value!r}")
    for run_id in ["other-run", "", 5, DROP]:
        header, payload = fz.submit_header(run_id=run_id)
        fz.send_signed("submit", header, payload, "unknown_run", what=f"submit: run_id={run_id!r}")
    g = rig.g
    wrong_layouts = {
        "transposed": [torch.zeros(16, 8), torch.zeros(16), torch.zeros(4096, 2)],
        "missing tensor": [torch.zeros(8, 16), torch.zeros(16)],
        "extra tensor": [torch.zeros(8, 16), torch.zeros(16), torch.zeros(4096, 2), torch.zeros(1)],
        "flattened": [torch.zeros(128), torch.zeros(16), torch.zeros(4096, 2)],
    }
    for what, tensors in wrong_layouts.items():
        header, payload = fz.submit_header(tensors)
        fz.send_signed("submit", header, payload, "layout_mismatch", what=f"submit: {what}")
    for names in (["w", "b"], ["w", "b", "big", "x"], ["b", "w", "big"]):
        header, payload = fz.submit_header(names=names)
        fz.send_signed("submit", header, payload, "layout_mismatch", what=f"submit: names {names}")
    for dtype, code in (("float16", "layout_mismatch"), ("float64", "layout_mismatch"), ("int8", "layout_mismatch"),
                        ("complex", "malformed"), (3, "malformed"), (None, "malformed")):
        header, payload = fz.submit_header()
        header["tensors"][1] = dict(header["tensors"][1], dtype=dtype)
        fz.send_signed("submit", header, payload, code, what=f"submit: dtype {dtype!r}")
    for compression in ("none", "fp16", "8bit", "topk"):  # topk: t0 and t2 sparse, t1 (1-D) fp32
        header, payload = fz.submit_header(compression=compression)
        meta = header["tensors"]
        for i in range(3):
            cases = {
                "nbytes+1": (dict(meta[i], nbytes=meta[i]["nbytes"] + 1), payload, "malformed"),
                "nbytes -1": (dict(meta[i], nbytes=-1), payload, "malformed"),
                "shape with a bool": (dict(meta[i], shape=[True] * len(SHAPES[i])), payload, "malformed"),
                "compression zstd": (dict(meta[i], compression="zstd"), payload, "malformed"),
            }
            for what, (entry, body, code) in cases.items():
                bad = list(meta)
                bad[i] = entry
                fz.send_signed("submit", dict(header, tensors=bad), body, code, what=f"submit {compression}: t{i} {what}")
            # corrupt the tensor's own bytes: a protobuf that does not parse or does not fit its metadata
            start = sum(m["nbytes"] for m in meta[:i])
            for _ in range(3):
                blob = bytearray(payload[start:start + meta[i]["nbytes"]])
                k = rng.randrange(len(blob))
                blob[k:k + 8] = bytes(rng.getrandbits(8) for _ in range(len(blob[k:k + 8])))
                if bytes(blob) == payload[start:start + meta[i]["nbytes"]]:
                    continue
                body = payload[:start] + bytes(blob) + payload[start + meta[i]["nbytes"]:]
                # random damage lands in a protobuf field (bad_tensor) or in the values (not_finite,
                # a norm beyond the bound, or a plausible update, which is no bad input): decode to know
                try:
                    values = decode_tensors(meta, body, [(s, torch.float32) for s in SHAPES])
                except WireError as exc:
                    code = exc.code
                else:
                    try:
                        st.check(values, st.version, rig.service.limits)
                        continue  # still a plausible update: not a bad input
                    except Exception as exc:
                        code = exc.code
                fz.send_signed("submit", header, body, code, what=f"submit {compression}: t{i} byte {k} damaged")
    for compression in ("none", "fp16"):
        for bad_value in (float("nan"), float("inf"), float("-inf")):
            for i in range(3):
                d = rand_delta(g)
                d[i].view(-1)[rng.randrange(d[i].numel())] = bad_value
                header, payload = fz.submit_header(d, compression=compression)
                # fp16 clamps ±inf to ±65504 on the sender's side: finite, but far beyond the norm bound
                code = "norm_too_large" if compression == "fp16" and bad_value != bad_value * 0 and \
                    abs(bad_value) == float("inf") else "not_finite"
                fz.send_signed("submit", header, payload, code, what=f"submit {compression}: {bad_value} in t{i}")
    for scale in (1.0, 1e3, 1e30):
        header, payload = fz.submit_header(rand_delta(g, scale))
        fz.send_signed("submit", header, payload, "norm_too_large", what=f"submit: ‖Δ‖ × {scale:g}")
    for base, code in ((st.version - 5, "too_stale"), (0, "too_stale"), (st.version + 1, "bad_version"),
                       (10 ** 12, "bad_version")):
        header, payload = fz.submit_header(base_version=base)
        fz.send_signed("submit", header, payload, code, what=f"submit: base version {base}")
    header, payload = fz.submit_header(term=TERM + 1)
    fz.send_signed("submit", header, payload, "not_coordinator", status="not_coordinator", what="submit: a later term")
    for seq in (PRELOADED - 1, 0):  # already applied: answered as a duplicate, applied no second time
        header, payload = fz.submit_header(seq=seq)
        fz.send_signed("submit", header, payload, "accepted", status="accepted", what=f"submit: applied seq {seq}")
    big = 1 + max(64 << 10, rig.server.gates["submit"].limits.max_payload_bytes)
    header, _ = fz.submit_header()
    fz.send("submit", jframe(fz.sign("submit", header, b"", declared=big), b"", declared=big), "too_large",
            read=False, what="submit: payload one byte over its layout's size")

    # ---- 5. replicate and handover, as a standby of term TERM
    svc = rig.service
    svc.term.active = False
    handed = []
    svc.standby.on_handover = handed.append
    try:
        svc.standby.term_sources[TERM] = rig.client.peer_id
        svc.term.believed = (rig.client.peer_id, TERM)  # the lease this standby reads names the client in TERM
        good_meta, good_payload = encode_tensors(rand_delta(g), "none")
        commit = {"kind": "commit", "term": TERM, "version_before": st.version, "base_version": st.version,
                  "peer": "p", "seq": 1, "steps": 3, "tensors": good_meta, "digest": "00"}
        for field, values in {"kind": ["full ", None, 1, DROP], "term": ["3", -1, None, DROP],
                              "version_before": [1.0, "6", DROP], "base_version": [True, DROP], "seq": [-1, "x"],
                              "steps": [None, 1.5], "peer": [5, None, "x" * 1000], "digest": [None, 7],
                              "tensors": [{}, None, DROP], "worker": [5, ["r"]], "seconds": [-1.0, "1", True, 0]}.items():
            for value in values:
                h = {k: v for k, v in dict(commit, **{field: value}).items() if v is not DROP}
                fz.send_signed("replicate", h, good_payload, "malformed", what=f"replicate: {field}={value!r}")
        fz.send_signed("replicate", dict(commit, term=TERM - 1), good_payload, "fenced", status="fenced",
                       what="replicate: an older term")
        fz.send_signed("replicate", dict(commit, version_before=st.version - 1), good_payload, "out_of_sync",
                       status="out_of_sync", what="replicate: a gap")
        fz.send_signed("replicate", dict(commit, base_version=st.version + 1), good_payload, "bad_version",
                       what="replicate: base version ahead")
        nan = rand_delta(g)
        nan[2][5, 1] = float("inf")
        nan_meta, nan_payload = encode_tensors(nan, "none")
        fz.send_signed("replicate", dict(commit, tensors=nan_meta), nan_payload, "not_finite", what="replicate: Inf")
        wrong_meta, wrong_payload = encode_tensors(wrong_layouts["transposed"], "none")
        fz.send_signed("replicate", dict(commit, tensors=wrong_meta), wrong_payload, "layout_mismatch",
                       what="replicate: transposed")
        fz.send_signed("replicate", commit, b"\xff" * 8 + good_payload[8:], "bad_tensor", what="replicate: bad bytes")
        # full states that must not load: garbage, a pickle that would run code, another layout
        marker = f"/tmp/heloco-fuzz-pwned-{os.getpid()}"
        full = {"kind": "full", "term": TERM, "version": 0}
        other = CommitState(build_engine([torch.zeros(3)], "lookahead", {"lr": 0.7, "momentum": 0.9}, "heloco", {}))
        buf = io.BytesIO()
        torch.save({"x": Pwn(marker)}, buf)
        for what, body in {"random bytes": bytes(rng.getrandbits(8) for _ in range(2000)), "empty": b"",
                           "a pickle that runs code": buf.getvalue(), "another layout": other.to_bytes(),
                           "a list": _saved([1, 2, 3]), "missing fields": _saved({"engine": {}, "term": 1}),
                           "wrong ledger types": _saved({**st.state_dict(), "applied": {"p": "x"}}),
                           "NaN norms": _saved({**st.state_dict(), "recent_norms": [float("nan")]})}.items():
            fz.send_signed("replicate", full, body, "malformed", what=f"replicate full: {what}")
        assert not os.path.exists(marker), "a full state ran code from its sender"
        # a participant that does not hold the lease: no state, no term, no role on its say-so
        svc.term.believed = ("12D3KooWSomeoneElseHoldsTheLease", TERM)
        fz.send_signed("replicate", full, st.to_bytes(), "refused", status="refused",
                       what="replicate full: not the lease holder")
        fz.send_signed("replicate", dict(commit, term=TERM + 1), good_payload, "refused", status="refused",
                       what="replicate: a higher term from a non-holder")
        fz.send_signed("handover", {"term": TERM, "version": st.version, "standbys": []}, b"", "refused",
                       status="refused", what="handover: not the lease holder")
        assert svc.term.highest_seen == TERM, "a term in a message was followed"
        svc.term.believed = (rig.client.peer_id, TERM)
        svc.standby.term_sources[TERM] = "12D3KooWSomeoneElseCoordinatesThisTerm"
        fz.send_signed("replicate", commit, good_payload, "fenced", status="fenced", what="replicate: not the term's source")
        fz.send_signed("replicate", full, st.to_bytes(), "fenced", status="fenced", what="replicate full: not the source")
        ho = {"term": TERM, "version": st.version, "standbys": []}
        fz.send_signed("handover", ho, b"", "refused", status="refused", what="handover: not the term's coordinator")
        svc.standby.term_sources[TERM] = rig.client.peer_id
        for field, values in {"term": ["3", None, DROP, -1], "version": [1.5, DROP],
                              "standbys": ["abc", [1], ["p"] * 65]}.items():
            for value in values:
                h = {k: v for k, v in dict(ho, **{field: value}).items() if v is not DROP}
                fz.send_signed("handover", h, b"", "malformed", what=f"handover: {field}={value!r}")
        fz.send_signed("handover", dict(ho, term=TERM - 1), b"", "refused", status="refused", what="handover: old term")
        fz.send_signed("handover", dict(ho, version=st.version + 1), b"", "refused", status="refused",
                       what="handover: another version")
        big = (1 << 30) + 1
        fz.send("replicate", jframe(fz.sign("replicate", full, b"", declared=big), b"", declared=big), "too_large",
                read=False, what="replicate: 1 GiB + 1 declared")
        assert handed == [], "a handover was accepted"
    finally:
        svc.standby.term_sources.pop(TERM, None)
        svc.term.active = True
        svc.standby.on_handover = None

    # ---- 6. state and genesis: their payload limit
    for name in ("state", "genesis"):
        big = (64 << 10) + 1
        fz.send(name, jframe(fz.sign(name, {"run_id": RUN}, b"", declared=big), b"", declared=big), "too_large",
                read=False, what=f"{name}: a payload over the request limit")

    report = {"inputs": fz.tried, "rejected": fz.rejected, "refused_otherwise": fz.refused_other, "served": fz.served,
              "crashes": len(rig.errors.records) + sum("internal error" in f for f in fz.failures),
              "failures": len(fz.failures), "by_reason": dict(sorted(fz.reasons.items()))}
    print("\nfuzz:", json.dumps(report))
    if os.environ.get("HELOCO_FUZZ_REPORT"):
        with open(os.environ["HELOCO_FUZZ_REPORT"], "w") as f:
            json.dump(report, f, indent=1)
    assert not fz.failures, "\n".join(fz.failures[:30])
    assert report["crashes"] == 0, [r.getMessage() for r in rig.errors.records]
    assert fz.tried >= 300 and fz.rejected + fz.refused_other + fz.served == fz.tried

    # ---- the server still works: a good submission is committed, the state is served
    version = st.version
    header, payload = fz.submit_header(seq=10 ** 9)
    reply, data = rig.client.call(rig.server.peer_id, "submit", header, payload, timeout=30)
    assert reply["status"] == "accepted" and reply["version"] == version + 1 and st.version == version + 1
    reply, data = rig.client.call(rig.server.peer_id, "state", {"run_id": RUN}, timeout=30)
    params = unpack_params(data, [(s, torch.float32) for s in SHAPES])
    assert reply["version"] == version + 1 and all(torch.equal(a, b) for a, b in zip(params, st.engine.params))


class Pwn:
    """A pickle that would create a file when loaded with weights_only=False."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
