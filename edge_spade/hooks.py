"""llama.cpp's eval callback, turned into "read these rows, write those rows, stop here".

llama.cpp hands every graph node to `cb_eval` twice: once to ask whether we want it, once
(only if we said yes) with its finished data. We mirror `ggml_tensor` with ctypes to read
the node's name and strides, and use ggml's own `ggml_backend_tensor_get/set` to copy single
rows, so the callback never touches whole tensors. Stopping is done with the abort callback,
which makes `llama_decode` return 2 and roll the batch back out of the KV cache; returning
False from the eval callback instead would silently truncate the graph.

The struct layout is that of the pinned llama-cpp-python; `load_ggml` checks it against the
loaded library before anything is read.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RuntimeMismatchError

log = logging.getLogger(__name__)

PINNED_LLAMA_CPP = "0.3.36"
GGML_TYPE_F32 = 0
GGML_MAX_NAME = 64


class GgmlTensor(ctypes.Structure):
    """The leading fields of `struct ggml_tensor` (ggml.h at the pinned version), sizeof 336."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


NAME_OFFSET = GgmlTensor.name.offset


class _InitParams(ctypes.Structure):
    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def _library_path(lib_dir: Path, stem: str) -> Path:
    suffixes = {"darwin": (".dylib", ".so"), "win32": (".dll",)}.get(sys.platform, (".so",))
    prefix = "" if sys.platform == "win32" else "lib"
    for suffix in suffixes:
        path = lib_dir / f"{prefix}{stem}{suffix}"
        if path.exists():
            return path
    raise RuntimeMismatchError(f"cannot find {stem} in {lib_dir}; reinstall llama-cpp-python=={PINNED_LLAMA_CPP}")


