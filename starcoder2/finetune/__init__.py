"""Fine-tuning: LoRA (through peft) or full, on a repository or any prepared token source (run.py)."""

from .run import FinetuneConfig, finetune, finetune_repo, prepare_repo

__all__ = ["FinetuneConfig", "finetune", "finetune_repo", "prepare_repo"]
