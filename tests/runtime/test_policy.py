"""SPADE-EXIT on the tiny model, with identity heads (U = 0: the head is the logit lens)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_spade.convert.heads_train import LayerHead
from edge_spade.convert.onnx_export import export_onnx
from edge_spade.heads import OnnxHeads, entropy, topk_entropy
from edge_spade.policy import ExitPolicy, spade_exit
from edge_spade.prompts import build_prompt
from tests.support import tiny

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


# -- SPADE probes: the tail itself judges, on the side context, inside the prompt pass ---------------


def probe(threshold: float, layers=(1, 2)) -> ExitPolicy:
    return ExitPolicy(threshold, tuple(layers), {}, top_k=8, signal="spade")


def test_side_context_tails_equal_main_context_tails(tiny_engine, prompt):
    trace = tiny_engine.trace(prompt.tokens, None, tail=3)
    tokens = [prompt.tokens[r] for r in trace.tail_rows]
    for layer in (0, 2):
        np.testing.assert_array_equal(
            tiny_engine.spade_tail(trace.states[layer], layer, None, tokens, side=True),
            tiny_engine.spade_tail(trace.states[layer], layer, None, tokens),
        )


@pytest.mark.parametrize("kind", ["choice", "free"])
def test_probe_exits_answer_with_spade_k_at_the_probe_layer(tiny_engine, prompt, kind, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))  # probes write tail models of this temporary model
    p = prompt if kind == "choice" else build_prompt(tiny_engine, "the capital of france is", None)
    spade = {layer: tiny_engine.spade(p.tokens, layer, p.ids, tail=3).logits for layer in (1, 2)}
    judged = {
        layer: entropy(p.choice_logits(lg)) if p.ids is not None else topk_entropy(lg, 8) for layer, lg in spade.items()
    }
    # infinite: the first probe; between the two entropies: the more confident layer; negative: full depth
    readout, seen = spade_exit(tiny_engine, None, probe(math.inf), p, tail=3)
    assert readout.layer == 1 and list(seen.entropies) == [1]
    np.testing.assert_array_equal(readout.logits, spade[1])
    confident = min(judged, key=judged.get)
    readout, seen = spade_exit(tiny_engine, None, probe(judged[confident] + 1e-6), p, tail=3)
    assert readout.layer == confident
    np.testing.assert_array_equal(readout.logits, spade[confident])
    assert seen.entropies[confident] == pytest.approx(judged[confident], abs=1e-5)
    readout, seen = spade_exit(tiny_engine, None, probe(-1.0), p, tail=3)
    np.testing.assert_array_equal(readout.logits, tiny_engine.full(p.tokens, p.ids).logits)
    readout, seen = spade_exit(tiny_engine, None, probe(1e-12), p, tail=3)  # probes run, nothing exits
    assert sorted(seen.entropies) == [1, 2] and readout.layer == tiny.N_LAYERS - 1
    np.testing.assert_array_equal(readout.logits, tiny_engine.full(p.tokens, p.ids).logits)


def test_screened_probes_answer_as_unscreened_ones_and_only_ever_exit_less(tiny_engine, tmp_path, monkeypatch):
    """A free-answer probe screened with candidates' logits: with every token a candidate, the same
    exit and logits; with candidates whose entropy is over the threshold while the vocabulary's is
    under it, no exit (the full answer) where the unscreened probe exits."""
    from dataclasses import replace

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    p = build_prompt(tiny_engine, "the capital of france is", None)
    spade = tiny_engine.spade(p.tokens, 1, None, tail=3).logits
    full_ent = topk_entropy(spade, 8)
    every = replace(probe(full_ent + 1e-6, (1,)), candidates=tuple(range(tiny_engine.n_vocab)), screen_probes=True)
    plain, _ = spade_exit(tiny_engine, None, replace(every, screen_probes=False), p, tail=3)
    screened, seen = spade_exit(tiny_engine, None, every, p, tail=3)
    assert plain.layer == screened.layer == 1 and seen.entropies[1] == pytest.approx(full_ent, abs=1e-5)
    np.testing.assert_array_equal(screened.logits, plain.logits)
    np.testing.assert_array_equal(screened.logits, spade)
    middle = np.argsort(spade)[len(spade) // 2 - 4 : len(spade) // 2 + 4]  # close logits: a flat top 8
    assert topk_entropy(spade[middle], 8) > full_ent + 1e-3
    blocked, seen = spade_exit(tiny_engine, None, replace(every, candidates=tuple(int(i) for i in middle)), p, tail=3)
    assert blocked.layer == tiny.N_LAYERS - 1 and seen.entropies == {}
    np.testing.assert_array_equal(blocked.logits, tiny_engine.full(p.tokens, None).logits)


# -- a cascade: L-SPADE checks first, then a SPADE probe for what they did not let exit --------------


def cascade(head_tau: float, probe_tau: float) -> ExitPolicy:
    return ExitPolicy(head_tau, (0,), {0: 0}, top_k=8, signal="cascade", probe_layers=(2,), probe_threshold=probe_tau)


@pytest.mark.parametrize("kind", ["choice", "free"])
def test_cascade_exits_at_the_head_or_the_probe_with_spade_there(
    tiny_engine, identity_heads, prompt, kind, tmp_path, monkeypatch
):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    p = prompt if kind == "choice" else build_prompt(tiny_engine, "the capital of france is", None)
    spade = {layer: tiny_engine.spade(p.tokens, layer, p.ids, tail=3).logits for layer in (0, 2)}
    # a confident head: SPADE from its layer, the probe never runs
    readout, seen = spade_exit(tiny_engine, identity_heads, cascade(math.inf, math.inf), p, tail=3)
    assert readout.layer == 0 and list(seen.entropies) == [0]
    np.testing.assert_array_equal(readout.logits, spade[0])
    # an undecided head, a confident probe: the probe's own tail is the answer
    readout, seen = spade_exit(tiny_engine, identity_heads, cascade(1e-12, math.inf), p, tail=3)
    assert readout.layer == 2 and sorted(seen.entropies) == [0, 2]
    np.testing.assert_array_equal(readout.logits, spade[2])
    want = entropy(p.choice_logits(spade[2])) if p.ids is not None else topk_entropy(spade[2], 8)
    assert seen.entropies[2] == pytest.approx(want, abs=1e-5)
    # neither: the full answer, after both checks; no head stage: only the probe runs
    readout, seen = spade_exit(tiny_engine, identity_heads, cascade(1e-12, 1e-12), p, tail=3)
    assert readout.layer == tiny.N_LAYERS - 1 and sorted(seen.entropies) == [0, 2]
    np.testing.assert_array_equal(readout.logits, tiny_engine.full(p.tokens, p.ids).logits)
    readout, seen = spade_exit(tiny_engine, identity_heads, cascade(-1.0, math.inf), p, tail=3)
    assert readout.layer == 2 and list(seen.entropies) == [2]
    readout, seen = spade_exit(tiny_engine, identity_heads, cascade(-1.0, -1.0).never(), p, tail=3)
    assert seen.entropies == {} and readout.layer == tiny.N_LAYERS - 1
    assert not cascade(-1.0, -1.0).exits and cascade(-1.0, 0.5).exits


def test_a_cascade_probes_after_its_heads():
    with pytest.raises(ValueError, match="after its heads"):
        ExitPolicy(1.0, (2,), {2: 0}, signal="cascade", probe_layers=(1,), probe_threshold=1.0)


def test_a_cascade_by_the_gates_verdict_runs_the_probes_of_the_prompts_side(
    tiny_engine, identity_heads, tmp_path, monkeypatch
):
    """Admitted by the heads' domain gate at the head layer, a prompt runs the inside probe; kept out, the
    shared one. A head under a negative threshold only takes the verdict: it never decides."""
    from dataclasses import replace

    from edge_spade.domain import DomainGate

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    p = build_prompt(tiny_engine, "the capital of france is", None)
    spade = {layer: tiny_engine.spade(p.tokens, layer, None, tail=3).logits for layer in (1, 2)}
    rule = ExitPolicy(
        -1.0, (0,), {0: 0}, top_k=8, signal="cascade", probe_layers=(2,), probe_threshold=math.inf,
        inside_probe_layers=(1,), inside_probe_threshold=math.inf,
    )  # fmt: skip
    assert rule.by_gate and rule.exits and rule.probes_for(True) == ((1,), math.inf)
    assert rule.probes_for(False) == ((2,), math.inf) and not rule.never().exits and not rule.heads_only().exits
    assert rule.with_own({"inside_probe_threshold": 0.5}).probes_for(True) == ((1,), 0.5)
    d = tiny.N_EMBD
    heads = OnnxHeads(identity_heads._data)
    for admitted, layer in ((True, 1), (False, 2)):  # a gate at distance 0 from everything: admits at threshold >= 0
        heads.domain = {0: DomainGate(np.zeros(d), np.zeros((1, d)), np.ones(1), 0.0, 0.0 if admitted else -1.0)}
        readout, seen = spade_exit(tiny_engine, heads, rule, p, tail=3)
        assert readout.layer == layer and seen.outside == ([] if admitted else [0]) and list(seen.entropies) == [layer]
        np.testing.assert_array_equal(readout.logits, spade[layer])
        # that side's probe unsure: the full answer, the other side's probe never ran
        unsure = replace(rule, **{"inside_probe_threshold" if admitted else "probe_threshold": 1e-12})
        readout, seen = spade_exit(tiny_engine, heads, unsure, p, tail=3)
        assert readout.layer == tiny.N_LAYERS - 1 and list(seen.entropies) == [layer]
        np.testing.assert_array_equal(readout.logits, tiny_engine.full(p.tokens, None).logits)
    with pytest.raises(ValueError, match="after its heads"):
        replace(rule, inside_probe_layers=(0,))
