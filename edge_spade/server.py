"""`edge-spade serve`: a model loaded once, answering over HTTP on loopback, for desktop apps.

FastAPI on uvicorn (the `server` extra). One llama context answers one question at a time, so
the server holds `parallel` runtimes in a pool: a request waits for a free one in a bounded
queue (503 with Retry-After when the queue is full, 504 past its timeout), and queued work
whose client has gone is dropped. Endpoints: `/health`, `/v1/models`, `/v1/ask` (the Python
API's `ask`, the JSON of `ask --json`), `/v1/ask/batch` (NDJSON, in order), and OpenAI's
`/v1/completions` and `/v1/chat/completions` for single-token answers (`max_tokens` 1).
The framework serves its OpenAPI page at `/docs`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Literal

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from .errors import EdgeSpadeError
from .prompts import MAX_CHOICES, chat_prompt
from .runtime import Runtime

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_QUESTION_CHARS = 100_000  # the context bounds it further: a longer prompt is a 400 from the runtime
MAX_BATCH = 1000
MAX_TOP = 20
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class AskRequest(BaseModel):
    """The Python API's `ask`, field for field."""

    model_config = ConfigDict(extra="forbid")
    id: str | int | None = None
    question: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    choices: list[str] | None = Field(default=None, max_length=MAX_CHOICES)
    layer: int | None = None
    lens: Literal["spade", "logit"] = "spade"
    tail: int | None = Field(default=None, ge=1, le=64)
    full: bool = False
    threshold: float | None = None
    signal: Literal["lspade", "spade", "cascade"] | None = None
    top_k: int = Field(default=5, ge=1, le=MAX_TOP)

    def options(self) -> dict:
        return self.model_dump(exclude={"id", "question", "choices"})


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    questions: list[AskRequest] = Field(min_length=1, max_length=MAX_BATCH)


