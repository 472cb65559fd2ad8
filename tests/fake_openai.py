"""A fake OpenAI-compatible chat endpoint on 127.0.0.1 for tests and benchmarks.

``FakeOpenAI`` runs a stdlib ``ThreadingHTTPServer`` on a free port in a background
thread and serves ``POST /v1/chat/completions`` with real ``chat.completion`` JSON
(usage included). Behaviour is configurable: canned answers (a function of the
request body), a fixed latency, its own sliding-window rate limit (429 with
Retry-After), scripted faults, and a log of every call for assertions::

    with FakeOpenAI(latency_s=0.05, faults=[Fault.server_error()]) as server:
        client = AsyncOpenAI(base_url=server.base_url, api_key="k")
        ...
        assert server.calls[0].status == 500
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal, Self

FaultKind = Literal["status", "slow", "garbage", "bad_answer", "echo_auth"]
DEFAULT_ANSWER = '{"failure_types": [{"name": "counting", "description": "Miscounts objects."}]}'


@dataclass(frozen=True)
class Fault:
    """One scripted misbehaviour for one call.

    ``status``: reply ``status_code`` with optional Retry-After / retry-after-ms headers;
    ``slow``: answer normally after ``delay_s``; ``garbage``: 200 with a truncated JSON
    body; ``bad_answer``: a valid completion whose content is ``text``;
    ``echo_auth``: a 500 whose error message repeats the Authorization header.
    """

    kind: FaultKind
    status_code: int = 500
    retry_after: str | None = None
    retry_after_ms: str | None = None
    delay_s: float = 0.0
    text: str = ""

    @classmethod
    def server_error(cls, status_code: int = 500) -> Fault:
        return cls("status", status_code=status_code)

    @classmethod
    def rate_limited(cls, retry_after: str | None = "1", retry_after_ms: str | None = None) -> Fault:
        return cls("status", status_code=429, retry_after=retry_after, retry_after_ms=retry_after_ms)

    @classmethod
    def slow(cls, delay_s: float) -> Fault:
        return cls("slow", delay_s=delay_s)

    @classmethod
    def garbage(cls) -> Fault:
        return cls("garbage")

    @classmethod
    def bad_answer(cls, text: str = "Sure! Here are some failure types: counting, colour.") -> Fault:
        return cls("bad_answer", text=text)

    @classmethod
    def echo_auth(cls) -> Fault:
        return cls("echo_auth")


@dataclass
class Call:
    """One request as the server saw it; ``t`` is ``time.monotonic()`` at arrival."""

    t: float
    body: dict[str, Any] | None
    authorization: str
    status: int = 0
    outcome: str = ""

    @property
    def prompt(self) -> str:
        """Content of the last message (how tests tell requests apart)."""
        messages = (self.body or {}).get("messages") or [{}]
        return str(messages[-1].get("content", ""))


def first_calls_per_prompt(n: int, fault: Fault) -> Callable[[dict[str, Any], int], Fault | None]:
    """A ``fault_for`` rule: the first ``n`` calls of every distinct body get ``fault``."""
    return lambda body, seen: fault if seen < n else None


def max_per_window(times: Sequence[float], window_s: float) -> int:
    """Largest number of ``times`` inside any half-open interval of length ``window_s``."""
    ordered = sorted(times)
    best, start = 0, 0
    for end, t in enumerate(ordered):
        while ordered[start] <= t - window_s:
            start += 1
        best = max(best, end - start + 1)
    return best


def _body_key(body: dict[str, Any]) -> str:
    return json.dumps(body, sort_keys=True)


class _Server(ThreadingHTTPServer):
    request_queue_size = 256
    daemon_threads = True
    fake: FakeOpenAI


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(payload)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, OSError):
            self.close_connection = True

    def do_POST(self) -> None:
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        status, payload, headers = self.server.fake._handle(self.path, raw, self.headers.get("Authorization", ""))
        self._send(status, payload, headers)


def _error(message: str, kind: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "param": param, "code": None}}).encode()


@dataclass
class FakeOpenAI:
    """The fake endpoint; a context manager that starts and stops its server thread.

    ``faults`` apply to the first calls in arrival order; after them ``fault_for(body,
    times_this_body_was_seen_before)`` may script faults per request. ``rate_limit``
    requests per ``rate_window_s`` (sliding, counted over answered calls) are allowed;
    beyond that the server answers 429 with ``Retry-After: rate_retry_after``.
    ``reject_response_format`` answers 400 to any call carrying a json_schema
    ``response_format``. ``api_key``, when set, is required as the Bearer token.
    """

    answer: Callable[[dict[str, Any]], str] = lambda body: DEFAULT_ANSWER
    latency_s: float = 0.0
    rate_limit: int | None = None
    rate_window_s: float = 60.0
    rate_retry_after: str = "1"
    faults: Sequence[Fault] = ()
    fault_for: Callable[[dict[str, Any], int], Fault | None] | None = None
    reject_response_format: bool = False
    api_key: str | None = None
    calls: list[Call] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._seen: Counter[str] = Counter()
        self._answered: deque[float] = deque()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def base_url(self) -> str:
        """``http://127.0.0.1:PORT/v1`` for ``AsyncOpenAI(base_url=...)``."""
        if self._server is None:
            raise RuntimeError("server not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> Self:
        """Bind a free port and serve in a daemon thread."""
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving; pending slow answers are cut short."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def snapshot(self) -> list[Call]:
        """A copy of the call log."""
        with self._lock:
            return list(self.calls)

    def answered(self) -> list[Call]:
        """Calls that got a 200 completion."""
        return [c for c in self.snapshot() if c.status == 200 and c.outcome != "garbage"]

    def _admit(self, call: Call, body: dict[str, Any]) -> Fault | None:
        """Under the lock: log the call, pick its fault, apply the server's rate limit."""
        self.calls.append(call)
        index = len(self.calls) - 1
        key = _body_key(body)
        seen = self._seen[key]
        self._seen[key] += 1
        if index < len(self.faults):
            return self.faults[index]
        fault = self.fault_for(body, seen) if self.fault_for is not None else None
        if fault is None and self.rate_limit is not None:
            while self._answered and self._answered[0] <= call.t - self.rate_window_s:
                self._answered.popleft()
            if len(self._answered) >= self.rate_limit:
                return Fault.rate_limited(retry_after=self.rate_retry_after)
            self._answered.append(call.t)
        return fault

    def _handle(self, path: str, raw: bytes, authorization: str) -> tuple[int, bytes, dict[str, str]]:
        call = Call(t=time.monotonic(), body=None, authorization=authorization)
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        with self._lock:
            if body is None or path.rstrip("/") != "/v1/chat/completions":
                self.calls.append(call)
                call.status, call.outcome = 400, "bad_request"
                return 400, _error("bad request", "invalid_request_error"), {}
            call.body = body
            fault = self._admit(call, body)
        status, payload, headers, outcome = self._respond(body, authorization, fault)
        with self._lock:
            call.status, call.outcome = status, outcome
        return status, payload, headers

    def _respond(
        self, body: dict[str, Any], authorization: str, fault: Fault | None
    ) -> tuple[int, bytes, dict[str, str], str]:
        if self.api_key is not None and authorization != f"Bearer {self.api_key}":
            return 401, _error("invalid api key", "invalid_request_error"), {}, "unauthorized"
        if fault is not None and fault.kind == "status":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = fault.retry_after
            if fault.retry_after_ms is not None:
                headers["retry-after-ms"] = fault.retry_after_ms
            kind = "rate_limit_exceeded" if fault.status_code == 429 else "server_error"
            return fault.status_code, _error(f"scripted {fault.status_code}", kind), headers, kind
        if fault is not None and fault.kind == "echo_auth":
            return 500, _error(f"upstream rejected {authorization}", "server_error"), {}, "echo_auth"
        response_format = body.get("response_format")
        if (
            self.reject_response_format
            and isinstance(response_format, dict)
            and response_format.get("type") == "json_schema"
        ):
            message = "response_format json_schema is not supported by this model"
            return 400, _error(message, "invalid_request_error", "response_format"), {}, "rejected_schema"
        delay = self.latency_s + (fault.delay_s if fault is not None and fault.kind == "slow" else 0.0)
        if delay > 0 and self._stop.wait(delay):
            return 503, _error("shutting down", "server_error"), {}, "shutdown"
        if fault is not None and fault.kind == "garbage":
            return 200, b'{"id": "chatcmpl-garbage", "choices": [{"message": ', {}, "garbage"
        text = fault.text if fault is not None and fault.kind == "bad_answer" else self.answer(body)
        return 200, self._completion(body, text), {}, "answered"

    def _completion(self, body: dict[str, Any], text: str) -> bytes:
        prompt_chars = sum(len(str(m.get("content", ""))) for m in body.get("messages", []))
        prompt_tokens, completion_tokens = max(1, prompt_chars // 4), max(1, len(text) // 4)
        with self._lock:
            number = len(self.calls)
        return json.dumps(
            {
                "id": f"chatcmpl-fake-{number}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.get("model", "fake"),
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                        "logprobs": None,
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        ).encode()
