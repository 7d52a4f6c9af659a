"""SPADE-EXIT on the tiny model, with identity heads (U = 0: the head is the logit lens)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tiny

from edge_spade.heads import LayerHead, OnnxHeads, entropy, export_onnx
from edge_spade.policy import ExitPolicy, spade_exit
from edge_spade.prompts import build_prompt

LAYERS = (0, 1, 2)


@pytest.fixture(scope="module")
def identity_heads(tiny_engine):
    heads = [LayerHead.identity(tiny.N_EMBD, 4, seed=i) for i in LAYERS]
    return OnnxHeads(export_onnx(heads, tiny_engine.head.norm_weight, tiny_engine.index.rms_eps, np.float32))


@pytest.fixture(scope="module")
def prompt(tiny_engine):
    return build_prompt(tiny_engine, "which is blue?", ["sky", "water", "paris"])


def policy(threshold: float) -> ExitPolicy:
    return ExitPolicy(threshold, LAYERS, {layer: i for i, layer in enumerate(LAYERS)})


def test_negative_threshold_is_the_full_model_exactly(tiny_engine, identity_heads, prompt):
    readout, seen = spade_exit(tiny_engine, identity_heads, policy(-1.0), prompt)
    np.testing.assert_array_equal(readout.logits, tiny_engine.full(prompt.tokens, prompt.ids).logits)
    assert readout.layer == tiny.N_LAYERS - 1 and seen.entropies == {}


def test_infinite_threshold_exits_at_the_first_layer_with_spade(tiny_engine, identity_heads, prompt):
    readout, seen = spade_exit(tiny_engine, identity_heads, policy(math.inf), prompt)
    assert readout.layer == LAYERS[0] and list(seen.entropies) == [LAYERS[0]]
    np.testing.assert_array_equal(readout.logits, tiny_engine.spade(prompt.tokens, LAYERS[0], prompt.ids).logits)


def test_exit_at_the_first_layer_under_the_threshold(tiny_engine, identity_heads, prompt):
    trace = tiny_engine.trace(prompt.tokens, prompt.ids)
    want = {layer: entropy(prompt.choice_logits(tiny_engine.lens(trace.last[layer], prompt.ids))) for layer in LAYERS}
    threshold = sorted(want.values())[0] + 1e-6  # only the most confident layer qualifies
    readout, seen = spade_exit(tiny_engine, identity_heads, policy(threshold), prompt)
    expected = next(layer for layer in LAYERS if want[layer] <= threshold)
    assert readout.layer == expected
    for layer, h in seen.entropies.items():
        assert h == pytest.approx(want[layer], abs=1e-4)
    np.testing.assert_array_equal(readout.logits, tiny_engine.spade(prompt.tokens, expected, prompt.ids).logits)


def test_never_exiting_hooks_still_give_the_full_answer(tiny_engine, identity_heads, prompt):
    readout, seen = spade_exit(tiny_engine, identity_heads, policy(1e-12), prompt)
    assert readout.layer == tiny.N_LAYERS - 1 and sorted(seen.entropies) == list(LAYERS)
    np.testing.assert_array_equal(readout.logits, tiny_engine.full(prompt.tokens, prompt.ids).logits)


def test_lens_baseline_answers_from_its_own_head(tiny_engine, identity_heads, prompt):
    readout, _ = spade_exit(tiny_engine, identity_heads, policy(math.inf), prompt, answer_from="head")
    assert readout.layer == LAYERS[0] and readout.tail_ms == 0.0
    want = tiny_engine.logit_lens(prompt.tokens, LAYERS[0], prompt.ids).logits
    np.testing.assert_allclose(readout.logits, want, atol=1e-4 * np.abs(want).max())