class CompletionRequest(BaseModel):
    """OpenAI's completion request, as far as one next token goes."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str = Field(min_length=1, max_length=MAX_QUESTION_CHARS)
    max_tokens: int | None = None
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    n: int = 1
    stream: bool = False
    echo: bool = False


class ChatMessage(BaseModel):
    role: str
    content: str = Field(max_length=MAX_QUESTION_CHARS)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP)
    n: int = 1
    stream: bool = False


class Pool:
    """`runtimes` behind a bounded queue: at most `queue` requests wait for one, each `timeout` s at most."""

    def __init__(self, runtimes: list[Runtime], queue: int = 16, timeout: float = 30.0) -> None:
        self.runtimes, self.queue, self.timeout = runtimes, queue, timeout
        self.free: asyncio.Queue[Runtime] | None = None
        self.admitted = 0  # requests answering or waiting: at most len(runtimes) + queue

    @property
    def waiting(self) -> int:
        return max(0, self.admitted - len(self.runtimes))

    async def run(self, request: Request | None, work):
        """`work(runtime)` on a free runtime, in a worker thread (the event loop stays free)."""
        if not self.runtimes:
            raise HTTPException(503, "the model is still loading", headers={"Retry-After": "1"})
        if self.free is None:  # made on the server's loop
            self.free = asyncio.Queue()
            for rt in self.runtimes:
                self.free.put_nowait(rt)
        if self.admitted >= len(self.runtimes) + self.queue:
            raise HTTPException(
                503,
                "the server is busy: every runtime is answering and the queue is full",
                headers={"Retry-After": "1"},
            )
        self.admitted += 1
        try:
            try:
                rt = await asyncio.wait_for(self.free.get(), self.timeout)
            except TimeoutError:
                raise HTTPException(504, f"no runtime was free within {self.timeout:g} s") from None
            try:
                if request is not None and await request.is_disconnected():  # the client has gone: drop the work
                    raise HTTPException(499, "the client closed the request")
                return await run_in_threadpool(work, rt)
            finally:
                self.free.put_nowait(rt)
        finally:
            self.admitted -= 1

    def close(self) -> None:
        for rt in self.runtimes:
            rt.close()


def create_app(
    runtimes: list[Runtime] | Callable[[], list[Runtime]],
    *,
    queue: int = 16,
    timeout: float = 30.0,
    api_key: str | None = None,
) -> FastAPI:
    """The HTTP API over `runtimes` (one model, loaded `parallel` times), or over what the function
    `runtimes` loads once the server is up: meanwhile /health says "loading" and questions get 503."""
    load = runtimes if callable(runtimes) else None
    pool = Pool([] if load else runtimes, queue, timeout)
    state = {"status": "loading" if load else "ready", "error": None}

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        async def load_in_background() -> None:
            try:
                pool.runtimes = await run_in_threadpool(load)
                state["status"] = "ready"
            except Exception as exc:  # noqa: BLE001 - reported by /health, the server stays up to say so
                log.error("the model failed to load: %s", exc)
                state.update(status="failed", error=str(exc))

        task = asyncio.create_task(load_in_background()) if load else None
        yield
        if task is not None:
            await task
        pool.close()  # after uvicorn has finished or refused the requests in flight

    app = FastAPI(
        title="edge-spade", version=_version(), summary="Single-token answers with SPADE-EXIT", lifespan=lifespan
    )
    app.state.pool = pool

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer ...)")

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return _error(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        return await call_next(request)

    @app.exception_handler(EdgeSpadeError)
    async def user_error(_request: Request, exc: EdgeSpadeError):
        return _error(400, str(exc), type(exc).__name__)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, exc: HTTPException):
        return _error(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def bug(_request: Request, exc: Exception):  # logged here, never sent as a traceback
        log.exception("internal error")
        return _error(500, "internal error (logged by the server)")

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": state["status"],
            "model": pool.runtimes[0].name if pool.runtimes else None,
            "parallel": len(pool.runtimes),
            "waiting": pool.waiting,
            **({"error": state["error"]} if state["error"] else {}),
        }

    @app.get("/v1/models", dependencies=[Depends(authorize)])
    async def models() -> dict:
        data = [{"id": rt.name, "object": "model", "created": 0, "owned_by": "edge-spade"} for rt in pool.runtimes[:1]]
        return {"object": "list", "data": data}

    @app.post("/v1/ask", dependencies=[Depends(authorize)])
    async def ask(body: AskRequest, request: Request) -> dict:
        answer = await pool.run(request, lambda rt: rt.ask(body.question, body.choices, **body.options()))
        return {"id": body.id, **answer.to_dict()}

    @app.post("/v1/ask/batch", dependencies=[Depends(authorize)])
    async def ask_batch(body: BatchRequest, request: Request) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            for item in body.questions:
                try:
                    answer = await pool.run(request, lambda rt, q=item: rt.ask(q.question, q.choices, **q.options()))
                    record = {"id": item.id, **answer.to_dict()}
                except (EdgeSpadeError, HTTPException) as exc:
                    record = {"id": item.id, "error": str(getattr(exc, "detail", exc))}
                yield (json.dumps(record, ensure_ascii=False) + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @app.post("/v1/completions", dependencies=[Depends(authorize)])
    async def completions(body: CompletionRequest, request: Request) -> dict:
        _one_token(body.max_tokens, body.n, body.stream)
        if body.echo:
            raise HTTPException(400, "echo is not supported: the answer is one token")
        top = max(body.logprobs or 0, 1)
        answer = await pool.run(request, lambda rt: rt.ask(body.prompt, None, top_k=top))
        logprobs = _completion_logprobs(answer, body.logprobs) if body.logprobs is not None else None
        return _openai(
            "text_completion",
            "cmpl",
            answer,
            {"index": 0, "text": answer.answer, "logprobs": logprobs, "finish_reason": "length"},
        )

    @app.post("/v1/chat/completions", dependencies=[Depends(authorize)])
    async def chat(body: ChatRequest, request: Request) -> dict:
        _one_token(
            body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
            body.n,
            body.stream,
        )
        messages = [m.model_dump() for m in body.messages]
        top = max(body.top_logprobs or 0, 1)
        answer = await pool.run(request, lambda rt: rt.ask_prompt(lambda: chat_prompt(rt.engine, messages), top_k=top))
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": answer.answer},
            "logprobs": _chat_logprobs(answer, body.top_logprobs or 0) if body.logprobs else None,
            "finish_reason": "length",
        }
        return _openai("chat.completion", "chatcmpl", answer, choice)

    return app


def _one_token(max_tokens: int | None, n: int, stream: bool) -> None:
    if max_tokens != 1:
        raise HTTPException(400, f"max_tokens must be 1: edge-spade answers with a single token (got {max_tokens})")
    if n != 1 or stream:
        raise HTTPException(400, "n must be 1 and stream false: one answer of one token")


def _completion_logprobs(answer, k: int) -> dict:
    top = {text: math.log(p) for text, p in list(answer.probs.items())[: max(k, 1)] if p > 0}
    return {
        "tokens": [answer.answer],
        "token_logprobs": [top.get(answer.answer)],
        "top_logprobs": [top],
        "text_offset": [0],
    }


def _chat_logprobs(answer, k: int) -> dict:
    top = [
        {"token": text, "logprob": math.log(p), "bytes": list(text.encode())}
        for text, p in list(answer.probs.items())[:k]
        if p > 0
    ]
    p = answer.probs.get(answer.answer)
    first = {
        "token": answer.answer,
        "logprob": math.log(p) if p else None,
        "bytes": list(answer.answer.encode()),
        "top_logprobs": top,
    }
    return {"content": [first]}


def _openai(kind: str, prefix: str, answer, choice: dict) -> dict:
    return {
        "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
        "object": kind,
        "created": int(time.time()),
        "model": answer.model,
        "choices": [choice],
        "usage": {
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": 1,
            "total_tokens": answer.prompt_tokens + 1,
        },
        # how the answer was reached; OpenAI clients ignore fields they do not know
        "edge_spade": {
            k: getattr(answer, k) for k in ("mode", "layer", "exit_layer", "n_layers", "plan", "guard", "timings_ms")
        },
    }


def _error(status: int, message: str, kind: str = "error", headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind}}, status_code=status, headers=headers)


def _version() -> str:
    from . import __version__

    return __version__


def check_host(host: str, api_key: str | None) -> None:
    """Loopback only, unless an API key guards the server."""
    if host not in LOOPBACK and not api_key:
        raise EdgeSpadeError(
            f"refusing to listen on {host}: anyone on the network could ask it; bind 127.0.0.1, "
            "or give --api-key (then required as a Bearer token)"
        )


def serve(
    model: str | None = None,
    *,
    heads: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8080,
    parallel: int = 1,
    queue: int = 16,
    timeout: float = 30.0,
    api_key: str | None = None,
    threads: int | None = None,
    speed_guard: bool = True,
    reuse_prefix: bool = False,
) -> None:
    """Load `parallel` runtimes of `model` and serve them until SIGINT or SIGTERM (in-flight answers finish)."""
    import uvicorn

    from .registry import resolve_model
    from .runtime import load_model

    check_host(host, api_key)
    if not 1 <= parallel <= 64:
        raise EdgeSpadeError(f"--parallel must be from 1 to 64, got {parallel}")

    def load() -> list[Runtime]:
        options = dict(heads=heads, threads=threads, speed_guard=speed_guard, reuse_prefix=reuse_prefix)
        first = load_model(model, **options)
        runtimes = [first] + [  # more contexts on the same loaded weights
            load_model(model, **options, share_with=first) for _ in range(parallel - 1)
        ]
        log.info("%s loaded: %d runtime(s) answering", runtimes[0].name, parallel)
        return runtimes

    resolve_model(model)  # a wrong name or file is an error now, not a "failed" status later
    app = create_app(load, queue=queue, timeout=timeout, api_key=api_key)
    log.info("serving on http://%s:%d (API docs at /docs); loading the model", host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(timeout))
