"""Bundles: one directory holding a model and the heads calibrated for it, verified as a unit.

The runtime only opens bundles; the converter builds them (edge_spade.convert.bundle_writer).

    my-model/
      bundle.json     format, version, model {file, sha256, size, architecture, layers, quantization}, source,
                      heads {file: sha256} once calibrated
      model.gguf
      heads/          heads.json + ONNX heads, written by `edge-spade calibrate --model my-model/`

Opening one checks every recorded file (the model's
sha256 once per file version, see cache.verify_sha256) and refuses mismatches.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cache import sha256_file, verify_sha256
from .errors import BundleError, ModelFileError

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
        raise BundleError(
            f"bundle {folder.name}: {model['file']} is {path.stat().st_size} bytes, "
            f"bundle.json says {model.get('size')}; the model file was replaced or damaged"
        )
    try:
        verify_sha256(path, model.get("sha256", ""))
    except ModelFileError:
        raise BundleError(f"bundle {folder.name}: {model['file']} does not match the sha256 in bundle.json") from None
    recorded = meta.get("heads") or {}
    for name in sorted(recorded, key=lambda n: n != "heads.json"):  # the manifest first: it names the others
        digest, file = recorded[name], folder / HEADS_DIR / name
        if not file.is_file() or sha256_file(file) != digest:
            raise BundleError(
                f"bundle {folder.name}: heads/{name} is missing or differs from bundle.json; "
                f"re-run: edge-spade calibrate --model {folder}"
            )
    if not recorded and (folder / HEADS_DIR / "heads.json").is_file():
        raise BundleError(
            f"bundle {folder.name}: heads/ is not recorded in bundle.json; "
            f"re-run: edge-spade calibrate --model {folder}"
        )
    return Bundle(folder, meta)
