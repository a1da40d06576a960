"""The training loop: `train(config)` pre-trains or fine-tunes, resumes, evaluates, checkpoints.

Per optimiser step: `grad_accum` micro-batches of (B, S) under autocast, mean loss, gradient clip,
AdamW, schedule. Every `eval_every` steps: held-out loss and bits per byte on the "valid" split
(FIM off, fixed windows). Every `save_every` steps and at the end: an atomic checkpoint (state.py).
Metrics go to OUT/metrics.jsonl (one JSON object per line) and to a progress bar.
Fine-tuning reuses this loop through `TrainHooks` (its own model, token source and export).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import load_model, save_model
from ..data.loader import IGNORE_INDEX, BatchLoader, PackedWindows, open_shards
from ..device import autocast_dtype, resolve_device
from ..model import StarCoder2
from ..tokenizer import Tokenizer
from .config import TrainConfig
from .optim import build_optimizer, lr_at
from .parallel import Dist, all_reduce_mean, init_distributed, wrap
from .state import full_model_state, latest_checkpoint, load_checkpoint, save_checkpoint

# bf16 matmul peak of the 2-core AVX-512 machines this project is measured on (performance.md);
# GPUs: the dense bf16 figure of the part. Anything else: pass `peak_flops`.
KNOWN_PEAK_FLOPS = {"cpu": 385e9, "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}
BEST_DIR, BEST_FILE = "best", "best.json"  # keep_best: OUT/best/ holds the lowest held-out loss's result


def flops_per_token(model: StarCoder2, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights plus attention (PaLM appendix B).

    Attention costs 12 x layers x heads x head_dim x (keys a query attends, averaged over positions:
    about S/2 for causal attention, about the window once S is much longer than it)."""
    cfg = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    window = cfg.sliding_window or seq_len
    keys = sum(min(i + 1, window) for i in range(seq_len)) / seq_len
    return 6 * matmul + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * keys


def loss_fn(model, input_ids: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None
            ) -> torch.Tensor:
    """Mean next-token loss over labels != IGNORE_INDEX. segment_ids (B, S): packed examples that
    must not attend to each other (instruction tuning); None: plain causal rows."""
    logits = model(input_ids) if segment_ids is None else model(input_ids, segment_ids=segment_ids)  # (B, S, V) fp32
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX)


@torch.no_grad()
def evaluate(model, batches: list[tuple[torch.Tensor, torch.Tensor]], nbytes: int, device, autocast) -> dict:
    """Held-out loss (nats/token) and bits per byte of text over fixed batches."""
    model.eval()
    total, count = 0.0, 0
    for x, y, *seg in batches:  # seg: [segment_ids] for packed instruction rows, else empty
        with autocast():
            logits = model(x.to(device)) if not seg else model(x.to(device), segment_ids=seg[0].to(device))
        y = y.to(device)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum").item()
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_bpb": total / math.log(2) / max(nbytes, 1), "val_tokens": count}


