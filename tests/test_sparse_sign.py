"""The topk codec's dense and 1-bit settings (swarm/sparse.py): the sign code (bits 1, scale the
mean kept magnitude), chunks that keep every value and so carry no indices, their exact sizes,
the wire round trip, malformed blobs, and error feedback with the sign code (swarm/uplink.py)."""
import math
import struct
from dataclasses import replace

import pytest
import torch

from heloco_p2p.config import load_config
from heloco_p2p.swarm import sparse
from heloco_p2p.swarm.sparse import SparseFormatError, TopkCodec, bits_per_param, blob_bytes, decode_topk, encode_topk
from heloco_p2p.swarm.uplink import Uplink
from heloco_p2p.swarm.wire import WireError, decode_tensors, encode_tensors, encode_tensors_sent

HEAD = struct.Struct("<2sBBHQ")
SIGN = TopkCodec(density=1.0, bits=1, chunk=128)


def layout(tensors):
    return [(tuple(t.shape), torch.float32) for t in tensors]


def bf16(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).to(torch.bfloat16).float().item()


# -- the sign code ----------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(8, 128), (37, 29), (1000,)])  # whole chunks; short last chunks of 49 and 104
def test_a_dense_sign_blob_decodes_to_plus_or_minus_the_chunks_mean_magnitude(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    blob, sent = encode_topk(x, SIGN)
    dec = decode_topk(blob, shape)
    assert torch.equal(dec, sent)
    flat, d = x.flatten(), dec.flatten()
    n = flat.numel()
    for c, start in enumerate(range(0, n, 128)):
        chunk, got = flat[start:start + 128], d[start:start + 128]
        s = bf16(chunk.abs().mean().item())
        # the scale travels as bf16, right after the header
        assert struct.unpack_from("<H", blob, HEAD.size + 2 * c)[0] == \
            torch.tensor([s], dtype=torch.bfloat16).view(torch.int16).item() & 0xFFFF
        want = torch.where(chunk < 0, -s, s)
        assert torch.equal(got, want)  # every value kept, exactly ±s
    assert bool((d != 0).all())


def test_a_sparse_sign_blob_keeps_the_top_k_at_plus_or_minus_their_mean_magnitude():
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(8))
    codec = TopkCodec(density=0.25, bits=1, chunk=128)
    assert codec.k == 32
    blob, sent = encode_topk(x, codec)
    dec = decode_topk(blob, x.shape)
    assert torch.equal(dec, sent)
    for row, got in zip(x, dec):
        top = row.abs().topk(32).indices
        assert set(torch.nonzero(got).flatten().tolist()) == set(top.tolist())
        s = bf16(row.abs()[top].mean().item())
        assert torch.equal(got[top], torch.where(row[top] < 0, -s, s))
    # indices are sent when k < C: 4 chunks × 32 entries × (7 + 1) bits
    assert len(blob) == 14 + 2 * 4 + 4 * 32 * 8 // 8 == blob_bytes(512, 1, 7, 32)


def test_the_sign_scale_is_the_l2_optimal_one_and_bits_2_and_up_keep_the_largest_magnitude():
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(9))
    _, sign = encode_topk(x, SIGN)
    err = (x - sign).norm().item()
    for factor in (0.9, 1.1):  # any other scale of the same signs is worse
        assert err < (x - factor * sign).norm().item()
    _, two = encode_topk(x, TopkCodec(1.0, 2, 128))
    rows, dec = x.view(-1, 128), two.view(-1, 128)
    assert torch.equal(dec.abs().amax(dim=1), rows.abs().amax(dim=1).to(torch.bfloat16).float())
    # a chunk whose values all have the same magnitude is sent exactly (up to the bf16 scale)
    equal = torch.sign(torch.randn(4, 128, generator=torch.Generator().manual_seed(1))) * \
        torch.tensor([0.5, 0.25, 1.5, 3.0]).unsqueeze(1)
    assert torch.equal(encode_topk(equal, SIGN)[1], equal)


