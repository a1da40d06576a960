"""starcoder2.load() and the object it returns, on a tiny checkpoint written by the tests."""

import pytest
import torch

import starcoder2
from starcoder2.checkpoint import CheckpointError
from starcoder2.prompts import fim_prompt


@pytest.fixture(scope="module")
def sc(tiny_checkpoint):
    return starcoder2.load(tiny_checkpoint, dtype="fp32", device="cpu")


def test_load_returns_model_tokenizer_config(sc):
    assert isinstance(sc.model, torch.nn.Module) and sc.config.vocab_size == 640
    ids = torch.tensor([sc.tokenizer.encode("def f(x):\n    return x")])
    logits = sc.model(ids)
    assert logits.shape == (1, ids.shape[1], sc.config.vocab_size)


def test_generate_returns_new_ids_and_greedy_is_argmax_chain(sc):
    prompt = sc.tokenizer.encode("import os\n")
    new = sc.generate(prompt, max_new_tokens=6)
    ids = list(prompt)
    with torch.no_grad():
        for tok in new:
            assert tok == int(sc.model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(tok)
    assert sc.generate([prompt, prompt[:2]], max_new_tokens=6)[0] == new
    assert sc.generate(torch.tensor([prompt]), max_new_tokens=6) == [new]


def test_complete_equals_decoded_generate(sc):
    prompt = "def add(a, b):\n"
    ids = sc.generate(sc.tokenizer.encode(prompt), max_new_tokens=20)
    assert sc.complete(prompt, max_new_tokens=20) == sc.tokenizer.decode(ids)
    assert "".join(sc.stream_complete(prompt, max_new_tokens=20)) == sc.complete(prompt, max_new_tokens=20)


def test_seed_reproducible(sc):
    a = sc.complete("x", max_new_tokens=15, temperature=1.0, seed=3)
    assert a == sc.complete("x", max_new_tokens=15, temperature=1.0, seed=3)


def test_stop_string_not_in_output(sc):
    free = sc.complete("def f", max_new_tokens=30)
    if len(free) > 6:
        stop = free[3:6]
        got = sc.complete("def f", max_new_tokens=30, stop=[stop])
        assert got == free[:free.index(stop)]


def test_infill_uses_fim_prompt(sc):
    prefix, suffix = "def f(x):\n    ", "\n    return y\n"
    ids = sc.generate(fim_prompt(sc.tokenizer, prefix, suffix), max_new_tokens=12)
    middle = sc.infill(prefix, suffix, max_new_tokens=12)
    fim_stops = {sc.tokenizer.token_id(t) for t in ("<file_sep>", "<fim_prefix>", "<fim_suffix>", "<fim_middle>")}
    cut = next((i for i, t in enumerate(ids) if t in fim_stops), len(ids))
    assert middle == sc.tokenizer.decode(ids[:cut])


def test_load_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    with pytest.raises(CheckpointError, match="not in the Hugging Face cache"):
        starcoder2.load("bigcode/starcoder2-3b")
    with pytest.raises(CheckpointError, match="no config.json"):
        starcoder2.load(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        starcoder2.load(tmp_path, dtype="int3")


def test_missing_tokenizer_is_a_checkpoint_error(tiny_checkpoint, tmp_path):
    import shutil
    shutil.copytree(tiny_checkpoint, tmp_path / "c")
    (tmp_path / "c" / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        starcoder2.load(tmp_path / "c")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_load_streams_and_equals_quantizing_a_loaded_model(tiny_checkpoint, mode):
    from starcoder2.checkpoint import load_model
    from starcoder2.infer.quantize import QuantizedLinear, quantize_head, quantize_model, use_native_kernels
    streamed = starcoder2.load(tiny_checkpoint, quantize=mode, group_size=64)
    assert sum(isinstance(m, QuantizedLinear) for m in streamed.model.modules()) == 12 + 1  # + the int8 head
    assert not any(p.is_meta for p in streamed.model.parameters())
    full, _ = load_model(tiny_checkpoint, torch.float32)  # quantized from the stored precision, as streamed
    quantize_model(full, mode, group_size=64, dtype=streamed.model.norm.weight.dtype)  # "auto"
    quantize_head(full)
    use_native_kernels(full)
    ids = torch.tensor([streamed.tokenizer.encode("def f(x):\n    return x + 1\n")])
    with torch.no_grad():
        assert torch.equal(streamed.model(ids), full(ids))
