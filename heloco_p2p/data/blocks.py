"""Token streams: a split of a source, tokenized once, cached, cut into fixed-length blocks.

The tokens of a split are its documents in order, each followed by ``<|endoftext|>``, stored
as one ``.npy`` (uint16 when the vocabulary fits, else uint32) under
``<cache>/tokens/`` and keyed by (source fingerprint, tokenizer digest, split). The first
open tokenizes; every later open memory-maps the file, so building many streams is cheap.

Blocks are the non-overlapping ``seq_len`` windows of that array (the tail shorter than one
block is dropped). Training visits them endlessly, in a new order each epoch: epoch ``e`` is
the permutation drawn from ``numpy.random.default_rng([seed, e])``::

    blocks = TokenBlocks(open_source("de"), load_tokenizer(), seq_len=128, seed=0)
    for x in blocks.batches(16):          # LongTensor [16, 128], forever
        ...
    val = validation_blocks(open_source("de"), tok, 128, 32)   # the same [32, 128] every call
"""
from __future__ import annotations

import functools
import logging
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from heloco_p2p.data.cache import cache_dir, load_array, save_array, settings_key
from heloco_p2p.data.sources import Source, check_split
from heloco_p2p.data.tokenizer import tokenizer_digest

logger = logging.getLogger(__name__)

_ENCODE_BATCH = 512  # documents per call into the (multi-threaded) Rust encoder


def token_cache_path(source: Source, digest: str, split: str) -> Path:
    key = settings_key({"source": source.fingerprint(), "tokenizer": digest, "split": split})
    region = "".join(c if c.isalnum() or c in "-_." else "_" for c in source.region)[:40]
    return cache_dir() / "tokens" / f"{region}-{split}-{key}.npy"


@functools.lru_cache(maxsize=256)
def open_cached(path: str) -> np.ndarray:
    """The token array at ``path``, memory-mapped once per process (``open_cached.cache_clear()``
    forgets them, as a new process would)."""
    return load_array(Path(path))


def encode_split(source: Source, tok, split: str) -> np.ndarray:
    """Tokenize every document of ``split``, each followed by eos (no caching: ``token_array`` caches)."""
    eos = tok.eos_token_id
    dtype = np.uint16 if len(tok) <= 2**16 else np.uint32
    backend = tok.backend_tokenizer
    parts: list[np.ndarray] = []
    batch: list[str] = []

    def flush() -> None:
        for enc in backend.encode_batch(batch, add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eos], dtype=dtype))
        batch.clear()

    for doc in source.documents(split):
        batch.append(doc)
        if len(batch) >= _ENCODE_BATCH:
            flush()
    if batch:
        flush()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def token_array(source: Source, tok, split: str = "train") -> np.ndarray:
    """All tokens of ``split`` (read-only, memory-mapped), tokenizing and caching on first use."""
    check_split(split)
    path = token_cache_path(source, tokenizer_digest(tok), split)
    if not path.exists():
        t0 = time.perf_counter()
        array = encode_split(source, tok, split)
        save_array(path, array)
        logger.info("tokenized %s %s: %d tokens in %.1f s -> %s", source.spec, split, len(array),
                    time.perf_counter() - t0, path)
    return open_cached(str(path))


class TokenBlocks:
    """Endless, deterministic stream of ``seq_len`` token blocks from one split of a source.

    :param source: an opened source (see :func:`heloco_p2p.data.open_source`)
    :param tokenizer: from :func:`heloco_p2p.data.load_tokenizer`
    :param seq_len: tokens per block
    :param split: "train" or "validation"
    :param seed: non-negative int; with the epoch it fixes each epoch's block order
    """

    def __init__(self, source: Source, tokenizer, seq_len: int = 128, split: str = "train", seed: int = 0):
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.source, self.seq_len, self.split, self.seed = source, seq_len, split, seed
        self.tokens = token_array(source, tokenizer, split)
        self.num_blocks = len(self.tokens) // seq_len
        if self.num_blocks == 0:
            raise ValueError(f"{source.spec} {split}: {len(self.tokens)} tokens, fewer than one block of {seq_len}")
        self._grid = self.tokens[: self.num_blocks * seq_len].reshape(self.num_blocks, seq_len)
        self._order_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens in the split (document separators included)."""
        return int(len(self.tokens))

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The block indices of ``epoch``, a permutation of range(num_blocks)."""
        if self._order_cache is None or self._order_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order_cache = (epoch, rng.permutation(self.num_blocks))
        return self._order_cache[1]

    def block_indices(self, start: int, count: int) -> np.ndarray:
        """Indices of blocks ``start .. start+count-1`` of the endless stream (epochs concatenated)."""
        out = np.empty(count, dtype=np.int64)
        pos, filled = start, 0
        while filled < count:
            epoch, offset = divmod(pos, self.num_blocks)
            take = min(count - filled, self.num_blocks - offset)
            out[filled: filled + take] = self.epoch_order(epoch)[offset: offset + take]
            filled += take
            pos += take
        return out

    def _gather(self, indices: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self._grid[indices], dtype=np.int64))

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self.iter_blocks()

    def iter_blocks(self, start: int = 0) -> Iterator[torch.Tensor]:
        """Blocks (LongTensor [seq_len]) forever, from position ``start`` of the endless stream."""
        pos = start
        while True:
            epoch, offset = divmod(pos, self.num_blocks)
            order = self.epoch_order(epoch)
            for i in order[offset:]:
                yield torch.from_numpy(np.asarray(self._grid[i], dtype=np.int64))
            pos = (epoch + 1) * self.num_blocks

    def batches(self, batch_size: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Batches (LongTensor [batch_size, seq_len]) forever: batch ``k`` holds blocks
        ``k*batch_size ..`` of the endless stream; ``start`` skips that many batches (resume)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        k = start
        while True:
            yield self._gather(self.block_indices(k * batch_size, batch_size))
            k += 1

    def __repr__(self) -> str:
        return (f"TokenBlocks({self.source.spec!r}, split={self.split!r}, seq_len={self.seq_len}, "
                f"seed={self.seed}, blocks={self.num_blocks})")


def validation_blocks(source: Source, tokenizer, seq_len: int, n: int) -> torch.Tensor:
    """The first ``n`` non-overlapping blocks of the validation split, in document order, as a
    LongTensor [min(n, available), seq_len]: the same tensor on every call and every peer."""
    tokens = token_array(source, tokenizer, "validation")
    available = len(tokens) // seq_len
    m = min(n, available)
    if m < n:
        logger.warning("%s: validation has %d blocks of %d tokens, fewer than the %d asked for",
                       source.spec, available, seq_len, n)
    return torch.from_numpy(np.asarray(tokens[: m * seq_len], dtype=np.int64).reshape(m, seq_len))
