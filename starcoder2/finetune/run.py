"""Fine-tune a checkpoint on your own repository: LoRA (default) or all weights.

    starcoder2 finetune --model M --repo PATH --out DIR [--lora --rank 16 --alpha 32 | --full] ...
    torchrun --nproc-per-node N -m starcoder2.cli finetune ...        # DDP, LoRA or full

`finetune_repo` runs the repository through the data pipeline (licence, PII, dedup as the data
config says; repository format) into OUT/data, then
calls `finetune`, which trains on any prepared token source through the pre-training loop
(train/loop.py: bf16 autocast, progress bar, held-out loss, atomic checkpoints, resume), with hooks
for what differs: LoRA loads the base frozen (bf16 in a bf16 run), injects fp32 adapters, checkpoints
only the adapters and leaves OUT/adapter in PEFT format; full fine-tuning leaves a HF checkpoint in
OUT/final. Multi-process: DDP for both (FSDP only for full fine-tuning).

Held-out files are exactly those `starcoder2 eval repo --holdout F --seed S` samples its cursors
from (same hash of the path), so that the before-and-after comparison runs on code the fine-tuning
never saw, with the same F and seed on both commands.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapters import TARGETS, AdapterConfig, save_adapter
from ..checkpoint import load_model, read_config
from ..data.fim import FIMConfig
from ..data.ingest import repository_files
from ..data.pipeline import DataConfig, prepare
from ..device import autocast_dtype, resolve_device
from ..eval.repobench import held_out, language_of
from ..tokenizer import Tokenizer
from ..train.config import TrainConfig
from ..train.loop import TrainHooks, train
from ..train.parallel import init_distributed
from .lora import inject_lora, lora_pairs

CONFIG_FILE = "finetune_config.json"


@dataclass(kw_only=True)
class FinetuneConfig:
    model: str  # base checkpoint directory (already resolved from a hub id by the caller)
    out: str  # run directory: data/, checkpoints/, metrics.jsonl, adapter/ (LoRA) or final/ (full)
    method: str = "lora"  # "lora" | "full"
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = TARGETS
    base_name: str | None = None  # recorded as base_model_name_or_path (default: `model`)
    steps: int = 200
    lr: float | None = None  # None: 2e-4 for LoRA, 2e-5 for full fine-tuning
    warmup_steps: int | None = None  # None: a tenth of the steps
    weight_decay: float = 0.0
    batch_size: int = 4
    seq_len: int = 512
    grad_accum: int = 1
    eval_every: int = 50
    eval_batches: int = 16
    save_every: int = 50
    log_every: int = 10
    seed: int = 0
    fim: FIMConfig = field(default_factory=FIMConfig)
    dtype: str = "auto"  # autocast dtype (train/config.py); a LoRA base is also stored in it (fp32 without autocast)
    parallel: str = "ddp"
    threads: int | None = None
    activation_checkpointing: bool = False  # recompute each block's activations in backward: long windows on 3B
    keep_best: bool = False  # also leave OUT/best/adapter (or best/final) from the lowest held-out loss

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.method not in ("lora", "full"):
            raise ValueError(f"method must be 'lora' or 'full', got {self.method!r}")
        if self.method == "lora":
            self.adapter_config()  # bad rank, targets or dropout fail here
            if self.parallel == "fsdp":
                raise ValueError("LoRA runs on several processes with DDP (parallel='ddp'); FSDP is for --full")
        self.train_config("")  # and the loop's own checks (steps, batch, dtype, ...)

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                             target_modules=self.targets, base_model_name_or_path=self.base_name or self.model)

    def train_config(self, data: str | Path) -> TrainConfig:
        lr = self.lr if self.lr is not None else 2e-4 if self.method == "lora" else 2e-5
        warmup = self.warmup_steps if self.warmup_steps is not None else max(1, self.steps // 10)
        return TrainConfig(data=str(data), out=self.out, init_from=self.model, seq_len=self.seq_len,
                           batch_size=self.batch_size, grad_accum=self.grad_accum, max_steps=self.steps, lr=lr,
                           warmup_steps=warmup, weight_decay=self.weight_decay, dtype=self.dtype, seed=self.seed,
                           fim=self.fim, eval_every=self.eval_every, eval_batches=self.eval_batches,
                           save_every=self.save_every, log_every=self.log_every, parallel=self.parallel, threads=self.threads,
                           activation_checkpointing=self.activation_checkpointing, keep_best=self.keep_best)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def lora_hooks(config: FinetuneConfig, data: Path) -> TrainHooks:
    """Base frozen in the run's dtype, fp32 adapters, adapter-only checkpoints, OUT/adapter at the end."""
    adapter = config.adapter_config()

    def build(train_config: TrainConfig, tok: Tokenizer, device: torch.device) -> torch.nn.Module:
        base_dtype = autocast_dtype(config.dtype, device) or torch.float32
        model, _ = load_model(train_config.init_from, dtype=base_dtype, device=device)
        return inject_lora(model, adapter)

    def export(model: torch.nn.Module, tok: Tokenizer, out: Path) -> Path:
        return save_adapter(lora_pairs(model), adapter, out / "adapter", tokenizer_dir=data / "tokenizer")

    return TrainHooks(build_model=build, export=export, trainable_only=True)


