"""The two real models from their PyPI packages: known answers, and SPADE's shape over depth."""

from __future__ import annotations

import numpy as np
import pytest

# Our own cloze prompts (not the shared benchmark data, which users do not have).
CLOZE = [
    "The capital of Japan is",
    "The capital of Italy is",
    "The capital of Germany is",
    "The capital of Canada is",
    "Two plus two equals",
    "Monday, Tuesday,",
    "one, two, three, four,",
    "The opposite of hot is",
    "The opposite of up is",
    "The opposite of black is",
    "The plural of mouse is",
    "The sun rises in the",
    "Water freezes at zero degrees",
    "The largest planet in our solar system is",
    "Romeo and Juliet was written by William",
    "The Eiffel Tower is in the city of",
]


@pytest.mark.parametrize(
    "fixture, prompt, expected",
    [
        ("gemma", "The capital of Japan is", " Tokyo"),
        ("gemma", "The opposite of hot is", " cold"),
        ("gemma", "Romeo and Juliet was written by William", " Shakespeare"),
        ("smollm", "The capital of Italy is", " Rome"),
        ("smollm", "The plural of mouse is", " mice"),
        ("smollm", "The opposite of up is", " down"),
    ],
)
def test_known_free_answers(request, fixture, prompt, expected):
    rt = request.getfixturevalue(fixture)
    first, second = rt.ask(prompt, full=True), rt.ask(prompt, full=True)
    assert first.answer == expected
    assert first.mode == "full" and first.layer == rt.n_layers - 1 and first.choice_index is None
    assert first.probs == second.probs and first.token == second.token  # deterministic


@pytest.mark.parametrize("fixture", ["gemma", "smollm"])
def test_choice_answers_are_deterministic_and_normalised(request, fixture):
    rt = request.getfixturevalue(fixture)
    q, choices = "Which gas do plants absorb from the air?", ["oxygen", "carbon dioxide", "helium"]
    a, b = rt.ask(q, choices, full=True), rt.ask(q, choices, full=True)
    assert a.probs == b.probs and a.answer == b.answer
    assert abs(sum(a.probs.values()) - 1) < 1e-9 and a.answer == choices[a.choice_index]
    yes = rt.ask("Is the sky blue?", ["yes", "no"], full=True)
    assert yes.label == yes.answer and set(yes.probs) == {"yes", "no"}


def test_gemma_says_yes_to_the_sky(gemma):
    a = gemma.ask("Is the sky blue?", ["yes", "no"], full=True)
    assert a.answer == "yes" and a.probs["yes"] > 0.6


@pytest.mark.parametrize("fixture", ["gemma", "smollm"])
def test_spade_and_lens_at_last_layer_equal_full(request, fixture):
    rt = request.getfixturevalue(fixture)
    prompt = rt.prompt("Which planet is known as the red planet?", ["Venus", "Mars", "Jupiter", "Saturn"])
    full = rt.engine.full(prompt.tokens, prompt.ids).logits
    last = rt.n_layers - 1
    np.testing.assert_array_equal(rt.engine.spade(prompt.tokens, last, prompt.ids).logits, full)
    np.testing.assert_allclose(rt.engine.logit_lens(prompt.tokens, last, prompt.ids).logits, full, atol=1e-3)


@pytest.mark.parametrize("fixture", ["gemma", "smollm"])
def test_spade_agreement_rises_with_depth_and_beats_logit_lens(request, fixture):
    rt = request.getfixturevalue(fixture)
    engine = rt.engine
    L = engine.n_layers
    layers = sorted({round(x) for x in np.linspace(0, L - 2, 7)})
    spade = {layer: 0 for layer in layers}
    lens = {layer: 0 for layer in layers}
    for text in CLOZE:
        tokens = engine.tokenize(text)
        trace = engine.trace(tokens, None)
        full = int(np.argmax(trace.full.logits))
        tail_tokens = [tokens[r] for r in trace.tail_rows]
        for layer in layers:
            spade[layer] += int(np.argmax(engine.spade_tail(trace.states[layer], layer, None, tail_tokens))) == full
            lens[layer] += int(np.argmax(engine.lens(trace.last[layer], None))) == full
    n = len(CLOZE)
    agree = [spade[layer] / n for layer in layers]
    lens_agree = [lens[layer] / n for layer in layers]
    early, mid, late = np.array_split(np.arange(len(layers)), 3)
    assert np.mean([agree[i] for i in late]) > np.mean([agree[i] for i in early]) + 0.3, agree
    assert agree[-1] >= 0.75, agree  # one layer before the end SPADE almost always agrees
    assert sum(agree[i] for i in mid) > sum(lens_agree[i] for i in mid), (agree, lens_agree)


@pytest.mark.parametrize("fixture", ["gemma", "smollm"])
def test_shipped_heads_fit_and_stay_small(request, fixture):
    rt = request.getfixturevalue(fixture)
    assert set(rt.heads) == {"choice", "free"}  # loading checked the fingerprint and file hashes
    # models/ ships what the runtime loads: the manifest and the L-SPADE heads, no baselines or curves
    shipped = {p.name for p in rt.heads_dir.iterdir()}
    files = {head_set.file for head_set in rt.manifest.sets.values()}
    gates = {head_set.domain["file"] for head_set in rt.manifest.sets.values() if head_set.domain}
    assert shipped == {"heads.json"} | files | gates and set(rt.manifest.hashes) == files | gates
    size = sum(p.stat().st_size for p in rt.heads_dir.iterdir())  # budget: about 10 MB per model
    assert size < 10 * 2**20, f"heads of {rt.name} take {size / 2**20:.1f} MiB"


@pytest.mark.parametrize("fixture", ["gemma", "smollm"])
@pytest.mark.parametrize(
    "question, choices",
    [
        ("Which gas do plants absorb from the air?", ["oxygen", "carbon dioxide", "helium"]),
        ("Is water wet?", ["yes", "no"]),
        ("The capital of Italy is", None),
    ],
)
def test_spade_exit_extremes(request, fixture, question, choices):
    rt = request.getfixturevalue(fixture)
    full = rt.ask(question, choices, full=True)
    never = rt.ask(question, choices, threshold=-1.0)
    assert never.mode == "spade-exit" and never.exit_layer is None and never.probs == full.probs
    head_set = rt.manifest.sets["free" if choices is None else "choice"]
    first = rt.ask(question, choices, threshold=float("inf"))
    layer = (head_set.probe_layers if head_set.signal == "spade" else head_set.eval_layers)[0]  # the default rule's
    gate = rt.heads["free" if choices is None else "choice"].domain.get(layer) if head_set.signal != "spade" else None
    prompt = rt.prompt(question, choices)
    if gate is not None and not gate.admits(rt.engine.last_rows(prompt.tokens, [layer])[0]):
        # outside the heads' calibration domain (edge_spade/domain.py): the head does not decide
        assert first.outside_domain == [layer] and first.exit_layer != layer and layer not in first.entropy
        return
    assert first.exit_layer == layer and list(first.entropy) == [layer] and first.outside_domain is None
    spade = rt.ask(question, choices, layer=first.exit_layer, tail=head_set.tail)
    assert first.probs == spade.probs and first.tail == head_set.tail
