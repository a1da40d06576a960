"""TrainConfig: everything a pre-training or fine-tuning run needs, saved with every checkpoint."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import ModelConfig, preset
from ..data.fim import FIMConfig


@dataclass(kw_only=True)
class TrainConfig:
    data: str  # a `starcoder2 data prepare` output directory (manifest.json, shards, tokenizer/)
    out: str  # run directory: checkpoints/, metrics.jsonl, final HF-layout export
    model: str = "small"  # a preset name; `model_config` overrides it field by field
    model_config: dict = field(default_factory=dict)
    init_from: str | None = None  # start from a HF-layout checkpoint instead of random weights
    seq_len: int = 512
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1
    max_steps: int = 1000
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    dtype: str = "auto"  # autocast dtype ("bf16" | "fp16" | "fp32" | "auto": bf16 where fast); master weights fp32
    seed: int = 0
    fim: FIMConfig = field(default_factory=FIMConfig)
    eval_every: int = 200
    eval_batches: int = 16
    save_every: int = 200
    keep_checkpoints: int = 2
    keep_best: bool = False  # also leave the result of the lowest held-out loss in OUT/best (ddp or 1 process)
    log_every: int = 10
    compile: bool = False
    activation_checkpointing: bool = False
    parallel: str = "ddp"  # how to spread over `torchrun` processes: "ddp" | "fsdp"
    peak_flops: float | None = None  # for MFU; None: a known device figure or no MFU
    threads: int | None = None  # torch intra-op threads (CPU); None: torch's default

    def __post_init__(self) -> None:
        if isinstance(self.fim, dict):
            if unknown := set(self.fim) - {f.name for f in dataclasses.fields(FIMConfig)}:
                raise ValueError(f"unknown fim keys: {', '.join(sorted(unknown))}")
            self.fim = FIMConfig(**self.fim)
        self.betas = tuple(self.betas)
        if self.parallel not in ("ddp", "fsdp"):
            raise ValueError(f"parallel must be 'ddp' or 'fsdp', got {self.parallel!r}")
        if self.keep_best and self.parallel == "fsdp":
            raise ValueError("keep_best exports from rank 0, which holds only shards under FSDP: use parallel='ddp'")
        if self.dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"dtype must be auto, bf16, fp16 or fp32, got {self.dtype!r}")
        for name in ("seq_len", "batch_size", "grad_accum", "max_steps", "log_every", "eval_every", "save_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if unknown := set(self.model_config) - {f.name for f in dataclasses.fields(ModelConfig)}:
            raise ValueError(f"unknown model_config keys: {', '.join(sorted(unknown))}")
        self.model_cfg(0)  # an unknown preset or inconsistent overrides fail now, not after loading data

    def model_cfg(self, vocab_size: int) -> ModelConfig:
        """The model's config: preset, then overrides; the vocabulary grows to hold the tokenizer."""
        base = preset(self.model)
        cfg = base.replace(**self.model_config) if self.model_config else base
        return cfg if cfg.vocab_size >= vocab_size else cfg.replace(vocab_size=vocab_size)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        if unknown := set(raw) - names:
            raise ValueError(f"unknown train config keys: {', '.join(sorted(unknown))}")
        return cls(**raw)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        path = Path(path)
        if path.suffix == ".toml":
            import tomllib

            return cls.from_dict(tomllib.loads(path.read_text()))
        return cls.from_dict(json.loads(path.read_text()))
