"""`starcoder2 bench` end to end on a tiny checkpoint: workers, JSON, tables, scenarios, skip notes.

Fast on purpose: one layer of hidden size 128, short prompts, one rep, native kernels off (their
first build takes a minute; they have their own tests), no transformers or llama.cpp workers."""

import json

import pytest
import torch

from starcoder2 import bench, cli
from starcoder2.checkpoint import save_model
from starcoder2.config import tiny
from starcoder2.model import StarCoder2

SIZES = ["--prefill-len", "64", "--prompt-len", "16", "--new-tokens", "12", "--batch", "4",
         "--batch-new-tokens", "6", "--keystroke-len", "200", "--keystroke-extra", "5", "--spec-len", "80"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = tiny().replace(hidden_size=128, intermediate_size=512, num_layers=1, max_position_embeddings=1024,
                         sliding_window=None)
    torch.manual_seed(0)
    model = StarCoder2(cfg)
    model.init_weights()
    with torch.no_grad():  # sharper logits than the init: fewer bf16 near-ties in greedy decoding
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return save_model(model, tmp_path_factory.mktemp("bench") / "tiny", dtype=torch.bfloat16)


def test_bench_writes_json_tables_and_scenarios(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("STARCODER2_NATIVE_KERNELS", "0")  # inherited by the workers
    out = tmp_path / "bench.json"
    code = bench.main(["--model", str(checkpoint), "--variants", "ours-bf16,ours-int8,llama-q4_0", "--reps", "1",
                       "--json", str(out), "--plot", str(tmp_path / "bench.png"), "--workdir", str(tmp_path / "wd"),
                       "--llama-cpp-src", "", *SIZES])
    stdout = capsys.readouterr().out
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["summary"]) == {"ours-bf16", "ours-int8"}  # llama.cpp: skipped with a note
    assert any(n.startswith("llama.cpp peer skipped") for n in data["notes"])
    assert (tmp_path / "bench.png").is_file() or any(n.startswith("plot skipped") for n in data["notes"])
    for name, s in data["summary"].items():
        for key in ("load_s", "peak_rss_gib", "weight_bytes", "limit_tok_s", "ttft_512_s", "prefill_tok_s",
                    "decode_tok_s", "batch_tok_s", "decode_pct_of_limit", "batch_over_decode"):
            assert s[key] > 0, (name, key)
    assert data["summary"]["ours-int8"]["weight_bytes"] < data["summary"]["ours-bf16"]["weight_bytes"]
    assert data["protocol"]["scenarios"] == "ours-bf16" and data["bandwidth_gbs"] > 0.5
    s = data["summary"]["ours-bf16"]
    assert s["limit_tok_s"] == pytest.approx(data["bandwidth_gbs"] * 1e9 / s["weight_bytes"])

    scenarios = data["results"][0]["scenarios"]
    (key,) = scenarios["keystroke"]
    assert key["cached_tokens"] == 200 and key["cold_ttft_s"] > 0 and key["warm_ttft_s"] > 0
    (spec,) = scenarios["speculation"]
    assert spec["identical"] and spec["tokens"] == 12 and spec["plain_tok_s"] > 0 and spec["spec_tok_s"] > 0
    assert data["summary"]["ours-bf16"]["speculation"]["identical"] is True

    for text in ("| ours-bf16 |", "| ours-int8 |", "*bandwidth limit*", "editor keystroke", "greedy outputs identical",
                 "Note: llama.cpp peer skipped"):
        assert text in stdout


def test_cli_bench_errors_are_one_line(capsys):
    assert cli.main(["bench", "--variants", "ours-fp64"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("starcoder2: error: unknown variant 'ours-fp64'") and err.count("\n") == 1
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", "--help"])
    assert exc.value.code == 0 and "usage: starcoder2 bench" in capsys.readouterr().out


def test_variants_follow_the_machine(monkeypatch):
    """bf16 baselines only where bf16 is fast; quantized activations in the "auto" dtype; the engine
    scenarios on the first unquantized ours variant."""
    import starcoder2.device as device
    for fast, float_variant, act in ((True, "ours-bf16", "bf16"), (False, "ours-fp32", "fp32")):
        monkeypatch.setattr(device, "fast_bf16", lambda *a, fast=fast: fast)
        names = bench.default_variants().split(",")
        assert names[0] == float_variant and f"transformers-{act}" in names
        assert all(n in bench.VARIANTS for n in names)
        assert bench.activation_dtype(bench.VARIANTS["ours-int4"]) == act
    assert bench.scenario_variant(["llama-q8_0", "ours-int8", "ours-fp32", "ours-bf16"]) == "ours-fp32"
    assert bench.scenario_variant(["ours-int8"]) is None


def test_measured_bandwidth_is_plausible():
    gbs = bench.measure_bandwidth(threads=1, gib=0.25, reps=2)
    assert 0.5 < gbs < 2000  # a 256 MiB read: GB/s, not bytes/s or a division slip
