"""Domain gates: the distance against an eigendecomposition of the covariance, the stored file, and a
gated head on the tiny model (outside its domain it does not decide; the answer is then full depth's)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil

import numpy as np
import pytest

from edge_spade import load_model
from edge_spade.cli import format_answer
from edge_spade.domain import DomainGate, fit_gate, gates_from_bytes, gates_to_bytes
from edge_spade.manifest import HeadsMismatchError
from edge_spade.policy import ExitPolicy, spade_exit
from edge_spade.prompts import build_prompt
from tests.support import tiny


def reference_distance(train: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """Mahalanobis in the covariance's top-k eigendirections, plus the residual over the rest's mean variance."""
    mean = train.mean(0)
    w, v = np.linalg.eigh(np.cov(train, rowvar=False))
    w, v = w[::-1], v[:, ::-1]
    d = x - mean
    proj = d @ v[:, :k]
    residual = (d**2).sum(1) - (proj**2).sum(1)
    return (proj**2 / w[:k]).sum(1) + residual / w[k:].mean()


def test_the_gate_distance_is_a_mahalanobis_distance_and_admits_its_quantile():
    rng = np.random.default_rng(0)
    scales = np.r_[np.linspace(5.0, 1.0, 6), np.full(14, 0.1)]
    train = rng.normal(size=(400, 20)) * scales + 3.0
    gate = fit_gate(train, components=6, quantile=0.9)
    probe = rng.normal(size=(50, 20)) * scales + 3.0
    np.testing.assert_allclose(gate.distance(probe), reference_distance(train, probe, 6), rtol=1e-4)
    assert np.mean(gate.distance(train) <= gate.threshold) == pytest.approx(0.9, abs=0.01)
    off = train.mean(0) + 2.0 * np.eye(20)[-1]  # far along a direction the training states barely use
    assert not gate.admits(off) and gate.admits(train.mean(0))


def test_the_domain_file_round_trips_and_refuses_what_does_not_fit():
    rng = np.random.default_rng(1)
    gate = fit_gate(rng.normal(size=(100, 8)), components=3, quantile=0.99)
    back = gates_from_bytes(gates_to_bytes({2: gate}), [2], 8, "f")[2]
    x = rng.normal(size=(30, 8))
    np.testing.assert_array_equal(back.distance(x), gate.distance(x))  # the threshold was taken as stored
    assert back.threshold == gate.threshold
    with pytest.raises(HeadsMismatchError, match="width 16"):
        gates_from_bytes(gates_to_bytes({2: gate}), [2], 16, "f")
    with pytest.raises(HeadsMismatchError, match="not a usable domain file"):
        gates_from_bytes(gates_to_bytes({2: gate}), [3], 8, "f")  # no gate for that layer
    with pytest.raises(HeadsMismatchError, match="not a usable domain file"):
        gates_from_bytes(b"not an npz", [2], 8, "f")
    with pytest.raises(ValueError, match="at least 2"):
        fit_gate(rng.normal(size=(1, 8)), components=3, quantile=0.99)


def gated(heads, out, threshold: float):
    """A copy of the tiny heads whose free head at layer 1 carries a gate around one state, with `threshold`."""
    shutil.copytree(heads, out)
    raw = json.loads((out / "heads.json").read_text())
    gate = DomainGate(np.zeros(tiny.N_EMBD), np.eye(tiny.N_EMBD)[:2], np.ones(2), 1.0, threshold)
    data = gates_to_bytes({1: gate})
    (out / "domain-free.npz").write_bytes(data)
    raw["hashes"]["domain-free.npz"] = hashlib.sha256(data).hexdigest()
    raw["sets"]["free"]["domain"] = {"file": "domain-free.npz", "layers": [1]}
    raw["sets"]["free"]["eval_layers"] = [1]
    (out / "heads.json").write_text(json.dumps(raw))
    return out


def test_a_head_outside_its_domain_does_not_decide(tiny_model, tiny_heads, tmp_path):
    question = "the capital of france is"
    open_gate, shut_gate = gated(tiny_heads, tmp_path / "open", 1e30), gated(tiny_heads, tmp_path / "shut", -1.0)
    with load_model(str(tiny_model[0]), heads=open_gate, n_ctx=256, kv_type="f32") as rt:
        a = rt.ask(question, signal="lspade", threshold=math.inf)
        assert a.exit_layer == 1 and a.outside_domain is None
    with load_model(str(tiny_model[0]), heads=shut_gate, n_ctx=256, kv_type="f32") as rt:
        a = rt.ask(question, signal="lspade", threshold=math.inf)  # sure at once, but outside: full depth
        full = rt.ask(question, full=True)
        assert a.exit_layer is None and a.outside_domain == [1] and a.entropy == {}
        assert a.token == full.token and a.probs == full.probs
        assert "outside the heads' calibration domain at layer 1" in format_answer(a)
        prompt = build_prompt(rt.engine, question, None)
        policy = ExitPolicy.from_head_set(rt.manifest.sets["free"], math.inf, "lspade")
        readout, seen = spade_exit(rt.engine, rt.heads["free"], policy, prompt)
        np.testing.assert_array_equal(readout.logits, rt.engine.full(prompt.tokens, None).logits)
        assert seen.outside == [1]


def test_an_altered_domain_file_is_refused(tiny_model, tiny_heads, tmp_path):
    heads = gated(tiny_heads, tmp_path / "heads", 1e30)
    (heads / "domain-free.npz").write_bytes(b"x" + (heads / "domain-free.npz").read_bytes())
    with pytest.raises(HeadsMismatchError, match="domain-free.npz is missing or does not match"):
        load_model(str(tiny_model[0]), heads=heads, n_ctx=256, kv_type="f32")
    raw = json.loads((heads / "heads.json").read_text())
    raw["sets"]["free"]["domain"] = {"layers": [1]}  # no file named
    (heads / "heads.json").write_text(json.dumps(raw))
    with pytest.raises(HeadsMismatchError, match="domain needs a file and layers"):
        load_model(str(tiny_model[0]), heads=heads, n_ctx=256, kv_type="f32")


def test_last_rows_are_the_traced_rows(tiny_engine):
    """What the cascade tool fits gates on: the last prompt row after each layer, as a full trace has it."""
    prompt = build_prompt(tiny_engine, "the capital of france is", None)
    rows = tiny_engine.last_rows(prompt.tokens, [0, 2])
    np.testing.assert_array_equal(rows, tiny_engine.trace(prompt.tokens, None).last[[0, 2]])


@pytest.mark.parametrize("inside_tau,outside_tau", [(1e9, -1.0), (-1.0, 1e9)])
def test_a_cascade_by_the_gates_verdict_follows_its_plan_per_side(
    tiny_model, tiny_heads, tmp_path, inside_tau, outside_tau
):
    """The default rule of a cascade with an `inside` probe: the plan's `inside_probe_threshold` for prompts
    the gate admits, its `probe_threshold` for the others; a side at -1 answers at full depth."""
    question = "the capital of france is paris and the sky is"
    for admitted in (True, False):
        heads = gated(tiny_heads, tmp_path / f"{admitted}{inside_tau}", 1e30 if admitted else -1.0)
        raw = json.loads((heads / "heads.json").read_text())
        free = raw["sets"]["free"]
        free["signal"] = "cascade"
        free["cascade"] = {
            "head_layers": [1], "threshold": -1.0, "probe_layers": [2], "probe_threshold": 0.0,
            "inside": {"probe_layers": [2], "probe_threshold": 0.0},
        }  # fmt: skip
        own = {"threshold": -1.0, "inside_probe_threshold": inside_tau, "probe_threshold": outside_tau}
        free["plans"] = [{"max_tokens": None, "check": True, "check_whole_model": False, **own}]
        (heads / "heads.json").write_text(json.dumps(raw))
        with load_model(str(tiny_model[0]), heads=heads, n_ctx=256, kv_type="f32", speed_guard=False) as rt:
            a, full = rt.ask(question), rt.ask(question, full=True)
            exits = (inside_tau if admitted else outside_tau) >= 0
            assert a.outside_domain == (None if admitted else [1]) and a.plan == "free:1+"
            if exits:
                assert (a.exit_layer, a.threshold) == (2, 1e9) and list(a.entropy) == [2]
                assert a.probs == rt.ask(question, layer=2, tail=rt.manifest.sets["free"].tail).probs
            else:
                assert a.exit_layer is None and a.entropy == {} and (a.token, a.probs) == (full.token, full.probs)
