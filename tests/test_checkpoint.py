"""Hugging Face layout in both directions, model-id resolution, and the loader's errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from starcoder2.checkpoint import CheckpointError, hf_to_native, load_model, native_to_hf, resolve, save_model
from starcoder2.config import tiny

from .conftest import hf_reference


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def test_name_table_round_trips():
    _, ours = hf_reference(tiny().replace(tie_word_embeddings=False))
    for name in ours.state_dict():
        assert hf_to_native(native_to_hf(name)) == name
    assert hf_to_native("model.layers.3.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("tied", [True, False])
def test_sharded_transformers_checkpoint_loads_in_ours(tmp_path, tied):
    cfg = tiny().replace(tie_word_embeddings=tied)
    hf, _ = hf_reference(cfg)
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours, loaded_cfg = load_model(tmp_path)
    assert loaded_cfg == cfg
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() < 1e-5


@pytest.mark.parametrize("tied", [True, False])
def test_our_sharded_checkpoint_loads_in_transformers(tmp_path, tied):
    from transformers import Starcoder2ForCausalLM
    cfg = tiny().replace(tie_word_embeddings=tied, rope_theta=999999.4420358813)
    _, ours = hf_reference(cfg)
    save_model(ours, tmp_path / "out", max_shard_size="100KB")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    hf = Starcoder2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, cfg.vocab_size, (2, 40))
    assert (_logits(hf, ids) - _logits(ours, ids)).abs().max() < 1e-5
    again, _ = load_model(tmp_path / "out")
    assert torch.equal(_logits(again, ids), _logits(ours, ids))


def test_load_casts_dtype_and_save_keeps_it(tmp_path):
    _, ours = hf_reference(tiny())
    save_model(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    state = load_file(tmp_path / "bf16" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    m, _ = load_model(tmp_path / "bf16", dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in m.parameters())


def test_load_builds_no_second_copy(tmp_path):
    """Loaded parameters are the tensors read from the file (assign=True), not copies into an init."""
    _, ours = hf_reference(tiny())
    save_model(ours, tmp_path / "c")
    m, _ = load_model(tmp_path / "c")
    assert not any(p.is_meta for p in m.parameters())
    assert m.lm_head.weight is m.embed_tokens.weight


@pytest.fixture
def saved(tmp_path):
    _, ours = hf_reference(tiny())
    return save_model(ours, tmp_path / "ckpt")


def _edit(path, fn):
    f = path / "model.safetensors"
    state = load_file(f)
    fn(state)
    save_file(state, f, metadata={"format": "pt"})


def test_error_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(CheckpointError, match="model_type"):
        load_model(tmp_path)


def test_error_missing_tensor(saved):
    _edit(saved, lambda s: s.pop("model.layers.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing: model\.layers\.1\.mlp\.c_fc\.bias"):
        load_model(saved)


def test_error_extra_tensor(saved):
    _edit(saved, lambda s: s.__setitem__("model.layers.7.mlp.c_fc.bias", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.layers\.7\.mlp\.c_fc\.bias'"):
        load_model(saved)
    _edit(saved, lambda s: (s.pop("model.layers.7.mlp.c_fc.bias"), s.__setitem__("model.foo", torch.zeros(1))))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model\.foo'"):
        load_model(saved)


def test_error_misshaped_tensor(saved):
    _edit(saved, lambda s: s.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(64, 64)))
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' has shape \[64, 64\], expected \[32, 64\]"):
        load_model(saved)


def test_error_tied_config_with_head(saved):
    _edit(saved, lambda s: s.__setitem__("lm_head.weight", s["model.embed_tokens.weight"].clone()))
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        load_model(saved)


def test_error_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(saved)


def test_refuses_pickle_weights(tmp_path, saved):
    (saved / "model.safetensors").unlink()
    (saved / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        load_model(saved)


def test_resolve_model_id_from_hf_cache(tmp_path, monkeypatch, saved):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    repo = tmp_path / "hf" / "hub" / "models--bigcode--starcoder2-3b"
    with pytest.raises(CheckpointError, match=r"models--bigcode--starcoder2-3b.*hf download bigcode/starcoder2-3b"):
        resolve("bigcode/starcoder2-3b")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(saved, repo / "snapshots" / "abc123")
    assert resolve("bigcode/starcoder2-3b") == repo / "snapshots" / "abc123"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(CheckpointError, match="elsewhere"):
        resolve("bigcode/starcoder2-3b")


def test_failed_save_keeps_the_old_checkpoint(saved, monkeypatch):
    before = (saved / "model.safetensors").read_bytes()
    _, other = hf_reference(tiny(), seed=1)

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr("starcoder2.checkpoint.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(other, saved)
    assert (saved / "model.safetensors").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == ["ckpt"]  # no temporary left behind


def test_read_tensor_without_mmap(saved, tmp_path):
    from starcoder2.checkpoint import read_tensor
    m, _ = load_model(saved)
    for name in ("layers.1.mlp.c_fc.weight", "embed_tokens.weight", "norm.bias"):
        assert torch.equal(read_tensor(saved, name), m.state_dict()[name])
    _, ours = hf_reference(tiny())
    save_model(ours, tmp_path / "sharded", max_shard_size="50KB")
    assert torch.equal(read_tensor(tmp_path / "sharded", "layers.0.self_attn.q_proj.weight"),
                       ours.layers[0].self_attn.q_proj.weight)


def test_deferred_tensors_stay_on_meta(saved):
    m, _ = load_model(saved, defer=lambda n: n.endswith("c_fc.weight"))
    assert m.layers[0].mlp.c_fc.weight.is_meta and not m.layers[0].mlp.c_proj.weight.is_meta


def test_read_tensor_rows_is_a_slice_of_the_whole(saved):
    from starcoder2.checkpoint import read_tensor
    whole = read_tensor(saved, "embed_tokens.weight")
    for a, b in ((0, 1), (3, 17), (whole.shape[0] - 5, whole.shape[0])):
        assert torch.equal(read_tensor(saved, "embed_tokens.weight", (a, b)), whole[a:b])


def test_load_reads_into_the_callers_memory_and_casts(saved):
    made = []

    def alloc(shape, dtype):
        made.append(torch.empty(shape, dtype=dtype))
        return made[-1]

    ref, _ = load_model(saved)
    m, _ = load_model(saved, dtype=torch.bfloat16, alloc=alloc)
    ptrs = {t.data_ptr() for t in made}
    assert all(p.data_ptr() in ptrs and p.dtype == torch.bfloat16 for p in m.parameters())
    for (name, a), b in zip(ref.state_dict().items(), m.state_dict().values()):
        assert torch.equal(a.to(torch.bfloat16), b), name
