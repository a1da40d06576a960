"""Weight-only quantization of the model's Linear layers, and native decode kernels, applied from
outside the model.

- int8: one scale per output channel, symmetric, w ≈ q * s with q in [-127, 127].
- int4: asymmetric per group of `group_size` input channels, w ≈ q * s + lo with q in [0, 15], two
  per byte (in each block of 64 columns, byte j holds column j low and column j + 32 high).
- AWQ-style calibration for int4: per layer, input channel i is scaled by a_i ** alpha before
  rounding (a_i: mean |x_i| over calibration activations) and x is divided by the same factor at run
  time, so channels that carry large activations keep more precision; alpha is picked per layer from
  a grid by the output error on the calibration activations (Lin et al. 2023, "AWQ").

Kernels: for decode-sized inputs (at most NATIVE_MAX_ROWS rows) the native AVX-512 or AVX2 kernels
of `starcoder2.kernels` read the packed weights directly, near the memory bandwidth; for prefill the
weights are dequantized to the activation dtype and multiplied by oneDNN's GEMM, which is compute
bound there anyway. `kernel="reference"` always takes the dequantize path: the oracle in tests.
`use_native_kernels` gives unquantized models the same decode kernels (bf16 on AVX-512; fp32 or bf16
weights on AVX2). The native kernels compute each output row in the same order whatever the number
of rows, so a speculative verify pass reproduces one-token decode bit for bit.

Pre-quantized checkpoints (`starcoder2 convert --quantize`, loaded by `prequantized_layers`) store
each QuantizedLinear's buffers under its HF name, e.g. `model.layers.0.mlp.c_fc.{weight,scale,lo,
bias,in_scale}`, with `quantization_config` (`quant_method: "starcoder2"`) in config.json. Unlike
GPTQ/AWQ checkpoints (int32-packed `qweight`, integer `qzeros`), int4 stores a float minimum `lo` per
group (w = q * scale + lo) and our nibble order, so transformers refuses the file instead of
misreading it (unknown quant_method), and loading it here needs no quantization pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError
from ..kernels import native

QUANT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")
QUANT_MODES = ("int8", "int4")
NATIVE_MAX_ROWS = 16  # above this many input rows (prefill), GEMM libraries win
NATIVE_ROW_BLOCK = 8  # out_features must be a multiple of this (R_BF16 in cpu_linear.cpp; R_INT is 4)
QUANT_METHOD = "starcoder2"  # quantization_config.quant_method of our pre-quantized checkpoints
QUANT_FORMAT_VERSION = 1


class Rows:
    """A (N, K) matrix read on demand, a slice of rows at a time (e.g. from a checkpoint file)."""

    def __init__(self, shape: tuple[int, int], read: Callable[[int, int], torch.Tensor],
                 device: torch.device | str = "cpu"):
        self.shape, self._read, self.device = shape, read, torch.device(device)  # rows arrive on `device`

    def __getitem__(self, rows: slice) -> torch.Tensor:
        a, b, _ = rows.indices(self.shape[0])
        return self._read(a, b)


QUANT_CHUNK_ROWS = 1024  # rows quantized at a time: fp32 temporaries stay ~K * 4 KB, not ~5x the matrix


def quantize_int8(w: torch.Tensor | Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float -> q (N, K) int8, scale (N,) fp32. Row chunks: at 3B the vocabulary head's
    temporaries would otherwise add ~1.2 GB to peak memory; `w` may be a `Rows` reader, so that the
    float matrix is never whole in memory."""
    N, K = w.shape
    q, scale = torch.empty(N, K, dtype=torch.int8, device=w.device), torch.empty(N, device=w.device)
    for i in range(0, N, QUANT_CHUNK_ROWS):
        wc = w[i:i + QUANT_CHUNK_ROWS].float()
        s = scale[i:i + QUANT_CHUNK_ROWS] = wc.abs().amax(dim=1).clamp(min=1e-8) / 127.0
        q[i:i + QUANT_CHUNK_ROWS] = (wc / s[:, None]).round_().clamp_(-127, 127)
    return q, scale


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w (N, K) -> q (N, K) uint8 in [0, 15], scale (N, K/g), lo (N, K/g); w ≈ q * scale + lo.
    In row chunks, so the fp32 temporaries stay small (at 3B, c_fc's would be ~0.5 GB)."""
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"in_features={K} is not a multiple of group_size={group_size}")
    q = torch.empty(N, K, dtype=torch.uint8, device=w.device)
    scale, lo = torch.empty(N, K // group_size, device=w.device), torch.empty(N, K // group_size, device=w.device)
    for i in range(0, N, QUANT_CHUNK_ROWS):
        wg = w[i:i + QUANT_CHUNK_ROWS].float().view(-1, K // group_size, group_size)
        lo_c, hi = wg.amin(-1), wg.amax(-1)
        s = ((hi - lo_c) / 15.0).clamp(min=1e-8)
        q[i:i + QUANT_CHUNK_ROWS] = ((wg - lo_c[..., None]) / s[..., None]).round_().clamp_(0, 15).view(-1, K)
        scale[i:i + QUANT_CHUNK_ROWS], lo[i:i + QUANT_CHUNK_ROWS] = s, lo_c
    return q, scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor, group_size: int) -> torch.Tensor:
    N, K = q.shape
    wg = q.view(N, K // group_size, group_size).float() * scale[..., None] + lo[..., None]
    return wg.view(N, K)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values in [0, 15] -> (N, K/2) bytes; in each block of 64 columns, byte j = q[j] | q[j+32] << 4."""
    N, K = q.shape
    blocks = q.view(N, K // 64, 2, 32)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(N, K // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    b = packed.view(N, half // 32, 32)
    return torch.stack([b & 15, b >> 4], dim=2).reshape(N, half * 2)


def _native_ok(x: torch.Tensor, kernel: str = "native") -> bool:
    """Whether a decode-sized CPU input (M, K) may take the native kernels (each layer still checks
    that the kernels take its dtypes)."""
    return (kernel == "native" and x.shape[0] <= NATIVE_MAX_ROWS and x.device.type == "cpu"
            and not torch.is_grad_enabled() and native() is not None)


class NativeLinear(nn.Module):
    """nn.Linear whose decode-sized products run on the native kernels (weights shared, not copied)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        self.in_features, self.out_features = linear.in_features, linear.out_features

    @property
    def fits(self) -> bool:
        """Whether the native kernels take this layer's shape."""
        return self.out_features % NATIVE_ROW_BLOCK == 0 and self.in_features % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)
        if _native_ok(x2) and native().float_ok(x2.dtype, self.weight.dtype) and self.fits:
            y = native().linear(x2.contiguous(), self.weight, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


class QuantizedLinear(nn.Module):
    """Drop-in for nn.Linear with int8 or int4 weights; activations and output in `dtype`."""

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = 128, kernel: str = "auto",
                 in_scale: torch.Tensor | None = None, dtype: torch.dtype = torch.bfloat16,
                 weight: Rows | None = None):
        """`weight`: read the int8 weight from there instead of `linear.weight` (left on the meta
        device by a streaming load)."""
        super().__init__()
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization {mode!r}; choose int8 or int4")
        if weight is not None and (mode != "int8" or in_scale is not None):
            raise ValueError("a row reader is quantized to plain int8 only")
        w = weight if weight is not None else linear.weight.detach()
        self.mode, self.group_size, self.dtype = mode, group_size, dtype
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self.kernel = _pick_kernel(self.in_features, self.out_features, group_size, kernel)
        self.register_buffer("in_scale", None if in_scale is None else (1.0 / in_scale).to(dtype))
        if in_scale is not None:
            w = w.float() * in_scale[None, :].float()
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))
        if mode == "int8":
            q, scale = quantize_int8(w)
            # stored offset by +128 as uint8 (the VNNI instruction multiplies unsigned by signed bytes):
            # for two's complement bytes, q + 128 = q xor 0x80
            self.register_buffer("weight", q.view(torch.uint8).bitwise_xor_(0x80))
            self.register_buffer("scale", scale)
        else:
            q, scale, lo = quantize_int4(w, group_size)
            self.register_buffer("weight", pack_int4(q) if self.in_features % 64 == 0 else q)
            self.register_buffer("scale", scale)
            self.register_buffer("lo", lo)

    @classmethod
    def empty(cls, in_features: int, out_features: int, mode: str, group_size: int = 128, bias: bool = True,
              awq: bool = False, kernel: str = "auto", dtype: torch.dtype = torch.bfloat16) -> QuantizedLinear:
        """A layer with uninitialised buffers of the stored shapes (on the current device, e.g. meta),
        for `load_state_dict(assign=True)` from a pre-quantized checkpoint: no quantization pass."""
        if mode not in QUANT_MODES:
            raise ValueError(f"unknown quantization {mode!r}; choose int8 or int4")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        N, K = out_features, in_features
        self.mode, self.group_size, self.dtype = mode, group_size, dtype
        self.in_features, self.out_features = K, N
        self.kernel = _pick_kernel(K, N, group_size, kernel)
        self.register_buffer("in_scale", torch.empty(K, dtype=dtype) if awq else None)
        self.register_buffer("bias", torch.empty(N, dtype=dtype) if bias else None)
        if mode == "int8":
            self.register_buffer("weight", torch.empty(N, K, dtype=torch.uint8))
            self.register_buffer("scale", torch.empty(N))
        else:
            self.register_buffer("weight", torch.empty(N, K // 2 if K % 64 == 0 else K, dtype=torch.uint8))
            self.register_buffer("scale", torch.empty(N, K // group_size))
            self.register_buffer("lo", torch.empty(N, K // group_size))
        return self

    def _stored_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The quantized weight as floats, (N, K), before undoing any AWQ input scaling. For prefill
        it is built directly in the activation dtype: half the memory traffic of an fp32 detour."""
        k = native() if self.kernel == "native" and self.weight.device.type == "cpu" else None
        if k is not None and (w := k.dequantize(self, dtype)) is not None:
            return w
        if self.mode == "int8":
            return (self.weight.to(dtype) - 128) * self.scale.to(dtype)[:, None]
        q = unpack_int4(self.weight) if self.weight.shape[1] != self.in_features else self.weight
        N, K = q.shape
        g = self.group_size
        w = q.view(N, K // g, g).to(dtype) * self.scale.to(dtype)[..., None] + self.lo.to(dtype)[..., None]
        return w.view(N, K)

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float weight applied to the raw input x, (N, K) fp32."""
        w = self._stored_weight()
        return w if self.in_scale is None else w * self.in_scale.float()[None, :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., K) -> (..., N)
        shape = x.shape
        x = x.reshape(-1, self.in_features).to(self.dtype)  # (M, K)
        if self.in_scale is not None:
            x = x * self.in_scale
        if _native_ok(x, self.kernel) and native().int_ok(x.dtype):
            x = x.contiguous()
            if self.mode == "int8":
                y = native().linear_int8(x, self.weight, self.scale, self.bias)
            else:
                y = native().linear_int4(x, self.weight, self.scale, self.lo, self.group_size, self.bias)
        else:
            y = F.linear(x, self._stored_weight(self.dtype), self.bias)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.in_features}, {self.out_features}, {self.mode}{g}, kernel={self.kernel}, awq={self.in_scale is not None}"


class QuantizedEmbedding(nn.Module):
    """The token embedding of a tied model whose head is int8: rows gathered from the head's int8
    weight and dequantized, so the float matrix need not stay in memory (llama.cpp does the same
    with a Q8_0 token_embd)."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        if head.mode != "int8" or head.in_scale is not None:
            raise ValueError("a tied embedding reads its rows from a plain int8 head")
        self._head = (head,)  # not a submodule: its buffers are lm_head's, saved once
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        head = self._head[0]
        rows = head.weight[ids].to(head.dtype) - 128
        return rows * head.scale[ids].to(head.dtype)[..., None]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows of lm_head"


@torch.no_grad()
def quantize_head(model: nn.Module, weight: Rows | None = None) -> None:
    """int8 LM head (one scale per vocabulary row), as llama.cpp's quantized GGUFs keep theirs at 6-8
    bits: at 3B it is 151 MB read per token instead of 302 (bf16) or 604 (fp32). A tied embedding
    then reads its rows from the same int8 matrix and the float copy is freed. `weight`: the head's
    float rows read on demand (the load left them on the meta device), so they are never whole in memory."""
    if isinstance(model.lm_head, QuantizedLinear):
        return
    dtype = model.norm.weight.dtype  # the activation dtype
    head = QuantizedLinear(model.lm_head, "int8", dtype=dtype, weight=weight)
    model.lm_head = head
    if model.config.tie_word_embeddings:
        model.embed_tokens = QuantizedEmbedding(head)


def _pick_kernel(in_features: int, out_features: int, group_size: int, kernel: str) -> str:
    fits = in_features % 64 == 0 and out_features % NATIVE_ROW_BLOCK == 0 and group_size % 64 == 0
    if kernel == "auto":
        kernel = "native" if fits and native() is not None else "reference"
    if kernel == "native" and (not fits or native() is None):
        raise ValueError("native kernels need an AVX2 or AVX-512 BF16/VNNI CPU, in_features and group_size multiples "
                         f"of 64, out_features of {NATIVE_ROW_BLOCK}")
    return kernel


def _targets(model: nn.Module, names: tuple[str, ...] = QUANT_TARGETS) -> list[tuple[nn.Module, str, nn.Linear]]:
    out = []
    for module in model.modules():
        for name, child in module.named_children():
            if name in names and type(child) is nn.Linear:
                out.append((module, name, child))
    return out


def is_quant_target(param_name: str) -> bool:
    """True for the weight names `quantize_model` replaces, e.g. 'layers.3.mlp.c_fc.weight'."""
    parts = param_name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANT_TARGETS


def use_native_kernels(model: nn.Module) -> int:
    """Route decode-sized products of the model's Linear layers (and LM head) to the native
    kernels where they take the weights' dtype. Returns how many layers were swapped (0 when the
    kernels are unavailable)."""
    k = native()
    if k is None:
        return 0
    targets = [t for t in _targets(model, QUANT_TARGETS + ("lm_head",))
               if k.float_ok(t[2].weight.dtype, t[2].weight.dtype)]
    for parent, name, lin in targets:
        setattr(parent, name, NativeLinear(lin))
    return len(targets)


@torch.no_grad()
def activation_stats(model: nn.Module, batches: Iterable[torch.Tensor], max_rows: int = 512
                     ) -> dict[nn.Linear, tuple[torch.Tensor, torch.Tensor]]:
    """Run calibration batches (B, T) through the float model; per target Linear, the mean |x| per
    input channel (K,) and a sample of input rows (<= max_rows, K) for choosing the scaling."""
    sums: dict[nn.Linear, list] = {}
    hooks = []
    for _, _, lin in _targets(model):
        def hook(mod, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            s = sums.setdefault(mod, [torch.zeros(x.shape[1]), 0, []])
            s[0] += x.abs().sum(0)
            s[1] += x.shape[0]
            if sum(r.shape[0] for r in s[2]) < max_rows:
                s[2].append(x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:max_rows]])
        hooks.append(lin.register_forward_hook(hook))
    try:
        for ids in batches:
            model(ids)
    finally:
        for h in hooks:
            h.remove()
    return {m: (s[0] / s[1], torch.cat(s[2])[:max_rows]) for m, s in sums.items()}


def awq_scale(lin: nn.Linear, mean_abs: torch.Tensor, x: torch.Tensor, group_size: int,
              grid: int = 20) -> torch.Tensor | None:
    """Per-input-channel scale s minimising ||x W^T - (x / s) Q(W s)^T||^2; None if plain rounding wins."""
    w = lin.weight.detach().float()
    ref = x @ w.t()

    def err(s: torch.Tensor | None) -> float:
        ws = w if s is None else w * s[None, :]
        wq = dequantize_int4(*quantize_int4(ws, group_size), group_size)
        xs = x if s is None else x / s[None, :]
        return float(((xs @ wq.t() - ref) ** 2).mean())

    best, best_s = err(None), None
    a = mean_abs.clamp(min=1e-6)
    for i in range(1, grid + 1):
        s = a ** (i / grid)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales around 1
        e = err(s)
        if e < best:
            best, best_s = e, s
    return best_s


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str, group_size: int = 128, kernel: str = "auto",
                   calibration: Iterable[torch.Tensor] | None = None, dtype: torch.dtype = torch.bfloat16,
                   load_weight: Callable[[str], torch.Tensor] | None = None,
                   place: Callable[[nn.Module], object] | None = None) -> nn.Module:
    """Replace every attention/MLP Linear by a QuantizedLinear, in place. With `calibration`
    (batches of token ids) and mode int4, choose AWQ input scales first (on the float model).
    Weights still on the meta device are fetched one at a time by `load_weight(name)` and freed
    once quantized, so peak memory stays near the quantized size (streaming quantization at load).
    `place(layer)` moves each new layer's buffers where they will live (e.g. huge pages) at once,
    so the allocator reuses its temporaries for the next layer."""
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose int8 or int4")
    stats = activation_stats(model, calibration) if calibration is not None and mode == "int4" else {}
    names = {id(m): n for n, m in model.named_modules()}
    for parent, name, lin in _targets(model):
        source = lin
        if lin.weight.is_meta:
            if load_weight is None:
                raise ValueError(f"{names[id(lin)]}.weight is not loaded and no load_weight was given")
            source = SimpleNamespace(weight=load_weight(f"{names[id(lin)]}.weight"), bias=lin.bias)
        s = awq_scale(lin, *stats[lin], group_size) if lin in stats else None
        layer = QuantizedLinear(source, mode, group_size, kernel, in_scale=s, dtype=dtype)
        setattr(parent, name, layer)
        if place is not None:
            place(layer)
    model.to(dtype)  # embedding, norms and head in the activation dtype
    return model


# ---- pre-quantized checkpoints ------------------------------------------------------------------


def quantization_config(model: nn.Module) -> dict:
    """The config.json `quantization_config` that describes a model quantized by `quantize_model`."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("the model has no quantized layers")
    modes = {(m.mode, m.group_size if m.mode == "int4" else None) for m in layers.values()}
    if len(modes) > 1:
        raise ValueError(f"mixed quantization {sorted(modes, key=str)} cannot be saved")
    mode, group_size = modes.pop()
    return {"quant_method": QUANT_METHOD, "format_version": QUANT_FORMAT_VERSION, "mode": mode,
            "group_size": group_size, "modules": list(QUANT_TARGETS),
            "awq_layers": sorted(n for n, m in layers.items() if m.in_scale is not None),
            "layout": "int8: uint8 = q + 128, fp scale per output row; int4: 2 per byte (in each 64-column "
                      "block byte j = q[j] | q[j+32] << 4), w = q * scale + lo per group of group_size columns"}


def prequantized_layers(qc: dict, dtype: torch.dtype = torch.bfloat16, kernel: str = "auto"
                        ) -> Callable[[nn.Module], None]:
    """For `checkpoint.load_model(prepare=...)`: swaps every target Linear of a meta-device model
    for an empty QuantizedLinear shaped like the stored buffers, then casts as `quantize_model` does."""
    if qc.get("quant_method") != QUANT_METHOD or qc.get("format_version") != QUANT_FORMAT_VERSION:
        raise CheckpointError(f"unsupported quantization_config (quant_method={qc.get('quant_method')!r}, "
                              f"format_version={qc.get('format_version')!r}); only starcoder2's own pre-quantized "
                              f"format {QUANT_FORMAT_VERSION} loads here (convert --quantize)")
    mode, group_size = qc.get("mode"), qc.get("group_size") or 128
    if mode not in QUANT_MODES:
        raise CheckpointError(f"quantization_config.mode={mode!r} is not int8 or int4")
    awq = set(qc.get("awq_layers", []))

    def prepare(model: nn.Module) -> None:
        names = {id(m): n for n, m in model.named_modules()}
        for parent, name, lin in _targets(model, tuple(qc.get("modules", QUANT_TARGETS))):
            setattr(parent, name, QuantizedLinear.empty(lin.in_features, lin.out_features, mode, group_size,
                                                        bias=lin.bias is not None, awq=names[id(lin)] in awq,
                                                        kernel=kernel, dtype=dtype))
        model.to(dtype)

    return prepare
