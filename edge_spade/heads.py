"""Per-layer affine heads (L-SPADE, tuned lens): `z = FinalNorm(h + U V h + b)`, trained in numpy.

The map is low rank (rank r) so that one head per layer stays small enough to ship (Gemma 3
270M, 18 layers, r = 64, fp16: about 3 MB instead of 15 MB for full 640x640 matrices). With
U = 0 at the start a head is exactly the logit lens; training moves it towards its target
distribution: SPADE's at the same layer (L-SPADE) or the full model's (tuned lens).

Targets are distributions over a per-sample decision set, given as logits over a shared list
of token ids with a mask of which ids belong to each sample. The head only estimates
confidence (entropy) during SPADE-EXIT; the exit answer itself always comes from SPADE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)

# Free answers: entropy over the top-k tokens (the vocabulary's tail only adds noise to it).
FREE_TOP_K = 32


@dataclass
class LayerHead:
    """h -> FinalNorm(h + (h @ v.T) @ u.T + b); u: (d, r), v: (r, d), b: (d,)."""

    u: np.ndarray
    v: np.ndarray
    b: np.ndarray

    @classmethod
    def identity(cls, d: int, rank: int, seed: int = 0) -> LayerHead:
        rng = np.random.default_rng(seed)
        v = (rng.standard_normal((rank, d)) / np.sqrt(d)).astype(np.float32)
        return cls(np.zeros((d, rank), np.float32), v, np.zeros(d, np.float32))

    def adjust(self, h: np.ndarray) -> np.ndarray:
        """(N, d) -> (N, d), before the final norm."""
        return h + (h @ self.v.T) @ self.u.T + self.b


def rms_norm(y: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return y / np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps) * weight


def masked_log_softmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    x = np.where(mask, logits, -np.inf)
    m = np.max(x, axis=-1, keepdims=True)
    return x - m - np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True))


def entropy(logits: np.ndarray) -> float:
    """Entropy in nats of softmax(logits) (1-d)."""
    x = logits.astype(np.float64) - np.max(logits)
    p = np.exp(x)
    p /= p.sum()
    return float(-(p * np.log(np.clip(p, 1e-300, None))).sum())


def train_head(
    hidden: np.ndarray,  # (N, d) last-row states after the layer
    target_logits: np.ndarray,  # (N, m) target logits over each sample's ids
    mask: np.ndarray,  # (N, m) bool: which of the m slots are real ids (decision sets differ in size)
    rows: np.ndarray,  # (m, d) shared output-matrix rows, or (N, m, d) rows per sample
    norm_weight: np.ndarray,  # (d,)
    eps: float,
    rank: int = 64,
    steps: int = 300,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    seed: int = 0,
) -> tuple[LayerHead, list[float]]:
    """Minimise cross-entropy to the target distribution with full-batch Adam; returns the losses."""
    h = hidden.astype(np.float32)
    n, d = h.shape
    head = LayerHead.identity(d, rank, seed)
    target = np.exp(masked_log_softmax(target_logits.astype(np.float64), mask)).astype(np.float32)
    params = [head.u, head.v, head.b]
    m1 = [np.zeros_like(p) for p in params]
    m2 = [np.zeros_like(p) for p in params]
    losses = []
    for step in range(1, steps + 1):
        t = h @ head.v.T  # (N, r)
        y = h + t @ head.u.T + head.b  # (N, d)
        s = np.sqrt(np.mean(y * y, axis=-1, keepdims=True) + eps)  # (N, 1)
        nrm = y / s
        logits = _apply_rows(nrm * norm_weight, rows)  # (N, m)
        logq = np.where(mask, masked_log_softmax(logits, mask), 0.0)
        q = np.where(mask, np.exp(logq), 0.0)
        losses.append(float(-(target * logq).sum() / n))
        dlogits = ((q - target) / n).astype(np.float32)
        dn = (np.einsum("nm,nmd->nd", dlogits, rows) if rows.ndim == 3 else dlogits @ rows) * norm_weight
        dy = (dn - nrm * np.mean(dn * nrm, axis=-1, keepdims=True)) / s
        grads = [dy.T @ t + weight_decay * head.u, (dy @ head.u).T @ h + weight_decay * head.v, dy.sum(axis=0)]
        for i, (p, g) in enumerate(zip(params, grads)):
            m1[i] = 0.9 * m1[i] + 0.1 * g
            m2[i] = 0.999 * m2[i] + 0.001 * g * g
            p -= lr * (m1[i] / (1 - 0.9**step)) / (np.sqrt(m2[i] / (1 - 0.999**step)) + 1e-8)
    return head, losses


def _apply_rows(z: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(N, d) with (m, d) shared or (N, m, d) per-sample rows -> (N, m) logits."""
    return np.einsum("nd,nmd->nm", z, rows) if rows.ndim == 3 else z @ rows.T


