"""LoRA adapters: peft's injection starts as a no-op and trains only the adapters; our PEFT-format
files round-trip and load in peft on transformers' Starcoder2ForCausalLM with the same logits;
merging (W += alpha/r * B @ A) matches the adapter applied, at load too (fp32 and int8); a
mismatched or unsupported adapter is a one-line error.

All in fp32 on the tiny config; tolerances: 1e-5 absolute on logits of order 1 (fp32 sums in a
different order), exact where the same operations run.
"""

from __future__ import annotations

import json

import pytest
import torch

from starcoder2 import cli
from starcoder2.adapters import TARGETS, AdapterConfig, AdapterError, load_adapter, merge_adapter, save_adapter
from starcoder2.checkpoint import load_model
from starcoder2.config import tiny
from starcoder2.finetune.lora import inject_lora, lora_pairs
from starcoder2.infer.quantize import QUANT_TARGETS
from starcoder2.model import StarCoder2

from .conftest import hf_reference

IDS = torch.tensor([[5, 17, 3, 99, 42, 7, 250, 11, 64, 8, 1, 300, 2, 77, 19, 120, 33, 4, 6, 500]])  # (1, 20): past the window of 16
ADAPTER = AdapterConfig(r=4, lora_alpha=8.0, target_modules=("q_proj", "v_proj", "c_fc", "c_proj"),
                        base_model_name_or_path="tiny")


def _trained_lora(model: StarCoder2, config: AdapterConfig = ADAPTER, seed: int = 1) -> StarCoder2:
    """Inject LoRA and give every B (zero at init) random values, as training would."""
    inject_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, B in lora_pairs(model).values():
            B.copy_(torch.randn(B.shape, generator=g) * 0.2)
    return model.eval()


def _copy(model: StarCoder2) -> StarCoder2:
    out = StarCoder2(model.config)
    out.load_state_dict(model.state_dict())
    out.tie_weights()
    return out.eval()


@torch.no_grad()
def test_lora_starts_as_an_exact_no_op_and_trains_only_the_adapters():
    torch.manual_seed(0)
    base = StarCoder2(tiny())
    base.init_weights(torch.Generator().manual_seed(0))
    expected = base.eval()(IDS)
    model = inject_lora(_copy(base), ADAPTER).eval()
    assert torch.equal(model(IDS), expected)  # B = 0: not merely close
    pairs = lora_pairs(model)
    assert set(pairs) == {f"layers.{i}.{m}" for i in range(2) for m in
                          ("self_attn.q_proj", "self_attn.v_proj", "mlp.c_fc", "mlp.c_proj")}
    assert all(not B.any() and A.any() for A, B in pairs.values())
    with torch.enable_grad():
        model.train()
        model(IDS).logsumexp(-1).mean().backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == with_grad and trained and all(".lora_A." in n or ".lora_B." in n for n in trained)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trained)
    assert all(B.grad.abs().sum() > 0 for _, B in pairs.values())  # dL/dB = (x A^T)^T dy: non-zero


@torch.no_grad()
def test_merge_matches_the_adapter_applied_and_the_float64_formula():
    base = StarCoder2(tiny())
    base.init_weights(torch.Generator().manual_seed(0))
    adapted = _trained_lora(_copy(base))
    pairs = {m: (A.clone(), B.clone()) for m, (A, B) in lora_pairs(adapted).items()}
    from starcoder2.adapters import Adapter

    merged = merge_adapter(_copy(base), Adapter(ADAPTER, pairs))
    torch.testing.assert_close(merged(IDS), adapted(IDS), rtol=0, atol=1e-5)
    assert not torch.allclose(merged(IDS), base(IDS), atol=1e-3)  # the adapter does something
    A, B = pairs["layers.1.mlp.c_fc"]
    want = base.layers[1].mlp.c_fc.weight.double() + (8.0 / 4) * (B.double() @ A.double())
    torch.testing.assert_close(merged.layers[1].mlp.c_fc.weight.double(), want, rtol=0, atol=1e-6)
    assert torch.equal(merged.layers[1].self_attn.k_proj.weight, base.layers[1].self_attn.k_proj.weight)


