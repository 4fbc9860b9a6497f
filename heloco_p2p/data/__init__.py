"""Regional corpora, the tokenizer and token streams (a bottom layer: imports no other
heloco_p2p module).

    from heloco_p2p.data import open_source, load_tokenizer, TokenBlocks, validation_blocks
    src = open_source("bible:de")                 # or "de", "files:/x/*.jsonl", "hf:name:config"
    tok = load_tokenizer("builtin")               # byte-level BPE, 4096 tokens, cached
    for batch in TokenBlocks(src, tok, seq_len=128, seed=0).batches(16): ...

See docs/data.md for the languages, the held-out books, the spec syntax and the cache.
"""
from heloco_p2p.data.bible import HELD_OUT_BOOKS, BibleError
from heloco_p2p.data.blocks import TokenBlocks, token_array, validation_blocks
from heloco_p2p.data.cache import cache_dir
from heloco_p2p.data.sources import (
    BibleSource,
    FilesSource,
    HFSource,
    Source,
    SourceError,
    SourceInfo,
    books_shard,
    builtin_regions,
    builtin_sources,
    open_region,
    open_source,
)
from heloco_p2p.data.tokenizer import load_tokenizer, tokenizer_digest

__all__ = [
    "BibleError", "BibleSource", "FilesSource", "HELD_OUT_BOOKS", "HFSource", "Source", "SourceError",
    "SourceInfo", "TokenBlocks", "books_shard", "builtin_regions", "builtin_sources", "cache_dir", "load_tokenizer",
    "open_region", "open_source", "token_array", "tokenizer_digest", "validation_blocks",
]
