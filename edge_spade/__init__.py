"""edge-spade: early-exit single-token answers from quantized LLMs, driven through llama.cpp."""

from .engine import Engine, EngineSettings
from .errors import EdgeSpadeError
from .runtime import Answer, Runtime, ask, load_model

__version__ = "0.1.0"
__all__ = ["Answer", "EdgeSpadeError", "Engine", "EngineSettings", "Runtime", "__version__", "ask", "load_model"]
