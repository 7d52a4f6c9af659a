"""edge-spade: early-exit single-token answers from quantized LLMs, driven through llama.cpp.

The names below load on first use, so that a client of a running server (`edge-spade ask
--server`) starts without numpy, llama.cpp or onnxruntime.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["Answer", "EdgeSpadeError", "Engine", "EngineSettings", "Runtime", "__version__", "ask", "load_model"]

_HOMES = {
    "Answer": "answer",
    "EdgeSpadeError": "errors",
    "Engine": "engine",
    "EngineSettings": "engine",
    "Runtime": "runtime",
    "ask": "runtime",
    "load_model": "runtime",
}

if TYPE_CHECKING:
    from .answer import Answer
    from .engine import Engine, EngineSettings
    from .errors import EdgeSpadeError
    from .runtime import Runtime, ask, load_model


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    raise AttributeError(f"module 'edge_spade' has no attribute {name!r}")
