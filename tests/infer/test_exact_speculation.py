"""Speculative verification is exact: the verify pass over T tokens gives the logits of T one-token
decode steps bit for bit (with row-exact matrix products: the native CPU kernels), and accepting n of
them leaves the cache exactly as n decode steps would, ring buffer included."""

import copy

import pytest
import torch

from starcoder2.config import tiny
from starcoder2.infer.quantize import quantize_head, quantize_model, use_native_kernels
from starcoder2.kernels import native
from starcoder2.kv_cache import KVCache
from starcoder2.model import StarCoder2

pytestmark = pytest.mark.skipif(native() is None, reason="exact verification needs the row-exact native "
                                "kernels (an AVX2 or AVX-512 BF16 CPU and a compiler)")


def _variants():
    torch.manual_seed(0)
    base = StarCoder2(tiny().replace(hidden_size=128, intermediate_size=512, num_heads=8, num_kv_heads=2))
    base.init_weights()
    base.eval()
    out = {}
    for dt in (torch.float32, torch.bfloat16):
        if native() is not None and native().float_ok(dt, dt):
            m = copy.deepcopy(base).to(dt)
            use_native_kernels(m)
            out[f"float-{dt}"] = m
    act = torch.bfloat16 if native() is not None and native().isa == "avx512" else torch.float32
    for mode in ("int8", "int4"):
        m = quantize_model(copy.deepcopy(base), mode, group_size=64, dtype=act)
        quantize_head(m)
        use_native_kernels(m)
        out[mode] = m
    return out


VARIANTS = _variants() if native() is not None else {}


def _decode(m, cache, tokens, start):
    """One-token decode steps: logits (len(tokens), V)."""
    rows = [m(torch.tensor([[t]]), input_pos=torch.tensor([[start + i]]), kv_cache=cache)[0, 0]
            for i, t in enumerate(tokens)]
    return torch.stack(rows) if rows else torch.empty(0)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prompt_len, n_accept", [(6, 4), (30, 2), (40, 9), (40, 0)])  # 30, 40: the 16-slot ring wraps
def test_verify_equals_decode_and_accept_equals_decoding_the_kept_tokens(name, prompt_len, n_accept):
    m = VARIANTS[name]
    cfg, dt = m.config, m.norm.weight.dtype
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=g)
    new = torch.randint(0, cfg.vocab_size, (9,), generator=g).tolist()
    with torch.no_grad():
        plain = KVCache(cfg, 1, 128, dtype=dt)
        m(prompt, kv_cache=plain)
        ref = _decode(m, plain, new, prompt_len)  # (9, V)

        spec = KVCache(cfg, 1, 128, dtype=dt)
        m(prompt, kv_cache=spec)
        spec.speculate()
        got = m(torch.tensor([new]), input_pos=torch.arange(prompt_len, prompt_len + 9)[None], kv_cache=spec)[0]
        spec.accept(n_accept)
        assert torch.equal(got, ref), (got - ref).abs().max()

        kept = KVCache(cfg, 1, 128, dtype=dt)  # what decoding only the accepted tokens leaves
        m(prompt, kv_cache=kept)
        _decode(m, kept, new[:n_accept], prompt_len)
        assert torch.equal(spec.slot_pos, kept.slot_pos) and spec.n_used == kept.n_used
        live = kept.slot_pos[0] >= 0
        assert torch.equal(spec.k[:, 0, :, live], kept.k[:, 0, :, live])
        assert torch.equal(spec.v[:, 0, :, live], kept.v[:, 0, :, live])
        # and decoding goes on exactly as if the rejected tokens had never been seen
        rest = new[n_accept:]
        assert torch.equal(_decode(m, spec, rest, prompt_len + n_accept), _decode(m, kept, rest, prompt_len + n_accept))


def test_a_failed_verify_pass_leaves_the_cache_as_it_was():
    m = next(iter(VARIANTS.values()))
    cfg, dt = m.config, m.norm.weight.dtype
    cache = KVCache(cfg, 1, 128, dtype=dt)
    with torch.no_grad():
        m(torch.randint(0, cfg.vocab_size, (1, 20)), kv_cache=cache)
        before = (cache.k.clone(), cache.v.clone(), cache.slot_pos.clone(), cache.n_used)
        cache.speculate()
        layer = m.layers[1].self_attn
        orig = layer.o_proj.forward
        layer.o_proj.forward = lambda x: (_ for _ in ()).throw(RuntimeError("boom"))  # fails after layer 0 wrote
        try:
            with pytest.raises(RuntimeError, match="boom"):
                m(torch.tensor([[1, 2, 3]]), input_pos=torch.tensor([[20, 21, 22]]), kv_cache=cache)
        finally:
            layer.o_proj.forward = orig
        cache.accept(0)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    assert torch.equal(cache.slot_pos, before[2]) and cache.n_used == before[3]