# -- sizes: no index bits in a chunk that keeps every value -----------------------------------------
def test_dense_blobs_are_exactly_their_formula_and_carry_no_index_bits():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    blob, _ = encode_topk(x, SIGN)
    # 14-byte header, 8 bf16 scales (7 chunks of 128 and one of 104), 1000 sign bits
    assert len(blob) == 14 + 2 * 8 + math.ceil(1000 * 1 / 8) == 155 == SIGN.blob_bytes(1000) == blob_bytes(1000, 1, 7, 128)
    assert HEAD.unpack_from(blob) == (b"TK", 1, 7, 128, 1000)
    # the entries are the signs, in order, and nothing else
    assert blob[HEAD.size + 16:] == sparse._pack((x < 0).to(torch.int64), 1)
    two, _ = encode_topk(x, TopkCodec(1.0, 2, 128))
    assert len(two) == 14 + 16 + 250 == blob_bytes(1000, 2, 7, 128)
    eight, _ = encode_topk(x, TopkCodec(1.0, 8, 128))
    assert len(eight) == 14 + 16 + 1000 == blob_bytes(1000, 8, 7, 128)


def test_a_short_last_chunk_is_index_free_when_it_keeps_all_its_values():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(3))  # 7 chunks of 128, one of 104
    # k = 115 < 128: full chunks send indices; the last chunk (104 ≤ k) keeps everything, without them
    codec = TopkCodec(density=0.9, bits=2, chunk=128)
    assert codec.k == 115
    blob, sent = encode_topk(x, codec)
    assert len(blob) == 14 + 16 + math.ceil((7 * 115 * (7 + 2) + 104 * 2) / 8) == 962
    dec = decode_topk(blob, (1000,))
    assert torch.equal(dec, sent) and bool((dec[896:] != 0).all())
    assert int((dec[:896] != 0).sum()) == 7 * 115
    # the last chunk keeps fewer than its values (104 > k = 64): indices for it too
    half = TopkCodec(density=0.5, bits=2, chunk=128)
    assert half.blob_bytes(1000) == 14 + 16 + math.ceil(8 * 64 * 9 / 8) == len(encode_topk(x, half)[0])
    # a tensor shorter than k is one index-free chunk
    short = torch.randn(20)
    blob, sent = encode_topk(short, TopkCodec(density=0.5, bits=3, chunk=64))
    assert len(blob) == 14 + 2 + math.ceil(20 * 3 / 8) and torch.equal(decode_topk(blob, (20,)), sent)


def test_bits_per_param_is_the_measured_blob_bits():
    for shape in [(1000,), (128, 344), (37, 29)]:
        n = math.prod(shape)
        blob, _ = encode_topk(torch.randn(shape), SIGN)
        assert bits_per_param([n], SIGN) == 8 * len(blob) / n
    # 1 + 16/128 bits per value, plus the 14-byte header; 2 bits: 2.125
    assert bits_per_param([1 << 20], SIGN) == pytest.approx(1.125 + 8 * 14 / (1 << 20))
    assert bits_per_param([1 << 20], TopkCodec(1.0, 2, 128)) == pytest.approx(2.125 + 8 * 14 / (1 << 20))
    # sparse settings are unchanged: 4/128 · (7 + 2) + 16/128
    assert bits_per_param([1 << 20], TopkCodec(0.03, 2, 128)) == pytest.approx(0.40625 + 8 * 14 / (1 << 20))


# -- the wire ---------------------------------------------------------------------------------------
def test_dense_sign_round_trip_through_the_wire():
    g = torch.Generator().manual_seed(4)
    tensors = [torch.randn(128, 344, generator=g), torch.randn(128, generator=g), torch.randn(37, 29, generator=g),
               torch.randn(4, 16, generator=g)]
    meta, payload, sent = encode_tensors_sent(tensors, "topk", SIGN)
    # 1-D tensors and tensors smaller than a chunk go as fp32
    assert [m["compression"] for m in meta] == ["topk", "none", "topk", "none"]
    assert [m["nbytes"] for m in meta if m["compression"] == "topk"] == [SIGN.blob_bytes(44032), SIGN.blob_bytes(1073)]
    assert meta[0]["nbytes"] == 14 + 2 * 344 + 44032 // 8
    got = decode_tensors(meta, payload, layout(tensors))
    assert all(torch.equal(a, b) for a, b in zip(got, sent))
    assert torch.equal(got[1], tensors[1]) and torch.equal(got[3], tensors[3])
    assert (got[0].abs().view(-1, 128) == got[0].abs().view(-1, 128)[:, :1]).all()  # one magnitude per chunk
    meta2, payload2 = encode_tensors(tensors, "topk", SIGN)
    assert meta2 == meta and payload2 == payload
    n = sum(t.numel() for t in tensors)
    measured = 8 * len(payload) / n
    predicted = bits_per_param([44032, 1073], SIGN, dense=[128, 64])
    assert predicted < measured < predicted + 8 * 2 * 64 / n  # the fp32 tensors' protobuf framing is extra


