"""The cascade's choice and certificate on synthetic signals (numpy only: no model, no timing)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_spade.convert.cascade import (
    CostModel,
    Gathered,
    Signals,
    better,
    cascade_plans,
    cascade_rule,
    certify,
    choose,
    choose_by_gate,
    merge_plans,
    outcome,
)
from edge_spade.manifest import HeadSet
from edge_spade.policy import ExitPolicy

L = 18
HEADS = [1]
PROBES = [4, 8]


def model() -> CostModel:
    return CostModel(10.0, 2.0, 2.0, 30.0, {4: 25.0, 8: 20.0}, 35.0, 40.0, L)


def signals(n: int, seed: int = 0, n_tokens: int = 80) -> list[Signals]:
    """A third of the prompts sure at the head (SPADE there agrees), a third sure only at layer 8
    (SPADE at 1 and 4 wrong), a third unsure everywhere and wrong before full depth."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 3
        full = 100 + i
        wrong = 7
        head_ent = np.array([0.1 if kind == 0 else 3.0 + rng.random()])
        answers = np.array([full if kind == 0 else wrong, full if kind == 0 else wrong, full if kind < 2 else wrong])
        ent = np.array([0.2 if kind == 0 else 3.0, 2.5 + rng.random(), 0.3 if kind < 2 else 2.9 + rng.random()])
        out.append(Signals(f"fact{i}", n_tokens, head_ent, answers, ent, full))
    return out


def test_the_cost_of_each_outcome():
    m = model()
    n = np.array([50, 50, 50])  # a full pass: 110 ms
    cost = m.cost(np.array([0, 1, -1]), n, HEADS, [8])
    assert cost == pytest.approx([2 / L * 110 + 2 + 30, 9 / L * 110 + 2 + 20, 110 + 2 + 20])
    whole = m.cost(np.array([-1]), n[:1], HEADS, [8], whole=True)  # one question: a context, the whole-model tail
    assert whole == pytest.approx([40 + 110 + 2 + 35])
    assert m.cost(np.array([-1]), n[:1], HEADS, ()) == pytest.approx([112.0])  # no probe: only the check
    loads = CostModel(10.0, 2.0, 2.0, 30.0, {4: 25.0, 8: 20.0}, 35.0, 40.0, L, heads_load_ms=50.0)
    assert loads.cost(np.array([-1]), n[:1], HEADS, [8], whole=True) == pytest.approx([50 + 40 + 110 + 2 + 35])
    # no head stage: neither its checks nor onnxruntime are paid for; a resident process pays neither load
    assert loads.cost(np.array([-1]), n[:1], HEADS, [8], whole=True, checked=False) == pytest.approx([40 + 110 + 35])
    assert loads.cost(np.array([-1]), n[:1], HEADS, [8]) == pytest.approx([110 + 2 + 20])
    # two probes: one exiting at 8 has paid for the one at 4 (less what screening saves it), none pays both
    screened = CostModel(10.0, 2.0, 2.0, 30.0, {4: 25.0, 8: 20.0}, 35.0, 40.0, L, screen_ms=5.0)
    two = screened.cost(np.array([1, 2, -1]), n, HEADS, [4, 8])
    assert two == pytest.approx([5 / L * 110 + 2 + 25, 9 / L * 110 + 2 + 20 + 20, 110 + 2 + 20 + 15])
    # a screen timed as saving more than a probe's tail (a busy machine) saves the tail, no more
    noisy = CostModel(10.0, 2.0, 2.0, 30.0, {4: 25.0, 8: 20.0}, 35.0, 40.0, L, screen_ms=60.0)
    assert noisy.cost(np.array([-1]), n[:1], HEADS, [4, 8]) == pytest.approx([110 + 2])


