"""Parity with transformers' Starcoder2ForCausalLM on random tiny configs."""

import pytest
import torch

from starcoder2.config import tiny
from starcoder2.model import StarCoder2

from .conftest import hf_reference

CONFIGS = {
    "gqa2": tiny(),  # 4 heads, 2 KV heads
    "mqa": tiny().replace(num_kv_heads=1),
    "mha": tiny().replace(num_kv_heads=4),
    "gqa4-untied": tiny().replace(num_heads=8, num_kv_heads=2, tie_word_embeddings=False),
    "no-window": tiny().replace(sliding_window=None, rope_theta=999999.4420358813),
    "no-bias": tiny().replace(use_bias=False),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name):
    cfg = CONFIGS[name]
    hf, ours = hf_reference(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 3 * (cfg.sliding_window or 16) + 5))  # well past the window
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids)
    err = (ref - got).abs().max().item()
    print(f"{name}: fp32 max abs diff {err:.2e}")
    assert err < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_close_to_fp32(dtype):
    cfg = tiny()
    _, ours = hf_reference(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 40))
    with torch.no_grad():
        ref = ours(ids)
        got = ours.to(dtype)(ids)
    assert got.dtype == torch.float32  # logits are always fp32
    assert (ref - got).abs().max().item() < 0.05 * ref.abs().max().item()
    assert (ref.argmax(-1) == got.argmax(-1)).float().mean() > 0.9


def test_tied_head_shares_storage():
    m = StarCoder2(tiny())
    assert m.lm_head.weight is m.embed_tokens.weight
    m = StarCoder2(tiny().replace(tie_word_embeddings=False))
    assert m.lm_head.weight is not m.embed_tokens.weight


def test_init_weights_follows_reference():
    cfg = tiny().replace(hidden_size=256, intermediate_size=1024)
    m = StarCoder2(cfg)
    m.init_weights(torch.Generator().manual_seed(0))
    w = m.layers[0].mlp.c_fc.weight
    assert abs(w.std().item() - cfg.initializer_range) < 0.05 * cfg.initializer_range
    assert m.layers[0].self_attn.q_proj.bias.abs().sum() == 0
    assert torch.all(m.norm.weight == 1) and torch.all(m.norm.bias == 0)


def test_dropout_only_in_training():
    cfg = tiny().replace(embedding_dropout=0.1, residual_dropout=0.1, attention_dropout=0.1)
    m = StarCoder2(cfg)
    m.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    m.eval()
    assert torch.equal(m(ids), m(ids))
    m.train()
    assert not torch.equal(m(ids), m(ids))


def test_backward_reaches_every_parameter():
    cfg = tiny()
    m = StarCoder2(cfg)
    m.init_weights()
    ids = torch.randint(0, cfg.vocab_size, (2, 20))
    logits = m(ids[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())


# ---- packed rows: segment ids (document mask) --------------------------------------------------------

def test_segment_positions_restart_per_run():
    from starcoder2.model import segment_positions

    seg = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [5, 5, 5, 5, 5, 5, 5]])
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6]]


@pytest.mark.parametrize("name", ["gqa2", "no-window"])
def test_packed_logits_equal_each_example_alone(name):
    """Three examples (one longer than the sliding window) packed in a row, plus padding: each one's
    logits equal its logits computed alone, so no attention crosses examples."""
    cfg = CONFIGS[name]
    _, ours = hf_reference(cfg)
    W = cfg.sliding_window or 16
    g = torch.Generator().manual_seed(1)
    lengths = [7, 2 * W + 3, 5]
    examples = [torch.randint(0, cfg.vocab_size, (n,), generator=g) for n in lengths]
    pad = 4
    ids = torch.cat([*examples, torch.zeros(pad, dtype=torch.long)])[None]  # (1, T)
    seg = torch.cat([torch.full((n,), i + 1) for i, n in enumerate(lengths)] + [torch.zeros(pad, dtype=torch.long)])
    with torch.no_grad():
        packed = ours(ids, segment_ids=seg[None])[0]  # (T, V)
        start = 0
        for ex in examples:
            alone = ours(ex[None])[0]
            got = packed[start:start + len(ex)]
            print(f"{name}: example of {len(ex)} tokens, max abs diff {(got - alone).abs().max().item():.2e}")
            torch.testing.assert_close(got, alone, rtol=0, atol=2e-6)
            start += len(ex)
        # and without segment ids, the later examples would see the earlier ones
        assert not torch.allclose(ours(ids)[0, lengths[0]:lengths[0] + 3], packed[lengths[0]:lengths[0] + 3])


def test_packed_gradients_do_not_cross_examples():
    cfg = tiny()
    _, ours = hf_reference(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 12))
    seg = torch.tensor([[1] * 6 + [2] * 6])
    emb = ours.embed_tokens(ids).detach().requires_grad_()
    # a loss on the second example's logits only: no gradient may reach the first example's inputs
    ours.embed_tokens.forward = lambda _ids: emb
    try:
        ours(ids, segment_ids=seg)[0, 6:].sum().backward()
    finally:
        del ours.embed_tokens.forward
    assert emb.grad[0, :6].abs().max() == 0 and emb.grad[0, 6:].abs().max() > 0


def test_segment_ids_refuse_kv_cache():
    from starcoder2.kv_cache import KVCache

    cfg = tiny()
    m = StarCoder2(cfg)
    with pytest.raises(ValueError, match="segment_ids"):
        m(torch.zeros(1, 3, dtype=torch.long), kv_cache=KVCache(cfg, 1, 8), segment_ids=torch.ones(1, 3))
