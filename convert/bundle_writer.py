"""Building bundles: written in a hidden sibling directory and renamed into place, so an
interrupted conversion never leaves a half bundle; heads recorded after calibration."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from edge_spade.bundle import BUNDLE_JSON, FORMAT, HEADS_DIR, MODEL_FILE, VERSION, Bundle
from edge_spade.cache import sha256_file
from edge_spade.errors import BundleError
from edge_spade.weights import read_index

log = logging.getLogger(__name__)


def build_bundle(
    out: str | Path, write_model: Callable[[Path], None], source: dict[str, Any], force: bool = False
) -> Bundle:
    """Create bundle `out`: `write_model(path)` writes model.gguf; the rest is recorded here."""
    out = Path(out).expanduser().resolve()
    if out.exists() and not (out.is_dir() and (force or not any(out.iterdir()))):
        raise BundleError(f"{out} already exists and is not an empty directory (use --force to replace a bundle)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = tmp / MODEL_FILE
        write_model(model)
        index = read_index(model)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": {
                "file": MODEL_FILE,
                "sha256": sha256_file(model),
                "size": model.stat().st_size,
                "architecture": index.arch,
                "n_layers": index.n_layers,
                "n_embd": index.n_embd,
                "n_vocab": index.n_vocab,
                "quantization": quantization_name(index.file_type),
            },
            "source": source,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "edge_spade": version("edge-spade"),
            "heads": {},
        }
        _write_meta(tmp, meta)
        tmp.chmod(0o755)
        if out.exists():
            shutil.rmtree(out)
        tmp.replace(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("wrote bundle %s", out)
    return Bundle(out, meta)


def record_heads(bundle: Bundle) -> Bundle:
    """After calibration wrote bundle/heads/: record its files' hashes in bundle.json."""
    heads = bundle.folder / HEADS_DIR
    files = sorted(p for p in heads.iterdir() if p.is_file()) if heads.is_dir() else []
    meta = {**bundle.meta, "heads": {p.name: sha256_file(p) for p in files}}
    _write_meta(bundle.folder, meta)
    return Bundle(bundle.folder, meta)


def quantization_name(file_type: int) -> str:
    import gguf

    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        return "unknown"


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    tmp = folder / f".{BUNDLE_JSON}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    tmp.replace(folder / BUNDLE_JSON)
