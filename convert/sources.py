"""What `edge-spade convert` and `pull` do: turn a model source into a bundle.

Sources: a Hugging Face folder, a hub repository id (fetched with huggingface-hub), a GGUF
file or a bundle (requantized with llama.cpp's quantizer), or one GGUF file of a hub
repository (`pull`, no conversion).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

from edge_spade import registry
from edge_spade.bundle import Bundle, is_bundle, open_bundle
from edge_spade.cache import verify_sha256
from edge_spade.errors import CheckpointError, ModelFileError

from .bundle_writer import build_bundle
from .checkpoint import snapshot
from .hf_to_gguf import OUT_TYPES, convert_checkpoint
from .quantize import QUANT_TYPES, quantize
from .verify import verify_conversion

log = logging.getLogger(__name__)

Progress = Callable[[Iterable], Iterable]


def convert(
    source: str,
    out: str | Path,
    quant: str = "Q4_K_M",
    *,
    revision: str = "main",
    threads: int | None = None,
    force: bool = False,
    progress: Progress = lambda x: x,
    verify: bool = True,
) -> Bundle:
    """A bundle at `out` from a Hugging Face folder or repo id, a GGUF file or a bundle.

    A Hugging Face source is verified after conversion (verify.verify_conversion: its own forward
    pass in numpy against llama.cpp on the written file), and refused over tolerance unless
    `verify=False`; the result is recorded in bundle.json's source."""
    if quant not in QUANT_TYPES:
        raise CheckpointError(f"quantization {quant!r} is not offered; choose one of {', '.join(QUANT_TYPES)}")
    path = Path(source).expanduser()
    if is_bundle(path):
        gguf_in, record = open_bundle(path).model, {"kind": "bundle", "path": str(path.resolve())}
    elif path.is_file():
        gguf_in, record = path, {"kind": "gguf", "path": str(path.resolve())}
    elif path.is_dir():
        return _from_checkpoint(
            path, out, quant, {"kind": "hf-folder", "path": str(path.resolve())}, threads, force, progress, verify
        )
    elif _looks_like_repo_id(source):
        folder = snapshot(source, revision)
        return _from_checkpoint(
            folder, out, quant, {"kind": "hub", "repo": source, "revision": revision}, threads, force, progress, verify
        )
    else:
        raise ModelFileError(f"{source} is neither a file, a folder nor a hub repository id (owner/name)")
    return build_bundle(out, lambda dst: quantize(gguf_in, dst, quant, threads), {**record, "quant": quant}, force)


def _from_checkpoint(
    folder: Path,
    out: str | Path,
    quant: str,
    record: dict,
    threads: int | None,
    force: bool,
    progress: Progress,
    verify: bool = True,
) -> Bundle:
    source = {**record, "quant": quant}

    def write(dst: Path) -> None:
        if quant in OUT_TYPES:
            convert_checkpoint(folder, dst, quant, progress)
            check(dst, quant)
            return
        staged = dst.with_name("model-f16.gguf")  # inside the bundle's temporary folder
        try:
            convert_checkpoint(folder, staged, "F16", progress)
            check(staged, "F16")  # the unquantized intermediate: quantization error is llama.cpp's own
            quantize(staged, dst, quant, threads)
        finally:
            staged.unlink(missing_ok=True)

    def check(path: Path, outtype: str) -> None:
        if verify:
            source["verification"] = verify_conversion(folder, path, outtype)  # recorded in bundle.json
        else:
            source["verification"] = None
            log.warning("not verified (--no-verify): nothing checks this conversion against the checkpoint")

    return build_bundle(out, write, source, force)


def pull(
    repo: str,
    filename: str,
    out: str | Path | None = None,
    *,
    revision: str = "main",
    force: bool = False,
    allow_unverified: bool = False,
) -> Path | Bundle:
    """One GGUF of a hub repository, verified against the hub's sha256; a bundle when `out` is given."""
    if not filename.endswith(".gguf"):
        raise ModelFileError(f"{filename} is not a .gguf file; for Hugging Face weights use: edge-spade convert {repo}")
    path = registry.download_from_hub(repo, filename, revision)
    verify_sha256(
        path,
        registry.hub_sha256(repo, filename, revision),
        allow_unverified=allow_unverified,
        what=f"{repo}/{filename}",
    )
    if out is None:
        return path
    return build_bundle(
        out,
        lambda dst: _link_or_copy(path, dst),
        {"kind": "hub-gguf", "repo": repo, "file": filename, "revision": revision},
        force,
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    """Hard link (no second copy of a large file) where the filesystem allows, else copy."""
    try:
        os.link(src.resolve(), dst)
    except OSError:
        shutil.copyfile(src, dst)


def _looks_like_repo_id(text: str) -> bool:
    parts = text.split("/")
    return len(parts) == 2 and all(parts) and not text.startswith((".", "~")) and not text.endswith(".gguf")
