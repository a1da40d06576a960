"""starcoder2: run, serve, evaluate and train StarCoder2 code models, self-hosted.

Importing the package has no side effects and does not import torch: the public names below are
loaded on first use, so `starcoder2 --help` answers at once.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load": "api", "LoadedModel": "api",
    "CheckpointError": "checkpoint", "load_model": "checkpoint", "save_model": "checkpoint",
    "ModelConfig": "config", "preset": "config",
    "KVCache": "kv_cache", "StarCoder2": "model", "Tokenizer": "tokenizer",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'starcoder2' has no attribute {name!r}")
