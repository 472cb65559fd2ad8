"""``LLMWorker``: sends :class:`LLMRequest` batches to an OpenAI-compatible chat endpoint.

Plain asyncio, no Ray: a Ray async actor can own one worker and await
:meth:`LLMWorker.run`; give every worker a :class:`~clipaudit.llm.ratelimit.SharedLimiter`
over one budget to keep a quota across all of them.

Retries are done here, not by the openai client (it is built with ``max_retries=0``),
so that every HTTP attempt passes through the limiter and is counted. A request
makes at most ``1 + max_retries`` attempts, plus one when the server rejects
``response_format`` and the worker falls back to a plain request, plus the same
again for each repair round.
"""

from __future__ import annotations

import asyncio
import email.utils
import inspect
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self

import openai
from openai.resources.chat.completions import AsyncCompletions

from clipaudit.llm.parse import ParseError, repair_request
from clipaudit.llm.ratelimit import RateLimiter, RequestTooLarge, UnlimitedLimiter
from clipaudit.llm.requests import (
    LLMRequest,
    LLMResult,
    Message,
    PriceTable,
    Status,
    estimate_cost,
    estimate_prompt_tokens,
    estimate_request_tokens,
    estimate_tokens,
)
from clipaudit.llm.scrub import Scrubber

log = logging.getLogger(__name__)

_CREATE_PARAMS = frozenset(inspect.signature(AsyncCompletions.create).parameters) - {
    "self",
    "messages",
    "model",
    "timeout",
    "stream",
}
_FALLBACK_STATUS = frozenset({400, 422})
_RETRY_STATUS = frozenset({408, 409, 429})


class BadResponse(Exception):
    """The server answered 200 with something that is not a chat completion."""


@dataclass
class _Answer:
    text: str | None
    error: str | None
    attempts: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass(frozen=True)
class _Decision:
    retry: bool
    delay_s: float = 0.0
    fallback: bool = False
    pause: bool = False


