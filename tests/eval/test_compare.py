"""`starcoder2 compare`: variants parse, and two tiny models give the table, the JSON and the plot."""

from __future__ import annotations

import json

from starcoder2 import cli
from starcoder2.eval.compare import Variant, markdown_table, parse_variant


def test_parse_variant():
    assert parse_variant("ckpt:int8") == Variant("ckpt:int8", "ckpt", quantize="int8")
    assert parse_variant("/a/b:bf16") == Variant("/a/b:bf16", "/a/b", dtype="bf16")
    assert parse_variant("bigcode/starcoder2-3b") == Variant("bigcode/starcoder2-3b", "bigcode/starcoder2-3b")
    assert parse_variant("dir:with:colon") == Variant("dir:with:colon", "dir:with:colon")


def test_markdown_table_shows_na():
    row = {"model": "m", "parameters": 2e6, "rss_bytes": 3 * 2**20, "load_s": 0.5, "ttft_s": 0.01, "tok_s": 100.0,
           "pass@1": 0.25, "fim_exact_match": None}
    table = markdown_table([row])
    assert "| m | 2.0 M | 3 MiB | 0.50 | 10.0 | 100.0 | 0.250 | n/a |" in table


def test_compare_two_tiny_models(capsys, tmp_path, tiny_checkpoint):
    code = cli.main(["compare", f"{tiny_checkpoint}:fp32", f"{tiny_checkpoint}:bf16", "--device", "cpu",
                     "--limit", "1", "--speed-prompts", "1", "--speed-tokens", "4", "--max-new-tokens", "8",
                     "--plot", str(tmp_path / "cmp.png"), "--output", str(tmp_path / "cmp.json")])
    out, err = capsys.readouterr()
    assert code == 0, err
    rows = json.loads((tmp_path / "cmp.json").read_text())
    assert [r["model"] for r in rows] == [f"{tiny_checkpoint}:fp32", f"{tiny_checkpoint}:bf16"]
    for r in rows:
        assert r["parameters"] > 0 and r["load_s"] > 0 and r["ttft_s"] > 0 and r["tok_s"] > 0
        assert 0.0 <= r["pass@1"] <= 1.0 and "fim_exact_match" in r
    assert out.splitlines()[0].startswith("| model | parameters | memory (RSS) |") and len(out.splitlines()) == 4
    assert (tmp_path / "cmp.png").stat().st_size > 1000
