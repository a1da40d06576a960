"""LoRA on our StarCoder2 module through peft, for training (inference merges with ../adapters.py).

`inject_lora` wraps each targeted nn.Linear (by module name: q_proj, ..., c_proj) in peft's
`lora.Linear`: y = base(x) + scale * B(A(dropout(x))), A (r, in) Kaiming-uniform, B (out, r) zero,
so the model starts exactly as the base. We use peft's `inject_adapter_in_model` rather than
`get_peft_model`: it adapts our module in place, without the PeftModel wrapper whose forward passes
transformers-only keyword arguments, so the training loop, `model.config` and `model.layers` work
unchanged. The base stays frozen in its loaded dtype (bf16 for a bf16 run); the adapters are fp32.
"""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import AdapterConfig

ADAPTER_NAME = "default"  # peft's name for the one adapter of a model; not part of the saved tensor names


def inject_lora(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze every base parameter and add trainable LoRA pairs to the targeted linears, in place."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.tuners.tuners_utils import cast_adapter_dtype

    model.requires_grad_(False)
    peft_config = LoraConfig(r=config.r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                             target_modules=list(config.target_modules), use_rslora=config.use_rslora,
                             task_type="CAUSAL_LM")
    inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER_NAME)
    # peft creates A and B in the base weight's dtype; a bf16 base still gets fp32 adapters
    cast_adapter_dtype(model, ADAPTER_NAME, autocast_adapter_dtype=True)
    return model


def lora_pairs(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Our module name -> (A (r, in), B (out, r)) of every LoRA-wrapped linear."""
    from peft.tuners.lora import LoraLayer

    return {name: (m.lora_A[ADAPTER_NAME].weight, m.lora_B[ADAPTER_NAME].weight)
            for name, m in model.named_modules() if isinstance(m, LoraLayer)}
