"""Asking a running `edge-spade serve` (`ask --server URL`), with the standard library only: the
point of a resident server is a fast start, so this path imports no numpy, llama.cpp or onnxruntime."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence

from .answer import Answer
from .errors import EdgeSpadeError


class ServerError(EdgeSpadeError):
    """The server could not be reached, or refused the question (its message is passed on)."""


class Client:
    """Questions to one server; `ask` takes the same arguments as Runtime.ask."""

    def __init__(self, url: str, api_key: str | None = None, timeout: float = 120.0) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def ask(self, question: str, choices: Sequence[str] | None = None, **options) -> Answer:
        body = {
            "question": question,
            "choices": list(choices) if choices is not None else None,
            **{k: v for k, v in options.items() if v is not None and k != "template"},
        }
        if options.get("template") is False:
            raise ServerError("--raw is not available through a server; ask without --server")
        return Answer.from_dict(self._post("/v1/ask", body))

    def _post(self, path: str, body: dict) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url + path, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ServerError(f"the server said {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ServerError(
                f"cannot reach the edge-spade server at {self.url} ({exc}); start it with "
                "`edge-spade serve`, or ask without --server"
            ) from None
