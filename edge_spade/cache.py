"""edge-spade's cache folder and file hashing: one home for what several modules derive from files.

The cache holds what is cheap to rebuild and slow to compute: GGUF indexes, tail models,
sha256 markers, calibration traces. Nothing in it is precious; deleting it costs time only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from .errors import ModelFileError

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    """$EDGE_SPADE_CACHE, else $XDG_CACHE_HOME/edge-spade, else ~/.cache/edge-spade."""
    env = os.environ.get("EDGE_SPADE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edge-spade"


def file_key(path: Path, length: int = 24) -> str:
    """A cache key for what is derived from a file: its resolved path, size and mtime."""
    stat = path.stat()
    return hashlib.sha256(f"{path}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:length]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ModelFileError unless `path` hashes to `expected` ('' = nothing to check).

    A file that verified once is remembered by path, size and mtime, so later runs do not
    re-hash hundreds of megabytes.
    """
    if not expected:
        return
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    stat = path.stat()
    marker_file = cache_dir() / "verified.json"
    try:
        markers = json.loads(marker_file.read_text())
    except (OSError, ValueError):
        markers = {}
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": expected}
    if markers.get(str(path)) == stamp:
        return
    log.info("verifying sha256 of %s", path.name)
    actual = sha256_file(path)
    if actual != expected:
        raise ModelFileError(f"{path} has sha256 {actual}, expected {expected}; delete it and fetch it again")
    markers[str(path)] = stamp
    tmp = marker_file.with_suffix(f".tmp{os.getpid()}")
    try:
        marker_file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(markers, indent=1))
        tmp.replace(marker_file)
    except OSError as exc:  # a read-only or full cache: verified now, hashed again next time
        log.warning("cannot remember that %s was verified (%s)", path.name, exc)
