"""starcoder2: run, serve, evaluate and train StarCoder2 code models, self-hosted.

Importing the package has no side effects; heavy modules load on first use.
"""

__version__ = "0.1.0"

from .api import LoadedModel, load
from .checkpoint import CheckpointError, load_model, save_model
from .config import ModelConfig, preset
from .kv_cache import KVCache
from .model import StarCoder2
from .tokenizer import Tokenizer

__all__ = ["CheckpointError", "KVCache", "LoadedModel", "ModelConfig", "StarCoder2", "Tokenizer", "load",
           "load_model", "preset", "save_model", "__version__"]
