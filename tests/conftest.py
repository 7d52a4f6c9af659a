"""Shared fixtures: the tiny generated model (exact tests) and the two real models.

Tiers (markers, see pyproject.toml): tests that load the real models from PyPI are marked
`real_model` here, by the fixtures they use; `slow` marks calibration, conversion and
process-level tests. `pytest -m "not real_model and not slow"` runs the fast tier alone.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_spade import Engine, load_model
from tests.support import EXACT, tiny

REAL_MODEL_FIXTURES = {"gemma", "smollm"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real_model)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> tuple[Path, tiny.TinyWeights]:
    path = tmp_path_factory.mktemp("tiny") / "tiny-llama.gguf"
    weights = tiny.write_tiny_gguf(path)
    assert path.stat().st_size < 2_000_000, "the tiny model must stay tiny"
    return path, weights


@pytest.fixture(scope="session")
def tiny_engine(tiny_model) -> Engine:
    engine = Engine(tiny_model[0], EXACT)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def tiny_heads(tiny_model, tmp_path_factory) -> Path:
    """Heads calibrated for the tiny model by the converter (both answer kinds)."""
    from tests.support.heads import calibrate_tiny

    return calibrate_tiny(
        tiny_model[0], tmp_path_factory.mktemp("heads") / "tiny-heads", tmp_path_factory.mktemp("calibration-cache")
    )


@pytest.fixture(scope="session")
def gemma():
    rt = load_model("gemma3-270m")
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def smollm():
    rt = load_model("smollm2-135m")
    yield rt
    rt.close()
