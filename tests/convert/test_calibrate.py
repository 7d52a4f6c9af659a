"""Calibration end to end on the tiny model; heads that do not fit are refused; the bound by hand."""

from __future__ import annotations

import hashlib
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from edge_spade import load_model
from edge_spade.cli import main
from edge_spade.convert.calibrate import calibrate
from edge_spade.convert.certify import CurvePoint, clopper_pearson_lower, exit_curve, pick_threshold, split
from edge_spade.convert.datasets import Item
from edge_spade.convert.heads_files import REPORT_JSON, default_report_dir
from edge_spade.convert.heads_train import LayerHead, rms_norm, train_heads
from edge_spade.convert.plan import choose_tail, thin_layers
from edge_spade.convert.trace import Sample
from edge_spade.domain import DomainGate, gates_from_bytes, gates_to_bytes
from edge_spade.manifest import HeadsMismatchError
from tests.support import tiny
from tests.support.heads import WORDS, free_items, items

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def heads_dir(tiny_heads):
    return tiny_heads


def test_calibration_writes_a_complete_heads_folder(heads_dir, tiny_model):
    manifest = json.loads((heads_dir / "heads.json").read_text())
    report = json.loads((default_report_dir(heads_dir) / REPORT_JSON).read_text())
    assert manifest["n_layers"] == tiny.N_LAYERS and set(manifest["sets"]) == {"choice", "free"}
    assert set(report["sets"]) == {"choice", "free"} and report["heads_hashes"] == manifest["hashes"]
    choice, free = manifest["sets"]["choice"], manifest["sets"]["free"]
    assert choice["layers"] == [1, 2] and set(choice["thresholds"]) == {"lspade", "spade"}
    assert set(report["sets"]["choice"]["thresholds"]) == {"tuned", "logit_lens"}
    for head_set in (choice, free):  # the probe cost model was measured, probes chosen or declined
        assert head_set["costs"]["full_ms"] > 0 and head_set["costs"]["tail_ms"] > 0
        assert head_set["costs"]["check_ms"] >= 0  # what one L-SPADE check adds to a pass, measured
        assert head_set["costs"]["check_full_ms"] > 0  # against full answers timed beside it
        assert set(head_set["probe_layers"]) <= {1, 2} and head_set["signal"] in ("lspade", "spade")
        assert (head_set["signal"] == "spade") <= (head_set["thresholds"]["spade"] >= 0)
    assert choice["calibration"]["n_prompts"] == 40 and choice["calibration"]["n_holdout"] == 12
    assert free["top_k"] == 8 and free["calibration"]["n_prompts"] == 24
    # two tail widths were tried for free answers: both on the frontier, the chosen one by choose_tail's rule
    frontier = {int(k): row for k, row in report["sets"]["free"]["tail_frontier"].items()}
    assert set(frontier) == {2, 3} and free["tail"] == choose_tail(frontier)
    assert set(report["sets"]["choice"]["tail_frontier"]) == {"1"} and choice["tail"] == 1
    for row in frontier.values():
        assert 0 <= row["mean_agreement"] <= 1 and 0 <= row["oracle_mean_exit_layer"] <= tiny.N_LAYERS - 1
    assert free["candidates"] and choice["candidates"] is None
    # the heads folder holds what the runtime loads; the tuned-lens baseline goes with the report
    names = ["domain-choice.npz", "domain-free.npz", "heads.json", "lspade-choice.onnx", "lspade-free.onnx"]
    assert sorted(p.name for p in heads_dir.iterdir()) == names
    for head_set in (choice, free):  # each set's domain gate, at its evaluation layers, hashed like its heads
        domain = head_set["domain"]
        assert domain["layers"] == head_set["eval_layers"] and domain["file"] in manifest["hashes"]
        assert 0.9 <= domain["admitted"]["train"] <= 1.0 and 0.0 <= domain["admitted"]["held_out"] <= 1.0
    for name in ("tuned-choice.onnx", "tuned-free.onnx"):
        assert (default_report_dir(heads_dir) / name).stat().st_size > 0
    curve = report["sets"]["choice"]["curves"]["lspade"]
    assert curve[0]["threshold"] == 0.0 and curve[-1]["mean_exit_layer"] <= tiny.N_LAYERS - 1


