"""Fused decode (all blocks of a step in one native call) against the module path: the same hidden
states in fp32 (float rounding only), far closer than quantization error for int8/int4; verify passes
bit for bit equal to decode steps; and the engine's exactness guarantees hold on it."""

import copy

import pytest
import torch

from starcoder2.config import tiny
from starcoder2.infer.engine import Engine
from starcoder2.infer.fused import FusedDecoder, decode_hidden_states
from starcoder2.infer.generate import SamplingParams, generate, prefill
from starcoder2.infer.quantize import quantize_head, quantize_model, use_native_kernels
from starcoder2.kernels import native
from starcoder2.kv_cache import KVCache
from starcoder2.model import StarCoder2

HAS_FUSED = native() is not None and hasattr(native().module, "Decoder")
pytestmark = pytest.mark.skipif(not HAS_FUSED, reason="fused decode needs the AVX2 native build "
                                "(an AVX2/FMA CPU without AVX-512 BF16, and a compiler)")


def _base():
    torch.manual_seed(0)
    m = StarCoder2(tiny().replace(hidden_size=128, intermediate_size=512, num_heads=8, num_kv_heads=2))
    m.init_weights()
    with torch.no_grad():  # non-trivial biases and norms, so each fused piece is exercised
        for name, p in m.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return m.eval()


def _variants():
    base, out = _base(), {}
    m = copy.deepcopy(base)
    use_native_kernels(m)
    out["fp32"] = m
    for mode in ("int8", "int4"):
        m = quantize_model(copy.deepcopy(base), mode, group_size=64, dtype=torch.float32)
        quantize_head(m)
        use_native_kernels(m)
        out[mode] = m
    return base, out


BASE, VARIANTS = _variants() if HAS_FUSED else (None, {})


def _twin_caches(m, prompts, S=40):
    """Two caches holding the same prefilled prompts, one row each."""
    caches = [KVCache(m.config, len(prompts), S) for _ in range(2)]
    for c in caches:
        for b, p in enumerate(prompts):
            prefill(m, p, c, b)
    return caches


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("rows", ["slice", "tensor"])
def test_a_fused_step_computes_what_the_modules_compute(name, rows):
    m, fused = VARIANTS[name], FusedDecoder.build(VARIANTS[name])
    assert fused is not None
    prompts = [list(range(5, 5 + n)) for n in (7, 12, 3)]
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        ref, got = _twin_caches(m, prompts)
        flt = copy.deepcopy(ref)
        pos = torch.tensor([[len(p)] for p in prompts])
        q_err = diff = kv_diff = 0.0
        for step in range(24):  # past the 16-slot window: the ring wraps
            for c in (ref, flt):  # the same state as the fused cache at every step
                c.k.copy_(got.k), c.v.copy_(got.v), c.slot_pos.copy_(got.slot_pos)
            ids = torch.randint(0, m.config.vocab_size, (3, 1), generator=g)
            r = slice(0, 3) if rows == "slice" else torch.tensor([0, 1, 2])
            a = m.logits(m.hidden_states(ids, pos, ref, r))
            b = m.logits(fused.hidden_states(ids, pos, got, r))
            diff += (a - b).abs().mean().item() / 24
            # the size of the quantization error at the same step: the float model on the same cache
            q_err += (BASE.logits(BASE.hidden_states(ids, pos, flt, r)) - a).abs().mean().item() / 24
            assert torch.equal(ref.slot_pos, got.slot_pos)
            kv_diff = max(kv_diff, (ref.k - got.k).abs().max().item(), (ref.v - got.v).abs().max().item())
            pos = pos + 1
    if name == "fp32":
        assert diff < 2e-6 and kv_diff < 2e-6
    else:  # mean |difference|: the int kernels quantize x per block, so a 1e-7 difference in x may
        # move one rounding step of one element (a rare, discrete change); quantization moves all
        assert diff < 0.1 * q_err, (diff, q_err)


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("prompt_len, n_accept", [(6, 4), (30, 2), (40, 9), (40, 0)])
def test_a_fused_verify_pass_equals_fused_decode_steps(name, prompt_len, n_accept):
    m = VARIANTS[name]
    fused = FusedDecoder.build(m)
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, m.config.vocab_size, (1, prompt_len), generator=g).tolist()[0]
    new = torch.randint(0, m.config.vocab_size, (9,), generator=g).tolist()

    def decode(cache, tokens, start):
        return torch.cat([fused.hidden_states(torch.tensor([[t]]), torch.tensor([[start + i]]), cache, slice(0, 1))[0]
                          for i, t in enumerate(tokens)]) if tokens else torch.empty(0)

    with torch.inference_mode():
        plain, spec = _twin_caches(m, [prompt], S=128)
        ref = decode(plain, new, prompt_len)  # (9, C)
        spec.speculate()
        got = fused.hidden_states(torch.tensor([new]), torch.arange(prompt_len, prompt_len + 9)[None], spec,
                                  slice(0, 1))[0]
        spec.accept(n_accept)
        assert torch.equal(got, ref)
        kept, _ = _twin_caches(m, [prompt], S=128)
        decode(kept, new[:n_accept], prompt_len)
        assert torch.equal(spec.slot_pos, kept.slot_pos) and spec.n_used == kept.n_used
        live = kept.slot_pos[0] >= 0
        assert torch.equal(spec.k[:, 0, :, live], kept.k[:, 0, :, live])
        assert torch.equal(spec.v[:, 0, :, live], kept.v[:, 0, :, live])