def test_outcome_takes_the_head_first_then_the_probe():
    s = signals(6)
    stage, ok = outcome(s, 1, [1 + PROBES.index(8)], 1.0, 1.0)
    assert list(stage) == [0, 1, -1] * 2 and ok.all()
    stage, ok = outcome(s, 1, [1 + PROBES.index(4)], 1.0, 5.0)  # the probe at 4 exits everything left, wrongly
    assert list(stage) == [0, 1, 1] * 2 and list(ok) == [True, False, False] * 2
    stage, ok = outcome(s, 1, [1, 2], 1.0, 1.0)  # two probes, one threshold: the one at 8 takes what 4 leaves
    assert list(stage) == [0, 2, -1] * 2 and ok.all()
    stage, ok = outcome(s, 1, [1, 2], 1.0, 5.0)  # ...unless the one at 4 exits first
    assert list(stage) == [0, 1, 1] * 2 and list(ok) == [True, False, False] * 2


def test_the_choice_exits_the_sure_prompts_and_keeps_agreement():
    train = signals(300)
    rule = choose(train, HEADS, PROBES, model(), target=0.95, confidence=0.95, objective="total")
    assert rule["probe_layers"] == [8] and 0.1 <= rule["threshold"] < 3.0 and 0.3 <= rule["probe_threshold"] < 2.9
    stage, ok = outcome(train, 1, [2], rule["threshold"], rule["probe_threshold"])
    assert ok.all() and (stage >= 0).mean() == pytest.approx(2 / 3)
    full = 10 + 2 * 80
    mean = ((2 / L * full + 2 + 30) + (9 / L * full + 2 + 20) + (full + 2 + 20)) / 3
    assert rule["train_speedup_total"] == pytest.approx(full / mean, abs=1e-4)
    # allowed two probes, it keeps one: the probe at 4 never lets a prompt exit rightly, only costs
    assert choose(train, HEADS, PROBES, model(), 0.95, 0.95, "total", max_probes=2)["probe_layers"] == [8]
    # held to the probe at 4 (the exit frontier's `chosen`), the choice keeps its agreement and gains less
    at_4 = choose(train, HEADS, PROBES, model(), 0.95, 0.95, "total", combos=[(4,)])
    assert at_4["probe_layers"] in ([4], []) and at_4["train_speedup_total"] < rule["train_speedup_total"]
    cols = [1 + PROBES.index(p) for p in at_4["probe_layers"]]
    assert outcome(train, 1, cols, at_4["threshold"], at_4["probe_threshold"])[1].mean() >= 0.95


def test_two_probes_are_chosen_where_each_takes_its_own_prompts():
    """Half the prompts sure at 8 are sure (and right) at 4 already, where a probe is cheap: two probes
    beat either alone."""
    train = signals(400)
    for s in train[1::3][::2]:
        s.spade_answer, s.spade_ent = np.full(3, s.full), np.array([3.0, 0.3, 0.3])
    cheap = CostModel(10.0, 2.0, 2.0, 30.0, {4: 5.0, 8: 20.0}, 35.0, 40.0, L)
    one = choose(train, HEADS, PROBES, cheap, 0.95, 0.95, "total")
    two = choose(train, HEADS, PROBES, cheap, 0.95, 0.95, "total", max_probes=2)
    assert two["probe_layers"] == [4, 8] and two["train_speedup_total"] > one["train_speedup_total"]
    stage, ok = outcome(train, 1, [1, 2], two["threshold"], two["probe_threshold"])
    sure_at_4 = stage[1::3][::2]
    assert set(sure_at_4) <= {0, 1} and (sure_at_4 == 1).mean() > 0.5 and ok.mean() >= 0.95  # they leave by 4


