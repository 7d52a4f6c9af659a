"""The top-k readout against a full sort: same ids in the same order (ties: lower id first), same
probabilities, for vocabularies small enough to partition and large enough to cut in blocks."""

from __future__ import annotations

import numpy as np
import pytest

from edge_spade.runtime import top_probs


def reference(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((np.arange(len(logits)), -logits.astype(np.float64)))[:k]
    z = logits.astype(np.float64)
    p = np.exp(z - z.max())
    return order, (p / p.sum())[order]


def vocabularies():
    rng = np.random.default_rng(7)
    yield "small", (rng.standard_normal(50) * 3).astype(np.float32)
    yield "gemma-sized", (rng.standard_normal(262_144) * 3).astype(np.float32)
    yield "uneven-tail", (rng.standard_normal(49_152 + 77) * 2).astype(np.float32)
    peaked = (rng.standard_normal(100_000)).astype(np.float32)
    peaked[[5, 70_001, 99_999]] = 40.0  # a three-way tie at the top, across blocks
    yield "ties", peaked
    rounded = np.round(rng.standard_normal(65_536) * 2).astype(np.float32)  # thousands tie at each value
    yield "coarse", rounded
    masked = np.full(262_144, -np.inf, np.float32)  # candidates only, the rest never possible
    masked[rng.choice(262_144, 3, replace=False)] = [2.0, 1.0, 0.5]
    yield "masked", masked


@pytest.mark.parametrize("k", [1, 5, 20])
@pytest.mark.parametrize("name,logits", list(vocabularies()))
def test_top_probs_equals_a_full_sort(name, logits, k):
    ids, probs = top_probs(logits, k)
    want_ids, want_probs = reference(logits, k)
    finite = np.isfinite(logits[want_ids])
    np.testing.assert_array_equal(ids[finite], want_ids[finite])
    np.testing.assert_allclose(probs[finite], want_probs[finite], rtol=1e-5, atol=1e-9)  # float32 exp, float64 sum
    assert len(ids) == min(k, len(logits))
