"""Fused decode: every decoder block of a decode step in one native call (cpu_decode_avx2.cpp).

Built once per model (`FusedDecoder.build`), when the whole decode step can run natively: a CPU
model in fp32 whose block Linears all take the native kernels (`NativeLinear` with fp32 or bf16
weights, or `QuantizedLinear` with the native kernel) and a build that has the fused decoder (the
AVX2 build; the AVX-512 build's kernels take bf16 activations and have none yet). Otherwise `build`
returns None and callers keep the module path (`model.hidden_states`); `decode_hidden_states` picks.
The decoder holds the weight tensors themselves (no copies): rebuild it if layers are replaced.

It serves one-token decode steps and speculative verify passes (the same KVCache plans as
`model.hidden_states`); prefill stays on the module path, whose GEMMs are faster for many tokens.
Every token's result is computed independently of the others, so outputs are batch-invariant and a
verify pass reproduces plain decoding bit for bit (see cpu_decode_avx2.cpp).
"""

from __future__ import annotations

import os

import torch

from ..kernels import native
from ..kv_cache import KVCache, Rows, row_index
from ..model import StarCoder2, rope_cos_sin
from .quantize import NATIVE_MAX_ROWS, NativeLinear, QuantizedLinear

MODES = {"int8": 1, "int4": 2}


def _linear(k, lin) -> object | None:
    """The native spec of one block Linear, or None when the fused step cannot run it."""
    if isinstance(lin, NativeLinear):
        ok = lin.fits and k.float_ok(torch.float32, lin.weight.dtype)
        return k.decode_linear(0, lin.weight.contiguous(), bias=_f32(lin.bias)) if ok else None
    if isinstance(lin, QuantizedLinear) and lin.kernel == "native" and lin.dtype == torch.float32:
        return k.decode_linear(MODES[lin.mode], lin.weight, lin.scale, getattr(lin, "lo", None),
                               lin.in_scale, _f32(lin.bias), lin.group_size)
    return None


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().float().contiguous()


class FusedDecoder:
    def __init__(self, model: StarCoder2, decoder):
        self.model, self.decoder = model, decoder

    @classmethod
    def build(cls, model: StarCoder2) -> FusedDecoder | None:
        """The fused decoder for `model`'s current layers, or None where it does not apply.
        STARCODER2_FUSED_DECODE=0 turns it off."""
        k = native()
        cfg = model.config
        act = model.norm.weight  # activations are in the model's float dtype
        if (k is None or os.environ.get("STARCODER2_FUSED_DECODE", "1") == "0" or model.training
                or act.device.type != "cpu" or act.dtype != torch.float32 or cfg.hidden_size % 8):
            return None
        decoder = k.decoder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.norm_eps)
        if decoder is None or cfg.head_dim % 16:
            return None
        for blk in model.layers:
            att, mlp = blk.self_attn, blk.mlp
            lins = [_linear(k, m) for m in (att.q_proj, att.k_proj, att.v_proj, att.o_proj, mlp.c_fc, mlp.c_proj)]
            norms = (blk.input_layernorm, blk.post_attention_layernorm)
            if any(lin is None for lin in lins) or any(n.bias is None for n in norms):
                return None
            decoder.add_block(*[_f32(t) for n in norms for t in (n.weight, n.bias)], *lins)
        return cls(model, decoder)

    @torch.inference_mode()
    def hidden_states(self, input_ids: torch.Tensor, input_pos: torch.Tensor, cache: KVCache,
                      rows: Rows) -> torch.Tensor:
        """model.hidden_states for a decode step ((B, 1) ids and positions) or a speculative verify
        pass (after cache.speculate(): (1, T), one row) -> (B, T, C)."""
        model, cfg = self.model, self.model.config
        B, T = input_ids.shape
        plan = cache.plan(input_pos, rows)
        tok_rows = row_index(rows, B, input_ids.device)  # (B,) cache row of each batch row
        if plan.steps is None:  # decode: token b writes row tok_rows[b], all attend over n_cached slots
            slots, mask = plan.slots[:, 0], plan.mask[:, 0, 0]  # (B,), (B, n_cached)
            n_keys = torch.full((B,), plan.n_cached)
        else:  # verify: token t of the one row is step t of plan.steps
            start, tok_rows = int(tok_rows[0]), tok_rows.expand(T)
            slots = torch.cat([s.slots[0] for s in plan.steps])  # (T,)
            n_keys = torch.tensor([s.n_cached for s in plan.steps])
            mask = torch.zeros(T, int(n_keys.max()), dtype=torch.bool)
            for t, s in enumerate(plan.steps):
                mask[t, :s.n_cached] = s.mask[0, 0, 0]
            cache.save_for_accept(plan, start)
        cos, sin = rope_cos_sin(input_pos, cfg.head_dim, cfg.rope_theta, torch.float32)  # (B, 1, T, hd)
        x = model.embed_tokens(input_ids).reshape(B * T, cfg.hidden_size)
        x = self.decoder.forward(x, cache.k, cache.v, tok_rows, slots, n_keys, mask.contiguous(),
                                 cos.reshape(B * T, -1), sin.reshape(B * T, -1))
        cache.commit(plan, input_pos)
        return model.norm(x.view(B, T, -1))

    def applies(self, input_ids: torch.Tensor, cache: KVCache) -> bool:
        return (cache.k.dtype == torch.float32 and input_ids.numel() <= NATIVE_MAX_ROWS
                and (input_ids.shape[1] == 1 or cache.speculating))


def decode_hidden_states(model: StarCoder2, fused: FusedDecoder | None, input_ids: torch.Tensor,
                         input_pos: torch.Tensor, cache: KVCache, rows: Rows) -> torch.Tensor:
    """A decode step or verify pass: fused where it applies, else the module path."""
    if fused is not None and fused.applies(input_ids, cache):
        return fused.hidden_states(input_ids, input_pos, cache, rows)
    return model.hidden_states(input_ids, input_pos, cache, rows)