def test_the_robust_objective_keeps_off_the_edge_of_half():
    """52% of the prompts are sure (and right) at the cheap probe at 4, 75% at 8: the median objective takes
    the probe at 4, whose median rests on 2% of the prompts; the robust one (the 40th percentile) the
    probe at 8, which more than 60% of them leave."""
    train = []
    for i in range(600):
        kind = 0 if i % 100 < 52 else 1 if i % 100 < 75 else 2
        answers = np.array([7, 100 + i if kind == 0 else 7, 100 + i if kind < 2 else 7])
        ent = np.array([3.0, 0.3 if kind == 0 else 3.0, 0.3 if kind < 2 else 3.0])
        train.append(Signals(f"fact{i}", 80, np.array([3.0 + (i % 7) / 10]), answers, ent, 100 + i))
    cheap = CostModel(10.0, 2.0, 2.0, 30.0, {4: 5.0, 8: 20.0}, 35.0, 40.0, L)
    median = choose(train, HEADS, PROBES, cheap, 0.95, 0.95, "median", max_probes=2)
    robust = choose(train, HEADS, PROBES, cheap, 0.95, 0.95, "robust", max_probes=2)
    assert 4 in median["probe_layers"] and robust["probe_layers"] == [8]
    assert robust["train_speedup_median"] < median["train_speedup_median"]
    assert better("robust", {"robust": 1.3, "total": 1.0}, {"robust": 1.2, "total": 1.5})
    assert not better("total", {"robust": 1.3, "total": 1.0}, {"robust": 1.2, "total": 1.5})
    assert not better("median", {"median": 1.9, "total": 1.0}, {"median": 1.0, "total": 1.5})  # by the total


def test_each_side_of_the_gate_gets_its_own_probe():
    """Inside the heads' domain gate, the prompts sure at 8 are sure and right at the cheaper 4 already;
    outside it (the same facts in other formats) SPADE at 4 is sure and wrong. One rule for both must keep
    to 8; a rule per side probes at 4 inside and 8 outside, each side's thresholds certified on its own
    held-out prompts, and the merged plans carry both."""
    cheap = CostModel(10.0, 2.0, 2.0, 30.0, {4: 5.0, 8: 20.0}, 35.0, 40.0, L)

    def prompts(seed: int) -> list[Signals]:
        inside, outside = signals(300, seed), signals(300, seed + 10)
        for s in inside[1::3]:
            s.spade_answer, s.spade_ent = np.full(3, s.full), np.array([3.0, 0.3, 0.3])
        for s in outside:
            s.head_ent = np.array([np.inf])  # what gate_heads gives a prompt the gate keeps out
        for s in outside[1::3]:
            s.spade_ent = np.array([3.0, 0.3, 0.3])  # sure at 4 (and wrong there), sure and right at 8
        return inside + outside

    train, held = prompts(0), prompts(1)
    g = Gathered(train, held, HEADS, PROBES, cheap, True, 0, 0, 0.0, 0.0, None, None)
    sides = choose_by_gate(g, 0.95, 0.95, "total", True, 0, 2, 32)
    assert sides[True].rule["probe_layers"] == [4] and sides[False].rule["probe_layers"] == [8]
    assert sides[False].rule["threshold"] == -1.0  # outside the gate the heads never decide
    one = choose(train, HEADS, PROBES, cheap, 0.95, 0.95, "total", max_probes=2)
    assert one["probe_layers"] == [8]
    plans = {p["max_tokens"]: p for p in merge_plans(sides[True], sides[False])}
    assert not plans[32]["measured"] and not plans[32]["check"]
    at = plans[128]  # the prompts' 80 tokens
    assert at["check"] and 0.1 <= at["threshold"] < 3.0
    assert at["inside_probe_threshold"] < 2.5 and at["probe_threshold"] < 2.9  # under the unsure prompts'
    assert at["inside"]["exit_share"] > 0.3 and at["outside"]["exit_share"] > 0.3
    # what heads.json gets, and the rule the runtime makes of it: the side's probes by the gate's verdict
    overall = {**sides[False].overall, "threshold": sides[True].overall["threshold"]}
    entry = cascade_rule(HEADS, overall, sides[False].rule["probe_layers"], sides)
    head_set = HeadSet("free", "heads.onnx", HEADS, HEADS, 1.0, signal="cascade", cascade=entry, top_k=8)
    policy = ExitPolicy.from_head_set(head_set).with_own({k: at[k] for k in ("threshold", "inside_probe_threshold")})
    assert policy.by_gate and policy.probes_for(True) == ((4,), at["inside_probe_threshold"])
    assert policy.probes_for(False) == ((8,), entry["probe_threshold"]) and entry["inside"]["probe_threshold"] >= 0
    for x, cols, tau in ((sides[True], [1], at["inside_probe_threshold"]), (sides[False], [2], at["probe_threshold"])):
        stage, ok = outcome(x.held, 1, cols, at["threshold"] if x is sides[True] else -1.0, tau)
        assert ok.mean() >= 0.95 and (stage >= 0).mean() > 0.3  # each side's thresholds keep its agreement


