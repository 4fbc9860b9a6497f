"""The topk uplink: the sparse low-bit codec (swarm/sparse.py) on the wire, error feedback
(swarm/uplink.py, roles/submit.py), malformed payloads, config validation, the simulator option."""
import math
import struct
import threading
from types import SimpleNamespace

import pytest
import torch

from heloco_p2p.config import ConfigError, load_config
from heloco_p2p.roles.submit import SubmitClient
from heloco_p2p.swarm.sparse import TopkCodec, bits_per_param, blob_bytes, decode_topk, encode_topk
from heloco_p2p.swarm.uplink import Uplink
from heloco_p2p.swarm.wire import WireError, decode_tensors, encode_tensors, encode_tensors_sent, pack_params


def layout(tensors):
    return [(tuple(t.shape), torch.float32) for t in tensors]


# -- the codec --------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 8])
@pytest.mark.parametrize("shape", [(64, 128), (37, 29)])  # whole chunks; a short last chunk (1073 = 8·128 + 49)
def test_round_trip_keeps_each_chunks_top_k_within_the_quantisation_bound(bits, shape):
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(shape, generator=g)
    codec = TopkCodec(density=0.05, bits=bits, chunk=128)
    blob, sent = encode_topk(x, codec)
    dec = decode_topk(blob, shape)
    assert torch.equal(dec, sent)  # the sender knows exactly what the receiver gets
    flat, d = x.flatten(), dec.flatten()
    k, levels = codec.k, 1 << (bits - 1)
    assert k == 6
    n = flat.numel()
    kept_total = 0
    for start in range(0, n, 128):
        chunk, got = flat[start:start + 128], d[start:start + 128]
        kk = min(k, chunk.numel())
        top = set(chunk.abs().topk(kk).indices.tolist())
        kept = set(torch.nonzero(got).flatten().tolist())
        assert kept == top  # exactly the kk largest magnitudes
        kept_total += len(kept)
        s = chunk.abs().max().item()
        for i in kept:
            v, r = chunk[i].item(), got[i].item()
            assert math.copysign(1.0, r) == math.copysign(1.0, v)
            bound = (s / (2 * levels) if abs(v) >= s / (2 * levels) else s / levels) + s * 2 ** -8
            assert abs(r - v) <= bound + 1e-7
        i_max = chunk.abs().argmax().item()
        assert abs(got[i_max].item() - chunk[i_max].item()) <= s * 2 ** -8  # the scale: the max is kept exact up to bf16
    assert kept_total == (n // 128) * k + min(k, n % 128)
    # it never adds energy: what it drops and rounds is smaller than the tensor
    assert (x - dec).norm() < x.norm()


def test_higher_bits_and_density_lower_the_error():
    x = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def err(density, bits):
        _, sent = encode_topk(x, TopkCodec(density, bits, 128))
        return ((x - sent).norm() / x.norm()).item()

    assert err(1.0, 8) < 0.01  # dense 8-bit: near-exact
    assert err(0.2, 2) < err(0.03, 2) < 1.0
    assert err(0.2, 8) < err(0.2, 2)


def test_bits_per_param_is_the_measured_payload():
    codec = TopkCodec(density=0.03, bits=2, chunk=128)
    tensors = [torch.randn(128, 344), torch.randn(344, 128), torch.randn(128), torch.randn(4096, 128)]
    meta, payload = encode_tensors(tensors, "topk", codec)
    assert [m["compression"] for m in meta] == ["topk", "topk", "none", "topk"]  # a 1-D tensor goes as fp32
    # (128, 344): 344 chunks, k = 4 → 1376 entries of 7 + 2 bits = 1548 bytes, + 14 header + 344 × 2 scales
    assert codec.k == 4 and meta[0]["nbytes"] == 14 + 688 + 1548 == 2250 == blob_bytes(44032, 2, 7, 4)
    topk_bytes = sum(m["nbytes"] for m in meta if m["compression"] == "topk")
    assert topk_bytes == sum(codec.blob_bytes(t.numel()) for t in tensors if t.dim() == 2)
    assert bits_per_param([44032], codec) == pytest.approx(8 * 2250 / 44032) == pytest.approx(0.408794, abs=1e-6)
    # the whole layout: blob bits over all parameters, with the 1-D tensor at 32 bits (+ its protobuf fields)
    n = sum(t.numel() for t in tensors)
    measured = 8 * len(payload) / n
    predicted = bits_per_param([t.numel() for t in tensors if t.dim() == 2], codec, dense=[128])
    assert predicted < measured < predicted + 8 * 64 / n  # only the fp32 tensor's protobuf framing is extra
    assert measured < 0.42
    # density k/C·(log2 C + bits) + 16/C: 4/128·9 + 16/128 = 0.40625 bits/param, plus the header
    assert bits_per_param([1 << 20], codec) == pytest.approx(0.40625 + 8 * 14 / (1 << 20))


def test_encode_tensors_sent_is_what_decode_tensors_returns():
    tensors = [torch.randn(64, 64), torch.randn(64)]
    for compression in ("none", "fp16", "topk"):
        meta, payload, sent = encode_tensors_sent(tensors, compression, TopkCodec(0.1, 2, 64))
        got = decode_tensors(meta, payload, layout(tensors))
        assert all(torch.equal(a, b) for a, b in zip(sent, got)), compression


# -- error feedback ---------------------------------------------------------------------------------
def test_error_feedback_makes_the_sum_of_sent_deltas_converge_to_the_sum_of_true_deltas():
    g = torch.Generator().manual_seed(1)
    drift = [torch.randn(64, 128, generator=g), torch.randn(32, generator=g)]
    codec = TopkCodec(density=0.02, bits=2, chunk=128)
    with_ef, without = Uplink("topk", codec), Uplink("topk", codec, error_feedback=False)
    true_sum = [torch.zeros_like(t) for t in drift]
    sums = {id(with_ef): [torch.zeros_like(t) for t in drift], id(without): [torch.zeros_like(t) for t in drift]}
    rel = []
    for t in range(200):
        delta = [d + 0.5 * torch.randn(d.shape, generator=g) for d in drift]
        for i, d in enumerate(delta):
            true_sum[i] += d
        for up in (with_ef, without):
            enc = up.prepare(delta)
            up.settle(True)
            for i, s in enumerate(decode_tensors(enc.meta, enc.payload, layout(delta))):
                sums[id(up)][i] += s
        if t in (9, 49, 199):
            err = torch.cat([(a - b).flatten() for a, b in zip(sums[id(with_ef)], true_sum)])
            rel.append(err.norm().item() / torch.cat([b.flatten() for b in true_sum]).norm().item())
            # nothing is lost: Σ sent + e = Σ Δ exactly (up to float rounding)
            assert err.norm().item() == pytest.approx(with_ef.residual_norm(), rel=1e-3)
    assert rel[2] < rel[1] < rel[0]
    # the residual stays bounded while the sums grow, so the relative error falls like 1/T
    assert rel == pytest.approx([0.691, 0.326, 0.091], abs=0.01)
    assert rel[2] < rel[1] / 3
    err_no = torch.cat([(a - b).flatten() for a, b in zip(sums[id(without)], true_sum)])
    assert err_no.norm().item() / torch.cat([b.flatten() for b in true_sum]).norm().item() > 0.5
    assert without.residual is None


def test_residual_is_kept_only_for_an_accepted_submission():
    up = Uplink("topk", TopkCodec(0.05, 2, 128))
    delta = [torch.randn(16, 128)]
    enc = up.prepare(delta)
    assert up.residual is None  # not before the outcome
    up.settle(True)
    assert torch.allclose(up.residual[0], delta[0] - enc.sent[0])
    # the next Δ carries it
    enc2 = up.prepare(delta)
    assert torch.allclose(up._pending[0] + enc2.sent[0], delta[0] + up.residual[0])
    up.settle(False)  # refused or given up: cleared
    assert up.residual is None and up.residual_norm() == 0.0
    dense = Uplink("none")
    dense.prepare(delta)
    dense.settle(True)
    assert dense.residual is None and not dense.error_feedback


def test_non_finite_delta_does_not_poison_the_residual():
    up = Uplink("topk", TopkCodec(0.05, 2, 128))
    bad = torch.randn(4, 128)
    bad[0, 0] = float("nan")
    up.prepare([bad])
    up.settle(True)
    assert up.residual is None


def test_submit_client_settles_the_residual_from_the_outcome(monkeypatch):
    cfg = load_config("configs/tiny.yaml", overrides={"swarm.compression": "topk", "swarm.topk_density": 0.05})
    params = [torch.zeros(8, 128)]
    stats = SimpleNamespace(loss=1.0, steps=1, tokens=10, seconds=1.0)
    node = SimpleNamespace(run_id="r", peer_id="me")
    election = SimpleNamespace(refresh=lambda: SimpleNamespace(peer_id="other", term=1), lease=None)
    service = SimpleNamespace(term=SimpleNamespace(highest_seen=1))
    client = SubmitClient(node, election, service, cfg.swarm, "en", ["w"], threading.Event(), lambda: True)
    assert client.uplink.compression == "topk" and client.uplink.codec.k == 6
    sent_payloads = []
    replies = iter([{"status": "accepted", "version": 1, "term": 1},
                    {"status": "rejected", "reason": "too_stale", "term": 1}])

    def send(lease, header, payload):
        sent_payloads.append((header["tensors"], payload))
        return next(replies), pack_params(*encode_tensors(params, "none"))

    monkeypatch.setattr(client, "send", send)
    delta = [torch.randn(8, 128)]
    out = client.submit(0, delta, 0, stats, layout(params))
    assert out.status == "accepted" and client.uplink.residual is not None
    got = decode_tensors(sent_payloads[0][0], sent_payloads[0][1], layout(params))
    assert torch.allclose(client.uplink.residual[0], delta[0] - got[0])
    out = client.submit(1, delta, 1, stats, layout(params))
    assert out.status == "rejected" and client.uplink.residual is None


# -- untrusted bytes --------------------------------------------------------------------------------
def _one(shape=(8, 128), codec=None):
    codec = codec or TopkCodec(0.05, 2, 128)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    meta, payload = encode_tensors([t], "topk", codec)
    return meta, payload, [(shape, torch.float32)]


def _with(meta, payload):
    return [dict(meta[0], nbytes=len(payload))], payload


def _refused(meta, payload, expected, code="bad_tensor"):
    with pytest.raises(WireError) as e:
        decode_tensors(meta, payload, expected)
    assert e.value.code == code
    return e.value.message


def test_malformed_topk_payloads_are_refused_with_bad_tensor():
    meta, payload, expected = _one()
    head = struct.Struct("<2sBBHQ")
    _, bits, log2c, k, n = head.unpack_from(payload)
    assert (bits, log2c, k, n) == (2, 7, 6, 1024)
    body = payload[head.size:]
    cases = {
        "truncated": payload[:-1],
        "one byte extra": payload + b"\0",
        "header only": payload[:10],
        "bad magic": b"XX" + payload[2:],
        "bits 1": head.pack(b"TK", 1, log2c, k, n) + body,
        "bits 9": head.pack(b"TK", 9, log2c, k, n) + body,
        "chunk 2^13": head.pack(b"TK", bits, 13, k, n) + body,
        "k 0": head.pack(b"TK", bits, log2c, 0, n) + body,
        "k > chunk": head.pack(b"TK", bits, log2c, 129, n) + body,
        "numel differs": head.pack(b"TK", bits, log2c, k, n + 1) + body,
        "huge numel": head.pack(b"TK", bits, log2c, k, 1 << 60) + body,
        "k larger than sent": head.pack(b"TK", bits, log2c, k + 1, n) + body,
    }
    for what, bad in cases.items():
        message = _refused(*_with(meta, bad), expected)
        assert "topk" in message, what
    # a NaN scale
    nan = bytearray(payload)
    nan[head.size:head.size + 2] = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    assert "scale" in _refused(*_with(meta, bytes(nan)), expected)
    # a topk tensor whose shape only the sender declares (no layout to check it against)
    assert "known layout" in _refused(meta, payload, None)


def _entries_payload(log2c, bits, k, n, scales, entries):
    """A hand-made blob: entries = [(index, code)], packed LSB-first as the codec does."""
    from heloco_p2p.swarm.sparse import _pack

    e = torch.tensor([i | (c << log2c) for i, c in entries], dtype=torch.int64)
    s = torch.tensor(scales, dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
    return struct.pack("<2sBBHQ", b"TK", bits, log2c, k, n) + s + _pack(e, log2c + bits)


def test_out_of_range_and_duplicate_indices_are_refused():
    shape = (20, 1)  # one chunk of 16 and a last chunk of 4 values; k = 2
    meta = [{"shape": list(shape), "dtype": "float32", "nbytes": 0, "compression": "topk"}]
    expected = [(shape, torch.float32)]
    good = _entries_payload(4, 2, 2, 20, [1.0, 2.0], [(3, 1), (7, 2), (0, 3), (3, 1)])
    got = decode_tensors(*_with(meta, good), expected)[0].flatten()
    # codes: 1 = +s, 2 = −s/2, 3 = −s (sign bit, then 1 magnitude bit; levels s/2, s)
    assert got[3].item() == 1.0 and got[7].item() == -0.5 and got[16].item() == -2.0 and got[19].item() == 2.0
    assert int((got != 0).sum()) == 4
    past = _entries_payload(4, 2, 2, 20, [1.0, 2.0], [(3, 1), (7, 2), (0, 3), (4, 1)])  # index 4 of a 4-value chunk
    assert "past" in _refused(*_with(meta, past), expected)
    dup = _entries_payload(4, 2, 2, 20, [1.0, 2.0], [(7, 1), (7, 2), (0, 3), (3, 1)])
    assert "increasing" in _refused(*_with(meta, dup), expected)
    unsorted = _entries_payload(4, 2, 2, 20, [1.0, 2.0], [(7, 1), (3, 2), (0, 3), (3, 1)])
    assert "increasing" in _refused(*_with(meta, unsorted), expected)


def test_random_damage_to_a_topk_payload_is_a_wire_error_or_a_tensor_of_the_layout():
    meta, payload, expected = _one()
    g = torch.Generator().manual_seed(5)
    outcomes = set()
    for _ in range(300):
        bad = bytearray(payload)
        for pos in torch.randint(0, len(bad), (3,), generator=g).tolist():
            bad[pos] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            out = decode_tensors(meta, bytes(bad), expected)
            assert out[0].shape == (8, 128) and out[0].dtype == torch.float32
            outcomes.add("decoded")
        except WireError as e:
            assert e.code == "bad_tensor"
            outcomes.add(e.code)
    assert outcomes == {"decoded", "bad_tensor"}


# -- configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, needle", [
    ({"swarm.compression": "topk", "swarm.topk_chunk": 100}, "topk_chunk must be a power of two in [16, 4096]"),
    ({"swarm.compression": "topk", "swarm.topk_chunk": 8}, "swarm.topk_chunk"),
    ({"swarm.compression": "topk", "swarm.topk_bits": 0}, "swarm.topk_bits"),  # 1 is the sign code
    ({"swarm.compression": "topk", "swarm.topk_bits": 9}, "swarm.topk_bits"),
    ({"swarm.compression": "topk", "swarm.topk_density": 0.0}, "swarm.topk_density"),
    ({"swarm.compression": "topk", "swarm.topk_density": 1.5}, "swarm.topk_density"),
    ({"swarm.topk_density": 0.05}, "only apply to compression: topk"),
    ({"swarm.compression": "zstd"}, "swarm.compression"),
    ({"swarm.reply_compression": "topk"}, "swarm.reply_compression"),  # θ is never sent sparse
])
def test_config_validation_names_the_key(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", overrides=overrides)
    assert needle in str(e.value)


def test_a_dumped_config_loads_again_with_or_without_topk():
    import yaml

    from heloco_p2p.config import config_from_dict

    for overrides in ({}, {"swarm.compression": "topk", "swarm.topk_density": 0.05, "swarm.topk_bits": 3}):
        cfg = load_config("configs/tiny.yaml", overrides=overrides)
        again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
        assert again.digest() == cfg.digest() and again.swarm == cfg.swarm
    # the defaults written out with compression none are not "topk settings without topk"
    assert load_config("configs/tiny.yaml", overrides={"swarm.topk_density": 0.02}).swarm.compression == "none"


def test_config_topk_codec():
    cfg = load_config("configs/tiny.yaml", overrides={"swarm.compression": "topk", "swarm.topk_density": 0.05,
                                                      "swarm.topk_chunk": 64})
    assert cfg.swarm.topk_codec() == TopkCodec(0.05, 2, 64)
    assert cfg.swarm.topk_codec().k == 3


# -- the simulator ----------------------------------------------------------------------------------
def test_simulator_uplink_topk_with_error_feedback(sim_run_cfg, tmp_path):
    from heloco_p2p.algorithms import ALGORITHMS
    from heloco_p2p.sim import SimSpec, Simulation

    from fakes import synthetic_streams, synthetic_val_blocks

    regions = ["a", "b"]
    up = {"compression": "topk", "density": 0.05, "bits": 2, "chunk": 128, "error_feedback": True}

    def run(uplink):
        spec = SimSpec(algorithm=ALGORITHMS["async_mla"], lr=ALGORITHMS["async_mla"].lr, heterogeneity="t",
                       slowness=[1.0, 2.0], data="non-iid", seed=0, steps_per_round=2, step_time=1.0,
                       comm_seconds=[0.0, 0.0], token_budget=1, time_budget=8.0, eval_points=1, uplink=uplink)
        return Simulation(sim_run_cfg, spec, regions, synthetic_streams, synthetic_val_blocks(regions)).run()

    dense, sparse = run(None), run(up)
    assert "uplink_bits_per_param" not in dense.commits[0]
    bits = {c["uplink_bits_per_param"] for c in sparse.commits}
    assert len(bits) == 1 and 0.4 < bits.pop() < 0.75  # k = 6 of 128: 6 · 9 / 128 + 1/8 ≈ 0.55, plus fp32 norm gains
    assert all(c["residual_norm"] > 0 for c in sparse.commits)
    assert [c["worker"] for c in sparse.commits] == [c["worker"] for c in dense.commits]
    assert sparse.at_time["val_loss"]["mean"] != dense.at_time["val_loss"]["mean"]
    assert math.isfinite(sparse.at_time["val_loss"]["mean"])


def test_sim_config_uplink_per_variant_and_its_validation(tmp_path):
    import yaml

    from heloco_p2p.sim import load_sim_config, make_spec

    tree = {"name": "t", "base": "configs/tiny.yaml", "regions": ["de", "en"], "steps_per_round": 2,
            "experiments": [{"algorithms": ["async_mla", "mla_topk"], "heterogeneity": ["none2"]}],
            "heterogeneity_levels": {"none2": [1.0, 1.0]}, "seeds": [0], "token_budget": 10, "time_budget": 5,
            "bandwidth": 1e6,
            "variants": {"mla_topk": {"base": "async_mla", "uplink": {"compression": "topk", "density": 0.03}}}}
    path = tmp_path / "sim.yaml"
    path.write_text(yaml.safe_dump(tree))
    cfg = load_sim_config(path)
    dense, sparse = make_spec(cfg, "async_mla", "none2", "non-iid", 0, None), \
        make_spec(cfg, "mla_topk", "none2", "non-iid", 0, None)
    assert dense.uplink is None
    assert sparse.uplink == {"compression": "topk", "density": 0.03, "bits": 2, "chunk": 128, "error_feedback": True}
    # communication time: Δ up at ~0.4 bits/param instead of 32, θ down at 32
    assert sparse.comm_seconds[0] < 0.55 * dense.comm_seconds[0]
    tree["variants"]["mla_topk"]["uplink"]["bits"] = 0  # 1..8 (1: the sign code)
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError) as e:
        load_sim_config(path)
    assert "topk_bits" in str(e.value)


