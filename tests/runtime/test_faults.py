"""Faults and abuse, with real processes and signals: each gives its one-line error and exit code
(or a clean exception in the API), never a crash, a hang or a traceback; nothing answered is lost."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from edge_spade import EngineSettings, load_model
from edge_spade.cli import main
from edge_spade.errors import QuestionError, SettingsError
from tests.support.heads import with_probe

pytestmark = pytest.mark.faults


def cli(*argv: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edge_spade.cli", *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


@pytest.fixture(scope="module")
def many_questions(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "many.jsonl"
    path.write_text("".join(json.dumps({"id": i, "question": "the sky is"}) + "\n" for i in range(200_000)))
    return path


def test_ctrl_c_during_a_batch_stops_at_once_keeping_every_answer(tiny_model, many_questions):
    p = cli("ask", "--file", str(many_questions), "--json", "--model", str(tiny_model[0]), "--ctx", "64")
    first = p.stdout.readline()
    assert json.loads(first)["id"] == 0
    p.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    out, err = p.communicate(timeout=30)
    assert time.monotonic() - t0 < 5 and p.returncode == 130
    assert err.strip().splitlines()[-1] == "edge-spade: interrupted" and "Traceback" not in err
    lines = out.splitlines()
    assert all(json.loads(line)["answer"] for line in lines)  # every printed answer is whole
    assert len(lines) < 200_000 - 1


def test_a_reader_that_goes_away_is_no_error(tiny_model, many_questions):
    p = cli("ask", "--file", str(many_questions), "--json", "--model", str(tiny_model[0]), "--ctx", "64")
    p.stdout.readline()
    p.stdout.close()  # `| head -1`
    assert p.wait(timeout=30) == 141
    assert "Traceback" not in p.stderr.read()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--ctx", "4"], "the context size (--ctx) 4 must be an integer from 8 to 1048576"),
        (["--threads", "0"], "the thread count (--threads) 0 must be an integer from 1 to 1024 (or unset)"),
        (["--threads", "-1"], "the thread count (--threads) -1 must be an integer from 1 to 1024 (or unset)"),
        (["--gpu-layers", "-5"], "the GPU layer count (--gpu-layers) -5 must be 0 or more (-1: all)"),
        (["--threshold", "nan"], "the threshold must be a number of nats (negative: never exit), got nan"),
        (["--file", "/nonexistent/q.jsonl"], "cannot read --file /nonexistent/q.jsonl: No such file or directory"),
        (["--file", "/"], "cannot read --file /: Is a directory"),
    ],
)
def test_bad_settings_are_one_line_errors(capsys, tiny_model, argv, message):
    question = [] if "--file" in argv else ["the sky is"]
    assert main(["ask", *question, "--model", str(tiny_model[0]), *argv]) == 1
    assert capsys.readouterr().err == f"edge-spade: error: {message}\n"


def test_a_tiny_context_refuses_long_prompts_instead_of_aborting(capsys, tiny_model):
    """--ctx 10 once let a 20-token prompt through to llama.cpp, which aborted the process."""
    assert (
        main(
            ["ask", "the capital of france is paris and the sky is blue", "--model", str(tiny_model[0]), "--ctx", "10"]
        )
        == 1
    )
    assert "but the context holds 10" in capsys.readouterr().err


def test_bad_values_in_the_api_are_clean_exceptions(tiny_model):
    with pytest.raises(SettingsError):
        EngineSettings(n_ctx=0)
    rt = load_model(str(tiny_model[0]), n_ctx=64)
    try:
        with pytest.raises(QuestionError, match="not the string 'yes'"):
            rt.ask("is the sky blue?", "yes")
        with pytest.raises(QuestionError, match="every choice must be a string"):
            rt.ask("is the sky blue?", ["yes", 1])
        with pytest.raises(SettingsError, match="threshold"):
            rt.ask("the sky", threshold=float("nan"))
    finally:
        rt.close()


def test_the_interrupt_handler_is_put_back(tiny_model):
    before = signal.getsignal(signal.SIGINT)
    rt = load_model(str(tiny_model[0]), n_ctx=64)
    rt.ask("the sky is")
    rt.close()
    assert signal.getsignal(signal.SIGINT) is before


def test_an_unusable_cache_degrades_instead_of_failing(tiny_model, tiny_heads, tmp_path):
    """The cache is a shortcut: with EDGE_SPADE_CACHE under a regular file (nothing can be written
    there, even as root) questions are still answered, tail models included, with a warning."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = {**os.environ, "EDGE_SPADE_CACHE": str(blocker / "cache")}
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"question": "the sky is"}\n{"question": "the water is"}\n')
    heads = with_probe(tiny_heads, tmp_path / "heads")
    argv = ["ask", "--file", str(lines), "--json", "--model", str(tiny_model[0]), "--heads", str(heads)]
    p = cli(*argv, "--ctx", "64", "--no-guard", env=env)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert [json.loads(line)["exit_layer"] for line in out.splitlines()] == [1, 1]
    assert "cannot cache the index" in err and "no head model" in err and "Traceback" not in err


