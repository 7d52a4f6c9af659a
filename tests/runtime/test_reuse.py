"""Reusing a kept prefix (reuse_prefix): only what a prompt adds runs, and its logits are still the
model's (an independent numpy forward pass); passes that stop or write keep nothing; off by default."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from edge_spade import Engine, load_model
from edge_spade.cli import main
from edge_spade.hooks import Tap
from tests.support import EXACT, tiny

PREFIX = "the capital of france is paris\nthe capital of italy is rome\nthe sky is blue\n"
QUESTIONS = [PREFIX + q for q in ("the capital of spain is", "water is", "the sky is")]
TOL = 1e-4


def close(got: np.ndarray, want: np.ndarray) -> None:
    np.testing.assert_allclose(got, want, atol=TOL * max(1.0, np.abs(want).max()), rtol=0)


@pytest.fixture()
def reusing(tiny_model):
    engine = Engine(tiny_model[0], replace(EXACT, reuse_prefix=True))
    yield engine
    engine.close()


def shared(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b[:-1])) if x != y), min(len(a), len(b) - 1))


def test_a_kept_prefix_runs_only_the_rest_and_gives_the_models_logits(reusing, tiny_model):
    tokens = [reusing.tokenize(q) for q in QUESTIONS]
    first = reusing.full(tokens[0], None)
    assert first.reused == 0  # nothing kept yet
    close(first.logits, tiny.full_logits(tiny_model[1], tokens[0]))
    for before, now in zip(tokens, tokens[1:]):
        assert reusing.reusable(now) == shared(before, now) > len(tiny.WORDS) // 4
        readout = reusing.full(now, None)
        assert readout.reused == shared(before, now)
        close(readout.logits, tiny.full_logits(tiny_model[1], now))  # the suffix on the kept cache: the model's
    ids = np.array([5, 77, 300])  # a decision set (the graph ends at result_norm) keeps the cache as well
    again = reusing.full(tokens[0], ids)
    assert again.reused == shared(tokens[-1], tokens[0])
    close(again.logits, tiny.full_logits(tiny_model[1], tokens[0])[ids])
    assert reusing.full(tokens[0], None).reused == len(tokens[0]) - 1  # the same prompt: all but its last token


def test_passes_that_stop_or_write_keep_nothing(reusing, tiny_model):
    tokens = [reusing.tokenize(q) for q in QUESTIONS]
    reusing.full(tokens[0], None)
    reusing.spade(tokens[1], 1, None)  # stops after layer 1: llama.cpp rolls its batch back
    assert reusing.reusable(tokens[1]) == 0
    reusing.full(tokens[0], None)
    states = np.zeros((2, tiny.N_EMBD), np.float32)
    reusing.spade_tail(states, 1, None, tokens[0][:2])  # writes into the graph: its cache is not the prompt's
    assert reusing.reusable(tokens[1]) == 0
    readout = reusing.full(tokens[1], None)
    assert readout.reused == 0
    close(readout.logits, tiny.full_logits(tiny_model[1], tokens[1]))
    reusing.full(tokens[0], None)
    with pytest.raises(ValueError, match="rows counted from the end"):
        reusing._decode(tokens[1], {reusing.arch.layer_node(1): Tap(read_rows=(0,))}, reuse=True)
    assert reusing.reusable(tokens[1]) == shared(tokens[0], tokens[1])  # refused before the cache was touched


def test_off_by_default(tiny_engine):
    tokens = [tiny_engine.tokenize(q) for q in QUESTIONS]
    tiny_engine.full(tokens[0], None)
    assert tiny_engine.reusable(tokens[1]) == 0 and tiny_engine.full(tokens[1], None).reused == 0


def test_the_default_rule_answers_a_repeated_prefix_by_a_plain_pass(tmp_path, tiny_heads, tiny_model):
    """A rule that exits at once: the first question exits (its pass stopped, nothing kept); the next,
    repeating its prefix, is answered by a plain pass that keeps its cache; the one after runs only its own
    tokens on it. Both answer as the full model does."""
    from tests.support.heads import with_cascade

    plans = [{"max_tokens": None, "check": True, "check_whole_model": True}]
    heads = with_cascade(tiny_heads, tmp_path / "heads", plans, head=1e9, probe=-1.0)
    options = dict(heads=heads, n_ctx=256, kv_type="f32", speed_guard=False)
    with load_model(str(tiny_model[0]), reuse_prefix=True, **options) as rt:
        with load_model(str(tiny_model[0]), **options) as fresh:
            first = rt.ask(QUESTIONS[0])
            assert first.exit_layer == 1 and first.reused_tokens == 0
            second, third = rt.ask(QUESTIONS[1]), rt.ask(QUESTIONS[2])
            assert (second.guard, second.exit_layer, second.entropy, second.reused_tokens) == ("prefix", None, {}, 0)
            assert third.guard == "prefix" and third.exit_layer is None and third.reused_tokens > 0
            for got, question in ((second, QUESTIONS[1]), (third, QUESTIONS[2])):
                want = fresh.ask(question, full=True)
                assert got.token == want.token and got.probs == pytest.approx(want.probs, abs=1e-4)
            assert fresh.ask(QUESTIONS[2]).exit_layer == 1  # without reuse_prefix the rule runs as written


def test_ask_file_reuses_prefixes_from_the_command_line(capsys, tmp_path, tiny_model):
    f = tmp_path / "q.jsonl"
    f.write_text("".join(json.dumps({"id": i, "question": q}) + "\n" for i, q in enumerate(QUESTIONS)))
    argv = ["ask", "--file", str(f), "--model", str(tiny_model[0]), "--json", "--full"]
    assert main([*argv, "--reuse-prefix"]) == 0
    reused = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert main(argv) == 0
    fresh = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["reused_tokens"] for a in fresh] == [0, 0, 0]
    assert reused[0]["reused_tokens"] == 0 and all(a["reused_tokens"] > 0 for a in reused[1:])
    assert [a["token"] for a in reused] == [a["token"] for a in fresh]


def test_serve_reuse_prefix_answers_over_http(tiny_model):
    """`edge-spade serve --reuse-prefix` in a process of its own, asked twice behind one prefix by a real
    HTTP client: the second answer reports the reused tokens; SIGINT ends it cleanly."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["serve", "--model", str(tiny_model[0]), "--port", str(port), "--reuse-prefix", "--no-guard"]
    code = f"from edge_spade.cli import main; raise SystemExit(main({args!r}))"
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"

    def post(question: str) -> dict:
        body = json.dumps({"question": question, "full": True}).encode()
        request = urllib.request.Request(url + "/v1/ask", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())

    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(url + "/health", timeout=1) as r:
                    if json.loads(r.read())["status"] == "ready":
                        break
            except OSError:
                pass
            time.sleep(0.1)
        first, second = post(QUESTIONS[0]), post(QUESTIONS[1])
        assert first["reused_tokens"] == 0 and second["reused_tokens"] > 0
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and b"Traceback" not in err
