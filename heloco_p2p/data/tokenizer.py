"""The tokenizer: byte-level BPE trained on a balanced sample of the built-in languages.

Balanced means the same number of characters from the train split of each language's default
translation, in catalog order, so no language dominates the merges. The sample takes whole
chapters in one fixed pseudo-random chapter order (the same in every language, so the sample is
parallel text spread over both testaments), the last one cut to the exact budget. Validation
chapters are never seen.

A tokenizer is identified by its digest, the sha256 of its tokenizer.json bytes; the digest is
part of a run's identity. Building is byte-for-byte deterministic and cached under the cache
root (keyed by the build settings), so every peer that builds ``builtin`` gets the same file::

    tok = load_tokenizer("builtin", vocab_size=4096)   # PreTrainedTokenizerFast
    tokenizer_digest(tok)                              # 'a3f…' (64 hex chars)
    tok.decode(tok.encode(text)) == text               # lossless: bytes in, bytes out
"""
from __future__ import annotations

import functools
import hashlib
import logging
import time
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from heloco_p2p.data import bible
from heloco_p2p.data.cache import atomic_write_bytes, cache_dir, settings_key

logger = logging.getLogger(__name__)

EOS = "<|endoftext|>"  # also BOS, as in GPT-2
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOS, PAD)
DEFAULT_VOCAB_SIZE = 4096
DEFAULT_CHARS_PER_LANGUAGE = 2_000_000
BUILD_VERSION = 1  # bump when the build recipe below changes


def _chapter_rank(book: int, chapter: int) -> bytes:
    return hashlib.sha256(f"{book}:{chapter}".encode()).digest()


def training_sample(chars_per_language: int) -> list[str]:
    """The balanced training text: per language, whole train chapters in a fixed hashed order
    until exactly ``chars_per_language`` characters."""
    texts: list[str] = []
    for lang in bible.languages():
        t = bible.resolve(lang)
        rows = [r for r in bible.chapters(t.code) if not bible.is_validation(r[0])]
        rows.sort(key=lambda r: _chapter_rank(r[0], r[1]))
        left = chars_per_language
        for _, _, text in rows:
            if left <= 0:
                break
            texts.append(text[:left])
            left -= len(texts[-1])
        if left > 0:
            raise ValueError(f"{t.spec}: train split has fewer than {chars_per_language} characters")
    return texts


def build_settings(vocab_size: int, chars_per_language: int) -> dict:
    return {
        "recipe": "byte-level-bpe",
        "build_version": BUILD_VERSION,
        "vocab_size": vocab_size,
        "chars_per_language": chars_per_language,
        "special_tokens": list(SPECIAL_TOKENS),
        "corpus": [bible.resolve(lang).spec for lang in bible.languages()],
        "cleanup": bible.CLEANUP_VERSION,
        "held_out": sorted(bible.HELD_OUT_BOOKS),
    }


def build_tokenizer_json(vocab_size: int = DEFAULT_VOCAB_SIZE,
                         chars_per_language: int = DEFAULT_CHARS_PER_LANGUAGE) -> bytes:
    """Train the built-in tokenizer and return its tokenizer.json bytes (no caching)."""
    if vocab_size <= 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must exceed the 256 byte tokens and {len(SPECIAL_TOKENS)} specials, got {vocab_size}")
    t0 = time.perf_counter()
    tk = Tokenizer(models.BPE())
    # No normalizer: text goes through as raw bytes, so decode(encode(x)) == x for any string.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tk.decoder = decoders.ByteLevel()
    # The identity template that transformers installs when it wraps a tokenizer without one:
    # set here so that save_pretrained() writes back these exact bytes (same digest).
    tk.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1", special_tokens=[])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample = training_sample(chars_per_language)
    tk.train_from_iterator(sample, trainer=trainer, length=len(sample))
    data = tk.to_str(pretty=True).encode("utf-8")
    logger.info("trained byte-level BPE: vocab %d on %d chars x %d languages in %.1f s",
                tk.get_vocab_size(), chars_per_language, len(bible.languages()), time.perf_counter() - t0)
    return data


def builtin_tokenizer_path(vocab_size: int = DEFAULT_VOCAB_SIZE,
                           chars_per_language: int = DEFAULT_CHARS_PER_LANGUAGE) -> Path:
    """Where the built-in tokenizer lives in the cache; built (atomically) if missing."""
    key = settings_key(build_settings(vocab_size, chars_per_language))
    path = cache_dir() / "tokenizers" / f"builtin-v{vocab_size}-{key}" / "tokenizer.json"
    if not path.exists():
        atomic_write_bytes(path, build_tokenizer_json(vocab_size, chars_per_language))
        logger.info("cached tokenizer at %s", path)
    return path


@functools.lru_cache(maxsize=16)
def _read(path: str, mtime_ns: int) -> tuple[str, str]:
    data = Path(path).read_bytes()
    return data.decode("utf-8"), hashlib.sha256(data).hexdigest()


def load_tokenizer(name_or_path: str | Path = "builtin", vocab_size: int = DEFAULT_VOCAB_SIZE,
                   chars_per_language: int = DEFAULT_CHARS_PER_LANGUAGE):
    """A ``transformers.PreTrainedTokenizerFast``: ``"builtin"`` (built and cached on first
    use; ``vocab_size`` and ``chars_per_language`` select the build), or a path to a
    tokenizer.json or a directory containing one (``vocab_size`` is then ignored).

    The tokenizer adds no special tokens on its own; bos = eos = ``<|endoftext|>`` and pad is
    ``<|pad|>`` (eos where the file has no pad token).
    """
    # transformers takes ~0.5 s to import: only where a tokenizer is loaded, not with data/ (the CLI imports it)
    from transformers import PreTrainedTokenizerFast

    if str(name_or_path) == "builtin":
        path = builtin_tokenizer_path(vocab_size, chars_per_language)
    else:
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{name_or_path}: no tokenizer.json there (expected a file or a directory holding one)")
    text, digest = _read(str(path), path.stat().st_mtime_ns)
    backend = Tokenizer.from_str(text)
    vocab = backend.get_vocab()
    if EOS not in vocab:
        raise ValueError(f"{path}: tokenizer has no {EOS} token; heloco-p2p separates documents with it")
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=PAD if PAD in vocab else EOS,
        clean_up_tokenization_spaces=False,  # would turn " ." into "." and break round trips
    )
    tok.init_kwargs["heloco_digest"] = digest
    return tok


def tokenizer_digest(tok) -> str:
    """sha256 (hex) of the tokenizer.json bytes the tokenizer was loaded from. For a tokenizer
    not made by :func:`load_tokenizer`, the sha256 of its serialized backend (compact JSON)."""
    digest = getattr(tok, "init_kwargs", {}).get("heloco_digest")
    if digest:
        return digest
    backend = getattr(tok, "backend_tokenizer", tok)
    return hashlib.sha256(backend.to_str().encode("utf-8")).hexdigest()