def test_prompts_outside_the_heads_domain_never_exit_at_a_head():
    """An infinite head entropy (what gate_heads gives a prompt outside the gate) is never a threshold and
    never exits there: those prompts go on to the probe."""
    train = signals(300)
    for s in train[::3]:  # the prompts sure at the head, but outside its domain
        s.head_ent = np.array([np.inf])
    rule = choose(train, HEADS, PROBES, model(), target=0.95, confidence=0.95, objective="total")
    assert np.isfinite(rule["threshold"]) and rule["probe_layers"] == [8]
    stage, ok = outcome(train, 1, [2], rule["threshold"], rule["probe_threshold"])
    assert (stage[::3] == 1).all() and ok[::3].all()  # the probe at 8 takes them, and agrees


def test_the_certificate_scales_back_and_the_plans_follow_length():
    rule = {"probe_layers": [8], "threshold": 3.5, "probe_threshold": 2.95}  # too loose: wrong exits
    held = signals(150, seed=1, n_tokens=50) + signals(150, seed=2, n_tokens=100)
    taus = certify(held, HEADS, [2], rule, 0.95, 0.95, by_key=True)
    assert taus is not None and taus[0] < 3.0 and taus[1] < 2.9  # scaled under the unsure prompts' entropies
    overall, plans = cascade_plans(held, HEADS, [2], [8], rule, model(), 0.95, 0.95, min_tokens=32)
    by_end = {p["max_tokens"]: p for p in plans}
    assert not by_end[16]["check"] and not by_end[32]["measured"]  # not measured: no checks
    assert by_end[64]["heldout_prompts"] == 150 and by_end[64]["check"] and by_end[64]["exit_share"] == 0.667
    assert by_end[256]["heldout_prompts"] is None and "threshold" not in by_end[256]  # the set's own apply
    assert overall["threshold"] == taus[0]
    wrong = [Signals(s.key, s.n_tokens, s.head_ent, np.full(3, 7), s.spade_ent, s.full) for s in held]
    assert certify(wrong, HEADS, [2], rule, 0.95, 0.95, by_key=True) is None  # no exit ever agrees


def tiny_cascade(tiny_model, heads: Path, tmp_path: Path, data: Path, **options) -> dict:
    """add_cascade on the tiny model: the head at layer 1, a probe at layer 2, every prompt measured."""
    from edge_spade.convert.cascade import add_cascade

    return add_cascade(
        str(tiny_model[0]),
        heads,
        tmp_path / "report",
        data=str(data),
        holdout=0.3,
        probe_layers=[2],
        min_tokens=0,
        **options,
    )