def first_layer(heads_dir, kind: str) -> int:
    """Where an infinite threshold exits: the first probe layer or the first head layer (whichever signal won)."""
    head_set = json.loads((heads_dir / "heads.json").read_text())["sets"][kind]
    return (head_set["probe_layers"] if head_set["signal"] == "spade" else head_set["eval_layers"])[0]


def gate_says(heads_dir, tiny_model, kind: str, questions: list[tuple[str, tuple | None]]) -> list[list[bool]]:
    """Per question, whether the set's domain gate admits it at each evaluation layer, computed here from
    the gate file and the prompt's traced rows (what the runtime must agree with)."""
    head_set = json.loads((heads_dir / "heads.json").read_text())["sets"][kind]
    layers = head_set["eval_layers"]
    gates = gates_from_bytes((heads_dir / head_set["domain"]["file"]).read_bytes(), layers, tiny.N_EMBD, "gates")
    with load_model(str(tiny_model[0]), heads=False, n_ctx=256, kv_type="f32") as rt:
        rows = [rt.engine.last_rows(rt.prompt(q, c).tokens, layers) for q, c in questions]
    return [[gates[layer].admits(r) for layer, r in zip(layers, row)] for row in rows]


def test_heads_drive_spade_exit(heads_dir, tiny_model, capsys):
    code = main(
        [
            "ask",
            "which sky is blue?",
            "--choices",
            "sky",
            "water",
            "--model",
            str(tiny_model[0]),
            "--heads",
            str(heads_dir),
            "--threshold",
            "inf",
            "--json",
        ]
    )
    a = json.loads(capsys.readouterr().out)
    first = first_layer(heads_dir, "choice")
    assert code == 0 and a["mode"] == "spade-exit" and a["exit_layer"] == first and list(a["entropy"]) == [str(first)]
    code = main(
        [
            "ask",
            "which sky is blue?",
            "--choices",
            "sky",
            "water",
            "--model",
            str(tiny_model[0]),
            "--heads",
            str(heads_dir),
            "--threshold",
            "-1",
            "--json",
        ]
    )
    a = json.loads(capsys.readouterr().out)
    assert code == 0 and a["exit_layer"] is None and a["layer"] == tiny.N_LAYERS - 1 and a["threshold"] == -1
    # free answers: a calibration prompt inside the heads' domain gate exits at once; one outside it at
    # every head layer does not, and says where it was refused
    free = json.loads((heads_dir / "heads.json").read_text())["sets"]["free"]
    assert free["signal"] == "lspade"  # the heads decide (a probe has no gate)
    first, layers = first_layer(heads_dir, "free"), free["eval_layers"]
    questions = [(i.question, None) for i in free_items()]
    inside = next(q for (q, _), says in zip(questions, gate_says(heads_dir, tiny_model, "free", questions)) if says[0])
    assert not any(gate_says(heads_dir, tiny_model, "free", [("the sky of", None)])[0])
    for question, exit_layer, outside in ((inside, first, None), ("the sky of", None, layers)):
        argv = ["ask", question, "--model", str(tiny_model[0]), "--heads", str(heads_dir), "--threshold", "inf"]
        code = main([*argv, "--json"])
        a = json.loads(capsys.readouterr().out)
        assert code == 0 and a["mode"] == "spade-exit" and a["exit_layer"] == exit_layer
        assert a["outside_domain"] == outside and a["tail"] == free["tail"]


def test_heads_for_another_model_are_refused(heads_dir, tmp_path, capsys):
    other = tmp_path / "other.gguf"
    tiny.write_tiny_gguf(other, seed=7)
    with pytest.raises(HeadsMismatchError, match="output matrix differs"):
        load_model(str(other), heads=heads_dir)
    code = main(["ask", "x?", "--choices", "sky", "water", "--model", str(other), "--heads", str(heads_dir)])
    assert code == 1 and "calibrate for this model" in capsys.readouterr().err


