"""The HTTP server: OpenAI, TGI, llama.cpp and Tabby completion APIs over one Engine (see app.py).

Needs the `serve` extra (fastapi, uvicorn). `starcoder2 serve` runs it.
"""

from .app import create_app
from .core import ServerSettings

__all__ = ["ServerSettings", "create_app"]
