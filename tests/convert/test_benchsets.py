"""The question sets `edge-spade bench` ships are what their generator writes, from the test split only."""

from __future__ import annotations

import json
from importlib import resources

from edge_spade.bench.sets import NAMES, SETS, load_set
from edge_spade.convert.cloze import benchsets


def test_shipped_sets_are_the_generators_output():
    shipped = resources.files("edge_spade.bench").joinpath("sets")
    rendered = benchsets.render()
    assert sorted(rendered) == sorted(f"{name}.jsonl" for name in SETS)
    for name, text in rendered.items():
        assert shipped.joinpath(name).read_text(encoding="utf-8") == text, f"regenerate: {benchsets.__name__}"


def test_sets_hold_no_calibration_fact():
    calibration = benchsets.HERE / "cloze-broad.jsonl"
    seen = {json.loads(line)["prompt"] for line in calibration.read_text(encoding="utf-8").splitlines()}
    test = {json.loads(line)["prompt"] for line in benchsets.TEST_FACTS.read_text(encoding="utf-8").splitlines()}
    for name in SETS:
        for q in load_set(name):
            asked = q.question.splitlines()[-1]  # the fact after any few-shot examples
            if q.kind == "choice" and q.choices == ("yes", "no"):
                assert any(asked.startswith(p + " ") for p in test)
            else:
                assert asked in test and asked not in seen
    assert {q.kind for q in load_set("mixed")} == {"free-0", "free-3", "free-8", "choice"}
    assert len(load_set("mixed")) == sum(len(load_set(n)) for n in SETS) and "mixed" in NAMES