def test_tampered_heads_are_refused(heads_dir, tiny_model, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(heads_dir, bad)
    (bad / "lspade-choice.onnx").write_bytes(b"not onnx")
    with pytest.raises(HeadsMismatchError, match="does not match its sha256"):
        load_model(str(tiny_model[0]), heads=bad)


def test_clopper_pearson_by_hand():
    # all successes: the bound solves p^n = alpha
    assert clopper_pearson_lower(10, 10, 0.95) == pytest.approx(0.05**0.1, abs=1e-9)
    assert clopper_pearson_lower(0, 10) == 0.0
    # 9 of 10: P(X >= 9 | p) = 10 p^9 (1-p) + p^10 = 0.05 at p = 0.6058 (solved by hand below)
    p = clopper_pearson_lower(9, 10, 0.95)
    assert 10 * p**9 * (1 - p) + p**10 == pytest.approx(0.05, abs=1e-9)
    assert p == pytest.approx(0.6058, abs=1e-4)


def test_exit_curve_bounds_facts_not_prompts():
    # 10 facts x 3 prompts; one layer; every prompt exits at threshold 1. Fact 0 has one wrong
    # prompt, fact 1 two: 27 of 30 prompts agree, but only 8 of 10 facts do.
    keys = [f"fact{i}" for i in range(10) for _ in range(3)]
    full = np.zeros(30, int)
    answers = np.zeros((30, 1), int)
    answers[[0, 3, 4], 0] = 1
    entropy = np.zeros((30, 1))
    by_prompt = exit_curve(full, answers, entropy, [1], 4, 0.95)[-1]
    by_fact = exit_curve(full, answers, entropy, [1], 4, 0.95, keys)[-1]
    assert by_prompt.agreement == by_fact.agreement == pytest.approx(0.9)
    assert by_prompt.lower_bound == pytest.approx(clopper_pearson_lower(27, 30))
    assert by_fact.lower_bound == pytest.approx(clopper_pearson_lower(8, 10))
    # all prompts right: 10 facts bound p^10 = 0.05, weaker than 30 prompts' p^30 = 0.05
    clean = exit_curve(full, full[:, None], entropy, [1], 4, 0.95, keys)[-1]
    assert clean.lower_bound == pytest.approx(0.05**0.1)
    # one prompt per key: the per-prompt bound exactly
    single = exit_curve(full, answers, entropy, [1], 4, 0.95, [str(i) for i in range(30)])[-1]
    assert single.lower_bound == by_prompt.lower_bound


def test_prompts_outside_a_domain_gate_never_exit_on_the_curve():
    """An infinite entropy (outside the head's domain gate) is no threshold and never exits, not even at
    the curve's infinite threshold: the runtime's gate refuses those prompts whatever the threshold."""
    full = np.zeros(10, int)
    answers = np.ones((10, 1), int)  # every exit is wrong
    entropy = np.full((10, 1), np.inf)
    curve = exit_curve(full, answers, entropy, [1], 4, 0.95)
    assert [p.threshold for p in curve] == [0.0, math.inf]
    assert all(p.exit_rate == 0.0 and p.agreement == 1.0 for p in curve)


def test_threshold_is_the_largest_that_keeps_the_bound():
    curve = [
        CurvePoint(0.0, 1.0, 0.99, 17, 0),
        CurvePoint(0.1, 1.0, 0.991, 12, 0.3),
        CurvePoint(0.5, 0.99, 0.97, 9, 0.8),
        CurvePoint(math.inf, 0.9, 0.85, 1, 1),
    ]
    assert pick_threshold(curve, 0.99) == 0.1
    assert pick_threshold(curve, 0.999) == -1.0
    assert pick_threshold(curve, 0.99, min_exit_rate=0.5) == -1.0  # too few exits to pay for the checks


def test_tail_width_choice():
    row = {"mean_agreement": 0.8, "probes_pay": False}
    assert choose_tail({1: {**row, "mean_agreement": 0.7}, 4: row, 8: row}) == 4  # best agreement, smaller on ties
    paying = {"probes_pay": True, "mean_agreement": 0.5}
    assert (
        choose_tail(
            {1: row, 2: {**paying, "heldout_mean_cost_model": 0.9}, 4: {**paying, "heldout_mean_cost_model": 0.8}}
        )
        == 4
    )  # probes that pay come first


def test_holdout_keeps_the_variants_of_a_fact_together(tmp_path):
    """A fact's few-shot variants are all trained on or all held out; one prompt per key (ARC)
    splits exactly as single prompts do."""
    from edge_spade.convert.datasets import load_items

    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        "".join(
            json.dumps({"id": f"f{i}", "prompt": f"{i} + 1 =", "answer": f" {i + 1}", "category": "addition"}) + "\n"
            for i in range(20)
        )
    )
    items = load_items(facts, variants=3)
    assert len(items) == 60 and len({i.key for i in items}) == 20 and len({i.question for i in items}) > 20
    samples = [
        Sample(np.zeros((2, 4), np.float32), np.zeros((1, 2), int), np.zeros((2, 2), np.float32), key=i.key)
        for i in items
    ]
    train, held = split(samples, 0.5, seed=0)
    train_keys, held_keys = {s.key for s in train}, {s.key for s in held}
    assert not train_keys & held_keys and len(train) + len(held) == 60 and 30 <= len(held) <= 33
    assert all(sum(s.key == k for s in held) == 3 for k in held_keys)
    by_prompt = split(samples, 0.5, seed=0, by_key=False)
    assert {s.key for s in by_prompt[0]} & {s.key for s in by_prompt[1]}  # what the old split did
    singles = [Sample(s.hidden, s.ids, s.logits, key=f"q{n}") for n, s in enumerate(samples)]
    for a, b in zip(split(singles, 0.5, seed=0), split(singles, 0.5, seed=0, by_key=False)):
        assert [id(x) for x in a] == [id(x) for x in b]


