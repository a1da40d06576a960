"""Weight-only int8/int4: error bounds against float, packed kernels against the reference path,
and AWQ scaling that beats plain rounding where activations have outlier channels."""

import copy

import pytest
import torch
from torch import nn

from starcoder2.config import tiny
from starcoder2.infer.engine import Engine
from starcoder2.infer.generate import SamplingParams, generate
from starcoder2.infer.quantize import (NativeLinear, QuantizedLinear, activation_stats, awq_scale,
                                       dequantize_int4, pack_int4, quantize_int4, quantize_int8, quantize_model,
                                       unpack_int4, use_native_kernels)
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


needs_native = pytest.mark.skipif(native() is None, reason="native kernels need an AVX512_BF16 CPU and a compiler")


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (8, 128), dtype=torch.uint8)
    assert pack_int4(q).shape == (8, 64) and torch.equal(unpack_int4(pack_int4(q)), q)


@needs_native
@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 16, 40])  # decode sizes (native) and prefill (dequantize + GEMM)
def test_native_kernel_equals_reference_path(mode, rows):
    lin = nn.Linear(256, 96)
    x = torch.randn(rows, 256, dtype=torch.bfloat16)
    fast = QuantizedLinear(lin, mode, group_size=64, kernel="native")
    ref = QuantizedLinear(lin, mode, group_size=64, kernel="reference")
    assert torch.equal(fast.dequantized_weight(), ref.dequantized_weight())
    exact = x.float() @ ref.dequantized_weight().t() + lin.bias.detach()
    for m in (fast, ref):
        y = m(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 96)
        assert (y.float() - exact).abs().max() < 0.02 * exact.abs().max()


@needs_native
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_native_bf16_linear_matches_torch(rows):
    lin = nn.Linear(512, 64).to(torch.bfloat16)
    x = torch.randn(rows, 512, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = x.float() @ lin.weight.float().t() + lin.bias.float()
        got = NativeLinear(lin)(x)
    assert (got.float() - ref).abs().max() < 0.01 * ref.abs().max()


@needs_native
def test_native_kernels_keep_greedy_generation(model):
    m = copy.deepcopy(model).to(torch.bfloat16)
    prompts = [torch.randint(1, 500, (n,)).tolist() for n in (7, 19)]
    params = SamplingParams(max_new_tokens=20)
    before = generate(m, prompts, params)
    assert use_native_kernels(m) == 6 * m.config.num_layers + 1
    after = generate(m, prompts, params)
    agree = sum(a == b for x, y in zip(before, after) for a, b in zip(x, y)) / sum(len(x) for x in before)
    assert agree > 0.8  # bf16 sums in a different order: near-ties may flip late tokens
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