def head_logits(head: LayerHead, hidden: np.ndarray, rows: np.ndarray, norm_weight: np.ndarray,
                eps: float) -> np.ndarray:
    """(N, m) logits of the head over `rows` ((m, d) shared or (N, m, d) per sample)."""
    return _apply_rows(rms_norm(head.adjust(hidden), norm_weight, eps), rows)


def topk_entropy(logits: np.ndarray, k: int) -> float:
    """Entropy (nats) of the distribution renormalised over the k largest logits."""
    if logits.shape[-1] > k:
        logits = logits[np.argpartition(logits, -k)[-k:]]
    return entropy(logits)


# -- ONNX -------------------------------------------------------------------------------------

ONNX_OPSET = 17


def export_onnx(heads: list[LayerHead], norm_weight: np.ndarray, eps: float, dtype=np.float16) -> bytes:
    """One ONNX graph holding every layer's head.

    Inputs: `hidden` float32 (1, d) and `layer` int64 scalar (the index into `heads`).
    Output: `normed` float32 (1, d), the head's FinalNorm output; the caller applies the
    decision-set rows of the output matrix (the decision set changes per question).
    Weights are stored as `dtype` (fp16 halves the file) and cast to float32 in the graph.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = heads[0].b.shape[0]
    inits = [
        numpy_helper.from_array(np.stack([h.v.T for h in heads]).astype(dtype), "vt_all"),  # (L, d, r)
        numpy_helper.from_array(np.stack([h.u.T for h in heads]).astype(dtype), "ut_all"),  # (L, r, d)
        numpy_helper.from_array(np.stack([h.b for h in heads]).astype(dtype), "b_all"),  # (L, d)
        numpy_helper.from_array(norm_weight.astype(np.float32), "norm_weight"),
        numpy_helper.from_array(np.array(eps, np.float32), "eps"),
    ]
    f32 = TensorProto.FLOAT
    nodes = [
        helper.make_node("Gather", ["vt_all", "layer"], ["vt_h"], axis=0),
        helper.make_node("Gather", ["ut_all", "layer"], ["ut_h"], axis=0),
        helper.make_node("Gather", ["b_all", "layer"], ["b_h"], axis=0),
        helper.make_node("Cast", ["vt_h"], ["vt"], to=f32),
        helper.make_node("Cast", ["ut_h"], ["ut"], to=f32),
        helper.make_node("Cast", ["b_h"], ["b"], to=f32),
        helper.make_node("MatMul", ["hidden", "vt"], ["t"]),
        helper.make_node("MatMul", ["t", "ut"], ["a"]),
        helper.make_node("Add", ["hidden", "a"], ["ha"]),
        helper.make_node("Add", ["ha", "b"], ["y"]),
        helper.make_node("Mul", ["y", "y"], ["y2"]),
        helper.make_node("ReduceMean", ["y2"], ["ms"], axes=[-1], keepdims=1),
        helper.make_node("Add", ["ms", "eps"], ["mse"]),
        helper.make_node("Sqrt", ["mse"], ["rms"]),
        helper.make_node("Div", ["y", "rms"], ["yn"]),
        helper.make_node("Mul", ["yn", "norm_weight"], ["normed"]),
    ]
    graph = helper.make_graph(
        nodes, "lspade_heads",
        [helper.make_tensor_value_info("hidden", f32, [1, d]),
         helper.make_tensor_value_info("layer", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("normed", f32, [1, d])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="edge-spade")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


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
        out = self.session.run(["normed"], {"hidden": hidden.reshape(1, -1).astype(np.float32),
                                            "layer": np.array(index, np.int64)})
        return out[0][0]
