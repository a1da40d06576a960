"""Native CPU kernels for decode-sized matrix products (see cpu_linear.cpp), built on first use.

The extension is compiled with the machine's compiler for its own CPU (`-march=native`) through
`torch.utils.cpp_extension` and cached in torch's extension directory ($TORCH_EXTENSIONS_DIR,
default ~/.cache/torch_extensions), so only the first use pays the ~1 minute build. Where the CPU
lacks AVX512_BF16, or the build fails, `native()` returns None and callers use torch's kernels;
set STARCODER2_NATIVE_KERNELS=0 to force that.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from ..device import cpu_flags

SOURCE = Path(__file__).with_name("cpu_linear.cpp")
REQUIRED_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")


def cpu_supported() -> bool:
    return all(f in cpu_flags() for f in REQUIRED_FLAGS)


@functools.cache
def native():
    """The compiled extension module, or None when unavailable (the reason goes to stderr once)."""
    if os.environ.get("STARCODER2_NATIVE_KERNELS", "1") == "0" or not cpu_supported():
        return None
    try:
        from torch.utils.cpp_extension import load
        return load(name="starcoder2_cpu_linear", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # a missing compiler or ninja: fall back, but say so
        print(f"starcoder2: native CPU kernels unavailable ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
              "using torch's kernels", file=sys.stderr)
        return None
