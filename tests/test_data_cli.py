"""``heloco-peer data list`` and ``heloco-peer data build-tokenizer``."""
import hashlib
import json

import pytest
from click.testing import CliRunner

from heloco_p2p.cli import main
from heloco_p2p.data import tokenizer_digest


def _run(*args):
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_data_list_json_has_exactly_the_documented_keys(tokenizer):
    rows = json.loads(_run("data", "list", "--json", "--log-level", "WARNING").stdout)
    assert len(rows) == 13
    assert all(set(r) == {"region", "source", "translation", "mb", "tokens", "license"} for r in rows)
    assert {r["license"] for r in rows} == {"public domain"}
    de = next(r for r in rows if r["source"] == "bible:de:elberfelder")
    assert de["region"] == "de" and de["translation"] == "Elberfelder 1932"
    assert de["mb"] >= 3.0 and 1_000_000 < de["tokens"] < 3_000_000


def test_data_list_table_names_every_language(tokenizer):
    out = _run("data", "--log-level", "ERROR", "list").stdout
    for spec in ("bible:en:kjv", "bible:fa:pov", "bible:tl:adb1905"):
        assert spec in out
    assert "public domain" in out


def test_build_tokenizer_prints_the_cached_digest_and_copies_the_file(tokenizer, tmp_path):
    out = _run("data", "build-tokenizer", "--out", f"{tmp_path}/", "--log-level", "DEBUG").stdout
    digest = tokenizer_digest(tokenizer)
    assert f"digest: {digest}" in out
    assert hashlib.sha256((tmp_path / "tokenizer.json").read_bytes()).hexdigest() == digest
