"""A limiter shared by several workers keeps the server's windows, measured server-side."""

from __future__ import annotations

import asyncio
import time

from fake_openai import FakeOpenAI, max_per_window

from clipaudit.llm.client import LLMWorker
from clipaudit.llm.ratelimit import (
    LocalLimiter,
    RateBudget,
    RateLimiter,
    RateLimits,
    SharedLimiter,
)
from clipaudit.llm.requests import LLMRequest, LLMResult

KEY = "sk-test-ratelimit-0123456789"
JITTER = 2
"""Extra arrivals a short server window may see: sends bunch up between grant and arrival."""


class RemoteLikeBudget:
    """A BudgetBackend that reaches its RateBudget through an awaited hop, as a Ray actor would."""

    def __init__(self, limits: RateLimits, rpc_s: float = 0.003) -> None:
        self.budget = RateBudget(limits, now=time.monotonic())
        self.rpc_s = rpc_s

    async def try_acquire(self, lease_id: str, tokens: int) -> float:
        await asyncio.sleep(self.rpc_s)
        return self.budget.try_acquire(time.monotonic(), lease_id, tokens)

    async def release(self, lease_id: str) -> None:
        await asyncio.sleep(self.rpc_s)
        self.budget.release(time.monotonic(), lease_id)

    async def record_actual(self, lease_id: str, tokens_used: int) -> None:
        self.budget.record_actual(time.monotonic(), lease_id, tokens_used)

    async def pause(self, seconds: float) -> None:
        self.budget.pause(time.monotonic(), seconds)


def _requests(n: int) -> list[LLMRequest]:
    return [LLMRequest("fake-model", [{"role": "user", "content": f"caption batch {i}"}]) for i in range(n)]


def _run_workers(server: FakeOpenAI, limiters: list[RateLimiter], requests: list[LLMRequest]) -> list[LLMResult]:
    async def main() -> list[LLMResult]:
        workers = [LLMWorker(server.base_url, KEY, "fake-model", limiter=lim, timeout_s=5.0) for lim in limiters]
        shares = [requests[i :: len(workers)] for i in range(len(workers))]
        try:
            batches = await asyncio.gather(*(w.run(s) for w, s in zip(workers, shares, strict=True)))
        finally:
            await asyncio.gather(*(w.aclose() for w in workers))
        return [r for batch in batches for r in batch]

    return asyncio.run(main())


def test_rpm_240_across_three_workers_with_one_remote_budget() -> None:
    limits = RateLimits.per_minute(240)
    backend = RemoteLikeBudget(limits)
    with FakeOpenAI(latency_s=0.05, rate_limit=240, rate_window_s=60.0) as server:
        results = _run_workers(server, [SharedLimiter(backend) for _ in range(3)], _requests(40))
    calls = server.snapshot()
    times = [c.t for c in calls]
    assert len(results) == 40 and all(r.status == "ok" and r.attempts == 1 for r in results)
    assert len(calls) == 40 and all(c.status == 200 for c in calls)
    burst = 240 * limits.burst_s / 60
    assert max_per_window(times, 60.0) <= 240
    for window in (1.0, 2.0, 5.0):
        assert max_per_window(times, window) <= burst + 4 * window + JITTER
    assert 8.0 <= max(times) - min(times) <= 10.5


def test_hard_window_cap_holds_server_side_with_one_local_limiter() -> None:
    limits = RateLimits(requests=12, window_s=3.0, burst_s=1.0, margin_s=0.2)
    limiter = LocalLimiter(limits)
    with FakeOpenAI(latency_s=0.05, rate_limit=12, rate_window_s=3.0) as server:
        results = _run_workers(server, [limiter, limiter, limiter], _requests(26))
    calls = server.snapshot()
    times = [c.t for c in calls]
    assert all(r.status == "ok" for r in results) and len(results) == 26
    assert all(c.status == 200 for c in calls), "the server never had to answer 429"
    assert max_per_window(times, 3.0) <= 12
    assert max_per_window(times, 1.0) <= 4 + 4 + JITTER
