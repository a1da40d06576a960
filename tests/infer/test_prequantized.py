"""Pre-quantized checkpoints (`convert --quantize`): saved buffers load without a quantization pass
and give logits identical to quantizing at load; AWQ scales survive; clear errors on conflicts."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import starcoder2
import starcoder2.infer.quantize as quant
from starcoder2.api import load_for_inference
from starcoder2.checkpoint import CheckpointError, load_model, save_model
from starcoder2.cli import main

IDS = torch.tensor([[5, 17, 42, 99, 7, 300, 12, 8, 64, 3, 77, 150]])


def _convert(src, out, mode, group_size=64):
    assert main(["convert", str(src), "--quantize", mode, "--group-size", str(group_size), "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def prequantized(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("preq")
    return {m: _convert(tiny_checkpoint, root / m, m) for m in ("int8", "int4")}


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_logits_identical_to_quantize_at_load(prequantized, tiny_checkpoint, mode, monkeypatch):
    # bf16 on both sides: the file keeps embeddings and norms in bf16, the tiny checkpoint in fp32
    at_load = starcoder2.load(tiny_checkpoint, quantize=mode, group_size=64, dtype="bf16")
    # loading the saved buffers must not quantize the layers again: only the LM head (int8, from the
    # float embedding the file keeps) is quantized at load
    for fn in ("quantize_int4", "quantize_model"):
        monkeypatch.setattr(quant, fn, lambda *a, **k: pytest.fail("re-quantized at load"))
    calls, int8 = [], quant.quantize_int8
    monkeypatch.setattr(quant, "quantize_int8", lambda w: calls.append(w.shape) or int8(w))
    stored = starcoder2.load(prequantized[mode], dtype="bf16")
    assert calls == [(stored.config.vocab_size, stored.config.hidden_size)]
    layers = [m for m in stored.model.modules() if isinstance(m, quant.QuantizedLinear)]
    assert len(layers) == 6 * stored.config.num_layers + 1 and all(m.mode == mode for m in layers[:-1])
    with torch.no_grad():
        assert torch.equal(stored.model(IDS), at_load.model(IDS))
    assert stored.generate(IDS[0].tolist(), max_new_tokens=8) == at_load.generate(IDS[0].tolist(), max_new_tokens=8)
    assert stored.tokenizer.encode("x = 1") == at_load.tokenizer.encode("x = 1")


def test_files_hold_the_documented_format(prequantized):
    for mode, path in prequantized.items():
        qc = json.loads((path / "config.json").read_text())["quantization_config"]
        assert qc["quant_method"] == "starcoder2" and qc["format_version"] == 1 and qc["mode"] == mode
        assert qc["group_size"] == (64 if mode == "int4" else None) and qc["awq_layers"] == []
        with safe_open(str(path / "model.safetensors"), "pt") as f:
            w = f.get_tensor("model.layers.0.mlp.c_fc.weight")  # (256, 64) float in the source
            scale = f.get_tensor("model.layers.0.mlp.c_fc.scale")
            assert w.dtype == torch.uint8 and w.shape == ((256, 64) if mode == "int8" else (256, 32))
            assert scale.shape == ((256,) if mode == "int8" else (256, 1))
            assert ("model.layers.0.mlp.c_fc.lo" in f.keys()) == (mode == "int4")
            assert f.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16


def test_awq_scales_round_trip(tiny_checkpoint, tmp_path):
    model, _ = load_model(tiny_checkpoint, torch.bfloat16)
    # an AWQ input scaling on two layers (as `quantize_model(calibration=...)` picks it), plain rounding elsewhere
    torch.manual_seed(0)
    for block, proj in ((model.layers[0].self_attn, "q_proj"), (model.layers[1].mlp, "c_proj")):
        lin = getattr(block, proj)
        s = torch.rand(lin.in_features) + 0.5
        setattr(block, proj, quant.QuantizedLinear(lin, "int4", 64, "reference", in_scale=s))
    quant.quantize_model(model, "int4", group_size=64, kernel="reference")
    qc = quant.quantization_config(model)
    assert qc["awq_layers"] == ["layers.0.self_attn.q_proj", "layers.1.mlp.c_proj"]
    out = save_model(model, tmp_path / "awq", tokenizer_dir=tiny_checkpoint, quantization_config=qc)
    loaded, _ = load_for_inference(out, dtype="bf16", native=False, head=False)  # as the model was built
    by_name = dict(loaded.named_modules())
    assert [n for n, m in by_name.items() if getattr(m, "in_scale", None) is not None] == qc["awq_layers"]
    for m in loaded.modules():
        if isinstance(m, quant.QuantizedLinear):
            m.kernel = "reference"
    with torch.no_grad():
        assert torch.equal(loaded(IDS), model(IDS))


def test_conflicts_and_misuse_fail_clearly(prequantized, tiny_checkpoint, tmp_path, capsys):
    int4 = prequantized["int4"]
    assert starcoder2.load(int4, quantize="int4").config.num_layers == 2  # the same mode is fine
    with pytest.raises(CheckpointError, match="pre-quantized to int4"):
        starcoder2.load(int4, quantize="int8")
    assert main(["complete", "x = 1", "--model", str(int4), "--quantize", "int8", "--max-new-tokens", "2"]) == 1
    err = capsys.readouterr().err
    assert "pre-quantized to int4" in err and err.count("\n") == 1
    # plain loading (training, `convert` to float, transformers-style use) refuses instead of misreading
    with pytest.raises(CheckpointError, match="pre-quantized int4"):
        load_model(int4)
    assert main(["convert", str(int4), "--out", str(tmp_path / "f")]) == 1
    assert main(["convert", str(int4), "--to", "gguf", "--out", str(tmp_path / "m.gguf")]) == 1
    assert "pre-quantized" in capsys.readouterr().err
    # someone else's quantization_config (e.g. a GPTQ checkpoint from the hub)
    other = tmp_path / "gptq"
    other.mkdir()
    for f in int4.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((other / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="quant_method='gptq'"):
        starcoder2.load(other)
