"""What we read from the GGUF file ourselves: a few hyperparameters and the LM head.

llama.cpp owns the model; we only need the output matrix rows of the decision set (to skip
the full LM head), the final norm weight (for the logit lens) and a few numbers. gguf's
`GGUFReader` parses the whole header into Python objects, slow for Gemma 3's 262k-token vocabulary,
so the first open of a file records what we need in a small JSON index in the cache, keyed
by the file's path, size and mtime; later opens read that and memory-map the tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .cache import cache_dir, file_key
from .errors import ModelFileError

log = logging.getLogger(__name__)

INDEX_VERSION = 3
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class TensorLoc:
    offset: int  # absolute byte offset in the file
    qtype: int  # GGMLQuantizationType
    n_rows: int
    n_cols: int


@dataclass(frozen=True)
class GgufIndex:
    """The facts about one GGUF file that the runtime needs besides llama.cpp itself."""

    arch: str
    n_layers: int
    n_embd: int
    n_vocab: int
    rms_eps: float
    logit_softcap: float  # 0 = none
    output: TensorLoc  # output.weight, or token_embd.weight when the embeddings are tied
    output_norm: TensorLoc
    file_size: int
    file_type: int = -1  # general.file_type (llama_ftype), -1 when absent
    tensors: dict[str, tuple[int, int]] | None = None  # name -> (absolute offset, bytes)


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _parse(path: Path) -> GgufIndex:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf raises ValueError, struct/numpy errors, IndexError on truncation
        raise ModelFileError(f"{path} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
    arch = _field(reader, "general.architecture")
    if not isinstance(arch, str):
        raise ModelFileError(f"{path} has no general.architecture; is it a model GGUF?")
    tensors = {t.name: t for t in reader.tensors}
    out = tensors.get("output.weight") or tensors.get("token_embd.weight")
    norm = tensors.get("output_norm.weight")
    if out is None or norm is None:
        raise ModelFileError(f"{path} lacks output_norm.weight or an output matrix; is it a complete {arch} model?")
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise ModelFileError(f"{path} is truncated: tensor {t.name} ends past the end of the file")

    def loc(t) -> TensorLoc:
        n_cols = int(t.shape[0])
        n_rows = int(np.prod(t.shape[1:])) if len(t.shape) > 1 else 1
        return TensorLoc(int(t.data_offset), int(t.tensor_type), n_rows, n_cols)

    return GgufIndex(
        arch=arch,
        n_layers=int(_field(reader, f"{arch}.block_count", 0)),
        n_embd=int(_field(reader, f"{arch}.embedding_length", 0)),
        n_vocab=loc(out).n_rows,
        rms_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        logit_softcap=float(_field(reader, f"{arch}.final_logit_softcapping", 0.0) or 0.0),
        output=loc(out),
        output_norm=loc(norm),
        file_size=size,
        file_type=int(_field(reader, "general.file_type", -1)),
        tensors={t.name: (int(t.data_offset), int(t.n_bytes)) for t in reader.tensors},
    )


def read_index(path: str | Path) -> GgufIndex:
    """Index of a GGUF file, from the cache when the file has not changed."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != GGUF_MAGIC:
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    if struct.unpack("<I", head[4:8])[0] not in (2, 3):
        raise ModelFileError(f"{path} has an unsupported GGUF version {struct.unpack('<I', head[4:8])[0]}")
    cached = cache_dir() / "index" / f"{file_key(path, 32)}.json"
    if cached.exists():
        try:
            raw = json.loads(cached.read_text())
            if raw.pop("version") == INDEX_VERSION:
                raw["output"], raw["output_norm"] = TensorLoc(**raw["output"]), TensorLoc(**raw["output_norm"])
                return GgufIndex(**raw)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a damaged index cache entry %s", cached)
    log.info("indexing %s (first use of this file; later runs read the cache)", path.name)
    index = _parse(path)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": INDEX_VERSION, **asdict(index)}))
        tmp.replace(cached)
    except OSError as exc:  # a read-only or full cache: the index is only a shortcut
        log.warning("cannot cache the index of %s (%s); the next run parses the file again", path.name, exc)
        if tmp.parent.exists():
            tmp.unlink(missing_ok=True)
    return index


