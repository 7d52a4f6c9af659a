"""The speed guard with injected costs (no clocks, no sleeps), and in the runtime on the tiny model:
plans chosen by prompt length, the guard switching checks off and back on, fidelity unchanged."""

from __future__ import annotations

import json

import pytest

from edge_spade import load_model
from edge_spade.guard import SpeedGuard
from tests.support import tiny
from tests.support.heads import with_probe


def test_a_plan_whose_checks_never_exit_is_switched_off_then_explored():
    guard = SpeedGuard(min_checked=4, explore_every=5)
    reasons = []
    for _ in range(4):  # learning: checks run, exit nothing, cost 3 ms each
        d = guard.decide("free:1-16")
        reasons.append(d.reason)
        guard.record_checked("free:1-16", 10, total_ms=33.0, check_ms=3.0, exited=False)
    assert reasons == ["learning"] * 4
    decisions = [guard.decide("free:1-16") for _ in range(10)]
    assert [d.check for d in decisions] == ([False] * 4 + [True]) * 2  # one question in five explores
    assert {d.reason for d in decisions} == {"does not pay", "exploring"}
    s = guard.stats()["free:1-16"]
    assert s["checked"] == 4 and s["skipped"] == 8 and not s["checking"] and s["mean_saving_ms"] == -3.0


def test_exits_that_save_time_bring_a_plan_back():
    guard = SpeedGuard(min_checked=2, explore_every=2, alpha=0.5)
    for _ in range(2):
        guard.record_checked("p", 20, total_ms=53.0, check_ms=3.0, exited=False)  # full depth: 50 ms
    assert not guard.decide("p").check or guard.decide("p").reason == "exploring"
    # an exit at a third of the depth that took 20 ms, against 50 ms at full depth: saves 30 ms
    assert guard.record_checked("p", 20, total_ms=20.0, check_ms=3.0, exited=True) == pytest.approx(30.0)
    assert guard.stats()["p"]["mean_saving_ms"] == pytest.approx(0.5 * -3.0 + 0.5 * 30.0)
    assert guard.decide("p").reason == "pays"


def test_the_full_depth_estimate_follows_prompt_length():
    guard = SpeedGuard(min_checked=1)
    guard.record_full("p", 10, 20.0)
    guard.record_full("p", 30, 40.0)  # 10 ms + 1 ms per token
    assert guard.record_checked("p", 50, total_ms=25.0, check_ms=1.0, exited=True) == pytest.approx(60.0 - 25.0)
    # nothing seen at full depth yet: the exit's own pass is extrapolated (10 ms for half the layers)
    assert SpeedGuard().record_checked("q", 5, 12.0, 1.0, True, prefix_ms=10.0, fraction=0.5) == pytest.approx(8.0)


def test_a_guard_that_is_off_always_checks():
    guard = SpeedGuard(enabled=False, min_checked=1)
    guard.record_checked("p", 5, 40.0, 30.0, exited=False)
    assert all(guard.decide("p").check for _ in range(20)) and guard.decide("p").reason == "off"
    with pytest.raises(ValueError):
        SpeedGuard(explore_every=1)


@pytest.fixture()
def planned_heads(tmp_path, tiny_heads):
    """Heads for the tiny model whose default free rule always exits (an infinite probe threshold),
    with a plan that does not check prompts of up to 5 tokens."""
    plans = [
        {"max_tokens": 5, "check": False, "check_whole_model": False},
        {"max_tokens": None, "check": True, "check_whole_model": True},
    ]
    return with_probe(tiny_heads, tmp_path / "heads", plans=plans)


def test_plans_by_prompt_length_and_the_guard_in_the_runtime(planned_heads, tiny_model):
    rt = load_model(str(tiny_model[0]), heads=planned_heads, n_ctx=256, kv_type="f32")
    try:
        short, long = "the sky", "the capital of france is paris and the sky is blue and the water is"
        assert len(rt.prompt(short).tokens) <= 5 < len(rt.prompt(long).tokens)
        a = rt.ask(short)  # its plan does not check: the plain full-depth pass, the full answer
        assert (a.plan, a.guard, a.exit_layer) == ("free:1-5", "plan", None) and a.entropy == {}
        assert a.probs == rt.ask(short, full=True).probs
        b = rt.ask(long)  # checked: the infinite threshold exits at the probe layer
        assert (b.plan, b.guard, b.exit_layer) == ("free:6+", "learning", 1)
        # injected costs: the checks of this plan have lost time, so the guard switches them off ...
        for _ in range(rt.guard.min_checked):
            # (a loss far beyond any real answer's time, so that the real answers above cannot outweigh it)
            rt.guard.record_checked("free:6+", 20, total_ms=50_000.0, check_ms=10_000.0, exited=False)
        skipped = [rt.ask(long) for _ in range(rt.guard.explore_every - 1)]
        assert {(x.guard, x.exit_layer) for x in skipped} == {("does not pay", None)}
        assert all(x.probs == rt.ask(long, full=True).probs for x in skipped)  # fidelity untouched
        explored = rt.ask(long)  # ... except on its stated share of questions
        assert (explored.guard, explored.exit_layer) == ("exploring", 1)
        # ... and back on once checks pay again
        for _ in range(40):
            rt.guard.record_checked("free:6+", 20, total_ms=5.0, check_ms=1.0, exited=True)
        assert rt.ask(long).guard == "pays"
        # a plan's own certified threshold replaces the set's
        raw = json.loads((planned_heads / "heads.json").read_text())
        raw["sets"]["free"]["plans"][1]["threshold"] = 12345.0
        (planned_heads / "heads.json").write_text(json.dumps(raw))
        with load_model(str(tiny_model[0]), heads=planned_heads, n_ctx=256, kv_type="f32") as own:
            assert own.ask(long).threshold == 12345.0
        # an explicit threshold or signal is run as asked: no plan, no guard
        c = rt.ask(short, threshold=float("inf"))
        assert c.exit_layer is not None and c.plan is None and c.guard is None
    finally:
        rt.close()


