"""Tail models: the layers above l as their own GGUF compute exactly the whole-model SPADE tail."""

from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

from edge_spade import Engine
from edge_spade.errors import ModelFileError
from edge_spade.policy import ExitPolicy, spade_exit
from edge_spade.prompts import build_prompt
from edge_spade.tailmodel import TAIL_VOCAB, TailModelError, tail_model_path, write_head_model, write_tail_model
from tests.support import EXACT, tiny

CHOICES = np.array([5, 9, 17])


def tails_agree(engine: Engine, tokens: list[int], layers, widths) -> None:
    """Whole-model tails first, then the same tails on tail models: bit for bit, vocabulary and decision set."""
    trace = engine.trace(tokens, None, tail=max(widths))
    rows = {k: np.concatenate([trace.states[:, :1], trace.states[:, -k:]], axis=1) for k in widths}
    want = {
        (layer, k, ids is None): engine.spade_tail(rows[k][layer], layer, ids)
        for layer in layers
        for k in widths
        for ids in (None, CHOICES)
    }
    engine.use_tail_models(layers)
    assert sorted(engine._tails) == sorted(layers)
    for (layer, k, vocab), logits in want.items():
        got = engine.spade_tail(rows[k][layer], layer, None if vocab else CHOICES)
        np.testing.assert_array_equal(got, logits, err_msg=f"layer {layer}, K={k}")
        ref = engine.spade_tail(rows[k][layer], layer, None if vocab else CHOICES, tail_model=False)
        np.testing.assert_array_equal(ref, logits)


def test_tiny_tail_models_equal_whole_model_tails_and_the_numpy_reference(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    path, weights = tiny_model
    with Engine(path, EXACT) as engine:
        tokens = engine.tokenize("the capital of france is paris . the answer is")
        tails_agree(engine, tokens, layers=[0, 1, tiny.N_LAYERS - 2], widths=[1, 3, len(tokens)])
        got = engine.spade(tokens, 1, None, tail=3).logits  # SPADE through the tail model
        ref = tiny.spade_logits(weights, tokens, 1, tail=3)
        np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


def test_a_tail_without_its_lm_head_gives_the_same_rows_and_logits(tiny_model, tmp_path, monkeypatch):
    """spade_tail_normed: the answer row before and after the final norm, from which the decision set's
    logits (numpy) and the vocabulary's (head_logits) equal spade_tail's bit for bit; None without a
    tail model for the layer."""
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    with Engine(tiny_model[0], EXACT) as engine:
        tokens = engine.tokenize("the capital of france is paris . the answer is")
        states = engine.trace(tokens, None, tail=3).states[1]
        assert engine.spade_tail_normed(states, 1) is None
        engine.use_tail_models([1])
        hidden, normed = engine.spade_tail_normed(states, 1)
        assert hidden.shape == (1, engine.n_embd) and normed.shape == (engine.n_embd,)
        np.testing.assert_array_equal(engine.head_logits(hidden), engine.spade_tail(states, 1, None))
        np.testing.assert_array_equal(engine.head.logits(normed, CHOICES), engine.spade_tail(states, 1, CHOICES))


def n_vocab(src: Path) -> int:
    return len(gguf.GGUFReader(src).fields["tokenizer.ggml.tokens"].contents())


def derived_tensors(src: Path, out: Path, block_of) -> dict[str, gguf.ReaderTensor]:
    """The derived file's tensors by their source names, each checked byte for byte against the source
    (vocabulary matrices: against the source's first rows)."""
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(out)  # gguf's own parser as the independent reader
    src_tensors = {t.name: t for t in a.tensors}
    renamed = {}
    for t in b.tensors:
        original = t.name
        if t.name.startswith("blk."):
            _, i, rest = t.name.split(".", 2)
            original = f"blk.{block_of(int(i))}.{rest}"
        renamed[original] = t
        assert t.tensor_type == src_tensors[original].tensor_type
        want = np.asarray(src_tensors[original].data)
        np.testing.assert_array_equal(np.asarray(t.data), want[: len(np.asarray(t.data))], err_msg=t.name)
    return renamed


def test_tail_model_file_is_the_upper_layers_renumbered_with_a_stub_vocabulary(tiny_model, tmp_path):
    src, _ = tiny_model
    out = write_tail_model(src, 1, tmp_path / "above-1.gguf")
    b = gguf.GGUFReader(out)
    assert b.fields["llama.block_count"].contents() == tiny.N_LAYERS - 2
    # fed embeddings, never text: no tokenizer to parse on load, and no vocabulary matrix to hold
    assert b.fields["tokenizer.ggml.model"].contents() == "no_vocab"
    assert not any(k.startswith("tokenizer.ggml.tokens") for k in b.fields)
    assert b.fields["llama.vocab_size"].contents() == TAIL_VOCAB < n_vocab(src)
    tensors = derived_tensors(src, out, lambda i: i + 2)
    assert tensors["token_embd.weight"].shape.tolist() == [tiny.N_EMBD, TAIL_VOCAB]
    names = {t.name for t in gguf.GGUFReader(src).tensors}
    assert set(tensors) == {n for n in names if not n.startswith(("blk.0.", "blk.1."))}


def test_head_model_file_is_block_0_and_the_whole_vocabulary(tiny_model, tmp_path):
    src, _ = tiny_model
    out = write_head_model(src, tmp_path / "head.gguf")
    b = gguf.GGUFReader(out)
    assert b.fields["llama.block_count"].contents() == 1
    assert b.fields["llama.vocab_size"].contents() == n_vocab(src)
    tensors = derived_tensors(src, out, lambda i: i)
    assert tensors["token_embd.weight"].shape.tolist() == [tiny.N_EMBD, n_vocab(src)]
    names = {t.name for t in gguf.GGUFReader(src).tensors}
    assert set(tensors) == {n for n in names if not n.startswith("blk.") or n.startswith("blk.0.")}


def test_head_model_answers_every_free_question_and_the_output_matrix_is_held_once(tiny_model, tmp_path, monkeypatch):
    """Once tail models are in use, full passes end after the last layer and the head model applies
    the LM head: the same logits as llama.cpp's own head, and the main file's matrix pages released."""
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    with Engine(tiny_model[0], EXACT) as engine:
        tokens = engine.tokenize("the capital of france is paris . the answer is")
        want = engine.full(tokens, None).logits
        exit_want = engine.early_exit(tokens, None, {1: lambda rows: True}, tail=3).logits
        assert not engine.head_model
        engine.use_tail_models([1])
        assert engine.head_model and engine.tail_model_layers == [1]
        np.testing.assert_array_equal(engine.full(tokens, None).logits, want)
        np.testing.assert_array_equal(engine.early_exit(tokens, None, {1: lambda rows: True}, tail=3).logits, exit_want)
        np.testing.assert_array_equal(engine.trace(tokens, None).full.logits, want)


def test_tail_model_errors(tiny_model, tmp_path):
    src, _ = tiny_model
    for layer in (-1, tiny.N_LAYERS - 1):
        with pytest.raises(ModelFileError, match="a tail model needs a layer"):
            write_tail_model(src, layer, tmp_path / "x.gguf")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        write_tail_model(truncated, 1, tmp_path / "y.gguf")
    header_only = tmp_path / "header.gguf"
    header_only.write_bytes(src.read_bytes()[:300])  # cut inside the metadata
    with pytest.raises(ModelFileError, match="not a readable GGUF"):
        write_tail_model(header_only, 1, tmp_path / "h.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF"):
        write_tail_model(junk, 1, tmp_path / "z.gguf")
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_gemma_implicit_sliding_window_pattern_is_written_shifted(gemma, tmp_path, monkeypatch):
    """Gemma 3's file names no pattern (llama.cpp's default: every 6th layer global); cutting at a
    layer that is not a multiple of 6 only stays exact if the pattern is written out, shifted."""
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    engine = gemma.engine
    saved, saved_head = dict(engine._tails), engine._head
    engine._tails.clear()
    try:
        tokens = gemma.prompt("The capital of France is Paris. The capital of Italy is", None).tokens
        tails_agree(engine, tokens, layers=[3, 5], widths=[1, 8])
        pattern = gguf.GGUFReader(tail_model_path(engine.path, 3)).fields["gemma3.attention.sliding_window_pattern"]
        assert pattern.contents() == [(i % 6) < 5 for i in range(4, 18)]
        with pytest.raises(TailModelError, match="all global"):  # layer 17 alone is global: llama.cpp would abort
            write_tail_model(engine.path, 16, tmp_path / "g16.gguf")
        engine.use_tail_models([16])  # falls back to the whole model, with a log line
        assert 16 not in engine._tails
    finally:
        for t in engine._tails.values():
            t.close()
        engine._tails.clear()
        engine._tails.update(saved)
        if engine._head is not saved_head:
            engine._head.close()
            engine._head = saved_head


def test_probe_exit_runs_on_tail_models(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path))
    with Engine(tiny_model[0], EXACT) as engine:
        p = build_prompt(engine, "the capital of france is", None)
        want = engine.spade(p.tokens, 1, p.ids, tail=3).logits  # before any tail model exists
        policy = ExitPolicy(math.inf, (1, 2), {}, top_k=8, signal="spade")
        readout, _ = spade_exit(engine, None, policy, p, tail=3)
        assert sorted(engine._tails) == [1, 2] and readout.layer == 1
        np.testing.assert_array_equal(readout.logits, want)
    # without tail models (a one-question CLI call): the whole-model tail, the same logits
    with Engine(tiny_model[0], replace(EXACT, tail_models=False)) as engine:
        readout, _ = spade_exit(engine, None, policy, p, tail=3)
        assert engine._tails == {} and readout.layer == 1
        np.testing.assert_array_equal(readout.logits, want)


