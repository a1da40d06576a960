"""Helpers for the trainer tests: a tiny prepared dataset, tiny run configs, metrics and subprocesses.

Every run here is the `tiny` preset (hidden 64, 2 layers) on windows of 32 tokens, in fp32 on one
CPU thread, so that two runs of the same config give bit-identical losses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# Small, dependency-free stdlib modules: about 125k tokens with the tiny tokenizer, of which
# holdout=0.2 sends a few files to the "valid" split.
CORPUS_MODULES = ("json.decoder", "json.encoder", "textwrap", "argparse", "dataclasses", "string", "fractions",
                  "heapq", "bisect", "shlex", "glob", "fnmatch")


def prepare_tiny_data(root: Path, tokenizer) -> Path:
    """root/src/repo/*.py -> root/data (shards + manifest.json + tokenizer/); returns root/data."""
    import importlib

    from starcoder2.data.pipeline import DataConfig, prepare

    src = root / "src" / "repo"
    src.mkdir(parents=True)
    for name in CORPUS_MODULES:
        path = Path(importlib.import_module(name).__file__)
        shutil.copy(path, src / f"{name.replace('.', '_')}.py")
    out = root / "data"
    config = DataConfig(holdout=0.2, near_dedup=False, decontaminate=False, workers=1)
    prepare([root / "src"], out, tokenizer=tokenizer, config=config, progress=False, log=lambda m: None)
    tokenizer.save(out / "tokenizer")  # the trainer reads DATA/tokenizer
    return out


def run_config(data: Path, out: Path, **overrides) -> dict:
    """A TrainConfig dict for a deterministic tiny run (fp32, one thread, no FIM, log every step)."""
    return {"data": str(data), "out": str(out), "model": "tiny", "seq_len": 32, "batch_size": 4,
            "max_steps": 20, "lr": 3e-3, "warmup_steps": 4, "weight_decay": 0.1, "dtype": "fp32", "threads": 1,
            "fim": {"rate": 0.0}, "log_every": 1, "eval_every": 10, "eval_batches": 2, "save_every": 10,
            **overrides}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(json.dumps(config, indent=1))
    return path


def read_metrics(run_dir: Path) -> dict[int, dict]:
    """step -> record; a step logged twice (a killed run, then its resume) keeps the later record."""
    records = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def subprocess_env() -> dict:
    """One thread per process (determinism, and the machine's cores belong to other work)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def nice_cmd(*args: str) -> list[str]:
    return ["nice", "-n", "19", *args] if shutil.which("nice") else list(args)


def cli_cmd(*args: str) -> list[str]:
    return nice_cmd(sys.executable, "-m", "starcoder2.cli", *args)


def torchrun_cmd(nproc: int, *args: str) -> list[str]:
    return nice_cmd(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                    "-m", "starcoder2.cli", *args)


GLOO_PROBE = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
x = torch.ones(1)
dist.all_reduce(x)
assert x.item() == dist.get_world_size()
dist.destroy_process_group()
"""


def gloo_unavailable(tmp_path: Path) -> str | None:
    """None when two torchrun processes can form a gloo group here; else why not (for a skip)."""
    probe = tmp_path / "gloo_probe.py"
    probe.write_text(GLOO_PROBE)
    cmd = nice_cmd(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", str(probe))
    try:
        done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "a 2-process gloo group did not form within 120 s"
    if done.returncode != 0:
        return "a 2-process gloo group cannot start here: " + (done.stderr.strip().splitlines() or ["?"])[-1]
    return None
