"""A Hugging Face checkpoint folder read lazily: config, tokenizer files and safetensors tensors.

Tensors are opened with safetensors' memory map and read one at a time, so converting a model
needs about one tensor of RAM beyond the writer's buffers. bf16 tensors come through
ml_dtypes' numpy dtype (numpy has none of its own).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 - registers numpy's "bfloat16" dtype, which safetensors' numpy loader asks for
import numpy as np
from safetensors import SafetensorError, safe_open

from edge_spade.errors import CheckpointError, ModelUnavailableError

log = logging.getLogger(__name__)

# What a conversion needs from a hub repository; nothing else is downloaded.
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


class Checkpoint:
    """config.json + safetensors shards + tokenizer files of one Hugging Face model folder."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(f"{self.folder} is not a directory (expected a Hugging Face model folder)")
        self.config: dict[str, Any] = self._json("config.json", required=True)
        self._json("tokenizer_config.json")  # a malformed one fails here, clearly, before gguf's SpecialVocab reads it
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._where: dict[str, Path] = {}  # tensor name -> shard
        for shard in self._shards():
            try:
                with safe_open(str(shard), framework="numpy") as handle:
                    names = list(handle.keys())
                    self._shapes.update({n: tuple(handle.get_slice(n).get_shape()) for n in names})
            except (SafetensorError, OSError) as exc:
                raise CheckpointError(f"{shard.name} is not a readable safetensors file: {exc}") from None
            self._where.update(dict.fromkeys(names, shard))

    def _json(self, name: str, required: bool = False) -> dict[str, Any]:
        path = self.folder / name
        if not path.is_file():
            if required:
                raise CheckpointError(f"{self.folder} has no {name}; is it a Hugging Face model folder?")
            return {}
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None

    def _shards(self) -> list[Path]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = self._json(index.name).get("weight_map", {})
            shards = [self.folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [s.name for s in shards if not s.is_file()]
            if missing:
                raise CheckpointError(f"{self.folder}: shards listed in {index.name} are missing: {', '.join(missing)}")
            return shards
        shards = sorted(self.folder.glob("*.safetensors"))
        if not shards:
            found = ", ".join(sorted(p.name for p in self.folder.glob("*.bin"))) or "none"
            raise CheckpointError(
                f"{self.folder} has no .safetensors weights (found .bin: {found}); only safetensors are read"
            )
        return shards

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def tensor(self, name: str) -> np.ndarray:
        """One tensor as float32. The shard is mapped only while it is read, so the pages of
        tensors already converted do not stay resident."""
        return self.rows(name, 0, self.shape(name)[0])

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows start:stop of a tensor as float32, reading only those rows from the shard."""
        try:
            with safe_open(str(self._where[name]), framework="numpy") as handle:
                data = handle.get_slice(name)[start:stop]
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read tensor {name}: {exc}") from None
        return np.asarray(data, dtype=np.float32)


def snapshot(repo: str, revision: str = "main", cache_dir: str | Path | None = None) -> Path:
    """A hub repository's conversion files (HUB_PATTERNS only) in huggingface-hub's cache."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(repo_id=repo, revision=revision, allow_patterns=HUB_PATTERNS, cache_dir=cache_dir)
        )
    except LocalEntryNotFoundError:
        raise ModelUnavailableError(
            f"{repo} is not in the local Hugging Face cache and the hub cannot be reached"
        ) from None
    except (HfHubHTTPError, OSError) as exc:
        raise ModelUnavailableError(f"could not download {repo}: {exc}") from None