def _eval_batches(config: TrainConfig, tok: Tokenizer, d: Dist) -> tuple[list, int]:
    shards = open_shards(config.data, "valid")
    if not shards:
        return [], 0
    windows = PackedWindows(shards, config.seq_len)
    n = min(config.eval_batches, len(windows) // config.batch_size)
    if n == 0:
        return [], 0
    loader = BatchLoader(windows, config.batch_size, seed=config.seed, shuffle=False)
    batches = [loader.next_batch() for _ in range(n)]
    # bytes of the text the labels spell (special tokens count zero bytes: a conservative bpb)
    nbytes = sum(len(tok.decode(y[i].tolist()).encode("utf-8")) for _, y in batches for i in range(len(y)))
    return batches, nbytes


def packed_data(config: TrainConfig, tok: Tokenizer, d: Dist) -> tuple[BatchLoader, list, int]:
    """The default token source: packed (FIM'd) windows of DATA's train split for this rank, and
    fixed held-out batches (with their text's byte count) from its valid split."""
    loader = BatchLoader(PackedWindows(open_shards(config.data, "train"), config.seq_len), config.batch_size,
                         seed=config.seed, tokenizer=tok, fim=config.fim, rank=d.rank, world_size=d.world_size)
    return loader, *_eval_batches(config, tok, d)


@dataclass
class TrainHooks:
    """What a caller (fine-tuning) replaces without copying the loop; None keeps the default.

    build_model(config, tok, device) -> the module to train (its parameters with requires_grad train)
    data(config, tok, dist) -> (loader with next_batch/state_dict/load_state_dict/batches_per_epoch,
                                eval batches, their byte count); batches are (input_ids, labels) or
                                (input_ids, labels, segment_ids) for packed examples (finetune/sft.py)
    export(model, tok, out) -> what the run leaves in OUT (default: a HF checkpoint in OUT/final);
                                called on rank 0 only, with the unwrapped module (DDP; not FSDP)
    trainable_only: checkpoints hold only the parameters that train (LoRA: the adapters, not the base)
    """

    build_model: Callable[[TrainConfig, Tokenizer, torch.device], torch.nn.Module] | None = None
    data: Callable[[TrainConfig, Tokenizer, Dist], tuple] | None = None
    export: Callable[[torch.nn.Module, Tokenizer, Path], Path] | None = None
    trainable_only: bool = False


def build_model(config: TrainConfig, tok: Tokenizer, device: torch.device) -> StarCoder2:
    if config.init_from:
        return load_model(config.init_from, dtype=torch.float32, device=device)[0]  # fp32 master weights
    model = StarCoder2(config.model_cfg(tok.vocab_size))
    model.init_weights(torch.Generator().manual_seed(config.seed))
    return model.to(device)


def train(config: TrainConfig, *, resume: bool = False, device: str | None = None, progress: bool = True,
          log: Callable[[str], None] = print, hooks: TrainHooks | None = None) -> dict:
    """Run (or continue) training; returns the last metrics record."""
    hooks = hooks or TrainHooks()
    dev = resolve_device(device)
    d = init_distributed(dev.type)
    if d.world_size > 1 and dev.type == "cuda":
        dev = torch.device("cuda", d.local_rank)
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed + d.rank)
    out = Path(config.out)
    ckpt_dir = out / "checkpoints"
    open_shards(config.data, "train")  # first: a wrong data dir is named as such
    tok = Tokenizer.from_dir(Path(config.data) / "tokenizer")

    model = (hooks.build_model or build_model)(config, tok, dev)
    model.train()
    loader, eval_batches, eval_bytes = (hooks.data or packed_data)(config, tok, d)
    # FSDP2's fully_shard replaces the parameters with sharded ones: the optimizer, and the checkpoint
    # load that fills its state, must come after wrap() or they hold the stale, unsharded tensors.
    runner = wrap(model, d, parallel=config.parallel, compile=config.compile,
                  activation_checkpointing=config.activation_checkpointing)
    optimizer = build_optimizer(model, config.lr, config.weight_decay, config.betas, config.eps)
    step, last = 0, {}
    if resume and (path := latest_checkpoint(ckpt_dir)):
        saved = load_checkpoint(path, model, optimizer, trainable_only=hooks.trainable_only)
        step = saved["step"]
        loader.load_state_dict(saved["loader"])
        if not saved["rng_restored"]:  # saved by another number of processes: a fresh, deterministic stream
            torch.manual_seed(config.seed + d.rank + step)
        if d.is_main:
            log(f"resumed from {path} at step {step}")
    elif resume and d.is_main:
        log(f"no checkpoint in {ckpt_dir}: starting from scratch")

    dtype = autocast_dtype(config.dtype, dev)
    def autocast():
        return torch.autocast(dev.type, dtype=dtype) if dtype else contextlib.nullcontext()

    tokens_per_step = config.batch_size * config.seq_len * config.grad_accum * d.world_size
    fpt = flops_per_token(model, config.seq_len)
    peak = config.peak_flops or KNOWN_PEAK_FLOPS.get(
        "cpu" if dev.type == "cpu" else next((k for k in KNOWN_PEAK_FLOPS if k in torch.cuda.get_device_name(dev)), ""))
    peak = peak * d.world_size if peak else None  # every process brings its own device
    metrics_file = None
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file = open(out / "metrics.jsonl", "a")
        n_params = sum(p.numel() for p in model.parameters())
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        trains = f" ({n_train / 1e6:.2f}M trained)" if n_train < n_params else ""
        log(f"model {n_params / 1e6:.1f}M params{trains}, {tokens_per_step:,} tokens/step, "
            f"{loader.batches_per_epoch:,} batches/epoch/rank, {d.world_size} process(es), device {dev}")

    from tqdm import tqdm

    bar = tqdm(total=config.max_steps, initial=step, disable=not (progress and d.is_main), unit="step",
               dynamic_ncols=True)

    def checkpoint(metrics: dict) -> None:
        save_checkpoint(ckpt_dir, step, model, optimizer, state={"loader": loader.state_dict(), "metrics": metrics},
                        train_config=config.to_dict(), model_config=model.config.to_hf(), is_main=d.is_main,
                        keep=config.keep_checkpoints, trainable_only=hooks.trainable_only)

    def result(target: Path) -> None:
        """What the run leaves in `target` (rank 0): the hooks' export, else a HF checkpoint in target/final."""
        hooks.export(model, tok, target) if hooks.export is not None else export(model, tok, target / "final")

    best_file = out / BEST_DIR / BEST_FILE  # {"step", "val_loss"} of what OUT/best holds
    best = json.loads(best_file.read_text()) if config.keep_best and resume and best_file.is_file() else {}

    t_last, tokens_since = time.perf_counter(), 0
    while step < config.max_steps:
        lr = lr_at(step, lr=config.lr, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                   min_lr_ratio=config.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=dev)
        for micro in range(config.grad_accum):
            x, y, *seg = loader.next_batch()  # seg: [segment_ids (B, S)] from an instruction-tuning source
            sync = micro == config.grad_accum - 1 or d.world_size == 1 or config.parallel == "fsdp"
            ctx = contextlib.nullcontext() if sync else runner.no_sync()
            with ctx, autocast():
                loss = loss_fn(runner, x.to(dev), y.to(dev), *(t.to(dev) for t in seg)) / config.grad_accum
            with ctx:
                loss.backward()
            loss_sum += loss.detach()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += tokens_per_step
        bar.update()

        record = None
        if step % config.log_every == 0 or step == config.max_steps:
            elapsed = time.perf_counter() - t_last
            tps = tokens_since / elapsed
            record = {"step": step, "loss": all_reduce_mean(loss_sum, d).item(), "lr": lr,
                      "grad_norm": float(grad_norm), "tokens_per_s": tps, "tokens": step * tokens_per_step,
                      "mfu": tps * fpt / peak if peak else None, "time": time.time()}
            t_last, tokens_since = time.perf_counter(), 0
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tps:,.0f}")
        if eval_batches and (step % config.eval_every == 0 or step == config.max_steps):
            record = {**(record or {"step": step}), **evaluate(runner, eval_batches, eval_bytes, dev, autocast)}
            if d.is_main:
                msg = f"step {step}: val loss {record['val_loss']:.4f}, {record['val_bpb']:.4f} bits/byte"
                bar.write(msg) if progress else log(msg)
                if config.keep_best and record["val_loss"] < best.get("val_loss", math.inf):
                    best = {"step": step, "val_loss": record["val_loss"]}
                    result(out / BEST_DIR)  # then its record: a crash in between leaves an older record (safe)
                    tmp = best_file.with_name(BEST_FILE + ".tmp")
                    tmp.write_text(json.dumps(best) + "\n")
                    tmp.replace(best_file)
        if record and d.is_main:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            last = record
        if step % config.save_every == 0 or step == config.max_steps:
            checkpoint(last)
    bar.close()
    if metrics_file:
        metrics_file.close()
    if hooks.export is not None:
        if d.is_main:
            result(out)
        return last
    if d.world_size > 1:  # FSDP parameters are shards: gather them (a collective) into a plain copy on rank 0
        full = full_model_state(model)
        if d.is_main:
            model = StarCoder2(model.config)
            model.load_state_dict(full)
            model.tie_weights()
    if d.is_main:
        result(out)
    return last


def export(model: StarCoder2, tok: Tokenizer, out: Path) -> Path:
    """The model as a Hugging Face checkpoint (bf16 weights, tokenizer) that transformers loads."""
    path = save_model(model, out, dtype=torch.bfloat16)
    tok.save(path)
    return path


def export_checkpoint(ckpt: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Any training checkpoint directory (or run directory: its latest) -> HF layout."""
    from ..config import ModelConfig

    ckpt = Path(ckpt)
    if not (ckpt / "state.json").is_file():
        found = latest_checkpoint(ckpt / "checkpoints" if (ckpt / "checkpoints").is_dir() else ckpt)
        if found is None:
            raise FileNotFoundError(f"{ckpt}: no training checkpoint found")
        ckpt = found
    cfg = ModelConfig.from_hf(json.loads((ckpt / "config.json").read_text()))
    model = StarCoder2(cfg)
    load_checkpoint(ckpt, model, None)
    train_cfg = json.loads((ckpt / "train_config.json").read_text())
    path = save_model(model, out, dtype=dtype)
    Tokenizer.from_dir(Path(train_cfg["data"]) / "tokenizer").save(path)
    return path
