"""A real OpenAI-compatible HTTP server for tests and benchmarks: ``POST /v1/chat/completions`` on
127.0.0.1 at a free port, in a background thread (stdlib ``ThreadingHTTPServer``, HTTP/1.1 keep-alive).

    with OpenAIServer(answer=lambda req: "5\\nfine") as server:
        llm = OpenAIChat("judge", base_url=server.url, api_key="sk-test")

Configurable: ``answer(request) -> str`` (or ``{"text": ..., "top_logprobs": [{token: logprob}, ...]}``;
raising makes that request a 500, raising :class:`BadRequest` a 400), fixed ``latency_s``, the first
``fail_429`` requests answered 429 with ``Retry-After: retry_after``, the next ``fail_500`` answered 500
(``fail_500=-1``: every request, a dead server; assign ``fail_500 = 0`` to mend it), and ``api_key`` (a request
with another bearer token gets OpenAI's 401, whose message repeats the key it was sent). It counts
requests, the most in flight at once, and records every ``Authorization`` header it saw.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Answer = Callable[[dict[str, Any]], "str | dict[str, Any]"]


class BadRequest(Exception):
    """Raised by an answer function: that request is answered 400 with this message."""


def last_user(request: dict[str, Any]) -> str:
    """The content of the request's last user message."""
    return next((m["content"] for m in reversed(request["messages"]) if m["role"] == "user"), "")


class OpenAIServer:
    def __init__(self, answer: Answer = lambda request: "ok", *, latency_s: float = 0.0, fail_429: int = 0,
                 retry_after: str | None = "0.05", fail_500: int = 0, api_key: str | None = None):
        self.answer = answer
        self.latency_s = latency_s
        self.fail_429 = fail_429
        self.retry_after = retry_after
        self.fail_500 = fail_500
        self.api_key = api_key
        self.requests = 0
        self.completions = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.authorizations: list[str] = []
        self.bodies: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> OpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out at once, not 40 ms apart

            def log_message(self, *args: Any) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
                    return
                status, payload, headers = server._handle(json.loads(body), self.headers.get("Authorization", ""))
                self._send(status, payload, headers)

            def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 128

            def handle_error(self, request: Any, client_address: Any) -> None:
                pass  # a client that hangs up (a cancelled request) is no error of the server's

        self._httpd = Server(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def _handle(self, request: dict[str, Any], authorization: str) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            self.requests += 1
            self.authorizations.append(authorization)
            self.bodies.append(request)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            n = self.requests
        try:
            if self.latency_s:
                time.sleep(self.latency_s)
            sent_key = authorization.removeprefix("Bearer ")
            if self.api_key is not None and sent_key != self.api_key:
                return 401, _error(f"Incorrect API key provided: {sent_key}.", "invalid_request_error"), {}
            if n <= self.fail_429:
                headers = {"Retry-After": self.retry_after} if self.retry_after is not None else {}
                return 429, _error("Rate limit reached.", "rate_limit_exceeded"), headers
            if self.fail_500 < 0 or n <= self.fail_429 + self.fail_500:
                return 500, _error("The server had an error.", "server_error"), {}
            try:
                answer = self.answer(request)
            except BadRequest as e:
                return 400, _error(str(e), "invalid_request_error"), {}
            except Exception as e:  # the answer function's way to fail one request
                return 500, _error(f"answer failed: {e}", "server_error"), {}
            with self._lock:
                self.completions += 1
            return 200, _completion(request, answer, n), {}
        finally:
            with self._lock:
                self.in_flight -= 1


@contextmanager
def serving(answer: Answer, monkeypatch, **options: Any) -> Iterator[OpenAIServer]:
    """An :class:`OpenAIServer` that the project's OpenAI backend talks to for one test
    (``OPENAI_BASE_URL`` and a test key set with ``monkeypatch``; the settings re-read)."""
    from sft_select.settings import settings

    with OpenAIServer(answer, **options) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        monkeypatch.setenv("OPENAI_API_KEY", "sk-test-judge")
        settings.cache_clear()
        try:
            yield server
        finally:
            settings.cache_clear()


def _error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": kind}}


def _completion(request: dict[str, Any], answer: str | dict[str, Any], n: int) -> dict[str, Any]:
    text, top = (answer, None) if isinstance(answer, str) else (answer["text"], answer.get("top_logprobs"))
    words = text.split(" ")
    tokens = [w if i == 0 else " " + w for i, w in enumerate(words)]
    logprobs = None
    if request.get("logprobs"):
        k = int(request.get("top_logprobs") or 0)
        positions = top if top is not None else [{t: 0.0} for t in tokens]
        content = []
        for pos in positions:
            ranked = sorted(pos.items(), key=lambda kv: -kv[1])
            token, logprob = ranked[0]
            content.append({"token": token, "logprob": logprob, "bytes": None,
                            "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in ranked[:k]]})
        logprobs = {"content": content, "refusal": None}
    prompt_tokens = sum(len((m.get("content") or "").split()) for m in request["messages"])
    return {
        "id": f"chatcmpl-test-{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "test"),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop",
                     "logprobs": logprobs}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(tokens),
                  "total_tokens": prompt_tokens + len(tokens)},
    }