def test_several_few_shot_counts_share_the_fact_key(tmp_path):
    """`--few-shot 3 8`: each fact gets `variants` prompts per count, all under its key (so the
    split and the bound treat them as one fact), with prefixes of the asked length."""
    from edge_spade.convert.datasets import DatasetError, load_items

    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        "".join(
            json.dumps({"id": f"f{i}", "prompt": f"{i} + 1 =", "answer": f" {i + 1}", "category": "addition"}) + "\n"
            for i in range(20)
        )
    )
    items = load_items(facts, variants=2, few_shot=[3, 8])
    assert len(items) == 80 and len({i.id for i in items}) == 80 and len({i.key for i in items}) == 20
    shots = [i.question.count("\n") for i in items]
    assert shots == [3] * 40 + [8] * 40
    assert [i.question for i in load_items(facts, variants=2, few_shot=[3])] == [i.question for i in items[:40]]
    with pytest.raises(DatasetError, match="few-shot"):
        load_items(facts, few_shot=[-1])


def test_cloze_facts_in_other_prompt_formats(tmp_path):
    """`form`: the same facts and prefixes as `Q: A:` pairs or arrows, under the same keys (a fact's
    prompts in every format stay on one side of a split); only cloze facts have formats."""
    from edge_spade.convert.datasets import DatasetError, load_items

    facts = tmp_path / "facts.jsonl"
    facts.write_text(
        "".join(
            json.dumps({"id": f"f{i}", "prompt": f"{i} + 1 =", "answer": f" {i + 1}", "category": "addition"}) + "\n"
            for i in range(10)
        )
    )
    cloze, qa, arrow = (load_items(facts, few_shot=[0, 2], form=f) for f in ("cloze", "Q/A", "arrow"))
    assert [i.key for i in qa] == [i.key for i in arrow] == [i.key for i in cloze]
    assert len({i.id for i in cloze + qa + arrow}) == 60 and qa[0].id == "f0-Q/A" and arrow[0].id == "f0-arrow"
    assert qa[0].question == "Q: 0 + 1 =\nA:" and arrow[0].question == "0 + 1 = ->"
    assert [(i.shots, i.form) for i in (cloze[0], cloze[10], qa[10], arrow[19])] == [
        (0, "cloze"),
        (2, "cloze"),
        (2, "Q/A"),
        (2, "arrow"),
    ]
    prefix = cloze[10].question.splitlines()[:2]  # 2 shots, then the fact: the same shots in every format
    assert qa[10].question.splitlines()[::2][:2] == [f"Q: {line.rsplit(' ', 1)[0]}" for line in prefix]
    assert arrow[10].question.splitlines()[:2] == [" -> ".join(line.rsplit(" ", 1)) for line in prefix]
    ask = tmp_path / "ask.jsonl"
    ask.write_text(json.dumps({"question": "the sky is"}) + "\n")
    with pytest.raises(DatasetError, match="for cloze facts"):
        load_items(ask, form="Q/A")
    with pytest.raises(DatasetError, match="unknown prompt format"):
        load_items(facts, form="yaml")


