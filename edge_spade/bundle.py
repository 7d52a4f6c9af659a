"""Bundles: one directory holding a model and the heads calibrated for it, verified as a unit.

    my-model/
      bundle.json     format, version, model {file, sha256, size, architecture, layers, quantization}, source,
                      heads {file: sha256} once calibrated
      model.gguf
      heads/          heads.json + ONNX heads, written by `edge-spade calibrate --model my-model/`

A bundle is built in a hidden sibling directory and renamed into place, so an interrupted
conversion never leaves a half bundle. Opening one checks every recorded file (the model's
sha256 once per file version, see registry.verify_sha256) and refuses mismatches.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

from .errors import BundleError, ModelFileError
from .registry import sha256_file, verify_sha256
from .weights import read_index

log = logging.getLogger(__name__)

FORMAT, VERSION = "edge-spade-bundle", 1
BUNDLE_JSON, MODEL_FILE, HEADS_DIR = "bundle.json", "model.gguf", "heads"


@dataclass(frozen=True)
class Bundle:
    folder: Path
    meta: dict[str, Any]

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def model(self) -> Path:
        return self.folder / self.meta["model"]["file"]

    @property
    def heads_dir(self) -> Path | None:
        return self.folder / HEADS_DIR if self.meta.get("heads") else None


def is_bundle(path: Path) -> bool:
    return path.is_dir() and (path / BUNDLE_JSON).is_file()


def open_bundle(folder: str | Path) -> Bundle:
    """Read and verify a bundle; BundleError says which file does not match bundle.json."""
    folder = Path(folder).expanduser().resolve()
    try:
        meta = json.loads((folder / BUNDLE_JSON).read_text(encoding="utf-8"))
        model = meta["model"]
        if meta.get("format") != FORMAT or not isinstance(model, dict):
            raise KeyError("format")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{folder}/{BUNDLE_JSON} is not an edge-spade bundle manifest ({exc})") from None
    if meta.get("version", 0) > VERSION:
        raise BundleError(f"{folder} is bundle format {meta['version']}; this edge-spade reads up to {VERSION}")
    path = folder / model["file"]
    if not path.is_file():
        raise BundleError(f"bundle {folder.name}: {model['file']} is missing")
    if path.stat().st_size != model.get("size"):
        raise BundleError(f"bundle {folder.name}: {model['file']} is {path.stat().st_size} bytes, "
                          f"bundle.json says {model.get('size')}; the model file was replaced or damaged")
    try:
        verify_sha256(path, model.get("sha256", ""))
    except ModelFileError:
        raise BundleError(f"bundle {folder.name}: {model['file']} does not match the sha256 in bundle.json") from None
    recorded = meta.get("heads") or {}
    for name, digest in recorded.items():
        file = folder / HEADS_DIR / name
        if not file.is_file() or sha256_file(file) != digest:
            raise BundleError(f"bundle {folder.name}: heads/{name} is missing or differs from bundle.json; "
                              f"re-run: edge-spade calibrate --model {folder}")
    if not recorded and (folder / HEADS_DIR / "heads.json").is_file():
        raise BundleError(f"bundle {folder.name}: heads/ is not recorded in bundle.json; "
                          f"re-run: edge-spade calibrate --model {folder}")
    return Bundle(folder, meta)


def build_bundle(out: str | Path, write_model: Callable[[Path], None], source: dict[str, Any],
                 force: bool = False) -> Bundle:
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
