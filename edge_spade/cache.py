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

from .errors import CacheError, ModelFileError

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


def verify_sha256(path: Path, expected: str, *, allow_unverified: bool = False, what: str = "") -> None:
    """Raise ModelFileError unless `path` hashes to `expected`.

    With no `expected` sha256 (none pinned, and the hub could not be asked) a file that verified
    before, unchanged since, is accepted; any other is refused unless `allow_unverified`, which
    only logs a warning. A file that verified once is remembered by path, size and mtime, so later
    runs do not re-hash hundreds of megabytes.
    """
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    stat = path.stat()
    marker_file = cache_dir() / "verified.json"
    try:
        markers = json.loads(marker_file.read_text())
    except (OSError, ValueError):
        markers = {}
    if not expected:
        seen = markers.get(str(path)) or {}
        if seen.get("size") == stat.st_size and seen.get("mtime_ns") == stat.st_mtime_ns:
            return  # verified against a known sha256 before, unchanged since
        if allow_unverified:
            log.warning("%s is not verified: no sha256 is known for it", path.name)
            return
        raise ModelFileError(
            f"cannot verify {what or path.name}: no sha256 is pinned for it and the hub cannot be "
            "asked; connect once to verify it, or pass --allow-unverified to use it anyway"
        )
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


# -- what is in the cache, and keeping it bounded ------------------------------------------------

KINDS = {
    "index": "GGUF indexes (hyperparameters and tensor offsets read once per model file)",
    "tails": "tail models (the layers above a probe layer) and head models (the LM head), per model file",
    "calibration": "calibration traces and cascade measurements, one file per prompt (calibrate resumes from them)",
    "models": "model files assembled from packages",
}
ORPHAN_AGE_S = 3600  # a temporary file this old belongs to no running writer


def cache_usage() -> dict[str, tuple[int, int]]:
    """Per kind of cache entry: (files, bytes)."""
    out = {}
    for kind in KINDS:
        files = [p for p in (cache_dir() / kind).rglob("*") if p.is_file()] if (cache_dir() / kind).is_dir() else []
        out[kind] = (len(files), sum(p.stat().st_size for p in files))
    return out


def clear_cache(kinds: list[str] | None = None) -> int:
    """Delete these kinds of entries (all: every kind and the verification markers); bytes freed."""
    import shutil

    unknown = set(kinds or ()) - set(KINDS)
    if unknown:
        raise CacheError(f"unknown cache kind(s) {', '.join(sorted(unknown))}; known: {', '.join(KINDS)}")
    freed = 0
    for kind in kinds or list(KINDS):
        folder = cache_dir() / kind
        if folder.is_dir():
            freed += sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
    if not kinds and (cache_dir() / "verified.json").exists():
        (cache_dir() / "verified.json").unlink()
    return freed


def sweep_orphans(folder: Path, now: float | None = None) -> int:
    """Delete temporary files (`*.tmp*`, `*.part*`) left by writers that were killed; the count deleted."""
    import time

    now = time.time() if now is None else now
    gone = 0
    if not folder.is_dir():
        return 0
    for p in folder.rglob("*"):
        if p.is_file() and (".tmp" in p.name or ".part" in p.name) and now - p.stat().st_mtime > ORPHAN_AGE_S:
            p.unlink(missing_ok=True)
            gone += 1
    return gone


def max_cache_bytes() -> int | None:
    """$EDGE_SPADE_CACHE_MAX_MB: the cap on the tail models' share of the cache (unset: no cap)."""
    raw = os.environ.get("EDGE_SPADE_CACHE_MAX_MB")
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        raise CacheError(f"EDGE_SPADE_CACHE_MAX_MB must be a number of megabytes, got {raw!r}") from None
    return int(value * 1e6)


def enforce_cap(incoming: int = 0) -> None:
    """Make room for `incoming` bytes of tail models under the cap, the least recently used first.
    (Calibration traces are not capped: a long calibration resumes from them.)"""
    cap = max_cache_bytes()
    if cap is None:
        return
    tails = cache_dir() / "tails"
    files = [p for p in tails.rglob("*") if p.is_file()] if tails.is_dir() else []
    used = sum(p.stat().st_size for p in files)
    for p in sorted(files, key=lambda p: p.stat().st_atime):
        if used + incoming <= cap:
            break
        used -= p.stat().st_size
        p.unlink(missing_ok=True)
        log.info("cache over %d MB: removed %s", cap // 10**6, p.name)
