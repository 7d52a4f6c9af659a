"""The command line: answers, JSON, --file, and clear errors (exit 1, no traceback) on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edge_spade.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture()
def tiny_path(tiny_model) -> str:
    return str(tiny_model[0])


def test_ask_json_has_the_documented_fields(capsys, tiny_path):
    code, out, _ = run(capsys, "ask", "is the sky blue?", "--choices", "yes", "no", "--model", tiny_path, "--json")
    assert code == 0
    a = json.loads(out)
    for key in ("answer", "choice_index", "probs", "mode", "layer", "n_layers", "prompt_tokens", "timings_ms", "model"):
        assert key in a
    assert a["mode"] == "full" and a["n_layers"] == 4 and a["layer"] == 3 and set(a["probs"]) == {"yes", "no"}
    assert set(a["timings_ms"]) >= {"total", "prefill", "tail"} and a["answer"] in ("yes", "no")


def test_ask_spade_and_lens_modes(capsys, tiny_path):
    code, out, _ = run(capsys, "ask", "the capital of", "--model", tiny_path, "--layer", "1", "--json")
    a = json.loads(out)
    assert code == 0 and a["mode"] == "spade" and a["layer"] == 1 and a["choice_index"] is None
    code, out, _ = run(
        capsys, "ask", "the capital of", "--model", tiny_path, "--layer", "2", "--lens", "logit", "--json"
    )
    assert code == 0 and json.loads(out)["mode"] == "logit-lens"
    code, out, _ = run(capsys, "ask", "what?", "--choices", "a b", "c d", "e f", "--model", tiny_path, "--full")
    assert code == 0 and "full depth of 4 layers" in out and "answer: " in out


def test_file_mode_reports_bad_lines_and_answers_the_rest(capsys, tmp_path, tiny_path):
    f = tmp_path / "q.jsonl"
    f.write_bytes(
        b'{"id": "a", "question": "is water wet?", "choices": ["yes", "no"]}\n'
        b"not json\n"
        b'{"id": "c", "question": ""}\n'
        b'{"id": "d", "question": "caf\xff"}\n'
        b'{"id": "e", "question": "the sky is"}\n'
    )
    code, out, err = run(capsys, "ask", "--file", str(f), "--model", tiny_path, "--json")
    assert code == 1
    answered = [json.loads(line) for line in out.splitlines()]
    assert [a["id"] for a in answered] == ["a", "e"]
    assert "line 2:" in err and "line 3:" in err and "question is empty" in err and "line 4:" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "   "], "question is empty"),
        (["ask", "x?", "--choices", "yes"], "at least two choices"),
        (["ask", "x?", "--choices", "Paris", " Paris"], "duplicate choice"),
        (["ask", "x?", "--choices", "a", ""], "choice is empty"),
        (["ask", "the sky " * 200, "--ctx", "64"], "but the context holds"),
        (["ask", "x", "--layer", "9"], "outside 0..3"),
        (["ask", "x", "--lens", "logit"], "needs a layer"),
        (["ask", "x", "--tail", "0", "--layer", "1"], "tail width"),
        (["ask"], "give a question"),
    ],
)
def test_bad_questions(capsys, tiny_path, argv, message):
    code, out, err = run(capsys, *argv, "--model", tiny_path)
    assert code == 1 and message in err and "Traceback" not in err and out == ""


def test_bad_model_files(capsys, tmp_path, tiny_model):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(os.urandom(4096))
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + os.urandom(200))
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model[0].read_bytes()[: tiny_model[0].stat().st_size // 2])
    cases = [
        (str(tmp_path / "missing.gguf"), "does not exist"),
        (str(garbage), "not a GGUF file"),
        (str(corrupt), "not a readable GGUF file"),
        (str(truncated), "truncated"),
        ("no-such-model", "unknown model 'no-such-model'"),
        (str(tmp_path), "is a directory"),
    ]
    for model, message in cases:
        code, _, err = run(capsys, "ask", "hello", "--model", model)
        assert code == 1 and message in err and "Traceback" not in err, (model, err)


def test_unknown_architecture(capsys, tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.add_tensor("output_norm.weight", np.ones(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    code, _, err = run(capsys, "ask", "hello", "--model", str(path))
    assert code == 1 and "architecture 'mamba' is not supported" in err


def test_non_utf8_argument_and_console_script(tiny_path):
    """A real process: argv bytes that are not UTF-8 give a clear error, not a traceback."""
    cmd = [sys.executable, "-m", "edge_spade.cli", "ask", b"caf\xe9 \xff?", "--model", tiny_path]
    proc = subprocess.run(cmd, capture_output=True, env={**os.environ, "LC_ALL": "C.UTF-8"})
    assert proc.returncode == 1 and b"not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edge_spade.cli",
            "ask",
            "is it?",
            "--choices",
            "yes",
            "no",
            "--model",
            tiny_path,
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["answer"] in ("yes", "no")


def test_models_lists_the_registry(capsys):
    code, out, _ = run(capsys, "models", "--json")
    entries = {e["name"]: e for e in json.loads(out)}
    assert code == 0 and entries["gemma3-270m"]["default"] and "smollm2-135m" in entries
    code, out, _ = run(capsys, "models")
    assert code == 0 and "(default)" in out