def load_ggml() -> ctypes.CDLL:
    """Load libggml-base from the llama-cpp-python wheel, bind what we use, and self-check."""
    import llama_cpp

    if llama_cpp.__version__ != PINNED_LLAMA_CPP:
        raise RuntimeMismatchError(
            f"llama-cpp-python {llama_cpp.__version__} is installed but edge-spade mirrors the structs of "
            f"{PINNED_LLAMA_CPP}; run: pip install llama-cpp-python=={PINNED_LLAMA_CPP}"
        )
    lib = ctypes.CDLL(str(_library_path(Path(llama_cpp.__file__).parent / "lib", "ggml-base")))
    sigs: dict[str, tuple[list, object]] = {
        "ggml_backend_tensor_get": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
        "ggml_backend_tensor_set": ([ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
        "ggml_nbytes": ([ctypes.c_void_p], ctypes.c_size_t),
        "ggml_tensor_overhead": ([], ctypes.c_size_t),
        "ggml_init": ([_InitParams], ctypes.c_void_p),
        "ggml_free": ([ctypes.c_void_p], None),
        "ggml_new_tensor_2d": ([ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64], ctypes.c_void_p),
        "ggml_set_name": ([ctypes.c_void_p, ctypes.c_char_p], ctypes.c_void_p),
    }
    for name, (argtypes, restype) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _self_check(lib)
    return lib


def _self_check(lib: ctypes.CDLL) -> None:
    """Build a real tensor with ggml and read it back through the mirror."""
    object_size = 32  # sizeof(struct ggml_object)
    if lib.ggml_tensor_overhead() != ctypes.sizeof(GgmlTensor) + object_size:
        raise RuntimeMismatchError(
            f"ggml_tensor is {lib.ggml_tensor_overhead() - object_size} bytes in the loaded library, "
            f"{ctypes.sizeof(GgmlTensor)} in edge-spade's mirror; reinstall llama-cpp-python=={PINNED_LLAMA_CPP}"
        )
    ctx = lib.ggml_init(_InitParams(1 << 16, None, True))
    try:
        addr = lib.ggml_new_tensor_2d(ctx, GGML_TYPE_F32, 7, 3)
        lib.ggml_set_name(addr, b"edge-spade-check")
        t = GgmlTensor.from_address(addr)
        ok = (
            t.type == GGML_TYPE_F32
            and list(t.ne) == [7, 3, 1, 1]
            and list(t.nb)[:2] == [4, 28]
            and t.name == b"edge-spade-check"
            and lib.ggml_nbytes(addr) == 84
        )
    finally:
        lib.ggml_free(ctx)
    if not ok:
        raise RuntimeMismatchError(
            f"the ggml_tensor layout does not match edge-spade's mirror; reinstall llama-cpp-python=={PINNED_LLAMA_CPP}"
        )


@dataclass
class Tap:
    """What to do with one named graph node during a decode."""

    read_rows: tuple[int, ...] = ()  # rows to copy out; negative counts from the end
    write: np.ndarray | None = None  # (k, n_embd) float32 rows written over rows 0..k-1
    stop: bool = False  # abort the decode once this node is handled
    cut: bool = False  # end the graph after this node; only where nothing later matters (see _on_eval)
    decide: Callable[[np.ndarray], bool] | None = None  # sees the rows read; True stops the decode


@dataclass
class Capture:
    """Rows copied out of the graph during one decode, by node name."""

    rows: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (len(read_rows), ne0)
    stopped: bool = False
    stop_node: str | None = None  # the node whose `decide` stopped the decode
    logits: Callable[[], np.ndarray] | None = None  # the last position's logits, when the decode completed
    reused: int = 0  # leading prompt tokens whose KV cache the decode kept from the one before (reuse_prefix)


class LayerHooks:
    """The eval and abort callbacks of one llama context, dispatching to the current taps."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        import llama_cpp

        self._get = lib.ggml_backend_tensor_get
        self._set = lib.ggml_backend_tensor_set
        self._taps: dict[bytes, Tap] = {}
        self._capture = Capture()
        self._stop = False
        self._error: BaseException | None = None
        # Keep the CFUNCTYPE objects alive as long as the context that calls them.
        self.eval_callback = llama_cpp.ggml_backend_sched_eval_callback(self._on_eval)
        self.abort_callback = llama_cpp.ggml_abort_callback(self._on_abort)

    def run(self, taps: dict[str, Tap], decode: Callable[[], int]) -> tuple[int, Capture]:
        """Call `decode` with `taps` active; re-raise anything that failed inside the callback."""
        self._taps = {name.encode(): tap for name, tap in taps.items()}
        self._capture = Capture()
        self._stop = False
        self._error = None
        interrupted = []

        def on_sigint(_signum, _frame) -> None:  # runs inside our callbacks: flag, stop, raise afterwards
            interrupted.append(True)
            self._stop = True

        # Ctrl-C during a pass: Python raises KeyboardInterrupt in whatever Python code runs next, and
        # inside a ctypes callback ctypes prints and drops it. A handler that only stops the pass
        # (the abort callback runs after every node) and a raise afterwards make it work.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, on_sigint) if main else None
        try:
            rc = decode()
        finally:
            self._taps = {}
            if main:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)
        if interrupted:
            self._error = None
            raise KeyboardInterrupt
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        self._capture.stopped = self._stop
        return rc, self._capture

    def _on_abort(self, _data: int) -> bool:
        return self._stop

    def _on_eval(self, tensor: int, ask: bool, _data: int) -> bool:
        if not self._taps:
            return False
        name = ctypes.string_at(tensor + NAME_OFFSET)
        tap = self._taps.get(name)
        if ask or tap is None:
            return tap is not None
        try:
            self._handle(tensor, name.decode(), tap)
        except BaseException as exc:  # noqa: BLE001 - must not escape into C; re-raised in run()
            self._error = exc
            self._stop = True
            return True
        # Returning False cuts the graph short without telling llama_decode, so stops go through the
        # abort callback. But the CPU backend checks that only after the next node has run, and after
        # `result_norm` the next node is the LM head (Gemma 3: a 262,144 x 640 matmul): a `cut` tap
        # there returns False instead. Safe only there: every layer has run, the KV cache is complete.
        return not tap.cut

    def _handle(self, tensor: int, name: str, tap: Tap) -> None:
        t = GgmlTensor.from_address(tensor)
        if t.type != GGML_TYPE_F32 or t.nb[0] != 4:
            raise RuntimeMismatchError(f"node {name} is not a contiguous F32 tensor (type {t.type})")
        width, n_rows, stride = int(t.ne[0]), int(t.ne[1]), int(t.nb[1])
        if tap.read_rows:
            out = np.empty((len(tap.read_rows), width), dtype=np.float32)
            for i, row in enumerate(tap.read_rows):
                if not -n_rows <= row < n_rows:
                    raise IndexError(f"row {row} of node {name} with {n_rows} rows")
                self._get(tensor, out[i].ctypes.data, (row % n_rows) * stride, width * 4)
            self._capture.rows[name] = out
            if tap.decide is not None and tap.decide(out):
                self._capture.stop_node = name
                self._stop = True
        if tap.write is not None:
            rows = np.ascontiguousarray(tap.write, dtype=np.float32)
            if rows.ndim != 2 or rows.shape[1] != width or rows.shape[0] > n_rows:
                raise ValueError(f"cannot write rows of shape {rows.shape} into node {name} ({n_rows} x {width})")
            for i in range(rows.shape[0]):
                self._set(tensor, rows[i].ctypes.data, i * stride, width * 4)
        if tap.stop:
            self._stop = True
