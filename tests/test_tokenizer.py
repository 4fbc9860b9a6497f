"""The built-in tokenizer: byte-level BPE, lossless, deterministic, cached, identified by digest."""
import hashlib

import pytest
from transformers import PreTrainedTokenizerFast

from heloco_p2p.data import bible, builtin_regions, builtin_sources, load_tokenizer, open_source, tokenizer_digest
from heloco_p2p.data import tokenizer as tokmod

SMALL = dict(vocab_size=512, chars_per_language=100_000)  # fast builds for cache/determinism tests


def test_builtin_tokenizer_is_a_4096_token_fast_tokenizer_with_eos_and_pad(tokenizer):
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 4096
    assert tokenizer.eos_token == tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.pad_token == "<|pad|>"
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1)


def test_encoding_adds_no_special_tokens(tokenizer):
    ids = tokenizer.encode("Im Anfang schuf Gott")
    assert tokenizer.eos_token_id not in ids and tokenizer.pad_token_id not in ids


@pytest.mark.parametrize("src", builtin_sources(), ids=lambda s: s.spec)
def test_every_language_round_trips_through_the_tokenizer(tokenizer, src):
    docs = list(src.documents("validation"))[:5] + list(src.documents("train"))[::200]
    for doc in docs:
        assert tokenizer.decode(tokenizer.encode(doc)) == doc


@pytest.mark.parametrize("text", [
    " leading and  double  spaces , before punctuation .",
    "tabs\tand\nnewlines\r\n",
    "emoji 🙂, CJK 天地, Devanagari आदि, combining e\u0301",
    "",
])
def test_arbitrary_text_round_trips(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_the_tokenizer_compresses_every_language(tokenizer):
    for region in builtin_regions():
        text = " ".join(open_source(region).documents("validation"))
        bytes_per_token = len(text.encode()) / len(tokenizer.encode(text))
        assert bytes_per_token > 2.0, (region, bytes_per_token)


def test_training_sample_takes_the_same_characters_from_each_language_train_split():
    sample = tokmod.training_sample(50_000)
    validation = {text for s in builtin_sources() for text in s.documents("validation")}
    per_language = []
    start = 0
    for lang in bible.languages():
        train = set(open_source(lang).documents("train"))
        n, count = 0, 0
        while n < 50_000:
            n += len(sample[start + count])
            count += 1
        chunk = sample[start: start + count]
        assert all(c in train or any(t.startswith(c) for t in train) for c in chunk)
        assert not set(chunk) & validation
        per_language.append(n)
        start += count
    assert per_language == [50_000] * len(bible.languages()) and start == len(sample)


def test_two_builds_into_different_cache_dirs_give_the_same_digest(tmp_path, monkeypatch):
    digests, paths = [], []
    for name in ("a", "b"):
        monkeypatch.setenv("HELOCO_CACHE_DIR", str(tmp_path / name))
        tok = load_tokenizer("builtin", **SMALL)
        paths.append(tokmod.builtin_tokenizer_path(**SMALL))
        digests.append(tokenizer_digest(tok))
    assert paths[0] != paths[1] and paths[0].read_bytes() == paths[1].read_bytes()
    assert digests[0] == digests[1] == hashlib.sha256(paths[0].read_bytes()).hexdigest()


@pytest.mark.slow
def test_a_fresh_default_build_reproduces_the_cached_tokenizer(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("HELOCO_CACHE_DIR", str(tmp_path))
    assert hashlib.sha256(tokmod.build_tokenizer_json()).hexdigest() == tokenizer_digest(tokenizer)


def test_the_cache_is_keyed_by_build_settings_and_not_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("HELOCO_CACHE_DIR", str(tmp_path))
    first = tokmod.builtin_tokenizer_path(**SMALL)
    other = tokmod.builtin_tokenizer_path(vocab_size=600, chars_per_language=100_000)
    assert first != other and first.parent.parent == tmp_path / "tokenizers"
    assert tokenizer_digest(load_tokenizer("builtin", vocab_size=600, chars_per_language=100_000)) != \
        tokenizer_digest(load_tokenizer("builtin", **SMALL))
    monkeypatch.setattr(tokmod, "build_tokenizer_json", lambda *a, **k: pytest.fail("rebuilt a cached tokenizer"))
    assert load_tokenizer("builtin", **SMALL).vocab_size == 512
    assert [p.name for p in first.parent.iterdir()] == ["tokenizer.json"]  # no temp files left


def test_loads_from_a_file_or_a_directory_and_keeps_the_digest(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)  # what a trained model directory holds
    from_dir = load_tokenizer(tmp_path)
    from_file = load_tokenizer(tmp_path / "tokenizer.json")
    assert tokenizer_digest(from_dir) == tokenizer_digest(from_file) == tokenizer_digest(tokenizer)
    assert hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest() == tokenizer_digest(tokenizer)
    assert from_dir.encode("Au commencement") == tokenizer.encode("Au commencement")


def test_digest_does_not_change_when_the_tokenizer_is_used_with_padding(tokenizer):
    before = tokenizer_digest(tokenizer)
    tokenizer(["a b", "c"], padding=True)
    assert tokenizer_digest(tokenizer) == before


def test_a_missing_tokenizer_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)


def test_vocabulary_must_exceed_the_byte_alphabet():
    with pytest.raises(ValueError, match="vocab_size"):
        tokmod.build_tokenizer_json(vocab_size=200, chars_per_language=1000)
