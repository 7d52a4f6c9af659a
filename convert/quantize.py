"""GGUF -> quantized GGUF with llama.cpp's own quantizer (`llama_model_quantize`)."""

from __future__ import annotations

import ctypes
import logging
import os
from pathlib import Path

from edge_spade.errors import CheckpointError, ModelFileError

log = logging.getLogger(__name__)

# --quant names -> llama_ftype; F32/F16/BF16 are also what the HF converter writes directly.
QUANT_TYPES = ("Q8_0", "Q4_K_M", "Q4_0", "Q5_K_M", "Q6_K", "Q4_K_S", "Q5_0", "F16", "BF16", "F32")


def ftype(name: str) -> int:
    import llama_cpp

    if name not in QUANT_TYPES:
        raise CheckpointError(f"quantization {name!r} is not offered; choose one of {', '.join(QUANT_TYPES)}")
    return getattr(llama_cpp, "LLAMA_FTYPE_ALL_F32" if name == "F32" else f"LLAMA_FTYPE_MOSTLY_{name}")


def quantize(src: str | Path, dst: str | Path, quant: str, threads: int | None = None) -> Path:
    """Quantize `src` into `dst` (written under a temporary name, renamed when complete)."""
    import llama_cpp

    from edge_spade.engine import init_backend
    from edge_spade.weights import read_index

    src, dst = Path(src), Path(dst)
    read_index(src)  # a clear ModelFileError for a missing, truncated or corrupt input
    init_backend()  # routes llama.cpp's log to our logger
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype(quant)
    params.nthread = threads or 0
    params.allow_requantize = True  # inputs may already be quantized (requantizing a GGUF)
    tmp = dst.with_name(f".{dst.name}.part{os.getpid()}")
    log.info("quantizing %s -> %s (%s)", src.name, dst.name, quant)
    try:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc != 0 or not tmp.is_file():
            raise ModelFileError(
                f"llama.cpp could not quantize {src} to {quant} (code {rc}); run with EDGE_SPADE_DEBUG=1 -v for its log"
            )
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