def _refused(blob, shape):
    meta = [{"shape": list(shape), "dtype": "float32", "nbytes": len(blob), "compression": "topk"}]
    with pytest.raises(WireError) as e:
        decode_tensors(meta, blob, [(tuple(shape), torch.float32)])
    assert e.value.code == "bad_tensor" and "topk" in e.value.message
    with pytest.raises(SparseFormatError):
        decode_topk(blob, shape)
    return e.value.message


def test_malformed_dense_and_sign_blobs_are_refused():
    shape = (8, 125)  # 1000 values: 7 chunks of 128 and one of 104
    blob, _ = encode_topk(torch.randn(shape, generator=torch.Generator().manual_seed(5)), SIGN)
    _, bits, log2c, k, n = HEAD.unpack_from(blob)
    body = blob[HEAD.size:]
    cases = {
        "truncated": blob[:-1],
        "one byte extra": blob + b"\0",
        "scales only": blob[:HEAD.size + 16],
        "bits 0": HEAD.pack(b"TK", 0, log2c, k, n) + body,
        "bits 9": HEAD.pack(b"TK", 9, log2c, k, n) + body,
        "bits 2 on a 1-bit body": HEAD.pack(b"TK", 2, log2c, k, n) + body,
        "k > chunk": HEAD.pack(b"TK", bits, log2c, 129, n) + body,
        "k 0": HEAD.pack(b"TK", bits, log2c, 0, n) + body,
        "k one less (indices expected)": HEAD.pack(b"TK", bits, log2c, 127, n) + body,
        "chunk 256 (k < C)": HEAD.pack(b"TK", bits, 8, k, n) + body,
        "chunk 2^13": HEAD.pack(b"TK", bits, 13, k, n) + body,
        "numel differs": HEAD.pack(b"TK", bits, log2c, k, n - 1) + body,
    }
    for what, bad in cases.items():
        assert _refused(bad, shape), what
    assert "155 expected" in _refused(blob[:-1], shape)
    for value in (float("nan"), float("inf"), -1.0):
        bad = bytearray(blob)
        bad[HEAD.size + 14:HEAD.size + 16] = torch.tensor([value], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes()
        assert "scale" in _refused(bytes(bad), shape)
    # a hand-made 1-bit dense blob of 16 values (chunk 16, k 16): signs as sent, ±scale
    signs = torch.tensor([0, 1] * 8)
    hand = HEAD.pack(b"TK", 1, 4, 16, 16) + torch.tensor([0.75], dtype=torch.bfloat16).view(torch.int16).numpy().tobytes() + \
        sparse._pack(signs, 1)
    assert len(hand) == 14 + 2 + 2
    assert decode_topk(hand, (16,)).tolist() == [0.75, -0.75] * 8
    assert decode_topk(hand, (4, 4)).shape == (4, 4)
    _refused(hand, (17,))
    _refused(hand + b"\0", (16,))


def test_random_damage_to_a_sign_blob_is_a_wire_error_or_a_tensor_of_the_layout():
    shape = (8, 128)
    meta, payload = encode_tensors([torch.randn(shape, generator=torch.Generator().manual_seed(6))], "topk", SIGN)
    g = torch.Generator().manual_seed(7)
    outcomes = set()
    for _ in range(200):
        bad = bytearray(payload)
        for pos in torch.randint(0, len(bad), (2,), generator=g).tolist():
            bad[pos] = int(torch.randint(0, 256, (1,), generator=g))
        try:
            out = decode_tensors(meta, bytes(bad), [(shape, torch.float32)])
            assert out[0].shape == shape and bool(torch.isfinite(out[0]).all())
            outcomes.add("decoded")
        except WireError as e:
            assert e.code == "bad_tensor"
            outcomes.add(e.code)
    assert outcomes == {"decoded", "bad_tensor"}


# -- error feedback with the sign code --------------------------------------------------------------
def test_error_feedback_with_the_sign_code_sends_the_sum_of_the_deltas():
    g = torch.Generator().manual_seed(0)
    delta = [torch.randn(16, 128, generator=g), torch.randn(32, generator=g)]
    up = Uplink("topk", SIGN)
    sent_sum = [torch.zeros_like(d) for d in delta]
    norm = torch.cat([d.flatten() for d in delta]).norm().item()
    seen = {}
    for t in range(1, 1601):
        enc = up.prepare(delta)
        up.settle(True)
        for i, s in enumerate(decode_tensors(enc.meta, enc.payload, layout(delta))):
            sent_sum[i] += s
        if t in (1, 100, 800, 1600):
            err = torch.cat([(s - t * d).flatten() for s, d in zip(sent_sum, delta)]).norm().item()
            # nothing is lost: Σ sent + e = t·Δ (up to float rounding)
            assert err == pytest.approx(up.residual_norm(), rel=1e-3, abs=1e-3)
            seen[t] = (up.residual_norm(), err / (t * norm))
    assert enc.meta[0]["nbytes"] == 14 + 2 * 16 + 2048 // 8  # 1.18 bits per value of the 2-D tensor
    # the residual levels off (a δ-contraction per chunk) while t·Δ grows: the relative error falls like 1/t
    assert seen[1600][0] < 1.1 * seen[800][0] < 20 * norm
    assert seen[1600][1] < 0.55 * seen[800][1]
    assert seen[1600][1] < 0.01
    # the 1-D tensor goes as fp32: its part of the residual is zero
    assert float(up.residual[1].abs().max()) == 0.0


def test_error_feedback_with_the_sign_code_on_an_even_delta_keeps_the_residual_below_one_delta():
    # a Δ whose coordinates all move about the same amount (magnitudes within 1%, as the dense
    # pseudo-gradients of many AdamW steps): one round sends it within 1%; repeated, the residual
    # grows only while the small coordinates' deficits add up, then levels off below one Δ
    g = torch.Generator().manual_seed(1)
    delta = [torch.sign(torch.randn(32, 128, generator=g)) * (1e-3 * (1 + 0.01 * torch.rand(32, 128, generator=g)))]
    norm = delta[0].norm().item()
    up = Uplink("topk", SIGN)
    sent_sum, rel = torch.zeros_like(delta[0]), []
    for _ in range(400):
        enc = up.prepare(delta)
        up.settle(True)
        sent_sum += enc.sent[0]
        rel.append(up.residual_norm() / norm)
    assert rel[0] < 0.01
    assert max(rel) < 0.7 and rel[399] < 1.05 * rel[199]
    assert (sent_sum - 400 * delta[0]).norm().item() / (400 * norm) < 0.7 / 400


# -- configuration ----------------------------------------------------------------------------------
def test_config_accepts_the_dense_sign_setting():
    cfg = load_config("configs/tiny.yaml", overrides={"swarm.compression": "topk", "swarm.topk_bits": 1,
                                                      "swarm.topk_density": 1.0})
    assert cfg.swarm.topk_codec() == SIGN and cfg.swarm.topk_codec().k == 128
    with pytest.raises(ValueError, match=r"topk_bits must be an integer in \[1, 8\]"):
        TopkCodec(1.0, 0, 128)


def test_the_sign_config_compares_the_dense_sign_code():
    from heloco_p2p.sim import load_sim_config, make_spec

    cfg = load_sim_config("configs/sim-lowbit-sign.yaml")
    assert cfg.seeds == [0, 1, 2]
    assert [e.algorithms for e in cfg.experiments] == [["heloco", "heloco_sign", "async_mla", "async_mla_sign"]]
    for name, base in (("heloco_sign", "heloco"), ("async_mla_sign", "async_mla")):
        spec, plain = make_spec(cfg, name, "paper_mixed", "non-iid", 0, None), \
            make_spec(cfg, base, "paper_mixed", "non-iid", 0, None)
        assert spec.uplink == {"compression": "topk", "density": 1.0, "bits": 1, "chunk": 128, "error_feedback": True}
        assert plain.uplink is None
        assert replace(spec.algorithm, name=base) == plain.algorithm and spec.lr == plain.lr
        assert spec.steps_per_round == plain.steps_per_round and spec.token_budget == plain.token_budget
