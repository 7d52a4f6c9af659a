"""Plans per prompt length by hand, and calibration on a user's own `ask --file` lines."""

from __future__ import annotations

import json

import pytest

from edge_spade.cli import main
from edge_spade.convert.datasets import DatasetError, load_items
from edge_spade.convert.length_plans import expected_cost, plans_by_length
from tests.support.heads import WORDS


def test_expected_cost_by_hand():
    # 18 layers, one probe at layer 4 costing 20 ms; half the prompts exit there; full depth 90 ms.
    # exit: 5/18 * 90 + 20 = 45; no exit: 90 + 20 = 110; mean 77.5
    assert expected_cost(90.0, [(0, 0.5)], [4], 18, [20.0], [0.0]) == pytest.approx(77.5)
    # an L-SPADE exit adds its SPADE tail (15 ms), and a first context costs 7 ms on every checked prompt
    assert expected_cost(90.0, [(0, 0.5)], [4], 18, [1.0], [15.0], first_ms=7.0) == pytest.approx(
        7 + 0.5 * (25 + 1 + 15) + 0.5 * 91
    )


def test_short_prompts_do_not_check_long_ones_do():
    fit = {"full_ms_at_0": 10.0, "full_ms_per_token": 0.5, "context_ms": 30.0}
    plans = plans_by_length(fit, [(0, 0.5)], [4], 18, [20.0], [0.0], [60.0], [0.0], edges=(16, 128))
    assert [p["max_tokens"] for p in plans] == [16, 128, None]
    # 1 token: 10.5 ms at full depth, a 20 ms probe never pays; 129 tokens: 74.5 ms, it does;
    # without tail models the probe costs 60 ms plus a context: no range pays
    assert [p["check"] for p in plans] == [False, False, True]
    assert not any(p["check_whole_model"] for p in plans)
    assert plans[0]["speedup_model"] < 1 < plans[-1]["speedup_model"]


def test_ask_file_lines_are_calibration_data(tmp_path):
    path = tmp_path / "mine.jsonl"
    lines = [{"question": "Is the sky blue?", "choices": ["yes", "no"], "id": "a"}, {"question": "The sky is"}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    a, b = load_items(path)
    assert (a.id, a.question, a.choices) == ("a", "Is the sky blue?", ("yes", "no"))
    assert (b.id, b.choices) == ("mine-1", None)
    path.write_text('{"question": "x"}\nnot json\n')
    with pytest.raises(DatasetError, match="line 2: not JSON"):
        load_items(path)
    path.write_text('{"question": "x", "choices": "yes"}\n')
    with pytest.raises(DatasetError, match="line 1: expected"):
        load_items(path)


@pytest.mark.slow
def test_calibrate_on_ask_file_lines_through_the_cli(tmp_path, tiny_model, monkeypatch, capsys):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "mine.jsonl"
    rows = [{"question": f"the {w} of {v} is"} for w in WORDS for v in WORDS[:3]]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "heads"
    argv = [
        "calibrate",
        "--model",
        str(tiny_model[0]),
        "--data",
        str(path),
        "--out",
        str(out),
        "--rank",
        "4",
        "--steps",
        "20",
        "--target-agreement",
        "0.5",
        "--free-tail",
        "2",
    ]
    assert main(argv) == 0, capsys.readouterr().err
    free = json.loads((out / "heads.json").read_text())["sets"]["free"]
    assert free["calibration"]["n_prompts"] == len(rows) and free["calibration"]["data"] == ["mine.jsonl"]
    fit = free["costs"]["length_fit"]
    assert fit["full_ms_at_0"] >= 0 and fit["context_ms"] > 0
    certified = (free["thresholds"]["spade"] if free["signal"] == "spade" else free["threshold"]) >= 0
    assert bool(free["plans"]) == certified  # a rule that never exits runs no hooks and needs no plan
    if certified:
        assert free["plans"][-1]["max_tokens"] is None


def test_ranges_with_enough_held_out_prompts_use_their_own_exit_share():
    """Short prompts that rarely exit do not check even when long ones, which often exit, do; a range
    with too few held-out prompts falls back to the share over all of them."""
    from edge_spade.convert.length_plans import MIN_PROMPTS_PER_RANGE

    fit = {"full_ms_at_0": 0.0, "full_ms_per_token": 2.0, "context_ms": 30.0}
    seen = {(17, 32): ([(0, 0.05)], MIN_PROMPTS_PER_RANGE, {}), (33, 64): ([(0, 0.9)], MIN_PROMPTS_PER_RANGE, {})}

    def exits_for(lo, hi):
        return seen.get((lo, hi), ([(0, 0.0)], 3, {}))

    plans = plans_by_length(
        fit, [(0, 0.5)], [4], 18, [15.0], [0.0], [60.0], [0.0], edges=(16, 32, 64), exits_for=exits_for
    )
    assert [p["exit_share"] for p in plans] == [0.5, 0.05, 0.9, 0.5]
    assert [p["heldout_prompts"] for p in plans] == [None, MIN_PROMPTS_PER_RANGE, MIN_PROMPTS_PER_RANGE, None]
    # 17 tokens, 34 ms at full depth, 5% exit: no; 33 tokens, 66 ms, 90% exit: yes
    assert [p["check"] for p in plans][1:3] == [False, True]


def test_each_length_range_certifies_its_own_threshold():
    """Held-out prompts: 60 short ones whose probe is confident and wrong, 60 long ones confident and
    right. Over all of them no threshold certifies 90% (half would be wrong); per range the long
    ones certify an exit and check, the short ones certify none and do not."""
    import numpy as np

    from edge_spade.convert.calibrate import default_rule_plans
    from edge_spade.convert.trace import Sample
    from edge_spade.manifest import HeadSet

    n_layers, k = 4, 8

    def sample(i: int, n_tokens: int, right: bool) -> Sample:
        ids = np.tile(np.arange(k), (n_layers, 1))
        logits = np.zeros((n_layers, k), np.float32)
        logits[-1, 0] = 20.0  # the full answer: token 0
        logits[1, 0 if right else 1] = 20.0  # the probe layer: confident, right or wrong
        return Sample(np.zeros((n_layers, 2), np.float32), ids, logits, key=f"fact{i}", n_tokens=n_tokens)

    held = [sample(i, 10, False) for i in range(60)] + [sample(60 + i, 40, True) for i in range(60)]
    head_set = HeadSet(
        kind="free",
        file="x.onnx",
        layers=[1, 2],
        eval_layers=[1, 2],
        threshold=-1.0,
        thresholds={"lspade": -1.0, "spade": 1.0},
        tail=8,
        top_k=k,
        signal="spade",
        probe_layers=[1],
        calibration={"target_agreement": 0.9, "confidence": 0.95},
        costs={"full_ms": 100.0, "tail_ms": 10.0},
    )
    fit = {"full_ms_at_0": 10.0, "full_ms_per_token": 2.0, "context_ms": 5.0}
    plans = {p["max_tokens"]: p for p in default_rule_plans(head_set, held, np.zeros((120, 2)), n_layers, fit)}
    assert plans[16]["threshold"] == -1.0 and not plans[16]["check"]  # short: no exit certifies
    assert plans[64]["threshold"] >= 0 and plans[64]["check"] and plans[64]["exit_share"] == 1.0
    assert "threshold" not in plans[128]  # no held-out prompts there: the set's own threshold applies