@pytest.mark.parametrize("bad", ["not onnx at all", "another width"])
def test_heads_that_do_not_fit_are_refused(tiny_model, tiny_heads, tmp_path, capsys, bad):
    """ONNX heads whose hashes were updated but that do not parse, or map another width: one line, exit 1.
    At load where the default rule runs them in a batch; otherwise (no certified threshold, or one
    question) onnxruntime is not even loaded until a head runs, and the same error comes then."""
    import hashlib
    import shutil

    import numpy as np

    from edge_spade.convert.heads_train import LayerHead
    from edge_spade.convert.onnx_export import export_onnx

    heads = tmp_path / "heads"
    shutil.copytree(tiny_heads, heads)
    raw = json.loads((heads / "heads.json").read_text())
    n_layers = len(raw["sets"]["choice"]["layers"])
    data = (
        b"junk"
        if bad == "not onnx at all"
        else export_onnx([LayerHead.identity(8, 2) for _ in range(n_layers)], np.ones(8, np.float32), 1e-5)
    )
    (heads / "lspade-choice.onnx").write_bytes(data)
    raw["hashes"]["lspade-choice.onnx"] = hashlib.sha256(data).hexdigest()
    raw["sets"]["choice"]["domain"] = {}  # no domain gate: the head runs on this question, whatever its state
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"question": "is the sky blue?", "choices": ["yes", "no"]}\n')
    model = ["--model", str(tiny_model[0]), "--heads", str(heads)]
    ask = ["ask", "is the sky blue?", "--choices", "yes", "no", *model]
    # a batch loads heads its default rule runs at once; one question, when one first runs
    for threshold, argv in ((0.5, ["ask", "--file", str(lines), *model]), (-1.0, [*ask, "--threshold", "0.5"])):
        raw["sets"]["choice"].update(signal="lspade", threshold=threshold)
        raw["sets"]["choice"]["thresholds"]["lspade"] = threshold
        (heads / "heads.json").write_text(json.dumps(raw))
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("edge-spade: error: ") and "is not a usable heads file for this model" in err
    assert main(ask) == 0  # never exiting by default: the file is never run