def test_a_closed_runtime_refuses_questions(tiny_model):
    from edge_spade.errors import ModelClosedError, SettingsError

    rt = load_model(str(tiny_model[0]), n_ctx=64)
    with pytest.raises(SettingsError, match="top_k"):
        rt.ask("the sky", top_k=0)
    rt.close()
    with pytest.raises(ModelClosedError, match="closed"):
        rt.ask("the sky")
    rt.close()  # twice is fine


def test_one_runtime_shared_by_threads_gives_the_sequential_answers(tiny_model):
    from concurrent.futures import ThreadPoolExecutor

    rt = load_model(str(tiny_model[0]), n_ctx=64)
    try:
        questions = [(f"the {w} is", None) for w in tiny.WORDS[:8]] + [("is the sky blue?", ["yes", "no"])] * 4
        expected = [rt.ask(q, c).probs for q, c in questions]
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda qc: rt.ask(*qc).probs, questions * 5))
        assert got == expected * 5
    finally:
        rt.close()


def test_runtimes_can_share_one_loaded_model(tiny_model):
    """A second Runtime on the first one's weights answers the same; the weights outlive either close."""
    first = load_model(str(tiny_model[0]), n_ctx=64)
    second = load_model(str(tiny_model[0]), n_ctx=64, share_with=first)
    try:
        assert second.engine._model == first.engine._model  # one llama_model, two contexts
        expected = first.ask("the sky is").probs
        assert second.ask("the sky is").probs == expected
        first.close()
        assert second.ask("the sky is").probs == expected  # still loaded: the second one uses it
    finally:
        second.close()
        first.close()


def test_a_cascade_default_follows_its_plans_and_their_own_thresholds(tmp_path, tiny_heads, tiny_model):
    from tests.support.heads import with_cascade

    long = "the capital of france is paris and the sky is blue and the water is"
    plans = [
        {"max_tokens": 5, "check": False, "check_whole_model": False},
        {"max_tokens": None, "check": True, "check_whole_model": True, "threshold": 1e9, "probe_threshold": -1.0},
    ]
    heads = with_cascade(tiny_heads, tmp_path / "heads", plans)  # the set: probe only; the plan: head only
    with load_model(str(tiny_model[0]), heads=heads, n_ctx=256, kv_type="f32", speed_guard=False) as rt:
        a = rt.ask(long)
        assert (a.plan, a.exit_layer, a.threshold, sorted(a.entropy)) == ("free:6+", 1, 1e9, [1])
        assert a.probs == rt.ask(long, layer=1, tail=rt.manifest.sets["free"].tail).probs  # SPADE at the head's layer
        b = rt.ask(long, signal="cascade")  # asked for by name: the set's thresholds, no plan
        assert (b.plan, b.exit_layer, sorted(b.entropy)) == (None, 2, [2])
        assert b.probs == rt.ask(long, layer=2, tail=rt.manifest.sets["free"].tail).probs
        assert rt.ask("the sky").exit_layer is None  # its plan does not check
    from edge_spade.manifest import HeadsMismatchError

    with load_model(str(tiny_model[0]), heads=tiny_heads, n_ctx=256, kv_type="f32") as plain:
        with pytest.raises(HeadsMismatchError, match="no cascade"):
            plain.ask(long, signal="cascade")


def test_a_one_question_process_runs_a_cascade_without_its_probe(tmp_path, tiny_heads, tiny_model):
    """Without tail models (a one-question process) the default cascade runs its heads alone: a probe
    there needs a context of its own and a whole-model tail, which its plans do not count on."""
    from tests.support.heads import with_cascade

    long = "the capital of france is paris and the sky is blue and the water is"
    plans = [{"max_tokens": None, "check": True, "check_whole_model": True}]
    heads = with_cascade(tiny_heads, tmp_path / "heads", plans, head=1e-12, probe=1e9)  # the probe would exit
    kwargs = dict(heads=heads, n_ctx=256, kv_type="f32", speed_guard=False)
    with load_model(str(tiny_model[0]), tail_models=False, **kwargs) as one:
        a = one.ask(long)
        assert (a.exit_layer, sorted(a.entropy)) == (None, [1]) and a.probs == one.ask(long, full=True).probs
        assert one.ask(long, signal="cascade").exit_layer == 2  # asked for by name: as given
    with load_model(str(tiny_model[0]), **kwargs) as many:
        assert many.ask(long).exit_layer == 2  # with tail models the probe runs
