"""L-SPADE / tuned-lens heads: training recovers a known affine head; zero init is the logit lens."""

from __future__ import annotations

import numpy as np

from edge_spade.convert.heads_train import LayerHead, head_logits, masked_log_softmax, rms_norm, train_head

D, M, N, EPS = 16, 12, 400, 1e-5


def problem(seed: int = 1):
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((M, D)).astype(np.float32)
    g = (1 + 0.1 * rng.standard_normal(D)).astype(np.float32)
    h = rng.standard_normal((N, D)).astype(np.float32)
    true = LayerHead(
        0.5 * rng.standard_normal((D, 4)).astype(np.float32),
        rng.standard_normal((4, D)).astype(np.float32) / 4,
        0.3 * rng.standard_normal(D).astype(np.float32),
    )
    mask = np.ones((N, M), bool)
    mask[: N // 2, M // 2 :] = False  # half the samples have a smaller decision set
    return h, head_logits(true, h, rows, g, EPS), mask, rows, g


def test_zero_init_is_the_logit_lens():
    h, _, _, rows, g = problem()
    head = LayerHead.identity(D, 4)
    np.testing.assert_allclose(head_logits(head, h, rows, g, EPS), rms_norm(h, g, EPS) @ rows.T, atol=1e-6)


def test_training_recovers_the_target_distribution():
    h, target, mask, rows, g = problem()
    head, losses = train_head(h, target, mask, rows, g, EPS, rank=8, steps=400, lr=2e-2)
    q = np.exp(masked_log_softmax(head_logits(head, h, rows, g, EPS), mask))
    p = np.exp(masked_log_softmax(target, mask))
    start = np.exp(masked_log_softmax(rms_norm(h, g, EPS) @ rows.T, mask))

    def kl(a, b):
        logs = np.log(np.clip(a, 1e-30, None)) - np.log(np.clip(b, 1e-30, None))
        return float(np.where(mask, a * logs, 0).sum() / N)

    assert losses[-1] < losses[0]
    assert kl(p, q) < 0.1 * kl(p, start)  # much closer to the target than the logit lens it started from
    assert (np.argmax(np.where(mask, q, -1), 1) == np.argmax(np.where(mask, p, -1), 1)).mean() > 0.9


def test_onnx_heads_reproduce_numpy_heads():
    from edge_spade.convert.onnx_export import export_onnx
    from edge_spade.heads import OnnxHeads

    h, target, mask, rows, g = problem()
    heads = [train_head(h, target, mask, rows, g, EPS, rank=4, steps=30, lr=2e-2, seed=s)[0] for s in range(3)]
    for dtype, tol in ((np.float32, 1e-5), (np.float16, 2e-2)):
        session = OnnxHeads(export_onnx(heads, g, EPS, dtype=dtype))
        for i, head in enumerate(heads):
            for x in h[:5]:
                want = rms_norm(head.adjust(x[None]), g, EPS)[0]
                np.testing.assert_allclose(session.normed(x, i), want, atol=tol * np.abs(want).max())