@pytest.mark.real_model
def test_with_tail_models_gemma_holds_its_output_matrix_once(tmp_path):
    """Once a tail model is in use the head model applies the LM head for every free answer and the
    main file's output matrix is no longer resident in the process (a populated mapping, as
    llama.cpp makes it, would count all of it). onnxruntime is imported only if a default rule runs
    L-SPADE heads."""
    import subprocess
    import sys

    code = """
import re, sys
from edge_spade import load_model
from edge_spade.bench.sets import load_set
rt = load_model("gemma3-270m", threads=2)
rt.ask("Is water wet?", ["yes", "no"])
rt.engine.use_tail_models([4])
for q in load_set("free-8")[:3]:
    rt.ask(q.question)
resident = {}
path = None
for line in open("/proc/self/smaps"):
    if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
        path = line.split()[-1] if len(line.split()) > 5 else None
    elif line.startswith("Rss:") and path:
        resident[path] = resident.get(path, 0) + int(line.split()[1]) * 1024
main = resident.get(str(rt.engine.path), 0)
sets = rt.manifest.sets.values()
runs_heads = any(s.runs_heads for s in sets)
probes = {layer for s in sets if s.signal == "cascade" for layer in s.cascade["probe_layers"]}  # its checks ran
tails = sorted({4} | probes)
print(rt.engine.head_model, rt.engine.tail_model_layers == tails, ("onnxruntime" in sys.modules) == runs_heads)
print(main < rt.engine.head.matrix_bytes / 2)
"""
    env = {**os.environ, "EDGE_SPADE_CACHE": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True", "True", "True"]
