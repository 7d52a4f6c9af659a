"""`edge-spade serve` for real: uvicorn on an ephemeral loopback port, the tiny model, real clients
(urllib, the official `openai` package, `edge-spade ask --server`); no mocks of the server or model."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from edge_spade import load_model
from edge_spade.cli import main

KEY = "test-key"
QUESTIONS = [
    ("is the sky blue?", ["yes", "no"]),
    ("which is wet?", ["water", "sky", "paris"]),
    ("the sky is", None),
    ("the capital of france is", None),
]


@pytest.fixture(scope="module")
def server(tiny_model, tiny_heads):
    import uvicorn

    from edge_spade.server import create_app

    # the speed guard off: with it, whether a question is checked depends on what came before
    runtimes = [load_model(str(tiny_model[0]), heads=tiny_heads, n_ctx=256, speed_guard=False) for _ in range(2)]
    app = create_app(runtimes, queue=2, timeout=3.0, api_key=KEY)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", runtimes
    srv.should_exit = True
    thread.join(20)


@pytest.fixture(scope="module")
def reference(tiny_model, tiny_heads):
    rt = load_model(str(tiny_model[0]), heads=tiny_heads, n_ctx=256, speed_guard=False)
    yield rt
    rt.close()


def call(url: str, path: str, body=None, key: str | None = KEY, raw: bytes | None = None):
    """(status, JSON or text, headers) of one request."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url + path, data, headers, method="POST" if data is not None else "GET")
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            text = r.read().decode()
            kind = r.headers.get("content-type", "")
            return r.status, (json.loads(text) if kind == "application/json" else text), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def same(answer: dict, expected) -> bool:
    return all(answer[k] == getattr(expected, k) for k in ("answer", "probs", "mode", "layer", "exit_layer", "token"))


def test_health_models_and_ask_match_in_process_answers(server, reference):
    url, _ = server
    status, health, _ = call(url, "/health", key=None)
    assert status == 200 and health["status"] == "ready" and health["parallel"] == 2
    assert call(url, "/v1/models")[1]["data"][0]["id"] == reference.name
    for q, choices in QUESTIONS:
        status, answer, _ = call(url, "/v1/ask", {"id": 7, "question": q, "choices": choices})
        assert status == 200 and answer["id"] == 7 and same(answer, reference.ask(q, choices))
    status, answer, _ = call(url, "/v1/ask", {"question": "the sky is", "layer": 1, "top_k": 3})
    assert same(answer, reference.ask("the sky is", layer=1, top_k=3)) and len(answer["probs"]) <= 3


def test_batch_answers_stream_in_order_with_errors_in_place(server, reference):
    url, _ = server
    batch = [{"id": i, "question": q, "choices": c} for i, (q, c) in enumerate(QUESTIONS)]
    batch.insert(2, {"id": "long", "question": "the sky " * 400})  # past the 256-token context
    status, text, headers = call(url, "/v1/ask/batch", {"questions": batch})
    lines = [json.loads(line) for line in text.splitlines()]
    assert status == 200 and "ndjson" in headers["content-type"]
    assert [x["id"] for x in lines] == [0, 1, "long", 2, 3]
    assert "the context holds 256" in lines[2]["error"]
    for line, (q, c) in zip(lines[:2] + lines[3:], QUESTIONS):
        assert same(line, reference.ask(q, c))


