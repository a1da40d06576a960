"""Weight-only int8/int4: error bounds against float, packed kernels against the reference path,
and AWQ scaling that beats plain rounding where activations have outlier channels."""

import copy

import pytest
import torch
from torch import nn

from starcoder2.config import tiny
from starcoder2.infer.engine import Engine
from starcoder2.infer.generate import SamplingParams, generate
from starcoder2.infer.quantize import (NativeLinear, QuantizedEmbedding, QuantizedLinear, activation_stats,
                                       awq_scale, dequantize_int4, pack_int4, quantize_head, quantize_int4,
                                       quantize_int8, quantize_model, unpack_int4, use_native_kernels)
from starcoder2.kernels import native
from starcoder2.model import StarCoder2


def test_int8_round_trip_error_is_half_a_step():
    w = torch.randn(64, 256)
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-6).all()


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_round_trip_error_is_half_a_step(group):
    w = torch.randn(48, 256)
    q, s, lo = quantize_int4(w, group)
    assert q.max() <= 15
    err = (dequantize_int4(q, s, lo, group) - w).abs().view(48, -1, group)
    assert (err <= s[..., None] / 2 + 1e-5).all()
    with pytest.raises(ValueError, match="multiple"):
        quantize_int4(torch.randn(4, 100), 64)


needs_native = pytest.mark.skipif(native() is None, reason="native kernels need an AVX2 or AVX-512 BF16 CPU and a compiler")
# the activation dtype the native kernels take here: bf16 on AVX-512 BF16, fp32 on AVX2
ACT = torch.bfloat16 if native() is not None and native().isa == "avx512" else torch.float32


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (8, 128), dtype=torch.uint8)
    assert pack_int4(q).shape == (8, 64) and torch.equal(unpack_int4(pack_int4(q)), q)


@needs_native
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 40])  # decode sizes (native) and prefill (dequantize + GEMM)
def test_native_kernel_equals_reference_path(mode, rows):
    lin = nn.Linear(256, 96)
    x = torch.randn(rows, 256, dtype=ACT)
    fast = QuantizedLinear(lin, mode, group_size=64, kernel="native", dtype=ACT)
    ref = QuantizedLinear(lin, mode, group_size=64, kernel="reference", dtype=ACT)
    assert torch.equal(fast.dequantized_weight(), ref.dequantized_weight())
    exact = x.float() @ ref.dequantized_weight().t() + lin.bias.detach()
    for m in (fast, ref):
        y = m(x)
        assert y.dtype == ACT and y.shape == (rows, 96)
        assert (y.float() - exact).abs().max() < 0.02 * exact.abs().max()


def _float_kernel_dtypes() -> list[tuple[torch.dtype, torch.dtype]]:
    """(weight, activation) dtype pairs the native float kernel takes here."""
    pairs = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float32, torch.float32)]
    return [p for p in pairs if native() is not None and native().float_ok(p[1], p[0])]


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_native_float_linear_matches_float64(rows):
    for wdt, xdt in _float_kernel_dtypes():
        lin = nn.Linear(512, 64).to(wdt)
        x = torch.randn(rows, 512, dtype=xdt)
        with torch.no_grad():
            ref = x.double() @ lin.weight.double().t() + lin.bias.double()
            got = NativeLinear(lin)(x)
        assert got.dtype == xdt
        tol = 1e-5 if xdt == torch.float32 else 0.01  # fp32 sums; bf16 output rounding
        assert (got.double() - ref).abs().max() < tol * ref.abs().max(), (wdt, xdt)


@needs_native
def test_native_kernels_give_each_row_the_same_result_for_any_batch():
    """Row m of y depends on row m of x only, bit for bit: a speculative verify pass (k + 1 rows)
    then reproduces one-token decode, and a request's output does not depend on its batch."""
    torch.manual_seed(0)
    lin = nn.Linear(512, 96)
    x = torch.randn(11, 512, dtype=ACT)
    layers = [QuantizedLinear(lin, mode, group_size=128, kernel="native", dtype=ACT) for mode in ("int8", "int4")]
    layers += [NativeLinear(copy.deepcopy(lin).to(w)) for w, a in _float_kernel_dtypes() if a == ACT]
    with torch.no_grad():
        for layer in layers:
            full = layer(x)
            for i in range(11):
                assert torch.equal(layer(x[i:i + 1])[0], full[i]), layer
            assert torch.equal(layer(x[3:8]), full[3:8]), layer


@needs_native
def test_native_kernels_keep_greedy_generation(model):
    m = copy.deepcopy(model).to(ACT)
    prompts = [torch.randint(1, 500, (n,)).tolist() for n in (7, 19)]
    params = SamplingParams(max_new_tokens=20)
    before = generate(m, prompts, params)
    assert use_native_kernels(m) == 6 * m.config.num_layers + 1
    after = generate(m, prompts, params)
    agree = sum(a == b for x, y in zip(before, after) for a, b in zip(x, y)) / sum(len(x) for x in before)
    assert agree > 0.8  # sums in a different order: near-ties may flip late tokens
    assert Engine(m, max_batch=2).generate(prompts, params)[0].output == after[0]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = StarCoder2(tiny().replace(hidden_size=128, intermediate_size=512, num_heads=4))
    m.init_weights()
    return m.eval()


