import pytest

from starcoder2.config import ModelConfig, preset, tiny


@pytest.mark.parametrize("name, params, embed", [
    ("3b", 3_030_371_328, 150_994_944),
    ("7b", 7_173_923_840, 226_492_416),
    ("15b", 15_957_889_024, 301_989_888),
])
def test_preset_parameter_counts_match_reference(name, params, embed):
    cfg = preset(name)
    assert cfg.num_params == params
    assert cfg.vocab_size * cfg.hidden_size == embed
    assert cfg.head_dim == 128 and cfg.sliding_window == 4096 and cfg.max_position_embeddings == 16384


def test_preset_values_of_official_configs():
    assert preset("3b").rope_theta == 999999.4420358813
    assert preset("starcoder2-7b").rope_theta == 1e6 and preset("7b").num_kv_heads == 4
    assert preset("15b").rope_theta == 1e5 and not preset("15b").tie_word_embeddings
    assert preset("15b").initializer_range == 0.01275
    with pytest.raises(ValueError, match="unknown preset"):
        preset("1b")


def test_num_params_equals_module_count():
    import torch
    from starcoder2.model import StarCoder2
    for cfg in (tiny(), tiny().replace(tie_word_embeddings=False, num_kv_heads=4)):
        with torch.device("meta"):
            m = StarCoder2(cfg)
        assert sum(p.numel() for p in m.parameters()) == cfg.num_params


def _hf_7b_file() -> dict:
    """The 7B config.json, including its GPTBigCode leftovers (reference §4.1)."""
    return {
        "activation_function": "gelu", "architectures": ["Starcoder2ForCausalLM"], "attention_dropout": 0.1,
        "attention_softmax_in_fp32": True, "bos_token_id": 0, "embedding_dropout": 0.1, "eos_token_id": 0,
        "hidden_act": "gelu_pytorch_tanh", "hidden_size": 4608, "initializer_range": 0.018042,
        "intermediate_size": 18432, "layer_norm_epsilon": 1e-05, "max_position_embeddings": 16384,
        "mlp_type": "default", "model_type": "starcoder2", "norm_epsilon": 1e-05, "norm_type": "layer_norm",
        "num_attention_heads": 36, "num_hidden_layers": 32, "num_key_value_heads": 4, "residual_dropout": 0.1,
        "rope_theta": 1000000, "scale_attention_softmax_in_fp32": True, "scale_attn_weights": True,
        "sliding_window": 4096, "torch_dtype": "bfloat16", "transformers_version": "4.37.0.dev0",
        "use_bias": True, "use_cache": True, "vocab_size": 49152,
    }


def test_from_hf_handles_the_gotchas():
    cfg = ModelConfig.from_hf(_hf_7b_file())
    assert cfg == preset("7b").replace(embedding_dropout=0.1, residual_dropout=0.1, attention_dropout=0.1)
    # transformers' class default 50256 is outside the vocabulary: dropped, resolved from the tokenizer
    bad_ids = {**_hf_7b_file(), "bos_token_id": 50256, "eos_token_id": 50256}
    assert ModelConfig.from_hf(bad_ids).eos_token_id is None
    # new files keep rope_theta inside rope_parameters; absent tie_word_embeddings means tied
    new = {k: v for k, v in _hf_7b_file().items() if k != "rope_theta"}
    new["rope_parameters"] = {"rope_theta": 999999.4420358813, "rope_type": "default"}
    cfg = ModelConfig.from_hf(new)
    assert cfg.rope_theta == 999999.4420358813 and cfg.tie_word_embeddings
    assert not ModelConfig.from_hf({**_hf_7b_file(), "tie_word_embeddings": False}).tie_word_embeddings


def test_from_hf_rejects_other_models():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf({**_hf_7b_file(), "model_type": "llama"})
    with pytest.raises(ValueError, match="hidden_act"):
        ModelConfig.from_hf({**_hf_7b_file(), "hidden_act": "silu"})


@pytest.mark.parametrize("name", ["tiny", "3b", "15b"])
def test_hf_round_trip_through_transformers(name):
    from transformers import Starcoder2Config
    cfg = preset(name)
    hf = Starcoder2Config(**cfg.to_hf())
    assert hf.rope_parameters["rope_theta"] == cfg.rope_theta
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("changes, match", [
    ({"num_kv_heads": 3}, "divisible"),
    ({"hidden_size": 66}, "divisible"),
    ({"sliding_window": 0}, "sliding_window"),
    ({"residual_dropout": 1.0}, "residual_dropout"),
    ({"num_layers": 0}, "num_layers"),
])
def test_validation(changes, match):
    with pytest.raises(ValueError, match=match):
        tiny().replace(**changes)