def finetune(config: FinetuneConfig, data: str | Path, *, resume: bool = False, device: str | None = None,
             progress: bool = True, log: Callable[[str], None] = print,
             token_source: Callable | None = None) -> dict:
    """Fine-tune on a prepared data directory (manifest.json, train/valid shards, tokenizer/); returns
    the last metrics record. `token_source(train_config, tokenizer, dist)` replaces the packed-window
    loader (see TrainHooks.data), e.g. for instruction data with loss masks."""
    data = Path(data)
    out = Path(config.out)
    _check_same_run(config, out / CONFIG_FILE, resume)
    hooks = lora_hooks(config, data) if config.method == "lora" else TrainHooks()
    hooks.data = token_source
    dev = resolve_device(device)
    if autocast_dtype(config.dtype, dev) is None and not config.activation_checkpointing:
        gb = 4 * read_config(Path(config.model)).num_params / 1e9
        if gb > 4 and init_distributed(dev.type).is_main:  # 1B parameters and more
            log(f"the weights train in fp32 here ({gb:.0f} GB; no fast bf16 on this {dev.type}): add "
                "--activation-checkpointing if memory runs short (3B LoRA: 16 GB with it, over 24 GB without)")
    if init_distributed(resolve_device(device).type).is_main:
        _write_json(out / CONFIG_FILE, config.to_dict())
    return train(config.train_config(data), resume=resume, device=device, progress=progress, log=log, hooks=hooks)


def eval_held_out(repo: Path, fraction: float, seed: int) -> list[str]:
    """The source files `eval repo --holdout fraction --seed seed` samples its cursors from."""
    code = sorted(p for p in repository_files(repo) if language_of(p))
    return held_out(code, fraction, seed) if code and fraction > 0 else []


def prepare_repo(repo: str | Path, data: str | Path, tokenizer: Tokenizer, data_config: DataConfig, *,
                 holdout: float = 0.2, progress: bool = True, log: Callable[[str], None] = print) -> Path:
    """The repository through the data pipeline into `data` (shards, manifest, tokenizer/), with the
    files `eval repo --holdout holdout --seed data_config.seed` uses in the valid split. Stages are
    cached under data/work, so a resumed run does not redo them."""
    repo, data = Path(repo), Path(data)
    if not repo.is_dir():
        raise ValueError(f"--repo {repo}: not a directory")
    valid = eval_held_out(repo, holdout, data_config.seed)
    data_config = dataclasses.replace(data_config, valid_paths=(*data_config.valid_paths, *valid))
    if valid:
        log(f"held out {len(valid)} files (those `eval repo --holdout {holdout} --seed {data_config.seed}` "
            f"samples from): {', '.join(valid[:5])}{' ...' if len(valid) > 5 else ''}")
    manifest = prepare([repo], data, tokenizer=tokenizer, config=data_config, progress=progress, log=log)
    tokenizer.save(data / "tokenizer")
    splits = {s["split"] for s in manifest["shards"]}
    if "train" not in splits:
        raise ValueError(f"--repo {repo}: no training files left after the data pipeline (see the report above)")
    if "valid" not in splits:
        log("no held-out files left after the data pipeline: held-out loss is not computed (raise --holdout)")
    return data


def finetune_repo(config: FinetuneConfig, repo: str | Path, data_config: DataConfig, *, holdout: float = 0.2,
                  resume: bool = False, device: str | None = None, progress: bool = True,
                  log: Callable[[str], None] = print) -> dict:
    """`starcoder2 finetune`: rank 0 prepares OUT/data from the repository, then every rank trains."""
    import torch.distributed as dist

    _check_same_run(config, Path(config.out) / CONFIG_FILE, resume)  # before minutes of data preparation
    d = init_distributed(resolve_device(device).type)
    data = Path(config.out) / "data"
    if d.is_main:
        tokenizer = Tokenizer.from_dir(config.model)
        prepare_repo(repo, data, tokenizer, data_config, holdout=holdout, progress=progress, log=log)
    if d.world_size > 1:
        dist.barrier()
    return finetune(config, data, resume=resume, device=device, progress=progress, log=log)


def _check_same_run(config: FinetuneConfig, saved: Path, resume: bool) -> None:
    """A resumed run must train what it trained before (same method and adapter shape)."""
    if not (resume and saved.is_file()):
        return
    before = json.loads(saved.read_text())
    for key in ("method", "rank", "targets", "model") if config.method == "lora" else ("method", "model"):
        now = config.to_dict()[key]
        if (list(now) if isinstance(now, tuple) else now) != before.get(key):
            raise ValueError(f"--resume with {key}={now!r}, but {saved} says {before.get(key)!r}")


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)
