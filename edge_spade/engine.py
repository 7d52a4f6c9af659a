"""One llama.cpp model + context, decoded layer by layer.

Every readout is a single-token distribution over a decision set of token ids (None: the
whole vocabulary) at the last prompt position:

- `full`: the whole model. With a decision set the pass stops at `result_norm` and only the
  decision rows of the output matrix are applied (the LM head is skipped).
- `logit_lens(layer)`: the prompt pass stops after `layer`; final norm + head in numpy.
- `spade(layer, tail)`: the prompt pass stops after `layer`; the start row and the last
  `tail` rows are forwarded as a fresh short sequence through the remaining layers, by
  overwriting `l_out-layer` of that short pass (llama.cpp cannot start a pass mid-way), or,
  where `use_tail_models` loaded one, on a tail model holding only the layers above.
- `trace`: one full pass that keeps the tail rows of every layer, so that SPADE and the
  lenses at every layer can be computed afterwards without repeating the prompt pass.

The whole prompt goes in one ubatch (`n_ubatch = n_ctx`) so that "after layer l" is one
moment of one graph, and the KV cache is cleared around every pass.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

from .archs import Arch, lookup_arch
from .errors import DecodeError, LayerError, ModelFileError, PromptTooLongError, QuestionError, SettingsError
from .hooks import LayerHooks, Tap, load_ggml
from .tailmodel import TailModelError, discard_tail_model, tail_model_path
from .weights import GgufIndex, OutputHead, read_index

log = logging.getLogger(__name__)
_llama_log = logging.getLogger("edge_spade.llama_cpp")

_GGML_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.DEBUG, 4: logging.DEBUG}
_backend: dict[str, object] = {}
# The CPU backend copies some tensors into an interleaved layout at load ("repack"); it says which
# in its log, and their bytes in the mapped file are never read again.
_REPACK_LINE = re.compile(r"repack: repack tensor (\S+) with ")
_loading: list[list[str]] = []  # the model load in progress collects its repacked tensors' names
_load_lock = threading.Lock()


def extra_buffers() -> bool:
    """Whether llama.cpp may move weights into its extra CPU buffer types (repacked layouts, AMX).

    Not on CPUs with AMX: llama.cpp's AMX matrix product crashes the process on Q4_K models there
    (ggml-org/llama.cpp#20824; llama-cpp-python with it), and the other repacked layouts are kept
    out with it. `EDGE_SPADE_EXTRA_BUFFERS=1` (or 0) decides instead, for a machine where it works.
    """
    forced = os.environ.get("EDGE_SPADE_EXTRA_BUFFERS", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return not cpu_has_amx()


@lru_cache(maxsize=1)
def cpu_has_amx() -> bool:
    """Whether the CPU reports AMX tiles (Linux's /proc/cpuinfo, read once: every model load asks;
    False where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return "amx_tile" in line.split()
    except OSError:
        pass
    return False


@contextmanager
def llama_cpp_python_buffers():
    """llama-cpp-python's `Llama` made inside this block loads with the engine's buffer choice
    (extra_buffers): baselines then run the same kernels, and do not crash where ours would not."""
    import llama_cpp.llama as high_level

    module = high_level.llama_cpp
    default = module.llama_model_default_params

    def params():
        mparams = default()
        mparams.use_extra_bufts = extra_buffers()
        return mparams

    module.llama_model_default_params = params
    try:
        yield
    finally:
        module.llama_model_default_params = default


def load_llama_model(path: Path, n_gpu_layers: int, release: Sequence[str] = (), index: GgufIndex | None = None):
    """llama.cpp's model of `path`, or None; on the CPU, the file's pages that llama.cpp will not read
    again (repacked tensors, and the tensors named in `release`) are handed back to the kernel.
    `index`: the file's index where the caller has read it already.

    llama.cpp maps model files populated, so every byte of the file counts as resident memory
    until released; released pages come back from the page cache if they are ever read.
    """
    import llama_cpp

    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = n_gpu_layers
    mparams.use_extra_bufts = extra_buffers()
    with _load_lock:
        _loading.append([])
        try:
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        finally:
            repacked = _loading.pop()
    if model and n_gpu_layers == 0:
        try:
            tensors = (index or read_index(path)).tensors or {}
        except ModelFileError:
            tensors = {}
        release_mapped(path, [tensors[name] for name in [*repacked, *release] if name in tensors])
    return model


def init_backend():
    """llama.cpp's global init, once per process; its log goes to our logger at DEBUG."""
    if not _backend:
        import llama_cpp

        ggml = load_ggml()

        def on_log(level: int, text: bytes | None, _data: int) -> None:
            if text:
                line = text.decode("utf-8", "replace").rstrip()
                _llama_log.log(_GGML_LOG_LEVELS.get(level, logging.DEBUG), line)
                repacked = _REPACK_LINE.match(line)
                if repacked and _loading:
                    _loading[-1].append(repacked.group(1))

        _backend["log"] = llama_cpp.llama_log_callback(on_log)
        llama_cpp.llama_log_set(_backend["log"], None)
        llama_cpp.llama_backend_init()
        _backend["ggml"] = ggml
    return _backend["ggml"]


@lru_cache(maxsize=1)
def _blas_controller():
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def default_threads() -> int:
    """The CPUs this process may run on (llama.cpp is memory-bound past the physical cores)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class EngineSettings:
    """How to run a model; the context is sized once and reused for every question."""

    n_ctx: int = 2048
    n_threads: int | None = None  # None: every CPU this process may use
    n_gpu_layers: int = 0  # Metal or another GPU backend; CPU is what the tests cover
    kv_type: Literal["f16", "f32"] = "f16"  # f32 for exact comparisons in tests
    flash_attn: bool | None = None  # None: llama.cpp decides; on CPU it rounds attention through f16
    # SPADE probes run their tails on tail models (only the layers above) and free answers' LM head on the
    # head model: two more files to load (small: no tokenizer), repaid after a few answers
    tail_models: bool = True
    # Keep the main context's KV cache after a pass that completes, and run a plain full-depth pass on
    # the tokens after the prefix it shares with the last one (the way llama-cpp-python's completions
    # do). Off by default: a suffix batch's numerics differ from a whole pass's (on Gemma with an f16
    # cache a logit moved by up to 1.0, a top probability by up to 0.06), so answers are no longer bit
    # for bit a fresh pass's, and agreement is certified against fresh passes.
    reuse_prefix: bool = False

    def __post_init__(self) -> None:
        def bad(what: str, value) -> SettingsError:
            return SettingsError(f"{what} must be {value}")

        if isinstance(self.n_ctx, bool) or not isinstance(self.n_ctx, int) or not 8 <= self.n_ctx <= 1 << 20:
            raise bad(f"the context size (--ctx) {self.n_ctx!r}", "an integer from 8 to 1048576")
        if self.n_threads is not None and (not isinstance(self.n_threads, int) or not 1 <= self.n_threads <= 1024):
            raise bad(f"the thread count (--threads) {self.n_threads!r}", "an integer from 1 to 1024 (or unset)")
        if isinstance(self.n_gpu_layers, bool) or not isinstance(self.n_gpu_layers, int) or self.n_gpu_layers < -1:
            raise bad(f"the GPU layer count (--gpu-layers) {self.n_gpu_layers!r}", "0 or more (-1: all)")
        if self.kv_type not in ("f16", "f32"):
            raise bad(f"the KV cache type {self.kv_type!r}", "'f16' or 'f32'")


@dataclass
class Readout:
    """Logits over the decision set at the last prompt position, and what they cost."""

    logits: np.ndarray  # (n_decision,) or (n_vocab,)
    layer: int  # the layer whose state produced them (n_layers - 1 for the full model)
    prefill_ms: float  # the prompt pass, stopped or not
    tail_ms: float = 0.0  # SPADE's short pass, or the numpy head
    reused: int = 0  # leading prompt tokens whose cache the pass kept from the one before (reuse_prefix)


@dataclass
class Trace:
    """Hidden states of one full prompt pass, for SPADE and lenses at every layer."""

    tokens: list[int]
    tail_rows: list[int]  # prompt positions kept in `states`
    states: np.ndarray  # (n_layers - 1, len(tail_rows), n_embd): rows after each layer but the last
    last: np.ndarray  # (n_layers, n_embd): the last prompt row after every layer
    full: Readout  # the full model's readout


def tail_positions(n_tokens: int, tail: int) -> list[int]:
    """Prompt positions of a SPADE tail: the start token and the last `tail` tokens."""
    if not isinstance(tail, int) or tail < 1:
        raise LayerError(f"tail width must be a positive integer, got {tail!r}")
    return sorted({0, *range(max(0, n_tokens - tail), n_tokens)})


class Engine:
    """A loaded GGUF model driven through llama.cpp's eval callback: one context for prompt passes,
    and a second one, made on first use, for SPADE tails run from inside a pass (probes)."""

    def __init__(
        self, path: str | Path, settings: EngineSettings | None = None, *, share: Engine | None = None
    ) -> None:
        import llama_cpp

        self.path = Path(path)
        self.settings = settings or EngineSettings()
        self.index = read_index(self.path)  # validates the file before llama.cpp sees it
        self.arch: Arch = lookup_arch(self.index.arch)
        ggml = init_backend()
        self._ll = llama_cpp
        self._model = self._main = self._side = None
        self._tails: dict[int, _DerivedModel] = {}  # layer -> the model of the layers above it
        self._head: _DerivedModel | None = None  # with tail models: where every free answer's LM head runs

        if share is not None:  # another context on the same loaded weights (llama.cpp allows many per model)
            if share._model is None or Path(share.path).resolve() != self.path.resolve():
                raise ModelFileError("an engine can share only a loaded model of the same file")
            self._model, self._owners = share._model, share._owners
        else:
            self._model = load_llama_model(self.path, self.settings.n_gpu_layers, index=self.index)
            if not self._model:
                raise ModelFileError(f"llama.cpp could not load {self.path} (corrupt or incomplete GGUF?)")
            self._owners = [0]  # engines using this llama_model: the last to close frees it
        self._owners[0] += 1
        self._vocab = llama_cpp.llama_model_get_vocab(self._model)
        self.n_layers = llama_cpp.llama_model_n_layer(self._model)
        self.n_embd = llama_cpp.llama_model_n_embd(self._model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self._vocab)

        self._ggml = ggml
        self._main = _Context(self, self.settings.n_ctx)
        self._side: _Context | None = None  # second context for tails run inside the main pass's callback
        self.hooks = self._main.hooks
        self.n_ctx = self._main.n_ctx
        self.threads = self._main.threads
        self.head = OutputHead(self.path, self.index)
        log.debug(
            "loaded %s: %s, %d layers, n_embd %d, %d threads",
            self.path.name,
            self.arch.name,
            self.n_layers,
            self.n_embd,
            self._main.threads,
        )

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        for derived in [*self._tails.values(), *([self._head] if self._head else [])]:
            derived.close()
        self._tails, self._head = {}, None
        for context in (self._side, self._main):
            if context is not None:
                context.close()
        self._main = self._side = None
        if self._model:
            self._owners[0] -= 1
            if self._owners[0] == 0:
                self._ll.llama_model_free(self._model)
            self._model = None
        if getattr(self, "head", None) is not None:
            self.head.release()  # dequantized rows and matrix: memory back on close, not at garbage collection

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- vocabulary ---------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`; `add_special` adds BOS when the model wants one."""
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError:
            raise QuestionError("the text is not valid UTF-8") from None
        n_max = len(data) + 8
        buf = (self._ll.llama_token * n_max)()
        n = self._ll.llama_tokenize(self._vocab, data, len(data), buf, n_max, add_special, parse_special)
        if n < 0:
            raise PromptTooLongError(f"text of {len(data)} bytes tokenizes to more than {n_max} tokens")
        return list(buf[:n])

    def token_text(self, token: int) -> str:
        """The text of one token (special tokens included), as llama.cpp renders it."""
        buf = ctypes.create_string_buffer(256)
        n = self._ll.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", "replace")

    @property
    def adds_bos(self) -> bool:
        return bool(self._ll.llama_vocab_get_add_bos(self._vocab))

    @property
    def bos_text(self) -> str:
        bos = self._ll.llama_vocab_bos(self._vocab)
        return self.token_text(bos) if bos >= 0 else ""

    @property
    def eos_text(self) -> str:
        eos = self._ll.llama_vocab_eos(self._vocab)
        return self.token_text(eos) if eos >= 0 else ""

    @property
    def chat_template(self) -> str | None:
        raw = self._ll.llama_model_chat_template(self._model, None)
        return raw.decode("utf-8") if raw else None

    # -- readouts -----------------------------------------------------------------------

    def full(self, tokens: Sequence[int], ids: np.ndarray | None) -> Readout:
        """The whole model's logits over `ids` (None: the vocabulary); with `reuse_prefix`, from the
        tokens after the prefix this prompt shares with the last completed pass."""
        t0 = time.perf_counter()
        capture = self._decode(tokens, self._final_taps(ids), reuse=self.settings.reuse_prefix)
        return Readout(self._final_logits(capture, ids), self.n_layers - 1, _ms(t0), reused=capture.reused)

    def reusable(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of this prompt a full pass would not run again (reuse_prefix)."""
        return self._main.reusable(tokens) if self.settings.reuse_prefix and self._main is not None else 0

    def repeats(self, tokens: Sequence[int]) -> int:
        """How many leading tokens this prompt shares with the main context's last pass, kept or not
        (reuse_prefix; 0 without): a pass that stopped kept nothing, but the next plain one will."""
        if not self.settings.reuse_prefix or self._main is None:
            return 0
        return _shared(self._main.last, tokens)  # what is kept is a prefix of the last prompt

    def logit_lens(self, tokens: Sequence[int], layer: int, ids: np.ndarray | None) -> Readout:
        """Final norm + LM head applied to the last row after `layer`."""
        self._check_layer(layer)
        node = self.arch.layer_node(layer)
        t0 = time.perf_counter()
        capture = self._decode(tokens, {node: Tap(read_rows=(-1,), stop=True)})
        t1 = time.perf_counter()
        logits = self.lens(capture.rows[node][0], ids)
        return Readout(logits, layer, _ms(t0, t1), _ms(t1))

    def last_rows(self, tokens: Sequence[int], layers: Sequence[int]) -> np.ndarray:
        """(len(layers), n_embd): the last prompt row after each of `layers`, the pass stopped after
        the deepest (what a head at each of them sees; calibration fits domain gates on these)."""
        for layer in layers:
            self._check_layer(layer)
        deepest = max(layers)
        taps = {self.arch.layer_node(layer): Tap(read_rows=(-1,), stop=layer == deepest) for layer in layers}
        capture = self._decode(tokens, taps)
        return np.stack([capture.rows[self.arch.layer_node(layer)][0] for layer in layers])

    def lens(self, hidden: np.ndarray, ids: np.ndarray | None) -> np.ndarray:
        """The logit lens of one captured hidden state (n_embd,)."""
        return self.head.logits(self.head.final_norm(hidden), ids)

    def spade(self, tokens: Sequence[int], layer: int, ids: np.ndarray | None, tail: int = 1) -> Readout:
        """SPADE at `layer`: stop the prompt pass there and forward the tail rows to the end."""
        self._check_layer(layer)
        rows = tail_positions(len(tokens), tail)
        if layer == self.n_layers - 1:  # nothing left to run: SPADE is the full model
            return self.full(tokens, ids)
        node = self.arch.layer_node(layer)
        t0 = time.perf_counter()
        capture = self._decode(tokens, {node: Tap(read_rows=tuple(rows), stop=True)})
        t1 = time.perf_counter()
        logits = self.spade_tail(capture.rows[node], layer, ids, [tokens[r] for r in rows])
        return Readout(logits, layer, _ms(t0, t1), _ms(t1))

    def spade_tail(
        self,
        states: np.ndarray,
        layer: int,
        ids: np.ndarray | None,
        tokens: Sequence[int] | None = None,
        side: bool = False,
        tail_model: bool = True,
    ) -> np.ndarray:
        """Forward `states` (k, n_embd), taken after `layer`, through the layers above it.

        The short sequence gets adjacent positions 0..k-1 (llama.cpp needs consecutive
        positions; RoPE sees only distances). Its layers up to `layer` run on `tokens` (any
        valid ids) and are overwritten at `l_out-layer`, so only the layers above count.
        `side=True` runs it on the second context, as exit checks inside a prompt pass must.
        With a tail model loaded for `layer` (use_tail_models) only the layers above run, on it
        (`tail_model=False`: on the whole model anyway, to measure the difference).
        """
        self._check_layer(layer)
        if layer == self.n_layers - 1:
            return self.lens(states[-1], ids)
        k = states.shape[0]
        cut = self._tails.get(layer) if tail_model else None
        if cut is not None and k <= cut.context.n_ctx:
            last = self.arch.layer_node(cut.n_layers - 1)
            capture = self._decode(states, self._final_taps(ids, last), context=cut.context)
            return self._final_logits(capture, ids, last)
        tokens = list(tokens) if tokens is not None else [0] * k
        taps = {self.arch.layer_node(layer): Tap(write=states), **self._final_taps(ids)}
        return self._final_logits(self._decode(tokens, taps, side=side), ids)

    def spade_tail_normed(self, states: np.ndarray, layer: int) -> tuple[np.ndarray, np.ndarray] | None:
        """A free answer's SPADE tail without its LM head: the answer row after the last layer, (1, n_embd),
        and after the final norm, (n_embd,). The vocabulary's logits cost a whole LM head (Gemma 3:
        262,144 x 640, read from memory on every call); a probe's decision needs only a few candidates'
        (numpy, `head.logits`), and `head_logits` makes the vocabulary's from the first row where they
        are needed. None where no tail model holds the layers above `layer` (then: spade_tail)."""
        self._check_layer(layer)
        cut = self._tails.get(layer)
        if cut is None or self._head is None or states.shape[0] > cut.context.n_ctx:
            return None
        last, norm = self.arch.layer_node(cut.n_layers - 1), self.arch.final_norm
        taps = {last: Tap(read_rows=(-1,)), norm: Tap(read_rows=(-1,), cut=True)}
        capture = self._decode(states, taps, context=cut.context)  # the tail model's own context, even in a pass
        return capture.rows[last], capture.rows[norm][0]

    def head_logits(self, hidden: np.ndarray) -> np.ndarray:
        """The vocabulary's logits of answer rows before the final norm, (1, n_embd), on the head model
        (where none is loaded: the final norm and LM head in numpy)."""
        if self._head is None:
            return self.lens(hidden[-1], None)
        taps = {self.arch.layer_node(0): Tap(write=hidden)}  # block 0's output replaced: norm + LM head remain
        return self._decode(hidden, taps, context=self._head.context).logits()

    def use_tail_models(self, layers: Sequence[int]) -> None:
        """Run SPADE tails from these layers on tail models (only the layers above; see tailmodel).

        Each costs a derived GGUF in the cache (written once) and the memory of its layers. The
        first also loads the head model, which from then on computes every free answer's
        vocabulary logits (tails' and full passes' alike), and releases the main model's output
        matrix, so that the matrix is held once. Without a head model there are no tail models.
        """
        if not self._use_head_model():
            return
        for layer in layers:
            self._check_layer(layer)
            if layer < self.n_layers - 1 and layer not in self._tails:
                try:
                    self._tails[layer] = _DerivedModel(self, layer)
                except TailModelError as exc:
                    log.info("%s; tails from layer %d run on the whole model", exc, layer)
                except (ModelFileError, OSError) as exc:  # a cache that cannot be written, or a damaged file
                    log.warning(
                        "no tail model above layer %d (%s); its tails run on the whole model (same answers, slower)",
                        layer,
                        exc,
                    )
                    discard_tail_model(self.path, layer)

    def _use_head_model(self) -> bool:
        if self._head is not None:
            return True
        if self.settings.n_gpu_layers == 0:  # first, so that the two copies are never resident together
            release_mapped(self.path, [(self.index.output.offset, self.head.matrix_bytes)])
        try:
            self._head = _DerivedModel(self, None)
        except (ModelFileError, OSError) as exc:  # the main model's LM head it is (its pages come back)
            log.warning("no head model (%s); SPADE tails run on the whole model (same answers, slower)", exc)
            discard_tail_model(self.path, None)
            return False
        return True

    def new_context_ms(self) -> float:
        """What making (and freeing) one more context of this engine's size costs, in ms: the price
        of the first SPADE probe in a process, which makes the second context probes run on."""
        t0 = time.perf_counter()
        _Context(self, self.settings.n_ctx).close()
        return _ms(t0)

    @property
    def head_model(self) -> bool:
        """Whether free answers' LM head runs on the head model (use_tail_models loaded it)."""
        return self._head is not None

    @property
    def tail_model_layers(self) -> list[int]:
        """Layers whose SPADE tails run on a tail model (use_tail_models)."""
        return sorted(self._tails)

    def early_exit(
        self,
        tokens: Sequence[int],
        ids: np.ndarray | None,
        checks: dict[int, Callable[[np.ndarray], bool]],
        tail: int = 1,
        then_spade: bool | Collection[int] = True,
    ) -> Readout:
        """One prompt pass that may stop at any layer in `checks`, then answers with SPADE there.

        `checks[layer]` sees the tail rows after `layer` (the last row is the answer position)
        inside the eval callback and returns True to stop; the first True wins. Without an
        exit the pass runs to the end and the readout is the full model's. `then_spade=False`
        (or a collection of layers the exit layer is not in) skips the SPADE pass after an exit
        (lens baselines answer from their own head, probes from their tail): the readout's logits
        are then empty and the caller supplies the answer.
        """
        rows = tail_positions(len(tokens), tail)
        last = self.n_layers - 1
        for layer in checks:
            self._check_layer(layer)
        taps = {
            self.arch.layer_node(layer): Tap(read_rows=tuple(rows), decide=check)
            for layer, check in checks.items()
            if layer < last
        }
        taps.update(self._final_taps(ids))
        t0 = time.perf_counter()
        capture = self._decode(tokens, taps, reuse=self.settings.reuse_prefix and not checks)  # a plain pass
        t1 = time.perf_counter()
        if capture.stop_node is None:
            return Readout(self._final_logits(capture, ids), last, _ms(t0, t1), reused=capture.reused)
        layer = next(layer for layer in checks if self.arch.layer_node(layer) == capture.stop_node)
        if not (then_spade if isinstance(then_spade, bool) else layer in then_spade):
            return Readout(np.empty(0, np.float32), layer, _ms(t0, t1))
        logits = self.spade_tail(capture.rows[capture.stop_node], layer, ids, [tokens[r] for r in rows])
        return Readout(logits, layer, _ms(t0, t1), _ms(t1))

    def trace(self, tokens: Sequence[int], ids: np.ndarray | None, tail: int = 1) -> Trace:
        """One full prompt pass that keeps the tail rows after every layer."""
        rows = tail_positions(len(tokens), tail)
        last = self.n_layers - 1
        taps = {self.arch.layer_node(i): Tap(read_rows=tuple(rows)) for i in range(last)}
        taps[self.arch.layer_node(last)] = Tap(read_rows=(-1,))  # only output rows survive the last layer
        taps.update(self._final_taps(ids))
        t0 = time.perf_counter()
        capture = self._decode(tokens, taps)
        full = Readout(self._final_logits(capture, ids), last, _ms(t0))
        states = (
            np.stack([capture.rows[self.arch.layer_node(i)] for i in range(last)])
            if last
            else np.zeros((0, len(rows), self.n_embd), np.float32)
        )
        final_rows = np.concatenate([states[:, -1, :], capture.rows[self.arch.layer_node(last)]])
        return Trace(list(tokens), rows, states, final_rows, full)

    # -- llama.cpp plumbing ---------------------------------------------------------------

    def _check_layer(self, layer: int) -> None:
        if not isinstance(layer, (int, np.integer)) or not 0 <= layer < self.n_layers:
            raise LayerError(f"layer {layer} is outside 0..{self.n_layers - 1} for this {self.n_layers}-layer model")

    def _decode(
        self,
        tokens: Sequence[int] | np.ndarray,
        taps: dict[str, Tap],
        side: bool = False,
        context: _Context | None = None,
        reuse: bool = False,
    ):
        """Decode `tokens` (or embeddings, (n, n_embd)) as sequence 0 on an empty cache, logits
        for the last token only.

        `side=True` runs on the second context: the way to decode from inside the main
        context's eval callback (the main pass waits in the callback meanwhile). `reuse=True`
        (taps that read only rows counted from the end): keep the cache of the prefix shared
        with the context's last completed pass and decode the rest (_Context.decode).
        """
        n = len(tokens)
        if n == 0:
            raise QuestionError("the prompt has no tokens")
        if n > self.n_ctx:
            raise PromptTooLongError(
                f"the prompt has {n} tokens but the context holds {self.n_ctx}; shorten it or raise --ctx"
            )
        if side and self._side is None:
            self._side = _Context(self, self.settings.n_ctx)
        context = context or (self._side if side else self._main)
        # numpy inside the callback (exit checks) must not wake OpenBLAS's thread pool: its
        # spinning threads fight llama.cpp's for the cores and slow the pass several times over.
        with _blas_controller().limit(limits=1, user_api="blas"):
            rc, capture = context.decode(tokens, taps, reuse)
        if rc != 0 and not (rc == 2 and capture.stopped):
            raise DecodeError(f"llama_decode failed with status {rc} on a {n}-token batch")
        missing = [
            name
            for name, tap in taps.items()
            if tap.read_rows and name not in capture.rows and capture.stop_node is None
        ]
        if missing:
            raise DecodeError(f"graph node(s) {', '.join(missing)} never appeared in the {self.arch.name} graph")
        if not capture.stopped:
            capture.logits = context.last_logits
        return capture

    def _final_taps(self, ids: np.ndarray | None, last: str | None = None) -> dict[str, Tap]:
        """With a decision set, end the graph at result_norm and skip llama.cpp's LM head; with a head
        model, end it after the last layer (`last`: that node, when not this model's) and skip both."""
        if ids is not None:
            return {self.arch.final_norm: Tap(read_rows=(-1,), cut=True)}
        if self._head is not None:
            return {last or self.arch.layer_node(self.n_layers - 1): Tap(read_rows=(-1,), cut=True)}
        return {}

    def _final_logits(self, capture, ids: np.ndarray | None, last: str | None = None) -> np.ndarray:
        """The last position's logits: llama.cpp's over the vocabulary (on the head model, when one is
        loaded), or the decision rows in numpy."""
        if ids is not None:
            return self.head.logits(capture.rows[self.arch.final_norm][0], ids)
        if self._head is None:
            return capture.logits()
        return self.head_logits(capture.rows[last or self.arch.layer_node(self.n_layers - 1)])


def release_mapped(path: Path, ranges: Sequence[tuple[int, int]]) -> int:
    """Drop this process's resident pages of `path`'s byte ranges (offset, length) where llama.cpp
    mapped the file (Linux; elsewhere nothing). The file stays mapped; pages come back on access.
    Returns the bytes released."""
    if not ranges or not os.path.exists("/proc/self/maps"):
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madv_dontneed, page = 4, os.sysconf("SC_PAGE_SIZE")
    target, released = str(Path(path).resolve()), 0
    with open("/proc/self/maps") as maps:
        mappings = [line.split(maxsplit=5) for line in maps]
    for parts in mappings:
        if len(parts) < 6 or parts[5].strip() != target:
            continue
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        base = lo - int(parts[2], 16)  # the address of file offset 0 in this mapping
        for offset, nbytes in ranges:
            start = -(-max(lo, base + offset) // page) * page  # whole pages inside the range only
            end = min(hi, base + offset + nbytes) // page * page
            if end > start and libc.madvise(start, end - start, madv_dontneed) == 0:
                released += end - start
    log.debug("released %.1f MB of %s's mapped pages", released / 2**20, Path(path).name)
    return released


def _shared(before: Sequence[int], tokens: Sequence[int]) -> int:
    """The leading tokens of `tokens` equal to `before`'s, short of the last (whose logits a pass makes)."""
    n = 0
    for a, b in zip(before, tokens[:-1]):
        if a != b:
            break
        n += 1
    return n


QUICK_PASS_TOKENS = 64  # plain passes up to this long run without an abort callback (_Context.decode)


class _Context:
    """One llama context on the engine's model (or a tail model): its own KV cache, batch and eval hooks."""

    def __init__(self, engine: Engine, n_ctx: int, model=None, embd: bool = False) -> None:
        ll = self._ll = engine._ll
        self.n_vocab = engine.n_vocab
        self.hooks = LayerHooks(engine._ggml)
        self.threads = engine.settings.n_threads or default_threads()
        kv = {"f16": ll.GGML_TYPE_F16, "f32": ll.GGML_TYPE_F32}[engine.settings.kv_type]
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = self.threads
        cparams.type_k = cparams.type_v = kv
        if engine.settings.flash_attn is not None:
            cparams.flash_attn_type = int(engine.settings.flash_attn)
        cparams.cb_eval = self.hooks.eval_callback
        cparams.abort_callback = self.hooks.abort_callback
        self._abort_set, self._no_abort = True, ll.ggml_abort_callback()  # NULL: the backend checks nothing
        cparams.no_perf = True
        self.ctx = ll.llama_init_from_model(model or engine._model, cparams)
        if not self.ctx:
            raise ModelFileError(f"llama.cpp could not create a context of {n_ctx} tokens for {engine.path}")
        self.mem = ll.llama_get_memory(self.ctx)
        # llama.cpp may pad the context beyond what was asked; a batch still holds at most n_batch tokens
        self.n_ctx = min(ll.llama_n_ctx(self.ctx), n_ctx)
        self.n_embd = engine.n_embd if embd else 0
        self.batch = ll.llama_batch_init(self.n_ctx, self.n_embd, 1)
        self.kept: list[int] = []  # the tokens whose KV cache the last pass left complete (reuse_prefix)
        self.last: list[int] = []  # the last prompt passed, whatever its pass left (reuse_prefix)
        self.keeps = engine.settings.reuse_prefix and not embd

    def reusable(self, tokens: Sequence[int]) -> int:
        """The leading tokens shared with the kept cache, short of the last (whose logits a pass makes)."""
        return _shared(self.kept, tokens)

    def decode(self, tokens: Sequence[int] | np.ndarray, taps: dict[str, Tap], reuse: bool = False):
        """One llama_decode of `tokens` as sequence 0. With `reuse`, the cache of the prefix shared with
        the last completed pass stays and only the rest runs (a tap's rows then count from the end).
        Where the context keeps caches (reuse_prefix), a pass that completes without writing into the
        graph leaves its cache for the next; one that stops has had its batch rolled back by llama.cpp."""
        start = self.reusable(tokens) if reuse and self.keeps else 0
        if start and any(r >= 0 for tap in taps.values() for r in tap.read_rows):
            raise ValueError("a pass that reuses a prefix reads rows counted from the end only")
        batch, n = self.batch, len(tokens) - start
        batch.n_tokens = n
        if self.n_embd:  # hidden states in: the batch holds embeddings instead of token ids
            rows = np.ascontiguousarray(tokens, dtype=np.float32)
            if rows.shape != (n, self.n_embd):
                raise ValueError(f"embeddings of shape {rows.shape}, expected ({n}, {self.n_embd})")
            ctypes.memmove(batch.embd, rows.ctypes.data, rows.nbytes)
        else:
            for i in range(n):
                batch.token[i] = int(tokens[start + i])
        for i in range(n):
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = i == n - 1
        ll = self._ll
        # Metadata only: emptied cells are masked out, so their stale (finite) K/V never count, and
        # zeroing the buffers costs time on every clear (the exact tests compare bit for bit).
        if start:
            ll.llama_memory_seq_rm(self.mem, 0, start, -1)
        else:
            ll.llama_memory_clear(self.mem, False)
        self.kept = []  # until this pass says what its cache holds
        writes = any(tap.write is not None for tap in taps.values())  # a SPADE tail's pass, not a prompt's
        if self.keeps and not writes:
            self.last = list(tokens)
        # The CPU backend calls the abort callback after every node, into Python: on a short pass
        # that no tap stops, that is a share of the pass worth saving. Ctrl-C there is raised when
        # the pass ends (LayerHooks.run), as soon as a person would notice; a failing tap (reading
        # rows) lets the short pass finish before its error is raised.
        wanted = n > QUICK_PASS_TOKENS or any(tap.stop or tap.decide is not None for tap in taps.values())
        if wanted != self._abort_set:
            ll.llama_set_abort_callback(self.ctx, self.hooks.abort_callback if wanted else self._no_abort, None)
            self._abort_set = wanted
        try:
            rc, capture = self.hooks.run(taps, lambda: ll.llama_decode(self.ctx, batch))
            capture.reused = start
            completed = rc == 0 and not capture.stopped and not writes
            if self.keeps and (completed or rc == 2):  # 2: stopped, the batch rolled back, the prefix kept
                self.kept = list(tokens) if completed else list(tokens[:start])
            return rc, capture
        finally:
            if not self.kept:
                ll.llama_memory_clear(self.mem, False)

    def last_logits(self) -> np.ndarray:
        ptr = self._ll.llama_get_logits_ith(self.ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        if self.batch is not None:
            self._ll.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx:
            self._ll.llama_free(self.ctx)
            self.ctx = None


class _DerivedModel:
    """A model derived from the engine's (tailmodel): the layers above `layer`, or (None) the head
    model; fed captured rows as embeddings, on a small context of its own."""

    N_CTX = 64  # tail rows (start token + K); wider tails fall back to the whole model

    def __init__(self, engine: Engine, layer: int | None) -> None:
        ll = self._ll = engine._ll
        self.path = tail_model_path(engine.path, layer)
        # a tail model's stub vocabulary is never read: fed embeddings, its pass ends before the LM head
        stub = () if layer is None else ("token_embd.weight", "output.weight")
        self.model = load_llama_model(self.path, engine.settings.n_gpu_layers, stub)
        what = "head model" if layer is None else "tail model"
        if not self.model:
            raise ModelFileError(f"llama.cpp could not load the {what} {self.path}; delete it to rewrite it")
        self.n_layers = ll.llama_model_n_layer(self.model)
        if self.n_layers != (1 if layer is None else engine.n_layers - 1 - layer):
            ll.llama_model_free(self.model)
            raise ModelFileError(f"the {what} {self.path} does not hold the layers it should")
        self.context = _Context(engine, self.N_CTX if layer is not None else 8, model=self.model, embd=True)

    def close(self) -> None:
        if self.context is not None:
            self.context.close()
            self.context = None
        if self.model:
            self._ll.llama_model_free(self.model)
            self.model = None


def _ms(start: float, end: float | None = None) -> float:
    return ((end if end is not None else time.perf_counter()) - start) * 1000.0
