"""Token streams: cached token arrays, deterministic endless packing, fixed validation blocks."""
import json

import numpy as np
import pytest
import torch

from heloco_p2p.data import TokenBlocks, builtin_regions, open_source, token_array, validation_blocks
from heloco_p2p.data import blocks as blocksmod


@pytest.fixture
def small_source(tmp_path):
    """A files: source of ~170 blocks of 16 tokens, so epochs are short."""
    docs = [f"Document {i}: " + "some words, " * (i % 4 + 1) for i in range(120)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return open_source(f"files:{tmp_path}/d.jsonl", region="small")


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HELOCO_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_the_token_array_is_documents_each_followed_by_eos(tokenizer):
    src = open_source("bible:de")
    tokens = np.asarray(token_array(src, tokenizer, "validation"))
    eos = tokenizer.eos_token_id
    docs = list(src.documents("validation"))
    assert tokens[-1] == eos and int((tokens == eos).sum()) == len(docs)
    cuts = np.flatnonzero(tokens == eos)
    first = tokens[: cuts[0]].tolist()
    assert tokenizer.decode(first) == docs[0]
    assert tokens.dtype == np.uint16


def test_a_cached_token_array_is_reused_not_retokenized(tokenizer, isolated_cache, monkeypatch):
    src = open_source("bible:it")
    first = np.asarray(token_array(src, tokenizer, "validation")).copy()
    files = list((isolated_cache / "tokens").glob("*.npy"))
    assert len(files) == 1 and np.array_equal(np.load(files[0]), first)
    blocksmod.open_cached.cache_clear()  # as a new process would
    monkeypatch.setattr(blocksmod, "encode_split", lambda *a: pytest.fail("re-tokenized a cached split"))
    assert np.array_equal(token_array(open_source("it"), tokenizer, "validation"), first)


def test_the_cache_key_separates_splits_sources_and_tokenizers(tokenizer, isolated_cache):
    a = blocksmod.token_cache_path(open_source("de"), "digest1", "train")
    assert a != blocksmod.token_cache_path(open_source("de"), "digest1", "validation")
    assert a != blocksmod.token_cache_path(open_source("bible:fr"), "digest1", "train")
    assert a != blocksmod.token_cache_path(open_source("de"), "digest2", "train")
    assert a == blocksmod.token_cache_path(open_source("bible:de:elberfelder"), "digest1", "train")


def test_a_changed_file_is_tokenized_again(tokenizer, isolated_cache, tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("one line of text\n" * 50)
    n1 = len(token_array(open_source(f"files:{f}"), tokenizer))
    f.write_text("one line of text\n" * 80)
    assert len(token_array(open_source(f"files:{f}"), tokenizer)) > n1


def test_blocks_are_long_tensors_of_seq_len(tokenizer):
    blocks = TokenBlocks(open_source("fr"), tokenizer, seq_len=64, seed=0)
    x = next(iter(blocks))
    assert x.dtype == torch.long and x.shape == (64,)
    assert blocks.num_blocks == blocks.num_tokens // 64
    assert next(blocks.batches(8)).shape == (8, 64)


def test_packing_is_deterministic_given_the_seed(tokenizer):
    src = open_source("ru")
    a = TokenBlocks(src, tokenizer, seq_len=128, seed=3).batches(16)
    b = TokenBlocks(src, tokenizer, seq_len=128, seed=3).batches(16)
    for _ in range(20):
        assert torch.equal(next(a), next(b))


def test_a_different_seed_gives_a_different_order_of_the_same_blocks(tokenizer):
    src = open_source("ru")
    a = TokenBlocks(src, tokenizer, seq_len=128, seed=0)
    b = TokenBlocks(src, tokenizer, seq_len=128, seed=1)
    assert not torch.equal(next(a.batches(16)), next(b.batches(16)))
    assert sorted(a.epoch_order(0)) == sorted(b.epoch_order(0)) == list(range(a.num_blocks))


def test_endless_iteration_crosses_epochs_with_a_new_permutation_each(tokenizer, small_source):
    blocks = TokenBlocks(small_source, tokenizer, seq_len=16, seed=0)
    n = blocks.num_blocks
    assert 100 <= n <= 250
    grid = torch.from_numpy(np.asarray(blocks.tokens[: n * 16], dtype=np.int64)).view(n, 16)
    it = iter(blocks)
    seen = torch.stack([next(it) for _ in range(2 * n + 5)])  # two full epochs and a bit
    epochs = [seen[:n], seen[n: 2 * n]]
    for e, epoch in enumerate(epochs):
        assert torch.equal(epoch, grid[torch.from_numpy(blocks.epoch_order(e))])
        rows = sorted(map(tuple, epoch.tolist()))
        assert rows == sorted(map(tuple, grid.tolist()))  # every block exactly once per epoch
    assert not torch.equal(epochs[0], epochs[1])
    assert torch.equal(seen[2 * n:], grid[torch.from_numpy(blocks.epoch_order(2)[:5])])


def test_batches_continue_the_block_stream_and_resume_from_start(tokenizer, small_source):
    blocks = TokenBlocks(small_source, tokenizer, seq_len=16, seed=7)
    it = iter(blocks)
    stream = torch.stack([next(it) for _ in range(20 * 12)])
    batches = blocks.batches(12)
    got = torch.cat([next(batches) for _ in range(20)])  # crosses the epoch boundary
    assert blocks.num_blocks < 20 * 12 and blocks.num_blocks % 12 and torch.equal(got, stream)
    resumed = blocks.batches(12, start=6)
    assert torch.equal(next(resumed), stream[72:84])
    assert torch.equal(next(blocks.iter_blocks(start=100)), stream[100])


def test_validation_blocks_are_the_first_non_overlapping_blocks_every_time(tokenizer):
    src = open_source("vi")
    tokens = np.asarray(token_array(src, tokenizer, "validation"), dtype=np.int64)
    v = validation_blocks(src, tokenizer, 128, 32)
    assert v.shape == (32, 128) and v.dtype == torch.long
    assert torch.equal(v, torch.from_numpy(tokens[: 32 * 128]).view(32, 128))
    assert torch.equal(v, validation_blocks(open_source("bible:vi"), tokenizer, 128, 32))


def test_validation_blocks_stop_at_what_is_available(tokenizer, small_source):
    available = len(token_array(small_source, tokenizer, "validation")) // 8
    assert validation_blocks(small_source, tokenizer, 8, 10_000).shape == (available, 8)


def test_every_language_has_far_more_than_the_default_32_validation_blocks(tokenizer):
    sizes = {r: len(token_array(open_source(r), tokenizer, "validation")) // 128 for r in builtin_regions()}
    assert min(sizes.values()) >= 300, sizes


def test_a_split_shorter_than_one_block_is_refused(tokenizer, small_source):
    with pytest.raises(ValueError, match="fewer than one block"):
        TokenBlocks(small_source, tokenizer, seq_len=10**6)


def test_bad_arguments_are_refused(tokenizer, small_source):
    with pytest.raises(ValueError):
        TokenBlocks(small_source, tokenizer, seq_len=0)
    with pytest.raises(ValueError):
        TokenBlocks(small_source, tokenizer, seed=-1)
    with pytest.raises(ValueError):
        next(TokenBlocks(small_source, tokenizer, seq_len=16).batches(0))
