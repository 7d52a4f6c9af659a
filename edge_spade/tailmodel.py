"""Tail and head models: GGUFs derived from a model so that SPADE tails skip the layers below,
and the process holds the output matrix once.

llama.cpp cannot start a graph at layer l: a tail run on the whole model recomputes layers
0..l for its K+1 rows and then overwrites them at `l_out-l`. A model whose blocks are
l+1..L-1 (renumbered from 0), fed the captured hidden states as input embeddings
(`batch.embd`), computes the same tail without that waste: bit-identical logits in the tests;
the saving grows with the layer (benchmarks/tailcost.py measures it).

The file is derived from the model by copying bytes (no requantization) into the cache. We
read and write the GGUF container ourselves because only byte ranges are needed and gguf's
`GGUFReader` is slow to parse Gemma 3's 262k-token vocabulary into Python objects.
Per-layer metadata arrays are sliced with the layers; an architecture whose sliding-window
pattern is implicit (gemma3: every 6th layer global) gets it written out, shifted.

Memory: llama.cpp maps a model file populated, so every model's output matrix is resident (for
Gemma 3 most of the file). Tail models therefore keep only a stub vocabulary and end their pass
before the LM head; one head model (block 0, then final norm + LM head) turns the last hidden
state of any pass into the vocabulary's logits, and the main model's copy is released (engine).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .cache import cache_dir, enforce_cap, file_key, sweep_orphans
from .errors import ModelFileError

log = logging.getLogger(__name__)

# GGUF value types (gguf spec): fixed sizes; 8 = string, 9 = array.
_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32, _BOOL = 8, 9, 4, 7
# Architectures whose llama.cpp loader sets a sliding-window pattern when the file names none.
_IMPLICIT_SWA = {"gemma3": 6}  # llama_hparams::set_swa_pattern(6): layer il is local unless il % 6 == 5
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_VOCAB_TENSORS = ("token_embd.weight", "output.weight")
_COPY_BLOCK = 1 << 22
TAIL_VOCAB = 256  # rows of the vocabulary matrices a tail model keeps: llama.cpp wants some, reads none


class TailModelError(ModelFileError):
    """This model cannot be cut at this layer (the caller runs the tail on the whole model)."""


@dataclass
class _Kv:
    key: str
    vtype: int
    raw: bytes  # the value as stored (for arrays: item type, count, items)


@dataclass
class _Tensor:
    name: str
    dims: tuple[int, ...]
    qtype: int
    offset: int  # absolute, in the source file
    nbytes: int


class _Reader:
    """Just enough of a GGUF (v2/v3) parser: KV pairs as raw bytes, tensor names, shapes and offsets."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def take(self, fmt: str):
        value = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value[0] if len(value) == 1 else value

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8")
        self.pos += n
        return s

    def skip_value(self, vtype: int) -> None:
        if vtype in _SIZES:
            self.pos += _SIZES[vtype]
        elif vtype == _STRING:
            n = self.take("Q")
            self.pos += n
        elif vtype == _ARRAY:
            itype, n = self.take("I"), self.take("Q")
            if itype in _SIZES:
                self.pos += n * _SIZES[itype]
            else:
                for _ in range(n):
                    self.skip_value(itype)
        else:
            raise ModelFileError(f"{self.path}: unknown GGUF value type {vtype}")

    def read(self) -> tuple[int, list[_Kv], list[_Tensor]]:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        if bytes(self.buf[:4]) != b"GGUF" or self.take("4sI")[1] not in (2, 3):
            raise ModelFileError(f"{self.path} is not a GGUF v2/v3 file")
        n_tensors, n_kv = self.take("QQ")
        kvs = []
        for _ in range(n_kv):
            key, vtype = self.string(), self.take("I")
            start = self.pos
            self.skip_value(vtype)
            kvs.append(_Kv(key, vtype, bytes(self.buf[start : self.pos])))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            n_dims = self.take("I")
            dims = tuple(self.take("Q") for _ in range(n_dims))
            qtype, offset = self.take("IQ")
            infos.append((name, dims, qtype, offset))
        alignment = next((struct.unpack("<I", kv.raw)[0] for kv in kvs if kv.key == "general.alignment"), 32)
        data_start = -(-self.pos // alignment) * alignment
        tensors = []
        for name, dims, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
            count = 1
            for d in dims:
                count *= d
            t = _Tensor(name, dims, qtype, data_start + offset, count // block * type_size)
            if t.offset + t.nbytes > len(self.buf):
                raise ModelFileError(f"{self.path} is truncated: tensor {name} ends past the end of the file")
            tensors.append(t)
        return alignment, kvs, tensors


def _scalar(kvs: list[_Kv], key: str):
    kv = next((kv for kv in kvs if kv.key == key), None)
    if kv is None or kv.vtype not in _SIZES:
        return None
    fmt = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}[kv.vtype]
    return struct.unpack("<" + fmt, kv.raw)[0]


def _array_len(kv: _Kv) -> int | None:
    return struct.unpack_from("<Q", kv.raw, 4)[0] if kv.vtype == _ARRAY else None


def _sliced_kvs(kvs: list[_Kv], arch: str, n_layers: int, keep: list[int], vocab_rows: int) -> list[_Kv]:
    """The source's metadata for the blocks in `keep` (renumbered from 0) and a tokenizer-less
    vocabulary of `vocab_rows` entries: per-layer arrays sliced, block_count and vocab_size set."""
    out = []
    for kv in kvs:
        if kv.key.startswith("tokenizer.") or kv.key == f"{arch}.vocab_size":
            continue  # the derived models are fed embeddings, never text
        if kv.key == f"{arch}.block_count":
            kv = _Kv(kv.key, _UINT32, struct.pack("<I", len(keep)))
        elif kv.key.startswith(f"{arch}.") and _array_len(kv) == n_layers:
            itype = struct.unpack_from("<I", kv.raw)[0]
            if itype not in _SIZES:
                raise ModelFileError(f"cannot slice the per-layer array {kv.key} (item type {itype})")
            size = _SIZES[itype]
            items = b"".join(kv.raw[12 + il * size : 12 + (il + 1) * size] for il in keep)
            kv = _Kv(kv.key, _ARRAY, struct.pack("<IQ", itype, len(keep)) + items)
        out.append(kv)
    # llama.cpp's "no_vocab" tokenizer: `vocab_size` dummy tokens, no strings to parse on load
    out.append(_Kv("tokenizer.ggml.model", _STRING, _pack_string("no_vocab")))
    out.append(_Kv(f"{arch}.vocab_size", _UINT32, struct.pack("<I", vocab_rows)))
    pattern_key = f"{arch}.attention.sliding_window_pattern"
    if (
        arch in _IMPLICIT_SWA
        and _scalar(kvs, f"{arch}.attention.sliding_window")
        and not any(kv.key == pattern_key for kv in kvs)
    ):
        period = _IMPLICIT_SWA[arch]
        local = [(il % period) < period - 1 for il in keep]
        out.append(_Kv(pattern_key, _ARRAY, struct.pack("<IQ", _BOOL, len(keep)) + bytes(local)))
    pattern = next((kv for kv in out if kv.key == pattern_key), None)
    if arch in _IMPLICIT_SWA and pattern is not None and not any(pattern.raw[12:]):
        # llama.cpp asserts (aborting the process) on a gemma3 model without any local layer.
        raise TailModelError(f"no tail model of layers {keep[0]}..{keep[-1]}: they are all global-attention")
    return out


def _pack_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _derive(src: Path, out: Path, keep_of: Callable[[int], list[int]], full_vocab: bool) -> Path:
    """Write the model of `src`'s blocks `keep_of(n_layers)` (renumbered from 0) to `out`.

    The vocabulary matrices (token_embd, output) keep all their rows with `full_vocab`, else only
    TAIL_VOCAB: a tail model is fed embeddings and its pass ends before the LM head, so neither is
    ever read, and the copy would cost disk and (llama.cpp maps files populated) memory.
    """
    with src.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        try:
            alignment, kvs, tensors = _Reader(buf, src).read()
        except (struct.error, ValueError, UnicodeDecodeError, KeyError) as exc:  # cut short or corrupt header
            raise ModelFileError(f"{src} is not a readable GGUF file ({type(exc).__name__}: {exc})") from None
        arch_kv = next((kv for kv in kvs if kv.key == "general.architecture"), None)
        if arch_kv is None:
            raise ModelFileError(f"{src} has no general.architecture")
        arch = arch_kv.raw[8:].decode("utf-8")
        n_layers = _scalar(kvs, f"{arch}.block_count") or 0
        keep = keep_of(n_layers)
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        if embd is None or len(embd.dims) != 2:
            raise ModelFileError(f"{src} has no two-dimensional token_embd.weight")
        n_vocab = embd.dims[1]
        rows = n_vocab if full_vocab else min(TAIL_VOCAB, n_vocab)
        kept = []
        for t in tensors:
            m = _BLOCK.fullmatch(t.name)
            if m is None:
                if t.name in _VOCAB_TENSORS and len(t.dims) == 2 and t.dims[1] == n_vocab and rows < n_vocab:
                    t = _Tensor(t.name, (t.dims[0], rows), t.qtype, t.offset, t.nbytes // n_vocab * rows)
                kept.append((t.name, t))
            elif int(m.group(1)) in keep:
                kept.append((f"blk.{keep.index(int(m.group(1)))}.{m.group(2)}", t))
        meta = _sliced_kvs(kvs, arch, n_layers, keep, rows)
        header = [struct.pack("<4sIQQ", b"GGUF", 3, len(kept), len(meta))]
        header += [_pack_string(kv.key) + struct.pack("<I", kv.vtype) + kv.raw for kv in meta]
        offset = 0
        for name, t in kept:
            header.append(
                _pack_string(name)
                + struct.pack("<I", len(t.dims))
                + struct.pack(f"<{len(t.dims)}Q", *t.dims)
                + struct.pack("<IQ", t.qtype, offset)
            )
            offset += -(-t.nbytes // alignment) * alignment
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
        try:
            with tmp.open("wb") as w:
                head = b"".join(header)
                w.write(head + bytes(-len(head) % alignment))
                for _, t in kept:  # read, not mapped: a mapping's pages would count as this process's memory
                    f.seek(t.offset)
                    for left in range(t.nbytes, 0, -_COPY_BLOCK):
                        w.write(f.read(min(left, _COPY_BLOCK)))
                    w.write(bytes(-t.nbytes % alignment))
            tmp.replace(out)
        finally:
            tmp.unlink(missing_ok=True)
    return out


def write_tail_model(src: str | Path, layer: int, out: str | Path) -> Path:
    """Write the model of `src`'s layers above `layer` (renumbered from 0) to `out`."""

    def above(n_layers: int) -> list[int]:
        if not n_layers or not 0 <= layer < n_layers - 1:
            raise ModelFileError(f"a tail model needs a layer in 0..{(n_layers or 1) - 2}, got {layer}")
        return list(range(layer + 1, n_layers))

    return _derive(Path(src), Path(out), above, full_vocab=False)


def write_head_model(src: str | Path, out: str | Path) -> Path:
    """Write `src`'s LM head as a model of its own: final norm and output matrix, and block 0.

    llama.cpp needs at least one block; the caller overwrites that block's output with the
    final hidden state, so only the norm and the LM head count. With one, every free answer's
    vocabulary logits come from the same output matrix: the main model's copy and the tail
    models' are never read, and the process holds the matrix once.
    """

    def first(n_layers: int) -> list[int]:
        if not n_layers:
            raise ModelFileError(f"{src} has no layers")
        return [0]

    return _derive(Path(src), Path(out), first, full_vocab=True)


FORMAT = "v2"  # in the cached file names: v1 tail models carried the whole vocabulary


def _cached_path(src: Path, layer: int | None) -> Path:
    name = "head" if layer is None else f"above-{layer}"
    return cache_dir() / "tails" / file_key(src) / f"{name}.{FORMAT}.gguf"


def discard_tail_model(src: str | Path, layer: int | None) -> None:
    """Delete a cached tail (or head, `layer` None) model that failed to load, so that the next use
    writes it afresh."""
    try:
        _cached_path(Path(src).resolve(), layer).unlink(missing_ok=True)
    except OSError:
        pass


def tail_model_path(src: str | Path, layer: int | None) -> Path:
    """The cached tail model of `src` above `layer` (None: its head model), written on first use."""
    src = Path(src).resolve()
    path = _cached_path(src, layer)
    if not path.exists():
        sweep_orphans(cache_dir())  # what killed writers left anywhere in the cache
        for old in path.parent.glob("*.gguf") if path.parent.is_dir() else ():
            if not old.name.endswith(f".{FORMAT}.gguf"):  # an older format's files: never read again
                old.unlink(missing_ok=True)
        enforce_cap(src.stat().st_size)
        if layer is None:
            log.info("writing the head model of %s (first use)", src.name)
            write_head_model(src, path)
        else:
            log.info("writing the tail model of %s above layer %d (first use)", src.name, layer)
            write_tail_model(src, layer, path)
    return path
