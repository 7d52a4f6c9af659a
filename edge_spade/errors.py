"""Expected errors: each carries a one-line message that says what went wrong and what to do.

The CLI prints these without a traceback and exits 1; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class EdgeSpadeError(Exception):
    """Base class of the errors a user can cause and fix."""


class UnknownModelError(EdgeSpadeError):
    """A model name that is neither a registry entry, a GGUF file nor a bundle."""


class ModelFileError(EdgeSpadeError):
    """A GGUF file that is missing, unreadable, corrupt or fails its checksum."""


class ModelUnavailableError(EdgeSpadeError):
    """A registry model whose source (package or hub) cannot provide the file here."""


class UnsupportedArchitectureError(EdgeSpadeError):
    """A GGUF whose architecture the runtime does not know how to drive."""


class QuestionError(EdgeSpadeError):
    """An empty question, bad choices, or text that is not valid UTF-8."""


class PromptTooLongError(EdgeSpadeError):
    """A prompt with more tokens than the context holds."""


class LayerError(EdgeSpadeError):
    """A decoding layer outside the model's range."""


class RuntimeMismatchError(EdgeSpadeError):
    """The installed llama-cpp-python is not the version whose structs we mirror."""


class SettingsError(EdgeSpadeError):
    """A setting out of range: context size, threads, GPU layers, threshold, top-k."""


class CacheError(EdgeSpadeError):
    """A cache setting or request that cannot be followed."""


class ModelClosedError(EdgeSpadeError):
    """A question to a Runtime after close()."""


class DecodeError(EdgeSpadeError):
    """llama_decode failed for a reason other than our own stop request."""


class CheckpointError(EdgeSpadeError):
    """A Hugging Face folder that cannot be converted: missing or corrupt files, unsupported settings."""


class BundleError(EdgeSpadeError):
    """A bundle directory whose files do not match its bundle.json."""