def _retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Server-requested delay from ``retry-after-ms`` or ``Retry-After`` (seconds or HTTP date)."""
    for name, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return float(value) / divisor
        except ValueError:
            if name == "retry-after":
                parsed = email.utils.parsedate_tz(value)
                if parsed is not None:
                    return float(email.utils.mktime_tz(parsed) - time.time())
    return None


class LLMWorker:
    """Sends chat-completion requests with rate limiting, retries, dedupe and safe errors.

    ``api_key`` is passed in by the caller (read from an environment variable there);
    it is handed to the openai client only and scrubbed from every error text.
    ``model`` is the default for :meth:`make_request`; each request carries its own.
    ``timeout_s`` bounds each HTTP attempt; ``max_in_flight`` bounds this worker's
    concurrent attempts (the limiter may bound all workers together).
    ``validator`` (e.g. :func:`~clipaudit.llm.parse.parse_failure_types`) checks answers:
    if it raises ``ValueError`` the result is ``parse_failed``, after up to
    ``repair_rounds`` follow-ups built by :func:`~clipaudit.llm.parse.repair_request`.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        model: str,
        *,
        limiter: RateLimiter | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 4,
        max_in_flight: int = 16,
        backoff_base_s: float = 0.5,
        backoff_max_s: float = 30.0,
        max_retry_after_s: float = 120.0,
        prices: PriceTable | None = None,
        validator: Callable[[str], object] | None = None,
        repair_rounds: int = 0,
    ) -> None:
        if max_retries < 0 or max_in_flight < 1 or timeout_s <= 0 or repair_rounds < 0:
            raise ValueError("max_retries, repair_rounds >= 0; max_in_flight >= 1; timeout_s > 0")
        self.base_url = base_url
        self.model = model
        self.limiter = limiter if limiter is not None else UnlimitedLimiter()
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.max_in_flight = max_in_flight
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.max_retry_after_s = max_retry_after_s
        self.prices: PriceTable = dict(prices or {})
        self.validator = validator
        self.repair_rounds = repair_rounds
        self._api_key = api_key
        self._scrub = Scrubber(api_key)
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._pending: dict[str, asyncio.Task[LLMResult]] = {}
        self._waiters: Counter[str] = Counter()
        self._schema_rejected: set[str] = set()

    def __repr__(self) -> str:
        return f"LLMWorker(base_url={self.base_url!r}, model={self.model!r}, max_in_flight={self.max_in_flight})"

    def make_request(self, messages: Sequence[Message], **params: Any) -> LLMRequest:
        """An :class:`LLMRequest` for this worker's model."""
        return LLMRequest(model=self.model, messages=list(messages), params=params)

    async def run(self, requests: Sequence[LLMRequest]) -> list[LLMResult]:
        """Send ``requests`` and return one result per request, in order.

        Requests sharing a ``request_id`` -- within this call or with another call
        still running on this worker -- are sent once and share the result.
        Never raises for a failed request: failures come back as results.
        """
        if not requests:
            return []
        tasks = [self._submit(r) for r in requests]
        unique = {r.request_id: t for r, t in zip(requests, tasks, strict=True)}
        self._waiters.update(unique.keys())
        try:
            await asyncio.wait(unique.values())
        finally:
            for request_id, task in unique.items():
                self._waiters[request_id] -= 1
                if self._waiters[request_id] <= 0:
                    del self._waiters[request_id]
                    if not task.done():
                        task.cancel()
        return [self._result_of(r, t) for r, t in zip(requests, tasks, strict=True)]

    async def aclose(self) -> None:
        """Close the HTTP client (a later :meth:`run` opens a new one)."""
        if self._client is not None:
            await self._client.close()
            self._client = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _submit(self, request: LLMRequest) -> asyncio.Task[LLMResult]:
        task = self._pending.get(request.request_id)
        if task is None:
            task = asyncio.ensure_future(self._run_one(request))
            self._pending[request.request_id] = task
            task.add_done_callback(lambda _t, rid=request.request_id: self._pending.pop(rid, None))
        return task

    def _result_of(self, request: LLMRequest, task: asyncio.Task[LLMResult]) -> LLMResult:
        if not task.cancelled() and task.exception() is None:
            return task.result()
        reason = "cancelled" if task.cancelled() else self._describe(task.exception())
        return self._failed(request, f"internal error: {reason}", 0, 0.0)

    def _openai(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = openai.AsyncOpenAI(
                base_url=self.base_url, api_key=self._api_key, max_retries=0, timeout=self.timeout_s
            )
        return self._client

    def _failed(self, request: LLMRequest, error: str, attempts: int, latency_s: float) -> LLMResult:
        return LLMResult(
            request_id=request.request_id,
            prompt_hash=request.prompt_hash,
            model=request.model,
            status="failed",
            error=self._scrub(error),
            attempts=attempts,
            latency_s=latency_s,
        )

    async def _run_one(self, request: LLMRequest) -> LLMResult:
        start = time.monotonic()
        try:
            return await self._answer_and_validate(request, start)
        except Exception as err:  # noqa: BLE001 - every request must end in a result
            log.warning("request %s failed unexpectedly: %s", request.request_id, self._describe(err))
            return self._failed(request, f"internal error: {self._describe(err)}", 0, time.monotonic() - start)

    async def _answer_and_validate(self, request: LLMRequest, start: float) -> LLMResult:
        answer = await self._call(request)
        attempts = answer.attempts
        prompt_tokens, completion_tokens = answer.prompt_tokens, answer.completion_tokens
        status: Status = "ok"
        error: str | None = answer.error
        current = request
        for round_ in range(self.repair_rounds + 1):
            if answer.text is None:
                status = "failed"
                break
            if self.validator is None:
                break
            try:
                self.validator(answer.text)
                status, error = "ok", None
                break
            except ValueError as err:
                status, error = "parse_failed", f"{type(err).__name__}: {err}"
            if round_ == self.repair_rounds:
                break
            current = repair_request(current, answer.text)
            repaired = await self._call(current)
            attempts += repaired.attempts
            prompt_tokens += repaired.prompt_tokens
            completion_tokens += repaired.completion_tokens
            if repaired.text is None:
                error = f"{error}; repair failed: {repaired.error}"
                break
            answer = repaired
        return LLMResult(
            request_id=request.request_id,
            prompt_hash=request.prompt_hash,
            model=request.model,
            status=status,
            text=None if answer.text is None else self._scrub.secret_only(answer.text),
            error=None if error is None else self._scrub(error),
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost=estimate_cost(request.model, prompt_tokens, completion_tokens, self.prices),
            attempts=attempts,
            latency_s=time.monotonic() - start,
        )

    async def _call(self, request: LLMRequest) -> _Answer:
        """All attempts for one request: bounded retries, one schema fallback."""
        plain = False
        attempts = retries = 0
        while True:
            attempts += 1
            async with self._slots():
                plain = plain or request.model in self._schema_rejected
                try:
                    return await self._attempt(request, plain, attempts)
                except asyncio.CancelledError:
                    raise
                except Exception as err:  # noqa: BLE001 - classified by _decide
                    error = err
            decision = self._decide(error, request, plain, retries)
            message = self._describe(error)
            if decision.fallback:
                log.info("model %s rejected response_format; falling back to plain", request.model)
                self._schema_rejected.add(request.model)
                plain = True
                continue
            if not decision.retry:
                return _Answer(None, message, attempts)
            retries += 1
            log.debug(
                "request %s attempt %d: %s; retry in %.2fs",
                request.request_id,
                attempts,
                message,
                decision.delay_s,
            )
            if decision.pause:
                await self.limiter.pause(decision.delay_s)
            await asyncio.sleep(decision.delay_s)

    def _slots(self) -> asyncio.Semaphore:
        """This worker's in-flight slots (made lazily, inside the running loop)."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_in_flight)
        return self._semaphore

    async def _attempt(self, request: LLMRequest, plain: bool, attempt: int) -> _Answer:
        """One HTTP call under a limiter lease and the per-attempt timeout; the caller holds a slot."""
        kwargs = self._create_kwargs(request, plain)
        lease = await self.limiter.acquire(estimate_request_tokens(request))
        try:
            async with asyncio.timeout(self.timeout_s):
                completion = await self._openai().chat.completions.create(**kwargs)
            text, prompt_tokens, completion_tokens = self._read_completion(completion, request)
            await self.limiter.record_actual(lease, prompt_tokens + completion_tokens)
        finally:
            await self.limiter.release(lease)
        return _Answer(text, None, attempt, prompt_tokens, completion_tokens)

    def _create_kwargs(self, request: LLMRequest, plain: bool) -> dict[str, Any]:
        params = dict(request.params)
        if plain:
            params.pop("response_format", None)
        extra = {k: params.pop(k) for k in list(params) if k not in _CREATE_PARAMS}
        kwargs: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "timeout": self.timeout_s,
            **params,
        }
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    @staticmethod
    def _read_completion(completion: object, request: LLMRequest) -> tuple[str, int, int]:
        choices = getattr(completion, "choices", None)
        if not choices:
            raise BadResponse(f"not a chat completion: {type(completion).__name__}")
        text = choices[0].message.content
        if not text:
            reason = getattr(choices[0], "finish_reason", None)
            raise ValueError(f"empty answer (finish_reason={reason})")
        usage = getattr(completion, "usage", None)
        if usage is not None:
            return text, int(usage.prompt_tokens or 0), int(usage.completion_tokens or 0)
        return text, estimate_prompt_tokens(request.messages), estimate_tokens(text)

    def _backoff(self, retries: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0**retries)
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _decide(self, err: Exception, request: LLMRequest, plain: bool, retries: int) -> _Decision:
        """Whether and when to try again after ``err``."""
        if isinstance(err, (ParseError, RequestTooLarge)):
            return _Decision(retry=False)
        if isinstance(err, openai.APIStatusError):
            status = err.status_code
            if status in _FALLBACK_STATUS and not plain and "response_format" in request.params:
                return _Decision(retry=False, fallback=True)
            if status not in _RETRY_STATUS and status < 500:
                return _Decision(retry=False)
            if retries >= self.max_retries:
                return _Decision(retry=False)
            wanted = _retry_after_s(err.response.headers)
            if wanted is not None and wanted > self.max_retry_after_s:
                return _Decision(retry=False)
            if wanted is not None and wanted > 0:
                return _Decision(retry=True, delay_s=wanted, pause=status == 429)
            return _Decision(retry=True, delay_s=self._backoff(retries))
        transient = (
            openai.APIConnectionError,
            TimeoutError,
            BadResponse,
            openai.APIResponseValidationError,
            json.JSONDecodeError,
        )
        if isinstance(err, transient) and retries < self.max_retries:
            return _Decision(retry=True, delay_s=self._backoff(retries))
        return _Decision(retry=False)

    def _describe(self, err: BaseException | None) -> str:
        if err is None:
            return "unknown error"
        if isinstance(err, (TimeoutError, openai.APITimeoutError)):
            return f"timeout after {self.timeout_s:g}s"
        return self._scrub(f"{type(err).__name__}: {err}")
