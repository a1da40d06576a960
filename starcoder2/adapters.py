"""LoRA adapters in PEFT's on-disk format: read, check against a base model, merge, write.

An adapter directory is what `peft`'s `save_pretrained` writes for transformers'
`Starcoder2ForCausalLM`, so transformers, peft and vLLM load ours and we load theirs:

    adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
                                target_modules, base_model_name_or_path, ...
    adapter_model.safetensors   base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight  (r, in)
                                base_model.model.model.layers.{i}.self_attn.q_proj.lora_B.weight  (out, r)

A LoRA-adapted projection computes y = x W^T + scale * (x A^T) B^T with scale = lora_alpha / r
(lora_alpha / sqrt(r) with rsLoRA), so merging is W += scale * B @ A. Merging happens here, with
plain torch and safetensors: inference never imports peft. Training injects LoRA through peft
(starcoder2/finetune/lora.py) and hands the learnt (A, B) pairs to `save_adapter`.

Left out: DoRA, per-module rank/alpha patterns, LoRA on embeddings or the head, `modules_to_save`,
bias training; an adapter that uses them is refused with a message naming the field.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .checkpoint import TOKENIZER_FILES, CheckpointError, hf_to_native, native_to_hf, swap_in
from .model import StarCoder2

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the transformers model
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")  # the linears of a block
# Fields whose non-default values change the maths in ways this module does not implement.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "modules_to_save": None,
                "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None, "lora_bias": False,
                "target_parameters": None, "trainable_token_indices": None}


class AdapterError(CheckpointError):
    """An adapter that cannot be read, is not a supported LoRA, or does not fit the base model."""


@dataclass(kw_only=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    lora_dropout: float = 0.0
    use_rslora: bool = False
    base_model_name_or_path: str | None = None

    def __post_init__(self) -> None:
        self.target_modules = tuple(sorted(self.target_modules))
        if self.r <= 0:
            raise ValueError(f"LoRA rank must be positive, got {self.r}")
        if not self.target_modules:
            raise ValueError("LoRA needs at least one target module")
        if unknown := [t for t in self.target_modules if t not in TARGETS]:
            raise ValueError(f"unknown LoRA target(s) {', '.join(unknown)}; choose among {', '.join(TARGETS)}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.lora_dropout}")

    @property
    def scale(self) -> float:
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self) -> dict:
        """adapter_config.json as peft writes it (the fields peft and vLLM read; the rest default)."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": self.base_model_name_or_path,
                "r": self.r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                "target_modules": list(self.target_modules), "use_rslora": self.use_rslora,
                "inference_mode": True, "init_lora_weights": True, "layers_to_transform": None,
                "layers_pattern": None, **_UNSUPPORTED}

    @classmethod
    def from_peft(cls, raw: dict, where: str = CONFIG_FILE) -> AdapterConfig:
        if raw.get("peft_type", "LORA") != "LORA":
            raise AdapterError(f"{where}: peft_type {raw.get('peft_type')!r} is not supported (only LORA)")
        for key, default in _UNSUPPORTED.items():
            value = raw.get(key, default)
            if value and value != default:  # None, {}, [] and False all mean "not used"
                raise AdapterError(f"{where}: {key}={raw[key]!r} is not supported when merging")
        targets = raw.get("target_modules")
        if isinstance(targets, str):  # peft allows a regex; we accept only the plain module names
            raise AdapterError(f"{where}: target_modules as a regex ({targets!r}) is not supported; list names")
        try:
            return cls(r=int(raw["r"]), lora_alpha=float(raw["lora_alpha"]), target_modules=tuple(targets or ()),
                       lora_dropout=float(raw.get("lora_dropout") or 0.0), use_rslora=bool(raw.get("use_rslora")),
                       base_model_name_or_path=raw.get("base_model_name_or_path"))
        except (KeyError, TypeError) as e:
            raise AdapterError(f"{where}: missing or bad field {e}") from None
        except ValueError as e:
            raise AdapterError(f"{where}: {e}") from None


@dataclass
class Adapter:
    """A LoRA adapter in memory: native module name -> (A (r, in), B (out, r)), fp32."""

    config: AdapterConfig
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    path: Path | None = None

    def delta(self, module: str) -> torch.Tensor | None:
        """scale * B @ A: (out, in) fp32, the change to `module`'s weight; None if not adapted."""
        if module not in self.pairs:
            return None
        A, B = self.pairs[module]
        return self.config.scale * (B.float() @ A.float())

    def merged_weight(self, weight_name: str, weight: torch.Tensor) -> torch.Tensor:
        """`weight` (native name `...q_proj.weight`) with the adapter folded in, in its own dtype.
        The sum is taken in fp32 and rounded once (a bf16 base is not rounded twice)."""
        delta = self.delta(weight_name.removesuffix(".weight")) if weight_name.endswith(".weight") else None
        if delta is None:
            return weight
        return (weight.float() + delta.to(weight.device)).to(weight.dtype)


