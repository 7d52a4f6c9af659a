"""Heads for the tiny model, calibrated end to end by the real converter (for tests of either stage)."""

from __future__ import annotations

import os
from pathlib import Path

from edge_spade import load_model
from edge_spade.convert.calibrate import calibrate
from edge_spade.convert.datasets import Item
from tests.support import EXACT

WORDS = ["sky", "water", "paris", "blue", "france", "capital", "answer", "question"]


def items(n: int) -> list[Item]:
    """`n` choice questions made of the tiny vocabulary's words."""
    out = []
    for i in range(n):
        a, b, c = WORDS[i % 8], WORDS[(i * 3 + 1) % 8], WORDS[(i * 5 + 2) % 8]
        choices = tuple(dict.fromkeys([a, b, c, "the"]))
        out.append(Item(f"q{i}", f"which {a} is the {b} of {c}?", choices, 0))
    return out


def free_items() -> list[Item]:
    return [Item(f"f{i}", f"the {w} of {v} is", None, None) for i, (w, v) in enumerate(zip(WORDS * 3, WORDS[::-1] * 3))]


def calibrate_tiny(model: Path, out: Path, cache: Path) -> Path:
    """Both answer kinds, two free tail widths, low targets so that something certifies."""
    old = os.environ.get("EDGE_SPADE_CACHE")
    os.environ["EDGE_SPADE_CACHE"] = str(cache)  # calibration traces stay private to the test run
    rt = load_model(str(model), n_ctx=EXACT.n_ctx, kv_type="f32", heads=False)
    try:
        manifest = calibrate(
            rt,
            items(40) + free_items(),
            out,
            data_names=["generated"],
            rank=4,
            steps=40,
            target_agreement=0.5,
            free_tail=[2, 3],
            top_k=8,
        )
    finally:
        rt.close()
        if old is None:
            del os.environ["EDGE_SPADE_CACHE"]
        else:
            os.environ["EDGE_SPADE_CACHE"] = old
    assert set(manifest.sets) == {"choice", "free"}
    return out


def with_probe(heads: Path, out: Path, layer: int = 1, plans: list[dict] | None = None) -> Path:
    """A copy of `heads` whose default free rule is a SPADE probe at `layer` that always exits."""
    import json
    import shutil

    shutil.copytree(heads, out)
    raw = json.loads((out / "heads.json").read_text())
    free = raw["sets"]["free"]
    free.update(signal="spade", probe_layers=[layer], thresholds={**free["thresholds"], "spade": 1e9})
    free["plans"] = plans or []
    (out / "heads.json").write_text(json.dumps(raw))
    return out


def with_cascade(heads: Path, out: Path, plans: list[dict], head: float = -1.0, probe: float = 1e9) -> Path:
    """A copy of `heads` whose default free rule is a cascade: the head at layer 1, then a probe at 2.
    Without the free set's domain gate, so that the head decides on any prompt: these copies test how
    rules, plans and the guard run (tests/runtime/test_domain.py tests the gate)."""
    import json
    import shutil

    shutil.copytree(heads, out)
    raw = json.loads((out / "heads.json").read_text())
    free = raw["sets"]["free"]
    cascade = {"head_layers": [1], "threshold": head, "probe_layers": [2], "probe_threshold": probe}
    free.update(signal="cascade", cascade=cascade, plans=plans, domain={})
    (out / "heads.json").write_text(json.dumps(raw))
    return out