@torch.no_grad()
def test_saved_adapter_loads_in_peft_on_transformers_with_equal_logits(tmp_path):
    from peft import PeftModel

    cfg = tiny()
    hf, ours = hf_reference(cfg)
    base_logits = hf(IDS).logits
    adapted = _trained_lora(ours)
    path = save_adapter(lora_pairs(adapted), ADAPTER, tmp_path / "adapter")
    raw = json.loads((path / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["task_type"] == "CAUSAL_LM" and raw["r"] == 4
    assert raw["lora_alpha"] == 8.0 and raw["base_model_name_or_path"] == "tiny"
    assert sorted(raw["target_modules"]) == ["c_fc", "c_proj", "q_proj", "v_proj"]
    peft_model = PeftModel.from_pretrained(hf, str(path)).eval()
    got = peft_model(input_ids=IDS).logits
    torch.testing.assert_close(got, adapted(IDS), rtol=0, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # peft really applied it
    # and peft's own save of what it loaded has exactly our tensor names
    peft_model.save_pretrained(str(tmp_path / "resaved"))
    from safetensors.torch import load_file

    ours_t, theirs = (load_file(str(p / "adapter_model.safetensors")) for p in (path, tmp_path / "resaved"))
    assert sorted(ours_t) == sorted(theirs)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours_t
    for k in ours_t:
        torch.testing.assert_close(ours_t[k], theirs[k], rtol=0, atol=0)


def test_adapter_round_trips_and_lora_targets_are_the_quantized_linears(tmp_path):
    assert set(TARGETS) == set(QUANT_TARGETS)  # load() merges every target as it streams into quantization
    g = torch.Generator().manual_seed(0)
    pairs = {"layers.1.self_attn.q_proj": (torch.randn(4, 64, generator=g), torch.randn(64, 4, generator=g))}
    path = save_adapter(pairs, ADAPTER, tmp_path / "a")
    back = load_adapter(path)
    assert back.config == ADAPTER and back.path == path
    assert torch.equal(back.pairs["layers.1.self_attn.q_proj"][0], pairs["layers.1.self_attn.q_proj"][0])
    assert not list(tmp_path.glob(".a.*"))  # the temporary directory was renamed into place


def _adapter_for(config, tmp_path, name="adapter", seed=1):
    model = StarCoder2(config)
    model.init_weights(torch.Generator().manual_seed(0))
    return save_adapter(lora_pairs(_trained_lora(model, seed=seed)), ADAPTER, tmp_path / name)


def test_mismatched_or_unsupported_adapters_are_refused_with_the_reason(tmp_path):
    model = StarCoder2(tiny())
    wider = _adapter_for(tiny().replace(hidden_size=96, num_heads=4, num_kv_heads=2), tmp_path, "wider")
    with pytest.raises(AdapterError, match=r"does not fit this base model \(it was trained on tiny\): "
                                           r"layers.0.mlp.c_fc is 256x64 here but 256x96"):
        merge_adapter(model, wider)
    deeper = _adapter_for(tiny().replace(num_layers=3), tmp_path, "deeper")
    with pytest.raises(AdapterError, match="adapts layers.2.mlp.c_fc, which a 2-layer model does not have"):
        merge_adapter(model, deeper)
    ok = _adapter_for(tiny(), tmp_path)
    raw = json.loads((ok / "adapter_config.json").read_text())
    for change, message in [({"use_dora": True}, "use_dora=True is not supported"),
                            ({"target_modules": ".*proj"}, "as a regex"),
                            ({"peft_type": "IA3"}, "only LORA"),
                            ({"target_modules": ["lm_head"]}, "unknown LoRA target")]:
        (ok / "adapter_config.json").write_text(json.dumps({**raw, **change}))
        with pytest.raises(AdapterError, match=message):
            load_adapter(ok)
    (ok / "adapter_config.json").write_text(json.dumps(raw))
    (ok / "adapter_model.safetensors").rename(ok / "adapter_model.bin")
    with pytest.raises(AdapterError, match="pickle adapter_model.bin is never loaded"):
        load_adapter(ok)
    with pytest.raises(AdapterError, match="has no adapter_config.json"):
        load_adapter(tmp_path)


def test_load_with_adapter_equals_the_merged_checkpoint_in_fp32_and_int8(tiny_checkpoint, tmp_path, capsys):
    import starcoder2

    base, _ = load_model(tiny_checkpoint)
    adapter = _adapter_for(base.config, tmp_path)
    assert cli.main(["merge", "-m", str(tiny_checkpoint), "-a", str(adapter), "-o", str(tmp_path / "merged")]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / 'merged'}\n"
    ids = IDS[:, :8]
    for kw in ({"dtype": "fp32"}, {"quantize": "int8"}):
        got = starcoder2.load(tiny_checkpoint, adapter=adapter, **kw).model(ids)
        want = starcoder2.load(tmp_path / "merged", **kw).model(ids)
        plain = starcoder2.load(tiny_checkpoint, **kw).model(ids)
        assert torch.equal(got, want), kw  # the same merged weights, then the same kernels
        assert not torch.allclose(got, plain, atol=1e-3), kw


def test_cli_adapter_errors_are_one_line(tiny_checkpoint, tmp_path, capsys):
    wrong = _adapter_for(tiny().replace(num_layers=3), tmp_path)
    for argv, message in [
        (["complete", "x", "--model", str(tiny_checkpoint), "--adapter", str(wrong)], "does not fit this base model"),
        (["complete", "x", "--model", str(tiny_checkpoint), "--adapter", str(tmp_path)], "is not a LoRA adapter"),
        (["merge", "-m", str(tiny_checkpoint), "-a", str(wrong), "-o", str(tmp_path / "m")], "does not fit"),
    ]:
        assert cli.main(argv) == 1, argv
        out, err = capsys.readouterr()
        assert out == "" and len(err.strip().splitlines()) == 1 and err.startswith("starcoder2: error: "), err
        assert message in err, err
    assert not (tmp_path / "m").exists()