def test_a_cascade_added_to_calibrated_heads_end_to_end(tiny_heads, tiny_model, tmp_path, monkeypatch):
    """On the tiny model's calibrated heads and their own prompts (as an `ask --file` JSONL): the
    split matches the calibration's, the cascade is written beside the heads, and the runtime runs
    it; the ONNX files are untouched."""
    import hashlib
    import json
    import shutil

    from edge_spade import load_model
    from tests.support.heads import free_items

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    heads = tmp_path / "heads"
    shutil.copytree(tiny_heads, heads)
    before = json.loads((heads / "heads.json").read_text())
    free = before["sets"]["free"]
    assert free["threshold"] >= 0 and free["signal"] == "lspade"
    free["eval_layers"] = [1]  # the head at layer 1, so that a probe can follow at layer 2
    (heads / "heads.json").write_text(json.dumps(before))
    calibrated_gate = (heads / "domain-free.npz").read_bytes()  # calibrate's own gate, which the cascade refits

    def others(manifest: dict) -> dict:  # every file but the free set's gate
        return {name: h for name, h in manifest["hashes"].items() if name != "domain-free.npz"}

    data = tmp_path / "free.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "question": i.question}) + "\n" for i in free_items()))
    record = tiny_cascade(tiny_model, heads, tmp_path, data)
    after = json.loads((heads / "heads.json").read_text())
    assert record["n_holdout"] == after["sets"]["free"]["calibration"]["n_holdout"]  # the calibration's split
    assert record["measured_prompts"] == len(free_items())
    assert record["traced_now"] == len({i.question for i in free_items()})  # repeated questions: cached
    assert after["sets"]["free"]["calibration"]["cascade"] == record
    assert after["sets"]["free"]["screen_probes"] == (record["screen_ms"] >= 1.0)  # measured, then decided
    cascade = after["sets"]["free"]["cascade"]
    assert cascade["head_layers"] == free["eval_layers"] and cascade["probe_layers"] in ([2], [])
    # the heads' domain gate: fitted on the training prompts, stored beside them and hashed
    domain = after["sets"]["free"]["domain"]
    assert domain["file"] == "domain-free.npz" and domain["layers"] == [1]
    assert after["hashes"]["domain-free.npz"] == hashlib.sha256((heads / "domain-free.npz").read_bytes()).hexdigest()
    assert 0.9 <= record["domain"]["admitted"]["train"] <= 1.0
    assert others(after) == others(before)  # the ONNX files (and the choice set's gate) untouched
    with load_model(str(tiny_model[0]), heads=heads, n_ctx=256, kv_type="f32") as rt:
        a = rt.ask(free_items()[0].question, signal="cascade", threshold=1e9)  # the head exits at once
        assert a.exit_layer == cascade["head_layers"][0]
    (heads / "heads.json").write_text(json.dumps(before))  # again: cached per prompt, nothing traced
    (heads / "domain-free.npz").write_bytes(calibrated_gate)
    again = tiny_cascade(tiny_model, heads, tmp_path, data)
    assert again["traced_now"] == 0 and again["chosen_on_train"] == record["chosen_on_train"]
    ungated = tiny_cascade(
        tiny_model, heads, tmp_path, data, domain_quantile=None
    )  # no gate: the domain file and its hash are gone, the heads decide everywhere
    after = json.loads((heads / "heads.json").read_text())
    assert "domain" not in ungated and after["sets"]["free"]["domain"] == {} and after["hashes"] == others(before)
    assert not (heads / "domain-free.npz").exists()


