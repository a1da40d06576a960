"""Training checkpoints: atomic, complete, resumable, exportable.

Layout of OUT/checkpoints/:
  step-000200/  model.safetensors (fp32, our parameter names), optimizer.pt, rng.pt,
                state.json (step, loader position, metrics), train_config.json, config.json
  latest        text file naming the newest complete step directory

A step directory is written under a temporary name and renamed when whole; `latest` is replaced
atomically afterwards, so a crash at any moment leaves the previous checkpoint usable. Files are
read back with safetensors and `torch.load(weights_only=True)`: nothing is unpickled.
Full (unsharded) state dicts come from torch.distributed.checkpoint's `get_state_dict`, which works
the same for a plain module, DDP and FSDP2; only rank 0 writes. With `trainable_only` (LoRA),
model.safetensors holds just the parameters that train; the frozen base is re-read from its own
checkpoint on resume.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

LATEST = "latest"


def _full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_state_dict(model, optimizer, options=opts)


def full_model_state(model: nn.Module) -> dict:
    """The whole model's state dict on CPU, gathered from FSDP shards if any; only rank 0 gets tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _rng_states() -> list[dict]:
    """Every rank's RNG state, gathered (a collective) so each rank's dropout stream resumes as it was."""
    import torch.distributed as dist

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()  # the device init_distributed selected
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [rng]
    states = [None] * dist.get_world_size()
    dist.all_gather_object(states, rng)
    return states


def save_checkpoint(ckpt_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    *, state: dict, train_config: dict, model_config: dict, is_main: bool = True,
                    keep: int = 2, trainable_only: bool = False) -> Path | None:
    model_sd, optim_sd = _full_state(model, optimizer)  # collective under FSDP: every rank calls it
    if trainable_only:
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        model_sd = {k: v for k, v in model_sd.items() if k in trained}
    rng_states = _rng_states()  # collective when distributed
    if not is_main:
        return None
    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=ckpt_dir))
    # tied weights are one tensor under two names: safetensors refuses shared storage, keep one
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_sd.items() if k != "lm_head.weight"
               or not model_config.get("tie_word_embeddings", True)}
    save_file(tensors, str(tmp / "model.safetensors"))
    torch.save(optim_sd, tmp / "optimizer.pt")
    torch.save({"ranks": rng_states}, tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, **state}, indent=1) + "\n")
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=1) + "\n")
    (tmp / "config.json").write_text(json.dumps(model_config, indent=1) + "\n")
    final = ckpt_dir / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = ckpt_dir / f".{LATEST}.tmp"
    latest_tmp.write_text(name + "\n")
    os.replace(latest_tmp, ckpt_dir / LATEST)
    steps = sorted(p for p in ckpt_dir.glob("step-*") if p.is_dir())
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    ckpt_dir = Path(ckpt_dir)
    pointer = ckpt_dir / LATEST
    if not pointer.is_file():
        return None
    path = ckpt_dir / pointer.read_text().strip()
    return path if (path / "state.json").is_file() else None


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    trainable_only: bool = False) -> dict:
    """Restore model (and optimizer, RNG) in place; returns state.json's contents, plus
    `rng_restored`: False when the checkpoint has no RNG state for this process (another world size).
    `trainable_only`: the checkpoint holds only some parameters (saved so); the others stay as they are."""
    import torch.distributed as dist

    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    path = Path(path)
    model_sd = load_file(str(path / "model.safetensors"))
    if "lm_head.weight" not in model_sd and "embed_tokens.weight" in model_sd:
        model_sd["lm_head.weight"] = model_sd["embed_tokens.weight"]
    opts = StateDictOptions(full_state_dict=True, strict=not trainable_only)
    if optimizer is not None:
        optim_sd = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=opts)
        rng = torch.load(path / "rng.pt", weights_only=True)
        if "ranks" not in rng:  # written before per-rank states: one process's, CUDA states per device
            rng = {"ranks": [{"torch": rng["torch"], **({"cuda": rng["cuda"][0]} if rng.get("cuda") else {})}]}
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        restored = len(rng["ranks"]) == world
        if restored:
            torch.set_rng_state(rng["ranks"][rank]["torch"])
            if "cuda" in rng["ranks"][rank] and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["ranks"][rank]["cuda"])
    else:
        model.load_state_dict(model_sd, strict=not trainable_only)
        restored = False
    return {**json.loads((path / "state.json").read_text()), "rng_restored": restored}
