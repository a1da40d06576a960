"""Device and dtype policy: "auto" picks bf16 only where the hardware multiplies it fast."""

import pytest
import torch

from starcoder2 import device


@pytest.fixture
def flags(monkeypatch):
    def use(*names):
        monkeypatch.setattr(device, "cpu_flags", lambda: frozenset(names))
    return use


@pytest.mark.parametrize("names, expected", [
    (("avx2", "fma"), torch.float32),  # bf16 emulated: measured 200x slower than fp32
    (("avx512f", "avx512_bf16"), torch.bfloat16),
    (("avx512f", "amx_bf16", "amx_tile"), torch.bfloat16),
    (("fp", "asimd", "bf16"), torch.bfloat16),  # Arm
    ((), torch.float32),
])
def test_auto_dtype_follows_the_cpu(flags, names, expected):
    flags(*names)
    cpu = torch.device("cpu")
    assert device.resolve_dtype("auto", cpu) == device.resolve_dtype(None, cpu) == expected
    assert device.autocast_dtype("auto", cpu) == (torch.bfloat16 if expected == torch.bfloat16 else None)


def test_explicit_dtypes_are_kept(flags):
    flags("avx2")
    assert device.resolve_dtype("bf16") == torch.bfloat16 and device.resolve_dtype("fp16") == torch.float16
    assert device.autocast_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert device.autocast_dtype("fp32", torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unknown dtype"):
        device.resolve_dtype("fp8")


def test_cpu_flags_reads_this_machine():
    flags = device.cpu_flags()
    assert isinstance(flags, frozenset)
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # x86 with /proc/cpuinfo
        assert "avx2" in flags


def test_default_load_uses_the_policy(flags, tiny_checkpoint):
    import starcoder2

    flags("avx2")
    assert starcoder2.load(tiny_checkpoint).model.embed_tokens.weight.dtype == torch.float32
    flags("avx512_bf16")
    assert starcoder2.load(tiny_checkpoint).model.embed_tokens.weight.dtype == torch.bfloat16
