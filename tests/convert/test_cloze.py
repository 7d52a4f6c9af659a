"""The broad cloze corpus: what the generator writes is what is committed, split once by fact."""

from __future__ import annotations

import json
from collections import Counter

from edge_spade.convert.cloze import broad


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_committed_broad_corpus_is_the_generators(tmp_path):
    calibration, test = broad.write(tmp_path)
    for name, written in (("cloze-broad.jsonl", calibration), ("cloze-broad-test.jsonl", test)):
        assert written.read_bytes() == (broad.HERE / name).read_bytes(), name


def test_the_split_is_by_fact_and_keeps_what_calibration_saw_out_of_the_test():
    calibration, test = read(broad.HERE / "cloze-broad.jsonl"), read(broad.HERE / "cloze-broad-test.jsonl")
    assert len(calibration) >= 2000 and len(Counter(r["category"] for r in calibration)) >= 25
    prompts = [r["prompt"] for r in calibration + test]
    assert len(prompts) == len(set(prompts))  # every fact once, on one side
    assert not {r["prompt"] for r in test} & broad.calibrated_before()
    assert not {broad.prompt_hash(p) for p in prompts} & broad.excluded_hashes()
    assert all(r["answer"].startswith(" ") and r["answer"].strip() for r in calibration + test)
    assert 0.1 < len(test) / len(prompts) < 0.3


def test_facts_read_by_hand():
    facts = {r["prompt"]: r["answer"] for r in broad.facts()}
    assert facts["7 x 8 ="] == " 56" and facts["30 - 12 ="] == " 18" and facts["Double 13 is"] == " 26"
    assert facts["The month after December is"] == " January" and facts["W, X, Y,"] == " Z"
    assert facts["The chemical symbol for gold is"] == " Au" and facts["A baby cat is called a"] == " kitten"


def test_the_capped_calibration_file_is_calibration_facts_at_most_n_per_category():
    capped = [json.loads(line) for line in broad.per_category(120).splitlines()]
    counts = Counter(r["category"] for r in capped)
    calibration = read(broad.HERE / "cloze-broad.jsonl")
    assert max(counts.values()) == 120 and len(counts) == len({r["category"] for r in calibration})
    assert capped == [r for r in calibration if r in capped]  # the file's own order, a subset of it
    assert counts["addition"] == 120 < Counter(r["category"] for r in calibration)["addition"]
