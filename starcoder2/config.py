"""ModelConfig: every hyper-parameter of a StarCoder2 model, presets, and Hugging Face config.json I/O.

The presets `3b`, `7b` and `15b` carry the exact values of the official `config.json` files
(see ../shared/reference/starcoder2.md §4.1). `tiny` and `small` exist for tests and experiments.

Conversion from a Hugging Face `config.json` handles the known traps (§4.3):
- `bos_token_id`/`eos_token_id` default to 50256 in transformers, outside the 49,152 vocabulary:
  ids outside the vocabulary are dropped here and resolved from the tokenizer files instead;
- the 7B's leftover GPTBigCode key `activation_function: "gelu"` is ignored (the activation is `hidden_act`);
- `rope_theta` sits at the top level in old files and inside `rope_parameters` in new ones;
- `tie_word_embeddings` is absent (meaning true) in the 3B and 7B files and false in the 15B.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Activation names transformers maps to the tanh approximation of GELU (the one StarCoder2 uses).
_TANH_GELU_NAMES = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu_tanh"}


@dataclass(kw_only=True)
class ModelConfig:
    """Architecture of a StarCoder2 model. Field names are ours; `from_hf`/`to_hf` map to HF's."""

    vocab_size: int = 49152
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int | None = None  # derived: hidden_size // num_heads (never stored in shipped configs)
    max_position_embeddings: int = 16384
    sliding_window: int | None = 4096  # None: full causal attention
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    use_bias: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.018042
    embedding_dropout: float = 0.0
    residual_dropout: float = 0.0
    attention_dropout: float = 0.0
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError(f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}")
            self.head_dim = self.hidden_size // self.num_heads
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window}")
        for name in ("embedding_dropout", "residual_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def num_params(self) -> int:
        """Exact parameter count (reference §3.3)."""
        H, kv = self.hidden_size, self.num_kv_heads * self.head_dim
        q = self.num_heads * self.head_dim
        b = 1 if self.use_bias else 0
        attn = H * q + b * q + 2 * (H * kv + b * kv) + q * H + b * H
        mlp = 2 * H * self.intermediate_size + b * (self.intermediate_size + H)
        per_layer = attn + mlp + 4 * H
        head = 0 if self.tie_word_embeddings else self.vocab_size * H
        return self.num_layers * per_layer + self.vocab_size * H + 2 * H + head

    def kv_bytes_per_token(self, bytes_per_element: int = 2) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_element

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with changes; a derived head_dim is derived again from the new sizes."""
        if "head_dim" not in changes and self.head_dim == self.hidden_size // self.num_heads:
            changes["head_dim"] = None
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from the dict of a Hugging Face `config.json` (raises ValueError if not StarCoder2)."""
        model_type = hf.get("model_type")
        if model_type != "starcoder2":
            raise ValueError(f"config.json has model_type={model_type!r}, expected 'starcoder2'")
        act = hf.get("hidden_act", "gelu_pytorch_tanh")
        if act not in _TANH_GELU_NAMES:
            raise ValueError(f"unsupported hidden_act={act!r}: StarCoder2 uses gelu_pytorch_tanh")
        if hf.get("rope_scaling") or (hf.get("rope_parameters") or {}).get("rope_type", "default") != "default":
            raise ValueError("RoPE scaling is not supported; StarCoder2 checkpoints use plain RoPE")
        rope = hf.get("rope_parameters") or {}
        theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))  # transformers' class default
        vocab = hf.get("vocab_size", 49152)

        def token_id(key: str) -> int | None:
            value = hf.get(key)
            if isinstance(value, list):  # transformers allows a list of eos ids
                value = value[0] if value else None
            # 50256 is transformers' class default leaking into some files: out of the vocabulary.
            return value if isinstance(value, int) and 0 <= value < vocab else None

        hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
        return cls(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hidden // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            sliding_window=hf.get("sliding_window"),
            rope_theta=float(theta),
            norm_eps=hf.get("norm_epsilon", 1e-5),
            use_bias=hf.get("use_bias", True),
            tie_word_embeddings=hf.get("tie_word_embeddings", True),
            initializer_range=hf.get("initializer_range", 0.018042),
            embedding_dropout=float(hf.get("embedding_dropout", 0.0)),
            residual_dropout=float(hf.get("residual_dropout", 0.0)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)),
            bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"),
        )

    def to_hf(self, dtype: str | None = None) -> dict[str, Any]:
        """The `config.json` dict transformers (old and new) reads. `rope_theta` is written at the top
        level for old readers and inside `rope_parameters` for new ones."""
        hf: dict[str, Any] = {
            "architectures": ["Starcoder2ForCausalLM"],
            "model_type": "starcoder2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "max_position_embeddings": self.max_position_embeddings,
            "sliding_window": self.sliding_window,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_theta": self.rope_theta, "rope_type": "default"},
            "norm_epsilon": self.norm_eps,
            "use_bias": self.use_bias,
            "hidden_act": "gelu_pytorch_tanh",
            "tie_word_embeddings": self.tie_word_embeddings,
            "initializer_range": self.initializer_range,
            "embedding_dropout": self.embedding_dropout,
            "residual_dropout": self.residual_dropout,
            "attention_dropout": self.attention_dropout,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
        }
        if self.head_dim != self.hidden_size // self.num_heads:
            hf["head_dim"] = self.head_dim
        if dtype is not None:
            hf["torch_dtype"] = dtype
        return hf

    @classmethod
    def from_json_file(cls, path: str | Path) -> ModelConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_hf(json.load(f))