def test_calibrate_with_cascade_from_the_cli(tiny_model, tmp_path, monkeypatch, capsys):
    """`edge-spade calibrate --cascade` on an `ask --file` JSONL: heads, then a cascade on the same
    prompts and split, in one command; choice-only data gets a clear error, not a traceback."""
    import json

    from edge_spade.cli import main
    from tests.support.heads import free_items, items

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "free.jsonl"
    data.write_text("".join(json.dumps({"id": i.id, "question": i.question}) + "\n" for i in free_items()))
    out = tmp_path / "heads"
    common = ["calibrate", "--model", str(tiny_model[0]), "--out", str(out), "--rank", "4", "--steps", "40"]
    argv = [*common, "--data", str(data), "--target-agreement", "0.5", "--free-tail", "2", "3", "--max-layer", "1"]
    argv.append("--cascade")
    assert main([*argv, "--cascade-min-tokens", "0"]) == 0
    printed = capsys.readouterr().out
    free = json.loads((out / "heads.json").read_text())["sets"]["free"]
    assert free["cascade"]["head_layers"] == [1], printed
    assert f"cascade: heads at [1] (<= {free['cascade']['threshold']:.4g} nats)" in printed
    assert "heads gated to their calibration's domain (domain-free.npz)" in printed
    assert (out / "domain-free.npz").is_file() and free["domain"]["layers"] == [1]
    record = free["calibration"]["cascade"]
    assert record["n_holdout"] == free["calibration"]["n_holdout"] and record["measured_prompts"] == len(free_items())
    assert main([*argv, "--cascade-min-tokens", "500"]) == 0  # no prompt that long: heads only, and it says so
    assert "cascade: none added" in capsys.readouterr().out
    assert "cascade" not in json.loads((out / "heads.json").read_text())["sets"]["free"]["calibration"]

    choices = tmp_path / "choices.jsonl"
    choices.write_text(
        "".join(json.dumps({"question": i.question, "choices": list(i.choices)}) + "\n" for i in items(12))
    )
    assert main([*common, "--data", str(choices), "--cascade"]) == 1
    err = capsys.readouterr().err
    assert "--cascade is for free answers" in err and "Traceback" not in err


def test_a_cascade_certified_on_other_prompt_formats(tiny_model, tmp_path, monkeypatch):
    """Heads calibrated on cloze facts; the cascade adds the same facts as `Q: A:` pairs and arrows:
    every format's prompts join, each fact's on its side of the calibration's split, the heads' gate
    is fitted on the cloze prompts alone (so it keeps most others from the heads), two probes may be
    chosen, and the runtime runs what was written."""
    import json

    from edge_spade import load_model
    from edge_spade.convert.calibrate import calibrate
    from edge_spade.convert.datasets import load_items
    from tests.support import EXACT
    from tests.support.tiny import WORDS

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    facts = tmp_path / "facts.jsonl"
    rows = [
        {"id": f"f{i}", "prompt": f"the {a} of {b} is", "answer": f" {c}", "category": f"c{i % 2}"}
        for i, (a, b, c) in enumerate(zip(WORDS * 2, WORDS[::-1] * 2, WORDS[3:] + WORDS[:3] + WORDS))
    ]
    facts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    heads, few_shot = tmp_path / "heads", [0, 2]
    with load_model(str(tiny_model[0]), n_ctx=EXACT.n_ctx, kv_type="f32", heads=False) as rt:
        calibrate(
            rt,
            load_items(facts, few_shot=few_shot),
            heads,
            data_names=[facts.name],
            rank=4,
            steps=40,
            target_agreement=0.5,
            free_tail=[2],
            top_k=8,
            max_layer=1,
            few_shot=few_shot,
        )
    record = tiny_cascade(tiny_model, heads, tmp_path, facts, max_probes=2, formats=["Q/A", "arrow"])
    cloze = len(load_items(facts, few_shot=few_shot))
    assert record["measured_prompts"] == 3 * cloze and record["formats"] == ["calibration's own", "Q/A", "arrow"]
    assert record["n_train"] + record["n_holdout"] == 3 * cloze and record["n_holdout"] % 3 == 0
    assert record["max_probes"] == 2 and len(record["chosen_on_train"]["probe_layers"]) <= 2
    assert record["domain"]["admitted"]["train"] >= 0.9  # of the cloze prompts it was fitted on
    free = json.loads((heads / "heads.json").read_text())["sets"]["free"]
    assert free["cascade"]["probe_layers"] == record["chosen_on_train"]["probe_layers"]
    layers = {None, *free["cascade"]["head_layers"], *free["cascade"]["probe_layers"]}
    with load_model(str(tiny_model[0]), heads=heads, n_ctx=256, kv_type="f32") as rt:
        for item in load_items(facts, few_shot=[2], form="arrow")[:6]:
            assert rt.ask(item.question, signal="cascade").exit_layer in layers
