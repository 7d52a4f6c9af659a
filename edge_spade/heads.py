"""The L-SPADE heads at run time: an onnxruntime session over the exported heads, and the
entropies the exit rule compares with its threshold.

A head maps the answer position's hidden state to `FinalNorm(h + U V h + b)` (trained by the
converter, edge_spade.convert.train); the decision-set rows of the output matrix turn that into
logits. The head only estimates confidence during SPADE-EXIT: the exit answer comes from SPADE.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .domain import DomainGate

# Free answers: entropy over the top-k tokens (the vocabulary's tail only adds noise to it).
FREE_TOP_K = 32


def entropy(logits: np.ndarray) -> float:
    """Entropy in nats of softmax(logits) (1-d)."""
    x = logits.astype(np.float64) - np.max(logits)
    p = np.exp(x)
    p /= p.sum()
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum())


def topk_entropy(logits: np.ndarray, k: int) -> float:
    """Entropy (nats) of the distribution renormalised over the k largest logits."""
    if logits.shape[-1] > k:
        logits = logits[np.argpartition(logits, -k)[-k:]]
    return entropy(logits)


class OnnxHeads:
    """An onnxruntime session over exported heads: one session, one thread, made on first use.

    Lazily: a rule that probes with SPADE or never exits (every shipped choice rule, and a free
    answer whose plan does not check) never runs a head, and onnxruntime costs tens of MB of
    resident memory and a noticeable share of a one-question process's start once imported.
    `check` runs once, when the session is made; whatever it or onnxruntime raises there goes
    through `on_error`, which turns it into the caller's own error (a file that does not fit).
    """

    def __init__(
        self,
        data: bytes,
        check: Callable[[OnnxHeads], None] | None = None,
        on_error: Callable[[Exception], Exception] | None = None,
    ) -> None:
        self._data, self._check, self._on_error, self._session = data, check, on_error, None
        self.domain: dict[int, DomainGate] = {}  # layer -> where its head may decide (none: everywhere)

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = 1  # called between llama.cpp graph views: keep it light
            options.inter_op_num_threads = 1
            try:
                self._session = ort.InferenceSession(self._data, options, providers=["CPUExecutionProvider"])
                if self._check is not None:
                    self._check(self)
            except Exception as exc:
                self._session = None  # refused again on the next use
                if self._on_error is None:
                    raise
                raise self._on_error(exc) from None
            self._check = None
        return self._session

    def normed(self, hidden: np.ndarray, index: int) -> np.ndarray:
        """(d,) FinalNorm(head_index(hidden))."""
        out = self.session.run(
            ["normed"], {"hidden": hidden.reshape(1, -1).astype(np.float32), "layer": np.array(index, np.int64)}
        )
        return out[0][0]
