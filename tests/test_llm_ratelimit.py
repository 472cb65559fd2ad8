"""RateBudget rules on a simulated clock: hard window cap, smoothness, tokens, in-flight, leases."""

from __future__ import annotations

import asyncio
import time

import pytest
from fake_openai import max_per_window

from clipaudit.llm.ratelimit import (
    LocalLimiter,
    RateBudget,
    RateLimits,
    RequestTooLarge,
)


def _greedy(budget: RateBudget, n: int, tokens: int = 0, start: float = 0.0) -> list[float]:
    """Grant times when one client asks for ``n`` leases as fast as the budget allows."""
    t, grants = start, []
    for i in range(n):
        while (wait := budget.try_acquire(t, f"lease-{i}", tokens)) > 0:
            t += wait
        grants.append(t)
        budget.release(t, f"lease-{i}")
    return grants


def test_hard_window_and_smoothness_hold_for_600_rpm() -> None:
    limits = RateLimits.per_minute(600)
    grants = _greedy(RateBudget(limits), 1500)
    hard = limits.window_s + limits.margin_s
    assert max_per_window(grants, hard) <= 600
    burst = 600 * limits.burst_s / 60
    for window in (0.5, 1.0, 5.0, 10.0, 30.0):
        assert max_per_window(grants, window) <= burst + 600 * window / 60 + 1e-9
    rate = (len(grants) - 1) / (grants[-1] - grants[0]) * 60
    assert 0.97 * 600 <= rate <= 600


def test_token_limit_caps_charged_tokens_and_actual_usage_refunds() -> None:
    limits = RateLimits(requests=1000, tokens=1000, window_s=60.0, margin_s=0.0)
    budget = RateBudget(limits)
    grants = _greedy(budget, 20, tokens=150)
    assert max_per_window(grants, 60.0) * 150 <= 1000
    refunded = RateBudget(limits)
    t = 0.0
    for i in range(12):
        while (wait := refunded.try_acquire(t, f"l{i}", 150)) > 0:
            t += wait
        refunded.record_actual(t, f"l{i}", 50)
        refunded.release(t, f"l{i}")
    assert t < 60.0, "real usage of 50 tokens each lets 12 requests in within one window"


def test_request_larger_than_token_limit_is_refused() -> None:
    budget = RateBudget(RateLimits(requests=10, tokens=100))
    with pytest.raises(RequestTooLarge):
        budget.try_acquire(0.0, "big", 101)


def test_in_flight_cap_and_stale_lease_reclaim() -> None:
    limits = RateLimits(requests=100, window_s=1.0, burst_s=1.0, max_in_flight=2, lease_ttl_s=10.0)
    budget = RateBudget(limits)
    assert budget.try_acquire(0.0, "a") == 0.0
    assert budget.try_acquire(0.0, "b") == 0.0
    assert budget.try_acquire(0.0, "c") > 0
    budget.release(0.1, "a")
    assert budget.try_acquire(0.1, "c") == 0.0
    assert budget.try_acquire(5.0, "d") > 0
    assert budget.try_acquire(10.5, "d") == 0.0, "leases older than lease_ttl_s are reclaimed"


def test_repeated_try_acquire_of_a_granted_lease_is_not_charged_twice() -> None:
    budget = RateBudget(RateLimits(requests=2, window_s=60.0, burst_s=60.0))
    assert budget.try_acquire(0.0, "a") == 0.0
    assert budget.try_acquire(0.0, "a") == 0.0
    assert budget.try_acquire(0.0, "b") == 0.0
    assert budget.try_acquire(0.0, "c") > 0
    assert budget.granted == 2


def test_pause_holds_every_grant() -> None:
    budget = RateBudget(RateLimits(requests=100, window_s=1.0))
    budget.pause(0.0, 2.0)
    assert budget.try_acquire(1.0, "a") == pytest.approx(1.0)
    assert budget.try_acquire(2.0, "a") == 0.0


def test_local_limiter_paces_concurrent_acquirers() -> None:
    async def main() -> list[float]:
        limiter = LocalLimiter(RateLimits(requests=20, window_s=1.0, burst_s=0.25, margin_s=0.0))
        times: list[float] = []

        async def one() -> None:
            lease = await limiter.acquire()
            times.append(time.monotonic())
            await limiter.release(lease)

        await asyncio.gather(*(one() for _ in range(25)))
        return times

    times = asyncio.run(main())
    assert len(times) == 25
    assert max_per_window(times, 0.5) <= 5 + 10 + 1
    assert max(times) - min(times) >= 0.9
