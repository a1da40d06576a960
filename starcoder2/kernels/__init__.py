"""Native CPU kernels for decode-sized matrix products, built on first use.

Two builds of the same three products (float, int8 and 4-bit weights, same weight layouts):
- cpu_linear.cpp for AVX-512 CPUs with BF16 and VNNI: bf16 weights and bf16 activations
  (vdpbf16ps), int8/int4 with vpdpbusd;
- cpu_linear_avx2.cpp for AVX2/FMA CPUs: fp32 or bf16 weights with fp32 arithmetic, int8/int4 with
  vpmaddubsw; activations fp32 (bf16 accepted and widened).

The extension is compiled with the machine's compiler for its own CPU (`-march=native`) through
`torch.utils.cpp_extension` and cached in torch's extension directory ($TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions), so only the first use pays the ~1 minute build. Where the CPU
has neither instruction set, or the build fails, `native()` returns None and callers use torch's
kernels; set STARCODER2_NATIVE_KERNELS=0 to force that.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch

from ..device import cpu_flags

HERE = Path(__file__).parent
# instruction set -> (sources, CPU flags it needs, extra compiler flags); the first one the CPU has wins.
# -ffp-contract=off: a*b+c in plain C++ stays two roundings, as torch computes it (the dequantizers
# match the reference path bit for bit); the intrinsics' FMAs are explicit and unaffected.
BUILDS = {
    "avx512": (("cpu_linear.cpp",), ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni"), []),
    "avx2": (("cpu_linear_avx2.cpp", "cpu_decode_avx2.cpp"), ("avx2", "fma"), ["-ffp-contract=off"]),
}


def cpu_isa(flags: frozenset[str] | None = None) -> str | None:
    """The best kernel build this CPU runs ("avx512" | "avx2"), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((isa for isa, (_, need, _) in BUILDS.items() if all(f in flags for f in need)), None)


def cpu_supported() -> bool:
    return cpu_isa() is not None


class Kernels:
    """The compiled extension of one instruction set, behind one interface.

    linear(x, w, bias) multiplies float weights; linear_int8 / linear_int4 the quantized layouts of
    `starcoder2.infer.quantize`. All take x (M, K) contiguous and return y (M, N) in x's dtype."""

    def __init__(self, isa: str, module):
        self.isa, self.module = isa, module

    def float_ok(self, x_dtype: torch.dtype, w_dtype: torch.dtype) -> bool:
        if self.isa == "avx512":
            return x_dtype == w_dtype == torch.bfloat16
        return x_dtype in (torch.float32, torch.bfloat16) and w_dtype in (torch.float32, torch.bfloat16)

    def int_ok(self, x_dtype: torch.dtype) -> bool:
        return x_dtype in ((torch.bfloat16,) if self.isa == "avx512" else (torch.float32, torch.bfloat16))

    def linear(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.isa == "avx512":
            return self.module.linear_bf16(x, w, bias)
        return self.module.linear_float(x, w, bias)

    def linear_int8(self, x, w, scale, bias):
        return self.module.linear_int8(x, w, scale, bias)

    def linear_int4(self, x, w, scale, lo, group_size, bias):
        return self.module.linear_int4(x, w, scale, lo, group_size, bias)

    def decoder(self, n_head: int, n_kv_head: int, head_dim: int, eps: float):
        """An empty fused decoder (cpu_decode_avx2.cpp), or None where this build has none."""
        if not hasattr(self.module, "Decoder"):
            return None
        return self.module.Decoder(n_head, n_kv_head, head_dim, eps)

    def decode_linear(self, mode: int, w, scale=None, lo=None, in_scale=None, bias=None, group_size: int = 0):
        return self.module.DecodeLinear(mode, w, scale, lo, in_scale, bias, group_size)

    def dequantize(self, layer, dtype: torch.dtype) -> torch.Tensor | None:
        """A QuantizedLinear's stored weight as floats (N, K) in one pass, or None where this build
        has no dequantizer (AVX-512: torch's ops do it)."""
        if not hasattr(self.module, "dequantize_int8"):
            return None
        if layer.mode == "int8":
            return self.module.dequantize_int8(layer.weight, layer.scale, dtype)
        return self.module.dequantize_int4(layer.weight, layer.scale, layer.lo, layer.group_size, dtype)


@functools.cache
def native() -> Kernels | None:
    """The compiled kernels for this CPU, or None when unavailable (the reason goes to stderr once)."""
    isa = cpu_isa()
    if os.environ.get("STARCODER2_NATIVE_KERNELS", "1") == "0" or isa is None:
        return None
    sources, flags = [HERE / s for s in BUILDS[isa][0]], BUILDS[isa][2]
    try:
        from torch.utils.cpp_extension import load
        module = load(name=f"starcoder2_{sources[0].stem}", sources=[str(s) for s in sources],
                      extra_cflags=["-O3", "-march=native", "-fopenmp", *flags], extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as e:  # a missing compiler or ninja: fall back, but say so
        print(f"starcoder2: native CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "using torch's kernels", file=sys.stderr)
        return None
    return Kernels(isa, module)