def test_the_cache_command_lists_bounds_and_clears(tiny_model, tmp_path, monkeypatch, capsys):
    from edge_spade.cache import cache_dir, enforce_cap, sweep_orphans
    from edge_spade.tailmodel import tail_model_path

    monkeypatch.setenv("EDGE_SPADE_CACHE", str(tmp_path / "cache"))
    first, second = tail_model_path(tiny_model[0], 1), tail_model_path(tiny_model[0], 2)
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "tails" in out and "2 files" in out
    # a cap that holds two tail models: making room for a third evicts the least recently used
    monkeypatch.setenv("EDGE_SPADE_CACHE_MAX_MB", str(first.stat().st_size * 2.5 / 1e6))
    os.utime(second, (1, 1))
    enforce_cap(first.stat().st_size)
    assert first.exists() and not second.exists()
    # temporary files of killed writers go, fresh ones stay
    old, fresh = first.with_name(".x.gguf.tmp123"), first.with_name(".y.gguf.tmp456")
    old.write_bytes(b"0")
    fresh.write_bytes(b"0")
    os.utime(old, (1, 1))
    assert sweep_orphans(cache_dir()) == 1 and fresh.exists() and not old.exists()
    # ... anywhere in the cache (a killed model assembly, a killed index write), when a writer starts
    orphans = [cache_dir() / "models" / "m.gguf.part999", cache_dir() / "index" / "i.json.tmp999"]
    for orphan in orphans:
        orphan.parent.mkdir(parents=True, exist_ok=True)
        orphan.write_bytes(b"0")
        os.utime(orphan, (1, 1))
    tail_model_path(tiny_model[0], 0)
    assert not any(orphan.exists() for orphan in orphans)
    assert main(["cache", "--clear", "tails"]) == 0 and not (cache_dir() / "tails").exists()
    assert main(["cache", "--clear", "nonsense"]) == 1
    assert "unknown cache kind(s) nonsense" in capsys.readouterr().err


def test_a_device_as_the_model_is_refused_by_name(capsys):
    assert main(["ask", "the sky is", "--model", "/dev/zero"]) == 1
    assert capsys.readouterr().err == (
        "edge-spade: error: /dev/zero is not a regular file (a device or a pipe?); give a .gguf file, a bundle or "
        "a model name\n"
    )


def test_a_full_disk_while_a_tail_model_is_written_degrades(tiny_model, tiny_heads, tmp_path):
    """A file-size limit (RLIMIT_FSIZE: writes past it fail with EFBIG, as a full disk fails them
    with ENOSPC) lets the small index cache be written but not the head model: the questions are
    answered with tails run on the whole model, and no partial file is left in the cache."""
    import resource

    cache = tmp_path / "cache"
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"question": "the sky is"}\n{"question": "the water is"}\n{"question": "the sun is"}\n')
    heads = with_probe(tiny_heads, tmp_path / "heads")
    limit = tiny_model[0].stat().st_size // 4  # below its head model, above the index cache

    def small_disk() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    argv = ["ask", "--file", str(lines), "--json", "--model", str(tiny_model[0]), "--heads", str(heads)]
    p = cli(
        *argv, "--ctx", "64", "--no-guard", env={**os.environ, "EDGE_SPADE_CACHE": str(cache)}, preexec_fn=small_disk
    )
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    assert [json.loads(line)["exit_layer"] for line in out.splitlines()] == [1, 1, 1]
    assert "no head model" in err and "File too large" in err and "Traceback" not in err
    leftovers = [f.name for f in cache.rglob("*") if ".part" in f.name or ".tmp" in f.name]
    assert leftovers == []


def test_ctrl_c_during_bench_keeps_what_was_measured(tiny_model, tiny_heads, tmp_path):
    lines = tmp_path / "q.jsonl"
    lines.write_text('{"question": "the sky is"}\n{"question": "is the sky blue?", "choices": ["yes", "no"]}\n')
    out = tmp_path / "out"
    argv = ["bench", "--model", str(tiny_model[0]), "--heads", str(tiny_heads), "--set", str(lines)]
    p = cli(*argv, "--duration", "600", "--energy", "none", "--no-rss", "--out", str(out))
    for line in p.stderr:  # the measured phase has begun
        if "measuring 600 s" in line:
            break
    time.sleep(1.0)
    p.send_signal(signal.SIGINT)
    stdout, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted: figures cover" in stdout and "Traceback" not in err
    saved = json.loads((out / "bench-tiny-llama.json").read_text())
    assert saved["interrupted"] and saved["questions"]["answered"] > 0
    assert len(saved["records"]) == 3 * saved["questions"]["answered"]  # whole questions only