def test_coordinator_commits_a_topk_submission_and_refuses_a_damaged_one():
    import asyncio

    from heloco_p2p.outer import build_engine
    from heloco_p2p.roles.commit_state import CommitState, SubmissionLimits
    from heloco_p2p.roles.coordinator import CoordinatorService

    from fakes import FakeNode

    shapes = [(4,), (16, 128)]
    state = CommitState(build_engine([torch.zeros(s) for s in shapes], "lookahead"))
    service = CoordinatorService(FakeNode({"status": "ok"}), state, shapes, SubmissionLimits(submit_rate=0.0))
    service.replication.standbys = ["QmStandby"]
    service.activate(1)
    delta = [torch.full((4,), 0.01), 0.01 * torch.randn(16, 128, generator=torch.Generator().manual_seed(2))]
    meta, payload, sent = encode_tensors_sent(delta, "topk", TopkCodec(0.05, 2, 128))

    def submit(seq, meta, payload):
        header = {"run_id": "fenced", "seq": seq, "base_version": state.version, "steps": 5, "term": 1,
                  "tensors": meta, "stats": {"seconds": 1.0}}
        return asyncio.run(service.handle_submit(header, payload, "QmPeer"))

    # t1's blob starts after t0's: claim one more value per chunk than it carries (its length no longer fits)
    start = meta[0]["nbytes"]
    bad = bytearray(payload)
    struct.pack_into("<H", bad, start + 4, 7)
    reply, _ = submit(0, meta, bytes(bad))
    assert reply["status"] == "rejected" and reply["reason"] == "bad_tensor" and state.version == 0
    reply, _ = submit(1, meta[:1] + [dict(meta[1], nbytes=meta[1]["nbytes"] - 1)], payload[:-1])
    assert reply["status"] == "rejected" and reply["reason"] == "bad_tensor" and state.version == 0
    reply, data = submit(2, meta, payload)
    assert reply["status"] == "accepted" and reply["version"] == 1 and len(data) > 0
    assert int((sent[1] != 0).sum()) == 16 * 6  # k = 6 of each row's 128 values reached the coordinator


def test_the_digest_of_a_run_without_topk_leaves_the_topk_keys_out():
    import hashlib
    import json

    cfg = load_config("configs/tiny.yaml")
    tree = cfg.model_dump(mode="json")
    assert {"topk_density", "topk_bits", "topk_chunk"} <= set(tree["swarm"])
    for key in ("topk_density", "topk_bits", "topk_chunk"):
        del tree["swarm"][key]
    del tree["swarm"]["defence"]  # at its defaults, left out too (tests/test_config.py)
    del tree["swarm"]["reply_window"]  # without wrap8, left out too
    del tree["swarm"]["shards"]  # one shard (the default), left out too
    blob = json.dumps(tree, sort_keys=True, separators=(",", ":")).encode()
    assert cfg.digest() == hashlib.sha256(blob).hexdigest()  # what it was before these keys existed
    topk = load_config("configs/tiny.yaml", overrides={"swarm.compression": "topk"})
    denser = load_config("configs/tiny.yaml", overrides={"swarm.compression": "topk", "swarm.topk_density": 0.05})
    assert len({cfg.digest(), topk.digest(), denser.digest()}) == 3