@pytest.mark.parametrize("mode, bound", [("int8", 0.02), ("int4", 0.15)])
def test_quantized_logits_close_to_float(model, mode, bound):
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(ids)
        qm = quantize_model(copy.deepcopy(model), mode, group_size=32)
        got = qm(ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"{mode}: relative logits error {rel:.4f}")
    assert sum(isinstance(m, QuantizedLinear) for m in qm.modules()) == 6 * model.config.num_layers
    assert rel < bound


def test_quantized_engine_equals_its_own_reference_generation(model):
    qm = quantize_model(copy.deepcopy(model), "int8")
    prompts = [torch.randint(1, 500, (n,)).tolist() for n in (5, 21, 9)]
    params = SamplingParams(max_new_tokens=25)
    reqs = Engine(qm, max_batch=3).generate(prompts, params)
    for r, p in zip(reqs, prompts):
        assert r.output == generate(qm, [p], params)[0]


def test_awq_beats_plain_rounding_with_outlier_channels():
    torch.manual_seed(0)
    lin = nn.Linear(256, 128)
    x = torch.randn(512, 256)
    x[:, :8] *= 30.0  # a few channels carry most of the activation magnitude, as in real LLMs
    s = awq_scale(lin, x.abs().mean(0), x, group_size=64)
    assert s is not None
    plain = QuantizedLinear(lin, "int4", 64, kernel="reference", dtype=torch.float32)
    awq = QuantizedLinear(lin, "int4", 64, kernel="reference", in_scale=s, dtype=torch.float32)
    ref = lin(x)
    err_plain = (plain(x) - ref).pow(2).mean()
    err_awq = (awq(x) - ref).pow(2).mean()
    print(f"int4 output MSE: plain {err_plain:.4e}, AWQ {err_awq:.4e}")
    assert err_awq < 0.8 * err_plain


def test_calibrated_int4_model_not_worse_than_plain(model):
    calib = [torch.randint(0, model.config.vocab_size, (2, 64)) for _ in range(2)]
    stats = activation_stats(model, calib)
    assert len(stats) == 6 * model.config.num_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        ref = model(ids)
        plain = quantize_model(copy.deepcopy(model), "int4", group_size=32)(ids)
        awq = quantize_model(copy.deepcopy(model), "int4", group_size=32, calibration=calib)(ids)
    assert (awq - ref).norm() <= 1.05 * (plain - ref).norm()


def test_unknown_mode():
    with pytest.raises(ValueError, match="int8 or int4"):
        quantize_model(StarCoder2(tiny()), "int2")


@pytest.mark.parametrize("tied", [True, False])
def test_int8_head_and_the_tied_embedding_that_reads_it(tied):
    torch.manual_seed(0)
    m = StarCoder2(tiny().replace(hidden_size=128, intermediate_size=512, num_heads=4, tie_word_embeddings=tied))
    m.init_weights()
    m.eval()
    old = m.embed_tokens.weight
    emb = old.detach().clone()
    ids = torch.randint(0, m.config.vocab_size, (2, 30))
    with torch.no_grad():
        ref = m(ids)
        quantize_head(m)
        got = m(ids)
    assert isinstance(m.lm_head, QuantizedLinear) and m.lm_head.mode == "int8"
    assert isinstance(m.embed_tokens, QuantizedEmbedding) == tied
    if tied:  # the float matrix is gone: rows come from the int8 head, within half a step of the float ones
        assert all(p is not old for p in m.parameters())
        rows = m.embed_tokens(ids)
        step = m.lm_head.scale[ids][..., None]
        assert rows.shape == (2, 30, 128) and ((rows - emb[ids]).abs() <= step / 2 + 1e-6).all()
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.02, rel
    quantize_head(m)  # idempotent
    assert isinstance(m.lm_head, QuantizedLinear)


def test_int8_head_from_a_row_reader_equals_the_whole_matrix(monkeypatch):
    """quantize_head(model, Rows): the float head is read a slice at a time (never whole) and gives
    the same int8 layer as quantizing the loaded matrix."""
    from starcoder2.infer.quantize import Rows
    monkeypatch.setattr("starcoder2.infer.quantize.QUANT_CHUNK_ROWS", 7)  # several uneven chunks
    m = StarCoder2(tiny().replace(hidden_size=128, intermediate_size=512, num_heads=4))
    m.init_weights()
    w = m.lm_head.weight.detach().clone()
    reads = []
    rows = Rows(tuple(w.shape), lambda a, b: reads.append(b - a) or w[a:b].clone())
    q, s = quantize_int8(w)
    q2, s2 = quantize_int8(rows)
    assert torch.equal(q, q2) and torch.equal(s, s2) and max(reads) == 7 and sum(reads) == w.shape[0]
    quantize_head(m, rows)
    assert torch.equal(m.lm_head.weight, q.view(torch.uint8) ^ 0x80) and torch.equal(m.lm_head.scale, s)
