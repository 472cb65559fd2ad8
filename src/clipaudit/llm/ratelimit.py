"""Requests-per-minute, tokens-per-minute and in-flight limits shared by many workers.

Three layers, so that the state can live in one place (one Ray actor, say) while
any number of workers in any number of processes draw from it:

* :class:`RateBudget` -- the state and the rules. Plain, synchronous, no I/O and
  no clock of its own: every method takes ``now`` (seconds, monotonic in the host
  that owns the budget). ``try_acquire`` either grants a lease (returns ``0.0``) or
  says how long to wait before asking again. Easy to host remotely: wrap it in an
  actor whose methods pass the actor's own clock.
* :class:`BudgetBackend` -- the async protocol a worker uses to reach a budget.
  :class:`LocalBudget` serves one in this process; a Ray actor handle adapter is
  the other intended implementation.
* :class:`RateLimiter` -- what :class:`~clipaudit.llm.client.LLMWorker` calls:
  ``acquire(tokens) -> Lease``, ``release(lease)``, ``record_actual(lease, used)``,
  ``pause(seconds)``. :class:`SharedLimiter` implements it over any backend;
  :class:`LocalLimiter` is the in-process shortcut.

Guarantee (``R`` requests and ``T`` tokens per ``window_s``, ``B = max(1, R * burst_s
/ window_s)``, ``m = margin_s``), on the grant times kept by the budget:

* any interval of length ``window_s + m`` holds at most ``R`` grants and at most ``T``
  charged tokens (a sliding log: a hard cap, never exceeded);
* any interval of length ``w`` holds at most ``B + R * w / window_s`` grants (a token
  bucket refilled at ``R / window_s`` per second, capacity ``B``): traffic is smooth,
  a minute's budget is never sent in one burst;
* at most ``max_in_flight`` leases are held at once (stale leases older than
  ``lease_ttl_s`` are reclaimed, so a crashed worker cannot leak slots).

A server sees each request a little after its grant; as long as that delay varies
by less than ``m`` the first bound holds for the server's own sliding window of
``window_s``. The long-run rate is ``R / (window_s + m)`` per second, i.e. 99.2 %
of ``R`` per minute with the default ``m = 0.5 s``.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Protocol

_MIN_WAIT_S = 1e-4


class RequestTooLarge(ValueError):
    """A single request asks for more tokens than the whole window allows."""


@dataclass(frozen=True)
class RateLimits:
    """Limits of one budget.

    ``requests`` and ``tokens`` are allowed per ``window_s`` seconds (60 for the usual
    RPM/TPM); ``tokens=None`` disables the token limit. ``burst_s`` sets the bucket
    capacity in seconds of traffic; ``margin_s`` lengthens the hard window to absorb
    delivery jitter between grant and server arrival.
    """

    requests: int
    tokens: int | None = None
    window_s: float = 60.0
    burst_s: float = 1.0
    margin_s: float = 0.5
    max_in_flight: int = 64
    lease_ttl_s: float = 900.0
    poll_s: float = 0.02

    @classmethod
    def per_minute(cls, rpm: int, tpm: int | None = None, max_in_flight: int = 64, **kwargs: float) -> RateLimits:
        """Limits for ``rpm`` requests and ``tpm`` tokens per minute."""
        return cls(requests=rpm, tokens=tpm, window_s=60.0, max_in_flight=max_in_flight, **kwargs)

    def __post_init__(self) -> None:
        if self.requests < 1 or self.window_s <= 0 or self.max_in_flight < 1:
            raise ValueError("requests, window_s and max_in_flight must be positive")
        if self.tokens is not None and self.tokens < 1:
            raise ValueError("tokens must be positive or None")
        if self.burst_s < 0 or self.margin_s < 0 or self.poll_s <= 0:
            raise ValueError("burst_s and margin_s must be >= 0, poll_s > 0")


class _Bucket:
    """Token bucket; the level may go negative (debt) after a large charge."""

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.level = capacity
        self.updated = now

    def refill(self, now: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now

    def wait_for(self, amount: float) -> float:
        """Seconds until the level reaches ``amount`` (capped at capacity); 0 if it has."""
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class _Grant:
    __slots__ = ("in_log", "lease_id", "time", "tokens")

    def __init__(self, lease_id: str, time: float, tokens: int) -> None:
        self.lease_id = lease_id
        self.time = time
        self.tokens = tokens
        self.in_log = True


class RateBudget:
    """The shared limiter state: pure given its state and the ``now`` passed in.

    Not thread-safe; host it in one event loop or one actor. Method arguments and
    results are plain values, so it can sit behind any RPC.
    """

    def __init__(self, limits: RateLimits, now: float = 0.0) -> None:
        self.limits = limits
        self._hard_window = limits.window_s + limits.margin_s
        self._requests = _Bucket(
            limits.requests / limits.window_s,
            max(1.0, limits.requests * limits.burst_s / limits.window_s),
            now,
        )
        self._tokens = (
            None
            if limits.tokens is None
            else _Bucket(
                limits.tokens / limits.window_s,
                max(1.0, limits.tokens * limits.burst_s / limits.window_s),
                now,
            )
        )
        self._log: deque[_Grant] = deque()
        self._log_tokens = 0
        self._by_lease: dict[str, _Grant] = {}
        self._in_flight: dict[str, float] = {}
        self._paused_until = now
        self.granted = 0

    def _expire(self, now: float) -> None:
        horizon = now - self._hard_window
        while self._log and self._log[0].time <= horizon:
            grant = self._log.popleft()
            grant.in_log = False
            self._log_tokens -= grant.tokens
            if grant.lease_id not in self._in_flight:
                del self._by_lease[grant.lease_id]
        stale = now - self.limits.lease_ttl_s
        for lease_id in [k for k, t in self._in_flight.items() if t <= stale]:
            self._forget(lease_id)

    def _forget(self, lease_id: str) -> None:
        """Drop lease ``lease_id`` from the in-flight set, and entirely once out of the log."""
        self._in_flight.pop(lease_id, None)
        grant = self._by_lease.get(lease_id)
        if grant is not None and not grant.in_log:
            del self._by_lease[lease_id]

    def _token_log_wait(self, now: float, tokens: int) -> float:
        cap = self.limits.tokens
        if cap is None or self._log_tokens + tokens <= cap:
            return 0.0
        excess = self._log_tokens + tokens - cap
        for grant in self._log:
            excess -= grant.tokens
            if excess <= 0:
                return max(grant.time + self._hard_window - now, _MIN_WAIT_S)
        return self._hard_window

    def try_acquire(self, now: float, lease_id: str, tokens: int = 0) -> float:
        """Grant lease ``lease_id`` charging ``tokens`` and return ``0.0``, or return seconds to wait.

        Repeating the call for a lease already granted returns ``0.0`` again without
        charging twice, so a caller may safely retry a lost RPC. Raises
        :class:`RequestTooLarge` when ``tokens`` exceeds the token limit itself.
        """
        if lease_id in self._in_flight:
            return 0.0
        cap = self.limits.tokens
        if cap is not None and tokens > cap:
            raise RequestTooLarge(f"request needs {tokens} tokens, limit is {cap} per window")
        self._expire(now)
        self._requests.refill(now)
        waits = [self._paused_until - now, self._requests.wait_for(1.0)]
        if len(self._log) >= self.limits.requests:
            waits.append(max(self._log[0].time + self._hard_window - now, _MIN_WAIT_S))
        if self._tokens is not None:
            self._tokens.refill(now)
            waits.append(self._tokens.wait_for(tokens))
            waits.append(self._token_log_wait(now, tokens))
        if len(self._in_flight) >= self.limits.max_in_flight:
            waits.append(self.limits.poll_s)
        wait = max(waits)
        if wait > 0:
            return max(wait, _MIN_WAIT_S)
        self._requests.level -= 1.0
        if self._tokens is not None:
            self._tokens.level -= tokens
        grant = _Grant(lease_id, now, tokens)
        self._log.append(grant)
        self._log_tokens += tokens
        self._by_lease[lease_id] = grant
        self._in_flight[lease_id] = now
        self.granted += 1
        return 0.0

    def release(self, now: float, lease_id: str) -> None:
        """End lease ``lease_id`` (frees its in-flight slot; its charge stays in the window)."""
        self._forget(lease_id)
        self._expire(now)

    def record_actual(self, now: float, lease_id: str, tokens_used: int) -> None:
        """Replace the estimated token charge of ``lease_id`` with the real usage."""
        grant = self._by_lease.get(lease_id)
        if grant is None:
            return
        delta = tokens_used - grant.tokens
        grant.tokens = tokens_used
        if grant.in_log:
            self._log_tokens += delta
        if self._tokens is not None:
            self._tokens.refill(now)
            self._tokens.level -= delta

    def pause(self, now: float, seconds: float) -> None:
        """Grant nothing for ``seconds`` (e.g. after the server answered 429 Retry-After)."""
        self._paused_until = max(self._paused_until, now + seconds)

    def in_flight(self) -> int:
        """Leases currently held."""
        return len(self._in_flight)


class BudgetBackend(Protocol):
    """Async access to one :class:`RateBudget`, local or remote; the host supplies ``now``."""

    async def try_acquire(self, lease_id: str, tokens: int) -> float:
        """See :meth:`RateBudget.try_acquire`."""
        ...

    async def release(self, lease_id: str) -> None:
        """See :meth:`RateBudget.release`."""
        ...

    async def record_actual(self, lease_id: str, tokens_used: int) -> None:
        """See :meth:`RateBudget.record_actual`."""
        ...

    async def pause(self, seconds: float) -> None:
        """See :meth:`RateBudget.pause`."""
        ...


class LocalBudget:
    """A :class:`BudgetBackend` holding its :class:`RateBudget` in this process (monotonic clock)."""

    def __init__(self, limits: RateLimits) -> None:
        self.budget = RateBudget(limits, now=time.monotonic())

    async def try_acquire(self, lease_id: str, tokens: int) -> float:
        return self.budget.try_acquire(time.monotonic(), lease_id, tokens)

    async def release(self, lease_id: str) -> None:
        self.budget.release(time.monotonic(), lease_id)

    async def record_actual(self, lease_id: str, tokens_used: int) -> None:
        self.budget.record_actual(time.monotonic(), lease_id, tokens_used)

    async def pause(self, seconds: float) -> None:
        self.budget.pause(time.monotonic(), seconds)


@dataclass(frozen=True)
class Lease:
    """Permission to send one request now; hand it back with :meth:`RateLimiter.release`."""

    lease_id: str
    tokens: int


class RateLimiter(ABC):
    """What a worker needs from a limiter; every HTTP attempt holds one lease."""

    @abstractmethod
    async def acquire(self, tokens: int = 0) -> Lease:
        """Wait until one request charging ``tokens`` may be sent, and return its lease."""

    @abstractmethod
    async def release(self, lease: Lease) -> None:
        """The request of ``lease`` finished (in any way)."""

    @abstractmethod
    async def record_actual(self, lease: Lease, tokens_used: int) -> None:
        """Correct the token charge of ``lease`` with the usage the server reported."""

    @abstractmethod
    async def pause(self, seconds: float) -> None:
        """Hold back every worker sharing this limiter for ``seconds``."""


class SharedLimiter(RateLimiter):
    """A :class:`RateLimiter` over any :class:`BudgetBackend`; one per worker process.

    Acquirers in this process queue in FIFO order behind one lock and only the head
    polls the backend, sleeping the wait it is told (cut short when a local lease is
    released). Budgets therefore hold across every process polling the same backend.
    """

    def __init__(self, backend: BudgetBackend) -> None:
        self.backend = backend
        self._queue = asyncio.Lock()
        self._released = asyncio.Event()

    async def acquire(self, tokens: int = 0) -> Lease:
        lease = Lease(uuid.uuid4().hex, tokens)
        async with self._queue:
            while True:
                self._released.clear()
                wait = await self.backend.try_acquire(lease.lease_id, tokens)
                if wait <= 0:
                    return lease
                try:
                    await asyncio.wait_for(self._released.wait(), timeout=wait)
                except TimeoutError:
                    pass

    async def release(self, lease: Lease) -> None:
        await self.backend.release(lease.lease_id)
        self._released.set()

    async def record_actual(self, lease: Lease, tokens_used: int) -> None:
        await self.backend.record_actual(lease.lease_id, tokens_used)

    async def pause(self, seconds: float) -> None:
        await self.backend.pause(seconds)


class LocalLimiter(SharedLimiter):
    """In-process limiter: share one instance among all workers of one event loop."""

    def __init__(self, limits: RateLimits) -> None:
        super().__init__(LocalBudget(limits))
        self.limits = limits


class UnlimitedLimiter(RateLimiter):
    """A limiter that never waits: for tests and endpoints without quotas."""

    async def acquire(self, tokens: int = 0) -> Lease:
        return Lease(uuid.uuid4().hex, tokens)

    async def release(self, lease: Lease) -> None:
        return None

    async def record_actual(self, lease: Lease, tokens_used: int) -> None:
        return None

    async def pause(self, seconds: float) -> None:
        return None