# ---- presets ------------------------------------------------------------------------------------
# Values of the official config.json files (reference §4.1). Dropouts are 0: inference is identical
# and training recipes set their own.


def starcoder2_3b() -> ModelConfig:
    return ModelConfig(hidden_size=3072, intermediate_size=12288, num_layers=30, num_heads=24, num_kv_heads=2,
                       rope_theta=999999.4420358813, initializer_range=0.018042, tie_word_embeddings=True)


def starcoder2_7b() -> ModelConfig:
    return ModelConfig(hidden_size=4608, intermediate_size=18432, num_layers=32, num_heads=36, num_kv_heads=4,
                       rope_theta=1000000.0, initializer_range=0.018042, tie_word_embeddings=True)


def starcoder2_15b() -> ModelConfig:
    return ModelConfig(hidden_size=6144, intermediate_size=24576, num_layers=40, num_heads=48, num_kv_heads=4,
                       rope_theta=100000.0, initializer_range=0.01275, tie_word_embeddings=False)


def tiny() -> ModelConfig:
    """For unit tests: runs in milliseconds; the window (16) is exercised by short sequences."""
    return ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=256, num_layers=2, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=256, sliding_window=16, rope_theta=10000.0)


def small() -> ModelConfig:
    """About 20M parameters with a 16k vocabulary: the size of an embedded default model."""
    return ModelConfig(vocab_size=16384, hidden_size=384, intermediate_size=1536, num_layers=8, num_heads=6,
                       num_kv_heads=2, max_position_embeddings=4096, sliding_window=1024, rope_theta=100000.0)


def embedded() -> ModelConfig:
    """The default model shipped inside the package (~8M parameters, 8k vocabulary, bf16 ~16 MB).

    Sized for about 2 hours of training on 2 CPU cores: at that compute (~1e15 FLOPs) a few million
    parameters seen over ~15M tokens beat a larger model seen over fewer."""
    return ModelConfig(vocab_size=8192, hidden_size=256, intermediate_size=1024, num_layers=8, num_heads=4,
                       num_kv_heads=2, max_position_embeddings=4096, sliding_window=512, rope_theta=10000.0,
                       initializer_range=0.02)


def m100() -> ModelConfig:
    """About 100M parameters (GPT-2-small scale): the larger preset of the training benchmark."""
    return ModelConfig(vocab_size=16384, hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12,
                       num_kv_heads=4, max_position_embeddings=4096, sliding_window=1024, rope_theta=100000.0,
                       initializer_range=0.02)


PRESETS = {"tiny": tiny, "small": small, "embedded": embedded, "100m": m100, "3b": starcoder2_3b, "7b": starcoder2_7b, "15b": starcoder2_15b}


def preset(name: str) -> ModelConfig:
    try:
        return PRESETS[name.lower().removeprefix("starcoder2-")]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
