"""The L-SPADE heads at run time: an onnxruntime session over the exported heads, and the
entropies the exit rule compares with its threshold.

A head maps the answer position's hidden state to `FinalNorm(h + U V h + b)` (trained by the
converter, edge_spade.convert.train); the decision-set rows of the output matrix turn that into
logits. The head only estimates confidence during SPADE-EXIT: the exit answer comes from SPADE.
"""

from __future__ import annotations

import numpy as np

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
    """An onnxruntime session over exported heads: one session, created once, one thread."""

    def __init__(self, data: bytes) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # called between llama.cpp graph views: keep it light
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])

    def normed(self, hidden: np.ndarray, index: int) -> np.ndarray:
        """(d,) FinalNorm(head_index(hidden))."""
        out = self.session.run(
            ["normed"], {"hidden": hidden.reshape(1, -1).astype(np.float32), "layer": np.array(index, np.int64)}
        )
        return out[0][0]