def test_exit_signal_can_be_chosen(heads_dir, tiny_model, capsys):
    head_set = json.loads((heads_dir / "heads.json").read_text())["sets"]["choice"]
    asked = [(i.question, i.choices) for i in items(40)]  # a calibration question inside the heads' domain
    question, choices = next(q for q, says in zip(asked, gate_says(heads_dir, tiny_model, "choice", asked)) if says[0])
    argv = [
        "ask",
        question,
        "--choices",
        *choices,
        "--model",
        str(tiny_model[0]),
        "--heads",
        str(heads_dir),
        "--threshold",
        "inf",
        "--json",
    ]
    assert main(argv + ["--signal", "lspade"]) == 0
    assert json.loads(capsys.readouterr().out)["exit_layer"] == head_set["eval_layers"][0]
    code = main(argv + ["--signal", "spade"])
    if head_set["probe_layers"]:
        assert code == 0 and json.loads(capsys.readouterr().out)["exit_layer"] == head_set["probe_layers"][0]
    else:
        assert code == 1 and "no SPADE probe layers" in capsys.readouterr().err


def test_free_heads_learn_the_top_k_over_all_candidates():
    """A free-answer target names only SPADE's top-k tokens, and a softmax over those alone cannot
    see a direction all their rows share: trained on them, a head lets rare candidates with long
    rows along it outrank SPADE's top token (what happened to the real heads). Trained over every
    candidate, as the runtime scores them, its own top token is SPADE's."""
    rng = np.random.default_rng(2)
    vocab, d, k, n, layer, rare = 300, 16, 8, 200, 1, 30
    w, g = rng.normal(size=(vocab, d)).astype(np.float32), np.ones(d, np.float32)
    w[:, 0] = 3.0  # a direction every row shares
    w[:rare] *= 0.1
    w[:rare, 0] = 10.0  # rare tokens far along it
    teacher = rng.normal(size=(d, d)).astype(np.float32)  # SPADE at this layer ignores that direction
    teacher[:, 0] = 0.0
    hidden = rng.normal(size=(n, 2, d)).astype(np.float32)
    hidden[:, :, 0] += 8.0  # a massive activation, as residual streams have
    target = rms_norm(hidden[:, layer] @ teacher, g, 1e-6) @ w.T
    top = np.argsort(-target, axis=1)[:, :k]
    early = rng.integers(0, rare, size=(n, k))  # the rare tokens top layer 0: they are candidates
    samples = [Sample(hidden[i], np.stack([early[i], top[i]]), np.stack([target[i, top[i]]] * 2)) for i in range(n)]
    candidates = np.unique(np.concatenate([top.ravel(), early.ravel()]))
    rt = SimpleNamespace(
        engine=SimpleNamespace(
            n_embd=d,
            n_layers=2,
            index=SimpleNamespace(rms_eps=1e-6),
            head=SimpleNamespace(rows=lambda ids: w[ids], norm_weight=g),
        )
    )

    def own_top(head) -> float:  # share of samples whose head's top candidate is SPADE's top token
        z = rms_norm(head.adjust(hidden[:, layer]), g, 1e-6) @ w[candidates].T
        return float(np.mean(candidates[z.argmax(1)] == top[:, 0]))

    over_candidates = train_heads(rt, samples, [layer], "spade", rank=8, steps=300, lr=0.02, candidates=candidates)
    over_top_k = train_heads(rt, samples, [layer], "spade", rank=8, steps=300, lr=0.02)
    assert own_top(LayerHead.identity(d, 8)) == 0.0 and own_top(over_top_k[0]) < 0.05
    assert own_top(over_candidates[0]) > 0.9


