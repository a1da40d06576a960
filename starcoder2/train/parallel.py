"""Parallelism and memory tricks applied to a plain StarCoder2 from outside model.py.

`torchrun --nproc-per-node N` sets RANK/WORLD_SIZE/LOCAL_RANK; `init_distributed()` joins the group
(gloo on CPU, NCCL on CUDA). `wrap()` then applies, in this order: activation checkpointing per
block, `torch.compile` per block (module names, hence checkpoint keys, stay unchanged), and DDP or
FSDP2 (`fully_shard` per block, then the root, which holds the tied embedding and head).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them."""
    for block in model.layers:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def wrap(model: nn.Module, d: Dist, *, parallel: str, compile: bool, activation_checkpointing: bool) -> nn.Module:
    """Returns the module to call in training (`model` itself keeps the parameters' canonical names)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if compile:
        for block in model.layers:
            block.compile()
    if d.world_size == 1:
        return model
    if parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for block in model.layers:
            fully_shard(block)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [d.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_mean(x: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world_size > 1:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= d.world_size
    return x