@pytest.mark.parametrize("name", ["fp32", "int4"])
def test_the_engine_on_fused_decode_keeps_its_exactness_guarantees(name):
    m = VARIANTS[name]
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist() for n in (5, 17, 9)]
    # a prompt that repeats itself, so prompt lookup has drafts to verify
    prompts.append((prompts[0] * 4)[:18])
    params = SamplingParams(max_new_tokens=20)
    eng = Engine(m, max_batch=4, max_seq_len=64)
    assert eng.fused is not None
    batched = [r.output for r in eng.generate(prompts, params)]
    alone = [Engine(m, max_batch=1, max_seq_len=64).generate([p], params)[0].output for p in prompts]
    spec_eng = Engine(m, max_batch=1, max_seq_len=64, num_draft=4)
    spec = [spec_eng.generate([p], params)[0].output for p in prompts]
    assert batched == alone == spec == generate(m, prompts, params)
    assert spec_eng.stats["draft_tokens"] > 0


def test_a_failed_fused_verify_pass_leaves_the_cache_as_it_was():
    m = VARIANTS["fp32"]
    fused = FusedDecoder.build(m)
    with torch.inference_mode():
        cache, _ = _twin_caches(m, [list(range(20))], S=128)
        before = cache.k.clone(), cache.v.clone(), cache.slot_pos.clone(), cache.n_used
        cache.speculate()
        real = fused.decoder

        class Failing:  # fails after every layer wrote its keys and values
            def forward(self, *args):
                real.forward(*args)
                raise RuntimeError("boom")

        fused.decoder = Failing()
        with pytest.raises(RuntimeError, match="boom"):
            fused.hidden_states(torch.tensor([[1, 2, 3]]), torch.tensor([[20, 21, 22]]), cache, slice(0, 1))
        assert not torch.equal(cache.k, before[0])
        cache.accept(0)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
    assert torch.equal(cache.slot_pos, before[2]) and cache.n_used == before[3]


def test_fused_decode_applies_only_where_it_computes_the_same_thing(monkeypatch):
    assert FusedDecoder.build(BASE) is None  # torch's Linears: nothing native to call
    bf16 = copy.deepcopy(BASE).to(torch.bfloat16)
    use_native_kernels(bf16)
    assert FusedDecoder.build(bf16) is None  # fp32 activations only
    monkeypatch.setenv("STARCODER2_FUSED_DECODE", "0")
    assert FusedDecoder.build(VARIANTS["fp32"]) is None
    monkeypatch.delenv("STARCODER2_FUSED_DECODE")
    fused = FusedDecoder.build(VARIANTS["fp32"])
    cache = KVCache(BASE.config, 1, 32)
    with torch.inference_mode():  # a prefill (T > 1, not speculating) takes the module path
        h = decode_hidden_states(VARIANTS["fp32"], fused, torch.tensor([[1, 2, 3]]), torch.arange(3)[None], cache,
                                 slice(0, 1))
        assert torch.allclose(h, VARIANTS["fp32"].hidden_states(torch.tensor([[1, 2, 3]])), atol=1e-5)