def test_evaluation_layers_where_exits_pay_for_the_checks():
    """A layer is checked when the exits there save more than its check costs everyone reaching it."""
    n, layers = 40, [1, 2, 3]
    ent = np.zeros((n, 3))
    ent[:, 0] = 3.0
    ent[0, 0] = 0.1  # one prompt (2.5%) would exit at layer 1, correctly
    ent[:, 1] = np.where(np.arange(n) < 20, 1.0, 4.0)  # half exit at layer 2, the rest at layer 3
    ent[:, 2] = 2.0

    def sample(i: int) -> Sample:  # free answers: the token is ids[layer][0]; layer 1 is wrong but for prompt 0
        ids = np.array([[7], [7 if i == 0 else 9], [7], [7], [7]])
        return Sample(np.zeros((5, 2), np.float32), ids, np.zeros((5, 1), np.float32))

    train = [sample(i) for i in range(n)]

    def thin(exit_cost, check_cost, target=0.9, budget=math.inf):
        return thin_layers(train, ent, layers, 5, target, 0.95, np.array(exit_cost), check_cost, budget)

    # savings per prompt: layer 1 0.025 * 0.5, layer 2 0.5 * 0.3, layer 3 0.475 * 0.05, against a check of 0.02
    assert thin([0.5, 0.7, 0.95], 0.02) == [2, 3]
    assert thin([0.5, 0.7, 1.0], 0.02) == [2]  # an exit that costs a full answer saves nothing
    assert thin([0.5, 0.7, 0.95], 0.0) == [1, 2, 3]
    assert thin([0.5, 0.7, 0.95], 0.02, target=0.999) == layers  # no threshold reaches the target: all layers
    # a budget for what checks may add to a pass that does not exit: the best savers that fit, one at least
    assert thin([0.5, 0.7, 0.95], 0.02, budget=0.04) == [2, 3]
    assert thin([0.5, 0.7, 0.95], 0.02, budget=0.03) == [2]
    assert thin([0.5, 0.7, 0.95], 0.02, budget=0.01) == [2]


def test_merge_keeps_the_kinds_not_recalibrated(heads_dir, tiny_model, tmp_path, monkeypatch):
    """Recalibrating free answers alone into shipped heads keeps their choice set byte for byte;
    heads of another rank or another model are refused before any work."""
    import shutil

    from tests.support import EXACT

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    merged = tmp_path / "merged"
    shutil.copytree(heads_dir, merged)
    shutil.copytree(default_report_dir(heads_dir), default_report_dir(merged))
    before = json.loads((heads_dir / "heads.json").read_text())
    # the kept set has a domain gate (edge_spade/domain.py): its file comes along, checked like the heads
    layer = before["sets"]["choice"]["eval_layers"][0]
    gate = gates_to_bytes({layer: DomainGate(np.zeros(tiny.N_EMBD), np.eye(tiny.N_EMBD)[:1], np.ones(1), 1.0, 1e30)})
    (merged / "domain-choice.npz").write_bytes(gate)
    before["hashes"]["domain-choice.npz"] = hashlib.sha256(gate).hexdigest()
    before["sets"]["choice"]["domain"] = {"file": "domain-choice.npz", "layers": [layer]}
    (merged / "heads.json").write_text(json.dumps(before))
    free = [Item(f"g{i}", f"the {w} is", None, None) for i, w in enumerate(WORDS * 2)]
    other_path = tmp_path / "other.gguf"
    tiny.write_tiny_gguf(other_path, seed=7)
    other = load_model(str(other_path), n_ctx=EXACT.n_ctx, kv_type="f32", heads=False)
    try:
        with pytest.raises(HeadsMismatchError, match="another model"):
            calibrate(other, free, merged, data_names=["generated"], rank=4, steps=20, top_k=8, merge=True)
    finally:
        other.close()
    rt = load_model(str(tiny_model[0]), n_ctx=EXACT.n_ctx, kv_type="f32", heads=False)
    try:
        with pytest.raises(HeadsMismatchError, match="rank 4"):
            calibrate(rt, free, merged, data_names=["generated"], rank=5, steps=20, top_k=8, merge=True)
        calibrate(
            rt, free, merged, data_names=["generated"], rank=4, steps=20, target_agreement=0.5, top_k=8, merge=True
        )
    finally:
        rt.close()
    after = json.loads((merged / "heads.json").read_text())
    assert after["sets"]["choice"] == before["sets"]["choice"]
    name = "lspade-choice.onnx"
    assert (merged / name).read_bytes() == (heads_dir / name).read_bytes()
    assert after["hashes"][name] == before["hashes"][name]
    assert (merged / "domain-choice.npz").read_bytes() == gate
    assert after["hashes"]["domain-choice.npz"] == before["hashes"]["domain-choice.npz"]
    assert after["sets"]["free"]["calibration"]["n_prompts"] == 16
    # the kept set's report entry and tuned-lens baseline come along with it
    old_report, new_report = default_report_dir(heads_dir), default_report_dir(merged)
    kept = json.loads((new_report / REPORT_JSON).read_text())["sets"]["choice"]
    assert kept == json.loads((old_report / REPORT_JSON).read_text())["sets"]["choice"]
    assert (new_report / "tuned-choice.onnx").read_bytes() == (old_report / "tuned-choice.onnx").read_bytes()
    load_model(str(tiny_model[0]), heads=merged).close()  # every file checked against its sha256 on load