def test_the_openai_client_gets_one_token_and_its_logprobs(server, reference):
    import openai

    url, _ = server
    client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    done = client.completions.create(model=reference.name, prompt="the sky is", max_tokens=1, logprobs=3)
    expected = reference.ask("the sky is", top_k=3)
    assert done.choices[0].text == expected.answer
    assert set(done.choices[0].logprobs.top_logprobs[0]) == set(expected.probs)
    assert done.usage.prompt_tokens == expected.prompt_tokens and done.usage.completion_tokens == 1
    with pytest.raises(openai.BadRequestError, match="max_tokens must be 1"):
        client.completions.create(model=reference.name, prompt="the sky is", max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="no chat template"):  # the tiny model has none
        client.chat.completions.create(model=reference.name, messages=[{"role": "user", "content": "hi"}], max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_concurrent_clients_get_the_sequential_answers(server, reference):
    url, _ = server
    expected = [reference.ask(q, c) for q, c in QUESTIONS]
    with ThreadPoolExecutor(4) as pool:  # two answering, two queued: the queue of 2 never overflows
        got = list(
            pool.map(
                lambda i: call(url, "/v1/ask", {"question": QUESTIONS[i % 4][0], "choices": QUESTIONS[i % 4][1]}),
                range(48),
            )
        )
    assert [status for status, _, _ in got] == [200] * 48
    for i, (_, answer, _) in enumerate(got):
        assert same(answer, expected[i % 4]), (i, answer, expected[i % 4])


def test_a_full_queue_is_503_and_a_long_wait_504(server):
    """Both runtimes held busy (their locks taken here) and two requests in the queue of 2: the next
    one is refused at once with Retry-After; the queued ones give up after the 3 s timeout; the two
    being answered finish once the runtimes are free."""
    url, runtimes = server
    for rt in runtimes:
        rt._lock.acquire()
    with ThreadPoolExecutor(4) as pool:
        try:
            requests = [pool.submit(call, url, "/v1/ask", {"question": "the sky is"}) for _ in range(4)]
            for _ in range(500):  # two hold the runtimes, two wait in the queue
                if call(url, "/health", key=None)[1]["waiting"] == 2:
                    break
                time.sleep(0.01)
            health = call(url, "/health", key=None)[1]
            assert health["waiting"] == 2, (health, [r.exception() for r in requests if r.done()])
            status, error, headers = call(url, "/v1/ask", {"question": "the sky is"})
            assert status == 503 and headers["Retry-After"] == "1" and "queue is full" in error["error"]["message"]
            while sum(r.done() for r in requests) < 2:  # the queued two time out while the runtimes stay busy
                time.sleep(0.01)
        finally:
            for rt in runtimes:
                rt._lock.release()
        assert sorted(r.result()[0] for r in requests) == [200, 200, 504, 504]


def test_bad_requests_are_4xx_with_a_message(server):
    url, _ = server
    assert call(url, "/v1/ask", {"question": "x"}, key=None)[0] == 401
    assert call(url, "/v1/ask", raw=b"{not json")[0] == 422
    assert call(url, "/v1/ask", {"question": "x", "color": "red"})[0] == 422
    assert call(url, "/v1/ask", {"question": ""})[0] == 422
    import http.client

    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    conn.putrequest("POST", "/v1/ask")  # a body announced as 2 MB is refused before it is read
    conn.putheader("Content-Length", str(2 << 20))
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.endheaders()
    response = conn.getresponse()
    assert response.status == 413 and "over" in json.loads(response.read())["error"]["message"]
    conn.close()
    status, error, _ = call(url, "/v1/ask", {"question": "is it?", "choices": ["yes"]})
    assert status == 400 and error["error"]["type"] == "QuestionError"


def test_ask_through_the_server_answers_what_ask_answers(server, tiny_model, tiny_heads, capsys, monkeypatch):
    url, _ = server
    monkeypatch.setenv("EDGE_SPADE_API_KEY", KEY)
    for q, c in QUESTIONS:
        args = ["ask", q, *(["--choices", *c] if c else []), "--json"]
        assert main([*args, "--server", url]) == 0
        remote = json.loads(capsys.readouterr().out)
        assert main([*args, "--model", str(tiny_model[0]), "--heads", str(tiny_heads), "--ctx", "256"]) == 0
        local = json.loads(capsys.readouterr().out)
        assert set(remote) == set(local)  # the same fields, the same answer
        # (which layer answered may differ: a resident server has tail models, a one-question ask does not)
        for key in ("answer", "choice_index", "label", "model", "n_layers", "prompt_tokens"):
            assert remote[key] == local[key], key
    assert main(["ask", "x", "--server", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the edge-spade server" in capsys.readouterr().err


def test_a_non_loopback_host_needs_an_api_key(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 1
    assert "refusing to listen on 0.0.0.0" in capsys.readouterr().err


def test_chat_completions_render_the_models_template(smollm):
    """SmolLM2 has a ChatML template: the chat endpoint answers what the runtime answers for the
    conversation rendered through it, and refuses a message that spells a control token."""
    import openai
    import uvicorn

    from edge_spade.prompts import chat_prompt
    from edge_spade.server import create_app

    app = create_app([smollm], queue=2, timeout=30)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}/v1", api_key="none", max_retries=0
        )
        messages = [{"role": "user", "content": "Is water wet? Answer yes or no."}]
        done = client.chat.completions.create(
            model=smollm.name, messages=messages, max_tokens=1, logprobs=True, top_logprobs=3
        )
        expected = smollm.ask_prompt(chat_prompt(smollm.engine, messages), top_k=3)
        assert done.choices[0].message.content == expected.answer
        assert len(done.choices[0].logprobs.content[0].top_logprobs) == 3
        with pytest.raises(openai.BadRequestError, match="spells a control token"):
            client.chat.completions.create(
                model=smollm.name, max_tokens=1, messages=[{"role": "user", "content": "hi<|im_end|>"}]
            )
    finally:
        srv.should_exit = True
        thread.join(20)


def test_health_says_loading_until_the_model_is_loaded(tiny_model):
    """With a loader, the server answers at once: /health says "loading" and questions get 503 with
    Retry-After until the runtimes are there; a model that cannot load is reported, not hidden."""
    import uvicorn

    from edge_spade.server import create_app

    go = threading.Event()

    def load():
        go.wait(30)
        return [load_model(str(tiny_model[0]), n_ctx=256)]

    srv = uvicorn.Server(uvicorn.Config(create_app(load), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    try:
        assert call(url, "/health", key=None)[1]["status"] == "loading"
        status, error, headers = call(url, "/v1/ask", {"question": "the sky is"}, key=None)
        assert status == 503 and headers["Retry-After"] == "1" and "loading" in error["error"]["message"]
        go.set()
        while call(url, "/health", key=None)[1]["status"] == "loading":
            time.sleep(0.05)
        assert call(url, "/health", key=None)[1]["status"] == "ready"
        assert call(url, "/v1/ask", {"question": "the sky is"}, key=None)[0] == 200
    finally:
        go.set()
        srv.should_exit = True
        thread.join(20)


def test_serve_refuses_a_model_it_cannot_find_before_listening(capsys):
    assert main(["serve", "--model", "no-such-model", "--port", "0"]) == 1
    assert "unknown model 'no-such-model'" in capsys.readouterr().err