class OutputHead:
    """The final norm and LM head, applied in numpy to rows we captured.

    Rows of the output matrix are dequantized on first use and cached, so a decision set of a
    few tokens costs a few hundred bytes of work. A whole-vocabulary readout in numpy (the logit
    lens over the vocabulary) streams the matrix in blocks of rows instead of keeping a float32
    copy of it (671 MB for Gemma 3's 262,144 x 640), and hands the file pages it read back.
    """

    CHUNK_ROWS = 2048  # rows dequantized at a time by whole-vocabulary readouts and large row sets

    def __init__(self, path: str | Path, index: GgufIndex) -> None:
        self.index = index
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self._data = np.frombuffer(self._mm, dtype=np.uint8)
        self.norm_weight = self._dequantize(index.output_norm, None).reshape(-1)  # (n_embd,)
        self._rows: dict[int, np.ndarray] = {}
        self._row_sets: dict[bytes, np.ndarray] = {}  # large id sets asked for again (candidates)

    @staticmethod
    def _row_bytes(loc: TensorLoc) -> int:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        block, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(loc.qtype)]
        return loc.n_cols // block * block_bytes

    def _dequantize(self, loc: TensorLoc, rows: np.ndarray | slice | None) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(loc.qtype)
        row_bytes = self._row_bytes(loc)
        raw = self._data[loc.offset : loc.offset + loc.n_rows * row_bytes].reshape(loc.n_rows, row_bytes)
        if rows is not None:
            raw = raw[rows]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            dtype = np.float32 if qtype == GGMLQuantizationType.F32 else np.float16
            return np.asarray(raw).view(dtype).astype(np.float32)
        return dequantize(np.asarray(raw), qtype).reshape(-1, loc.n_cols).astype(np.float32, copy=False)

    @property
    def matrix_bytes(self) -> int:
        """The output matrix's size in the file."""
        return self.index.output.n_rows * self._row_bytes(self.index.output)

    def fingerprint(self, n_sample: int = 64) -> str:
        """sha256 of the output matrix's type, shape and raw bytes of evenly spaced rows.

        Ties trained heads to this exact output matrix without hashing hundreds of MB per load.
        """
        loc = self.index.output
        row_bytes = self._row_bytes(loc)
        digest = hashlib.sha256(f"{loc.qtype}|{loc.n_rows}|{loc.n_cols}".encode())
        for row in np.linspace(0, loc.n_rows - 1, min(n_sample, loc.n_rows)).astype(int):
            start = loc.offset + int(row) * row_bytes
            digest.update(self._data[start : start + row_bytes].tobytes())
        digest.update(self.norm_weight.tobytes())
        return digest.hexdigest()

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """(len(ids), n_embd) output-matrix rows."""
        loc = self.index.output
        if len(ids) > 256:  # a large set (candidates): kept whole, not also row by row
            key = np.asarray(ids, np.int64).tobytes()
            if key not in self._row_sets:
                ids = np.asarray(ids, np.int64)
                out = np.empty((len(ids), loc.n_cols), np.float32)
                for start in range(0, len(ids), self.CHUNK_ROWS):  # dequantizing's temporaries stay small
                    out[start : start + self.CHUNK_ROWS] = self._dequantize(loc, ids[start : start + self.CHUNK_ROWS])
                self._drop_pages(loc.offset, self.matrix_bytes)  # scattered rows: a page each, read once
                self._row_sets[key] = out
            return self._row_sets[key]
        missing = [int(i) for i in ids if int(i) not in self._rows]
        if missing:
            for i, row in zip(missing, self._dequantize(loc, np.asarray(missing))):
                self._rows[i] = row
            self._drop_pages(loc.offset, self.matrix_bytes)  # scattered rows: a page each, read once
        return np.stack([self._rows[int(i)] for i in ids])

    def release(self) -> None:
        """Drop what was dequantized and the file pages read (the file stays mapped: reading rows
        again re-dequantizes them)."""
        self._rows.clear()
        self._row_sets.clear()
        self._drop_pages()

    def _drop_pages(self, start: int = 0, length: int | None = None) -> None:
        """Let the kernel reclaim the file pages we read (clean pages: it reads them again if needed)."""
        if hasattr(mmap, "MADV_DONTNEED"):
            aligned = start - start % mmap.PAGESIZE
            end = len(self._mm) if length is None else min(start + length, len(self._mm))
            self._mm.madvise(mmap.MADV_DONTNEED, aligned, end - aligned)

    def vocabulary_logits(self, normed: np.ndarray) -> np.ndarray:
        """`normed @ output.T` over the whole vocabulary, CHUNK_ROWS rows of the matrix at a time."""
        loc = self.index.output
        row_bytes = self._row_bytes(loc)
        out = np.empty((*normed.shape[:-1], loc.n_rows), dtype=np.float32)
        for start in range(0, loc.n_rows, self.CHUNK_ROWS):
            stop = min(start + self.CHUNK_ROWS, loc.n_rows)
            out[..., start:stop] = normed @ self._dequantize(loc, slice(start, stop)).T
            self._drop_pages(loc.offset + start * row_bytes, (stop - start) * row_bytes)
        return out

    def final_norm(self, hidden: np.ndarray) -> np.ndarray:
        """RMSNorm times output_norm, as llama.cpp's result_norm. hidden: (..., n_embd)."""
        h = hidden.astype(np.float32)
        scale = 1.0 / np.sqrt(np.mean(h * h, axis=-1, keepdims=True) + self.index.rms_eps)
        return h * scale * self.norm_weight

    def logits(self, normed: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """Logits of already-normed rows over `ids` (None: the whole vocabulary)."""
        out = self.vocabulary_logits(normed) if ids is None else normed @ self.rows(ids).T
        cap = self.index.logit_softcap
        return np.tanh(out / cap) * cap if cap else out