def test_committed_cloze_calibration_facts_are_the_generators(tmp_path):
    """convert/cloze/cloze-calibration.jsonl is what convert/cloze/generate.py writes (no stale or
    hand-edited file), every prompt once, every category with enough facts for a few-shot prefix."""
    from importlib.resources import files

    from edge_spade.convert.cloze import generate as module

    written = module.write_jsonl(tmp_path / "facts.jsonl")
    assert written.read_bytes() == files("edge_spade.convert.cloze").joinpath("cloze-calibration.jsonl").read_bytes()
    rows = module.facts()
    prompts = [r["prompt"] for r in rows]
    assert len(prompts) == len(set(prompts)) > 400
    by_cat: dict[str, int] = {}
    for r in rows:
        by_cat[r["category"]] = by_cat.get(r["category"], 0) + 1
        assert r["answer"].startswith(" ") and r["answer"].strip()
    assert min(by_cat.values()) > 8


def test_costs_are_timed_on_prompts_spread_over_the_data():
    """With 3-shot prompts first and 8-shot ones after (`--few-shot 3 8`), the timed prompts must
    include both, not just the first few."""
    from edge_spade.convert.costs import timing_items

    items = [f"3shot-{i}" for i in range(6)] + [f"8shot-{i}" for i in range(6)]
    assert timing_items(items, 2) == ["3shot-0", "3shot-0", "8shot-0"]  # warm-up, then the two halves
    assert timing_items(items[:3], 5) == ["3shot-0", "3shot-0", "3shot-1", "3shot-2"]


def test_heads_on_a_range_of_layers_probes_on_all(tiny_model, tmp_path, monkeypatch, capsys):
    """`max_layer`: heads only up to it; the probe frontier still spans every layer; a range outside
    the model is refused before any work, as a one-line CLI error."""
    from edge_spade.errors import LayerError
    from tests.support import EXACT

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    free = [Item(f"g{i}", f"the {w} is", None, None) for i, w in enumerate(WORDS * 2)]
    rt = load_model(str(tiny_model[0]), n_ctx=EXACT.n_ctx, kv_type="f32", heads=False)
    try:
        for low, high in ((1, tiny.N_LAYERS - 1), (2, 1), (-1, 1)):
            with pytest.raises(LayerError, match="--max-layer"):
                calibrate(
                    rt,
                    free,
                    tmp_path / "bad",
                    data_names=["g"],
                    rank=2,
                    steps=5,
                    top_k=8,
                    min_layer=low,
                    max_layer=high,
                )
        assert not (tmp_path / "bad").exists()
        manifest = calibrate(rt, free, tmp_path / "heads", data_names=["g"], rank=2, steps=5, top_k=8, max_layer=1)
    finally:
        rt.close()
    assert manifest.sets["free"].layers == [1] and set(manifest.sets["free"].eval_layers) <= {1}
    report = json.loads((default_report_dir(tmp_path / "heads") / REPORT_JSON).read_text())
    frontier = report["sets"]["free"]["tail_frontier"]
    assert {layer for row in frontier.values() for layer in row["agreement_by_layer"]} == {"1", "2"}
    load_model(str(tiny_model[0]), heads=tmp_path / "heads").close()
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"question": item.question}) + "\n" for item in free))
    argv = [
        "calibrate",
        "--model",
        str(tiny_model[0]),
        "--data",
        str(data),
        "--max-layer",
        "9",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "--max-layer" in err and "Traceback" not in err
