"""The ctypes mirror of ggml_tensor against the loaded library."""

from __future__ import annotations

import ctypes

from edge_spade.hooks import PINNED_LLAMA_CPP, GgmlTensor, load_ggml


def test_layout_matches_the_documented_struct():
    assert ctypes.sizeof(GgmlTensor) == 336
    offsets = {name: getattr(GgmlTensor, name).offset for name, _ in GgmlTensor._fields_}
    assert offsets == {
        "type": 0,
        "buffer": 8,
        "ne": 16,
        "nb": 48,
        "op": 80,
        "op_params": 84,
        "flags": 148,
        "src": 152,
        "view_src": 232,
        "view_offs": 240,
        "data": 248,
        "name": 256,
        "extra": 320,
        "padding": 328,
    }


def test_self_check_passes_on_the_pinned_version():
    import llama_cpp

    assert llama_cpp.__version__ == PINNED_LLAMA_CPP
    lib = load_ggml()  # raises RuntimeMismatchError if the mirror is wrong
    assert lib.ggml_tensor_overhead() == 336 + 32


def test_another_llama_cpp_version_is_refused(monkeypatch):
    import llama_cpp
    import pytest

    from edge_spade.errors import RuntimeMismatchError

    monkeypatch.setattr(llama_cpp, "__version__", "0.0.1")
    with pytest.raises(RuntimeMismatchError, match="pip install llama-cpp-python==0.3.36"):
        load_ggml()
