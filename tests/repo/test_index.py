"""RepoIndex: retrieval of a planted definition, .gitignore, incremental updates, BM25 parity."""

from __future__ import annotations

import math
import os
import sqlite3
from collections import Counter

import pytest

from starcoder2.repo import RepoIndex, code_tokens
from starcoder2.repo import index as index_module
from starcoder2.repo.context import query_for_cursor

from .conftest import FILES, PLANTED, write_repo


def test_code_tokens_split_identifiers_and_keep_them_whole():
    assert code_tokens("parseHTTPHeader(buf) + max_retry_count") == [
        "parsehttpheader", "parse", "http", "header", "buf", "max_retry_count", "max", "retry", "count"]
    assert code_tokens("def return self if") == []  # keywords are stop words


def test_retrieval_finds_the_planted_definition(shop_repo):
    with RepoIndex.open(shop_repo) as index:
        stats = index.update(show_progress=False)
        assert stats.added == stats.files == 6 and stats.languages["Python"] == 3
        # A cursor in another file that calls the planted function.
        prefix = "from shop.cart import Cart\n\ndef checkout(cart, weight, zone):\n    shipping = compute_shipping_"
        hits = index.search(query_for_cursor(prefix, ""), k=3, exclude_path="shop/checkout.py")
        assert hits[0].path == "shop/shipping.py" and hits[0].name == PLANTED and hits[0].kind == "function"
        assert hits[0].score > hits[-1].score > 0
        assert all(h.path != "shop/shipping.py" for h in index.search(PLANTED, exclude_path="shop/shipping.py"))
        [definition] = index.definitions([PLANTED, "no_such_name"])
        assert f"def {PLANTED}(weight_kg, zone):" in definition.text and definition.start_line == 4
        assert [d.name for d in index.definitions(["formatPrice", "Cart"])] == ["formatPrice", "Cart"]


def test_gitignore_is_respected_and_the_db_stays_out_of_git(shop_repo):
    with RepoIndex.open(shop_repo) as index:
        index.update(show_progress=False)
        files = index.files()
    assert "ignored/secret.py" not in files and "debug.log" not in files
    assert files == ["README.md", "shop/cart.py", "shop/shipping.py", "shop/users.py", "web/static/app.js",
                     "web/static/format.js"]
    with RepoIndex.open(shop_repo) as index:
        assert index.search("zz_hidden_ignored_function") == []
        with pytest.raises(FileNotFoundError):
            index.read("ignored/secret.py")
        assert index.read("shop/users.py").startswith("def normalize_email")
    assert (shop_repo / ".starcoder2" / ".gitignore").read_text() == "*\n"


def test_incremental_update_rechunks_only_changed_files(shop_repo, tmp_path, monkeypatch):
    db = tmp_path / "elsewhere" / "index.sqlite"  # a database outside the repository
    calls = []
    real_chunk_file = index_module.chunk_file
    monkeypatch.setattr(index_module, "chunk_file", lambda path, *a, **k: calls.append(path) or real_chunk_file(path, *a, **k))
    with RepoIndex.open(shop_repo, db_path=db) as index:
        index.update(show_progress=False)
        assert len(calls) == 6
        calls.clear()

        stats = index.update(show_progress=False)  # nothing changed: nothing read
        assert (stats.added, stats.changed, stats.removed, calls) == (0, 0, 0, [])

        users = shop_repo / "shop" / "users.py"
        users.write_text(users.read_text() + "\n\ndef gravatar_url(email):\n    return email\n")
        os.utime(shop_repo / "shop" / "cart.py")  # touched, same content: hashed, not re-chunked
        st = (shop_repo / "shop" / "cart.py").stat()
        os.utime(shop_repo / "shop" / "cart.py", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        (shop_repo / "shop" / "shipping.py").unlink()
        stats = index.update(show_progress=False)
        assert (stats.added, stats.changed, stats.removed, calls) == (0, 1, 1, ["shop/users.py"])
        assert index.search("gravatar_url")[0].name == "gravatar_url"  # the BM25 cache was rebuilt
        assert index.definitions([PLANTED]) == [] and "shop/shipping.py" not in index.files()
        assert all(c.path != "shop/shipping.py" for c in index.chunks())
    assert db.exists() and not (shop_repo / ".starcoder2").exists()


def test_a_stale_schema_is_rebuilt(shop_repo, tmp_path):
    db = tmp_path / "index.sqlite"
    with RepoIndex.open(shop_repo, db_path=db) as index:
        index.update(show_progress=False)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    with RepoIndex.open(shop_repo, db_path=db) as index:
        assert index.files() == []
        assert index.update(show_progress=False).added == 6


def test_bm25_scores_match_a_float64_reference(shop_repo):
    """bm25s (Lucene variant, k1=1.5, b=0.75) against the formula written out in float64."""
    with RepoIndex.open(shop_repo) as index:
        index.update(show_progress=False)
        docs = [code_tokens(f"{c.path} {c.name or ''} {c.text}") for c in index.chunks()]
        query = "total price of the cart items with shipping rates"
        hits = index.search(query, k=100)
    n, avg = len(docs), sum(map(len, docs)) / len(docs)
    df = Counter(t for d in docs for t in set(d))

    def reference(doc):
        tf = Counter(doc)
        return sum(math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) * tf[t] / (tf[t] + 1.5 * (0.25 + 0.75 * len(doc) / avg))
                   for t in code_tokens(query) if t in df)

    expected = sorted((reference(d) for d in docs), reverse=True)
    assert len(hits) == sum(s > 0 for s in expected)
    assert [h.score for h in hits] == pytest.approx(expected[: len(hits)], rel=1e-5)


def test_cli_index_prints_a_summary_and_results(shop_repo, capsys):
    from starcoder2.cli import main

    assert main(["index", str(shop_repo), "-q", "--query", "shipping cost for a zone", "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"indexed {shop_repo.resolve()}: 6 files") and "Python 3" in out[0]
    assert len(out) == 3 and f"shop/shipping.py:4-6  function {PLANTED}" in out[1]
    assert main(["index", str(shop_repo / "missing"), "-q"]) == 1
    assert capsys.readouterr().err.strip() == f"starcoder2: error: {shop_repo / 'missing'}: not a directory"


def test_outside_git_every_visible_file_is_indexed(tmp_path):
    root = write_repo(tmp_path / "plain", git=False)
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.py").write_text("def hidden(): pass\n")
    with RepoIndex.open(root, db_path=tmp_path / "db.sqlite") as index:
        index.update(show_progress=False)
        files = index.files()
    assert "ignored/secret.py" in files and ".hidden/h.py" not in files  # no git: no .gitignore either
    assert len(files) == sum(1 for p in FILES if p.endswith((".py", ".js", ".md")))


def test_binary_files_are_skipped_and_not_read_again(shop_repo, monkeypatch):
    (shop_repo / "shop" / "blob.py").write_bytes(b"\x00\x01binary")
    with RepoIndex.open(shop_repo) as index:
        first = index.update(show_progress=False)
        assert "shop/blob.py" not in index.files() and first.files == 6
        reads = []
        real = index_module.decode_source
        monkeypatch.setattr(index_module, "decode_source", lambda data, n: reads.append(data) or real(data, n))
        again = index.update(show_progress=False)
        assert reads == [] and again.skipped == first.skipped and again.files == 6
        (shop_repo / "shop" / "blob.py").write_text("def now_text():\n    pass\n")
        fixed = index.update(show_progress=False)
        assert fixed.changed == 1 and fixed.skipped == first.skipped - 1 and "shop/blob.py" in index.files()
