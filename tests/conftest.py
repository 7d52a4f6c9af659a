"""Shared fixtures: the tiny generated model (exact tests) and the two real models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import tiny  # noqa: E402

from edge_spade import Engine, EngineSettings, load_model  # noqa: E402

# f32 KV cache and no flash attention: llama.cpp then computes in f32 like the reference.
EXACT = EngineSettings(n_ctx=256, kv_type="f32", flash_attn=False)


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
def gemma():
    rt = load_model("gemma3-270m")
    yield rt
    rt.close()


@pytest.fixture(scope="session")
def smollm():
    rt = load_model("smollm2-135m")
    yield rt
    rt.close()