def peft_key(module: str, which: str) -> str:
    """Our module name (`layers.0.self_attn.q_proj`) -> PEFT's tensor name for lora_A or lora_B."""
    hf_module = native_to_hf(f"{module}.weight").removesuffix(".weight")
    return f"{PEFT_PREFIX}{hf_module}.{which}.weight"


def _native_module(key: str, where: str) -> tuple[str, str]:
    """PEFT tensor name -> (our module name, "lora_A" | "lora_B")."""
    body = key.removeprefix(PEFT_PREFIX)
    head, _, which = body.removesuffix(".weight").rpartition(".")
    if not key.startswith(PEFT_PREFIX) or which not in ("lora_A", "lora_B") or not key.endswith(".weight"):
        raise AdapterError(f"{where}: unexpected tensor {key!r} (only LoRA A/B matrices are supported)")
    try:
        native = hf_to_native(f"{head}.weight")
    except KeyError:
        native = None
    if native is None or native.split(".")[-2] not in TARGETS:
        raise AdapterError(f"{where}: tensor {key!r} adapts a module LoRA merging does not support")
    return native.removesuffix(".weight"), which


def load_adapter(path: str | os.PathLike) -> Adapter:
    """Read an adapter directory (PEFT format)."""
    path = Path(path)
    cfg_file, weights = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not cfg_file.is_file():
        raise AdapterError(f"{path} is not a LoRA adapter: it has no {CONFIG_FILE}")
    if not weights.is_file():
        hint = " (pickle adapter_model.bin is never loaded; re-save with safetensors)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{path} has no {WEIGHTS_FILE}{hint}")
    try:
        config = AdapterConfig.from_peft(json.loads(cfg_file.read_text()), str(cfg_file))
    except json.JSONDecodeError as e:
        raise AdapterError(f"{cfg_file}: not JSON: {e}") from None
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{weights}: unreadable safetensors file: {e}") from None
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        module, which = _native_module(key, weights.name)
        halves.setdefault(module, {})[which] = t
    pairs = {}
    for module, h in sorted(halves.items()):
        if set(h) != {"lora_A", "lora_B"}:
            raise AdapterError(f"{weights.name}: {module} has {', '.join(h)} but not both lora_A and lora_B")
        A, B = h["lora_A"], h["lora_B"]  # (r, in), (out, r)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != config.r or B.shape[1] != config.r:
            raise AdapterError(f"{weights.name}: {module} has A {list(A.shape)} and B {list(B.shape)}, "
                               f"which do not make a rank-{config.r} pair")
        pairs[module] = (A, B)
    if not pairs:
        raise AdapterError(f"{weights} holds no LoRA tensors")
    return Adapter(config, pairs, path)


def check_fits(adapter: Adapter, model_config) -> None:
    """Raise AdapterError naming the first module whose shape (or existence) differs from the base."""
    with torch.device("meta"):
        base = StarCoder2(model_config)
    linears = dict(base.named_modules())
    where = adapter.path or "the adapter"
    trained_on = adapter.config.base_model_name_or_path
    origin = f" (it was trained on {trained_on})" if trained_on else ""
    for module, (A, B) in adapter.pairs.items():
        lin = linears.get(module)
        if lin is None:
            raise AdapterError(f"{where} does not fit this base model{origin}: it adapts {module}, which a "
                               f"{model_config.num_layers}-layer model does not have")
        if (B.shape[0], A.shape[1]) != (lin.out_features, lin.in_features):
            raise AdapterError(f"{where} does not fit this base model{origin}: {module} is "
                               f"{lin.out_features}x{lin.in_features} here but {B.shape[0]}x{A.shape[1]} in the adapter")


@torch.no_grad()
def merge_adapter(model: StarCoder2, adapter: Adapter | str | os.PathLike) -> StarCoder2:
    """Fold the adapter into the model's weights in place (W += scale * B @ A); returns the model.
    Call before swapping in native kernels or quantizing: both read the plain nn.Linear weights."""
    if not isinstance(adapter, Adapter):
        adapter = load_adapter(adapter)
    check_fits(adapter, model.config)
    modules = dict(model.named_modules())
    for module in adapter.pairs:
        lin = modules[module]
        lin.weight.copy_(adapter.merged_weight(f"{module}.weight", lin.weight))
    return model


def save_adapter(pairs: dict[str, tuple[torch.Tensor, torch.Tensor]], config: AdapterConfig, out: str | os.PathLike,
                 tokenizer_dir: str | os.PathLike | None = None) -> Path:
    """Write an adapter directory in PEFT format, atomically (temporary directory, then rename)."""
    out = Path(out)
    tensors = {}
    for module, (A, B) in pairs.items():
        tensors[peft_key(module, "lora_A")] = A.detach().to("cpu", torch.float32).contiguous()
        tensors[peft_key(module, "lora_B")] = B.detach().to("cpu", torch.float32).contiguous()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_peft(), indent=2) + "\n")
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        for name in TOKENIZER_FILES if tokenizer_dir is not None else ():
            if (Path(tokenizer_dir) / name).is_file():
                shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        swap_in(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
