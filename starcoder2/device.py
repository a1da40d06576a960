"""Device and dtype policy, as pure functions (no detection at import time).

Dtype policy: weights are stored and multiplied in the requested dtype (fp32, bf16 or fp16); RoPE
tables, LayerNorm statistics (torch does them in fp32 internally), softmax (SDPA accumulates in fp32)
and the returned logits are fp32.
"""

from __future__ import annotations

import torch

DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None`/"auto" picks CUDA when present, else CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device | None = None) -> torch.dtype:
    """`None`/"auto": bf16 on CUDA and on CPUs (fast there with AVX512_BF16/AMX), fp32 otherwise."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16
    try:
        return DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of fp32, bf16, fp16") from None


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, str(dtype))


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """An explicit RNG for sampling; `None` seed means torch's default (non-reproducible) RNG."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g
