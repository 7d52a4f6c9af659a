"""llama.cpp through edge_spade against an independent numpy forward pass of the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from edge_spade import Engine, EngineSettings
from edge_spade.hooks import Tap
from tests.support import tiny

PROMPTS = ["Question: is the sky blue?\nAnswer:", "the capital of france is", "water is wet (yes or no)"]
TOL = 1e-4  # f32 llama.cpp vs f64 numpy, logits of magnitude ~10


def close(got: np.ndarray, want: np.ndarray, tol: float = TOL) -> None:
    np.testing.assert_allclose(got, want, atol=tol * max(1.0, np.abs(want).max()), rtol=0)


@pytest.mark.parametrize("text", PROMPTS)
def test_full_logits_match_numpy(tiny_engine, tiny_model, text):
    tokens = tiny_engine.tokenize(text)
    close(tiny_engine.full(tokens, None).logits, tiny.full_logits(tiny_model[1], tokens))


@pytest.mark.parametrize("text", PROMPTS)
def test_spade_matches_numpy_at_every_layer(tiny_engine, tiny_model, text):
    tokens = tiny_engine.tokenize(text)
    for layer in range(tiny.N_LAYERS):
        want = tiny.spade_logits(tiny_model[1], tokens, layer)
        close(tiny_engine.spade(tokens, layer, None).logits, want)
        # The decision-set path (stop at result_norm, numpy rows) agrees with the vocabulary path.
        ids = np.array([5, 77, 300, 361])
        close(tiny_engine.spade(tokens, layer, ids).logits, want[ids])


@pytest.mark.parametrize("tail", [2, 3, 5])
def test_wide_tails_match_numpy(tiny_engine, tiny_model, tail):
    tokens = tiny_engine.tokenize(PROMPTS[0])
    for layer in (0, 1, 2):
        close(
            tiny_engine.spade(tokens, layer, None, tail=tail).logits,
            tiny.spade_logits(tiny_model[1], tokens, layer, tail),
        )


def test_tail_covering_the_prompt_is_the_full_model(tiny_engine, tiny_model):
    tokens = tiny_engine.tokenize(PROMPTS[1])
    full = tiny_engine.full(tokens, None).logits
    for layer in range(tiny.N_LAYERS):
        close(tiny_engine.spade(tokens, layer, None, tail=len(tokens)).logits, full)


def test_spade_at_last_layer_is_full(tiny_engine):
    tokens = tiny_engine.tokenize(PROMPTS[0])
    ids = np.arange(20)
    np.testing.assert_array_equal(
        tiny_engine.spade(tokens, tiny.N_LAYERS - 1, ids).logits, tiny_engine.full(tokens, ids).logits
    )


def test_logit_lens_is_numpy_head_of_captured_state(tiny_engine, tiny_model):
    tokens = tiny_engine.tokenize(PROMPTS[2])
    states = tiny.hidden_states(tiny_model[1], tokens)
    trace = tiny_engine.trace(tokens, None)
    for layer in range(tiny.N_LAYERS):
        close(trace.last[layer], states[layer][-1])
        want = tiny.head(tiny_model[1], states[layer][-1])
        close(tiny_engine.logit_lens(tokens, layer, None).logits, want)
        # ... and exactly the numpy head applied to the state the engine captured
        np.testing.assert_allclose(
            tiny_engine.logit_lens(tokens, layer, None).logits,
            tiny_engine.lens(trace.last[layer], None),
            rtol=0,
            atol=1e-5,
        )


def test_trace_gives_the_same_spade_as_direct_passes(tiny_engine):
    tokens = tiny_engine.tokenize(PROMPTS[0])
    ids = np.array([3, 4, 5, 6])
    trace = tiny_engine.trace(tokens, ids, tail=2)
    np.testing.assert_array_equal(trace.full.logits, tiny_engine.full(tokens, ids).logits)
    for layer in range(tiny.N_LAYERS - 1):
        rows_tokens = [tokens[r] for r in trace.tail_rows]
        np.testing.assert_allclose(
            tiny_engine.spade_tail(trace.states[layer], layer, ids, rows_tokens),
            tiny_engine.spade(tokens, layer, ids, tail=2).logits,
            rtol=0,
            atol=1e-5,
        )


def test_default_settings_stay_close(tiny_model):
    """The production settings (f16 KV, flash attention as llama.cpp picks) differ only by rounding."""
    with Engine(tiny_model[0], EngineSettings(n_ctx=256)) as engine:
        tokens = engine.tokenize(PROMPTS[0])
        close(engine.full(tokens, None).logits, tiny.full_logits(tiny_model[1], tokens), tol=5e-3)
        close(engine.spade(tokens, 1, None).logits, tiny.spade_logits(tiny_model[1], tokens, 1), tol=5e-3)


def test_stopped_passes_leave_nothing_behind(tiny_engine, tiny_model):
    """After stopped prompt passes and tails, answers equal a fresh engine's, bit for bit."""
    tokens = tiny_engine.tokenize(PROMPTS[1])
    for layer in range(tiny.N_LAYERS):
        tiny_engine.spade(tiny_engine.tokenize(PROMPTS[0]), layer, np.arange(4))
        tiny_engine.logit_lens(tiny_engine.tokenize(PROMPTS[2]), layer, None)
    used = [tiny_engine.full(tokens, None).logits, tiny_engine.spade(tokens, 1, None).logits]
    with Engine(tiny_model[0], tiny_engine.settings) as fresh:
        np.testing.assert_array_equal(used[0], fresh.full(tokens, None).logits)
        np.testing.assert_array_equal(used[1], fresh.spade(tokens, 1, None).logits)


def test_exception_inside_callback_surfaces(tiny_engine):
    tokens = tiny_engine.tokenize(PROMPTS[0])
    bad = np.zeros((2, tiny.N_EMBD + 1), np.float32)  # wrong width: raises inside the callback
    with pytest.raises(ValueError, match="cannot write rows"):
        tiny_engine.hooks.run(
            {"l_out-1": Tap(write=bad)},
            lambda: tiny_engine._ll.llama_decode(tiny_engine._main.ctx, tiny_engine._main.batch),
        )
    # The engine stays usable and exact afterwards.
    want = tiny_engine.full(tokens, None).logits
    with Engine(tiny_engine.path, tiny_engine.settings) as fresh:
        np.testing.assert_array_equal(want, fresh.full(tokens, None).logits)


def test_exception_from_a_read_surfaces_through_the_engine(tiny_engine, monkeypatch):
    def broken(*args):
        raise RuntimeError("boom inside the callback")

    monkeypatch.setattr(tiny_engine.hooks, "_handle", broken)
    with pytest.raises(RuntimeError, match="boom inside the callback"):
        tiny_engine.spade(tiny_engine.tokenize(PROMPTS[0]), 1, None)


@pytest.mark.parametrize("chunk", [64, 445, 4096])
def test_logit_lens_over_the_vocabulary_matches_numpy_in_any_block_size(tiny_engine, tiny_model, monkeypatch, chunk):
    """The whole-vocabulary logit lens streams the output matrix in blocks of rows (no float32 copy
    of it is kept): any block size, a last block cut short included, gives the same logits."""
    monkeypatch.setattr(type(tiny_engine.head), "CHUNK_ROWS", chunk)
    tokens = tiny_engine.tokenize(PROMPTS[1])
    hidden = tiny.hidden_states(tiny_model[1], tokens)
    for layer in range(tiny.N_LAYERS):
        want = tiny.head(tiny_model[1], hidden[layer][-1])
        close(tiny_engine.logit_lens(tokens, layer, None).logits, want)
