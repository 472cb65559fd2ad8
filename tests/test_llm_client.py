"""LLMWorker through the real openai client against the fake endpoint."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from fake_openai import FakeOpenAI, Fault, first_calls_per_prompt

from clipaudit.llm.client import LLMWorker
from clipaudit.llm.parse import parse_failure_types
from clipaudit.llm.requests import LLMRequest, LLMResult
from clipaudit.llm.scrub import Scrubber

KEY = "sk-test-DO-NOT-LEAK-0123456789abcdef"
SCHEMA = {
    "type": "json_schema",
    "json_schema": {
        "name": "failure_types",
        "schema": {"type": "object", "properties": {"failure_types": {"type": "array"}}},
    },
}


def _requests(n: int, **params: Any) -> list[LLMRequest]:
    return [LLMRequest("fake-model", [{"role": "user", "content": f"prompt {i}"}], params) for i in range(n)]


def _run(server: FakeOpenAI, requests: list[LLMRequest], **kwargs: Any) -> list[LLMResult]:
    options: dict[str, Any] = {"timeout_s": 5.0, "max_retries": 3, "backoff_base_s": 0.05, **kwargs}

    async def main() -> list[LLMResult]:
        async with LLMWorker(server.base_url, KEY, "fake-model", **options) as worker:
            return await worker.run(requests)

    return asyncio.run(main())


def test_answers_carry_usage_cost_and_the_bearer_key() -> None:
    with FakeOpenAI(api_key=KEY) as server:
        results = _run(server, _requests(8, temperature=0.0), prices={"fake-model": (1.0, 2.0)})
    assert [r.status for r in results] == ["ok"] * 8
    assert [r.request_id for r in results] == [q.request_id for q in _requests(8, temperature=0.0)]
    first = results[0]
    assert first.attempts == 1 and first.prompt_tokens >= 1 and first.completion_tokens >= 1
    assert first.cost == pytest.approx((first.prompt_tokens + 2 * first.completion_tokens) / 1000)
    assert parse_failure_types(first.text or "")
    assert {c.authorization for c in server.snapshot()} == {f"Bearer {KEY}"}


@pytest.mark.parametrize(
    ("fault", "min_gap"),
    [(Fault.rate_limited(retry_after="1"), 0.95), (Fault.rate_limited(retry_after=None, retry_after_ms="400"), 0.38)],
)
def test_429_waits_for_retry_after_then_succeeds(fault: Fault, min_gap: float) -> None:
    with FakeOpenAI(faults=[fault]) as server:
        (result,) = _run(server, _requests(1))
    calls = server.snapshot()
    assert result.status == "ok" and result.attempts == 2
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].t - calls[0].t >= min_gap


def test_retry_after_beyond_the_cap_fails_without_retrying() -> None:
    with FakeOpenAI(faults=[Fault.rate_limited(retry_after="500")]) as server:
        (result,) = _run(server, _requests(1))
    assert result.status == "failed" and result.attempts == 1 and "429" in (result.error or "")


def test_server_errors_are_retried_with_backoff() -> None:
    with FakeOpenAI(fault_for=first_calls_per_prompt(2, Fault.server_error(503))) as server:
        results = _run(server, _requests(4))
    assert all(r.status == "ok" and r.attempts == 3 for r in results)
    assert len(server.snapshot()) == 12


def test_persistent_server_errors_fail_after_bounded_attempts() -> None:
    with FakeOpenAI(fault_for=lambda body, seen: Fault.server_error()) as server:
        (result,) = _run(server, _requests(1), max_retries=2)
    assert result.status == "failed" and result.attempts == 3
    assert "500" in (result.error or "") and len(server.snapshot()) == 3


def test_non_retryable_status_fails_at_once() -> None:
    with FakeOpenAI(api_key="another-key") as server:
        (result,) = _run(server, _requests(1))
    assert result.status == "failed" and result.attempts == 1 and "401" in (result.error or "")


def test_slow_answers_time_out_and_are_recorded_failed() -> None:
    with FakeOpenAI(fault_for=lambda body, seen: Fault.slow(10.0)) as server:
        (result,) = _run(server, _requests(1), timeout_s=0.3, max_retries=1)
    assert result.status == "failed" and result.attempts == 2
    assert "timeout" in (result.error or "") and result.latency_s < 3.0


def test_a_slow_first_answer_is_retried_after_its_timeout() -> None:
    with FakeOpenAI(faults=[Fault.slow(10.0)]) as server:
        (result,) = _run(server, _requests(1), timeout_s=0.3)
    assert result.status == "ok" and result.attempts == 2


def test_malformed_response_body_is_retried() -> None:
    with FakeOpenAI(faults=[Fault.garbage()]) as server:
        (result,) = _run(server, _requests(1))
    assert result.status == "ok" and result.attempts == 2


def test_unparseable_answer_is_parse_failed_with_its_text() -> None:
    with FakeOpenAI(fault_for=lambda body, seen: Fault.bad_answer("no JSON here")) as server:
        (result,) = _run(server, _requests(1), validator=parse_failure_types)
    assert result.status == "parse_failed" and result.text == "no JSON here"
    assert "ParseError" in (result.error or "") and result.attempts == 1


def test_repair_round_fixes_an_unparseable_answer() -> None:
    with FakeOpenAI(faults=[Fault.bad_answer("failure types: counting")]) as server:
        (result,) = _run(server, _requests(1), validator=parse_failure_types, repair_rounds=1)
    calls = server.snapshot()
    assert result.status == "ok" and result.attempts == 2 and result.error is None
    assert "could not be parsed" in calls[1].prompt


def test_rejected_response_format_falls_back_to_plain_once_per_model() -> None:
    with FakeOpenAI(reject_response_format=True) as server:
        results = _run(server, _requests(3, response_format=SCHEMA), max_in_flight=1)
    calls = server.snapshot()
    assert [r.status for r in results] == ["ok"] * 3 and results[0].attempts == 2
    assert [c.status for c in calls] == [400, 200, 200, 200]
    assert "response_format" in (calls[0].body or {}) and "response_format" not in (calls[1].body or {})


def test_accepted_response_format_is_sent() -> None:
    with FakeOpenAI() as server:
        (result,) = _run(server, _requests(1, response_format=SCHEMA))
    assert result.status == "ok" and (server.snapshot()[0].body or {})["response_format"] == SCHEMA


def test_in_flight_duplicates_are_sent_once() -> None:
    request = _requests(1)[0]

    async def main(server: FakeOpenAI) -> tuple[list[LLMResult], list[LLMResult]]:
        async with LLMWorker(server.base_url, KEY, "fake-model") as worker:
            return await asyncio.gather(worker.run([request, request, request]), worker.run([request]))

    with FakeOpenAI(latency_s=0.3) as server:
        first, second = asyncio.run(main(server))
    assert len(server.snapshot()) == 1
    assert [r.status for r in first + second] == ["ok"] * 4
    assert {r.request_id for r in first + second} == {request.request_id}


def test_every_request_ends_ok_or_failed() -> None:
    def mixed(body: dict[str, Any], seen: int) -> Fault | None:
        number = int(body["messages"][-1]["content"].split()[-1])
        return [
            None,
            Fault.server_error() if seen < 1 else None,
            Fault.server_error(),
            Fault.rate_limited(retry_after_ms="100") if seen < 1 else None,
            Fault.slow(10.0),
            Fault.garbage() if seen < 1 else None,
        ][number % 6]

    requests = _requests(30)
    with FakeOpenAI(fault_for=mixed, latency_s=0.02) as server:
        results = _run(server, requests, timeout_s=2.0, max_retries=1)
    assert [r.request_id for r in results] == [q.request_id for q in requests]
    expected = ["ok", "ok", "failed", "ok", "failed", "ok"]
    assert [r.status for r in results] == [expected[i % 6] for i in range(30)]
    assert all(r.error for r in results if r.status == "failed")
    assert all(1 <= r.attempts <= 2 for r in results)


def test_api_key_never_appears_in_results_errors_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with FakeOpenAI(fault_for=lambda body, seen: Fault.echo_auth()) as server:
        results = _run(server, _requests(2), max_retries=1)
    assert all(r.status == "failed" for r in results)
    assert any(KEY in c.authorization for c in server.snapshot()), "the server did see the key"
    assert all("REDACTED" in (r.error or "") for r in results)
    text = " ".join(repr(r.to_dict()) for r in results)
    assert KEY not in text and KEY not in caplog.text
    assert KEY not in repr(LLMWorker("http://127.0.0.1:1/v1", KEY, "m"))


def test_empty_batch_returns_no_results() -> None:
    assert asyncio.run(LLMWorker("http://127.0.0.1:1/v1", KEY, "m").run([])) == []


def test_scrubber_removes_the_key_bearer_tokens_and_key_like_strings() -> None:
    scrub = Scrubber(KEY)
    text = scrub(f"bad key {KEY}; header Bearer abc.def; other sk-live-abcdefghijkl end")
    assert KEY not in text and "abc.def" not in text and "sk-live-abcdefghijkl" not in text
    assert text.endswith("end") and len(scrub("x" * 2000)) == 500
    assert scrub.secret_only(f"echo {KEY}") == "echo [REDACTED]"
