"""Per-layer affine heads (L-SPADE, tuned lens): `z = FinalNorm(h + U V h + b)`, trained in numpy.

The map is low rank (rank r) so that one head per layer stays small enough to ship (Gemma 3
270M, 18 layers, r = 64, fp16: about 3 MB instead of 15 MB for full 640x640 matrices). With
U = 0 at the start a head is exactly the logit lens; training moves it towards its target
distribution: SPADE's at the same layer (L-SPADE) or the full model's (tuned lens).

Targets are distributions over a per-sample decision set, given as logits over a shared list
of token ids with a mask of which ids belong to each sample.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from edge_spade.heads import entropy, topk_entropy
from edge_spade.prompts import choice_logits
from edge_spade.runtime import Runtime

from .trace import Sample

log = logging.getLogger(__name__)


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


def head_logits(
    head: LayerHead, hidden: np.ndarray, rows: np.ndarray, norm_weight: np.ndarray, eps: float
) -> np.ndarray:
    """(N, m) logits of the head over `rows` ((m, d) shared or (N, m, d) per sample)."""
    return _apply_rows(rms_norm(head.adjust(hidden), norm_weight, eps), rows)


# -- across layers, on calibration traces ------------------------------------------------------


def _batch(
    rt: Runtime, samples: list[Sample], layer: int, target_layer: int | None, candidates: np.ndarray | None = None
):
    """Rows, mask and target logits for one layer (target_layer None: the layer itself).

    Free answers with `candidates`: every sample is scored over all candidate tokens, as the
    runtime scores them, the target putting SPADE's top-k distribution on its own tokens and
    nothing on the rest. Trained on the top-k rows alone, a head leaves the other candidates'
    logits free, and they end up above the top-k (measured: Gemma's free heads agreed with SPADE's
    answer on 0 of 160 held-out prompts at each of layers 1-8).
    """
    src = layer if target_layer is None else target_layer
    hidden = np.stack([s.hidden[layer] for s in samples])
    if candidates is not None and samples[0].free:
        logits = np.full((len(samples), len(candidates)), -np.inf, np.float32)
        for n, s in enumerate(samples):
            ids = s.layer_ids(src)
            pos = np.searchsorted(candidates, ids).clip(0, len(candidates) - 1)
            known = candidates[pos] == ids
            logits[n, pos[known]] = s.logits[src][known]
        return hidden, logits, np.ones(logits.shape, bool), rt.engine.head.rows(candidates)
    m = max(len(s.layer_ids(src)) for s in samples)
    d = rt.engine.n_embd
    rows = np.zeros((len(samples), m, d), np.float32)
    mask = np.zeros((len(samples), m), bool)
    logits = np.zeros((len(samples), m), np.float32)
    for n, s in enumerate(samples):
        ids = s.layer_ids(src)
        rows[n, : len(ids)] = rt.engine.head.rows(ids)
        mask[n, : len(ids)] = True
        logits[n, : len(ids)] = s.logits[src]
    return hidden, logits, mask, rows


def train_heads(
    rt: Runtime,
    samples: list[Sample],
    layers: list[int],
    target: str,
    rank: int,
    steps: int,
    lr: float,
    candidates: np.ndarray | None = None,
) -> list[LayerHead]:
    """One head per layer; target "spade" (L-SPADE) or "full" (tuned lens); free answers over `candidates`."""
    engine = rt.engine
    heads = []
    for layer in layers:
        hidden, logits, mask, rows = _batch(
            rt, samples, layer, None if target == "spade" else engine.n_layers - 1, candidates
        )
        head, losses = train_head(
            hidden,
            logits,
            mask,
            rows,
            engine.head.norm_weight,
            engine.index.rms_eps,
            rank=rank,
            steps=steps,
            lr=lr,
            seed=layer,
        )
        log.info("%s head, layer %d: cross-entropy %.4f -> %.4f", target, layer, losses[0], losses[-1])
        heads.append(head)
    return heads


def judge(
    rt: Runtime,
    heads: list[LayerHead],
    layers: list[int],
    samples: list[Sample],
    top_k: int,
    candidates: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """(entropy, own answer) of each head on each sample, as the runtime computes them.

    Free answers: entropy over the head's top-k among `candidates`, and its own answer among them.
    """
    engine = rt.engine
    ent = np.zeros((len(samples), len(layers)))
    own = np.zeros((len(samples), len(layers)), np.int64)
    cand_rows = engine.head.rows(candidates) if candidates is not None else None
    for n, s in enumerate(samples):
        rows = None if s.free else engine.head.rows(s.ids[0])
        for j, (layer, head) in enumerate(zip(layers, heads)):
            normed = head.adjust(s.hidden[layer][None])[0]
            normed = engine.head.final_norm(normed)
            if s.free:
                logits = cand_rows @ normed
                ent[n, j], own[n, j] = topk_entropy(logits, top_k), int(candidates[np.argmax(logits)])
            else:
                choice = choice_logits(rows @ normed, s.groups)
                ent[n, j], own[n, j] = entropy(choice), int(np.argmax(choice))
    return ent, own
