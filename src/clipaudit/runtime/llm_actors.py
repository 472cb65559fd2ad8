"""LLM requests fanned out over Ray: async worker actors drawing on one shared rate budget.

Each :class:`_LLMWorkerActor` owns one :class:`~clipaudit.llm.LLMWorker` (an async OpenAI-compatible client);
all of them draw on one :class:`_BudgetActor` (requests and tokens per window, leases in flight), so the limits
hold for the whole fan-out however many workers run. The same requests also run in-process
(:func:`map_llm_local`) under a :class:`~clipaudit.llm.LocalLimiter`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from clipaudit.config import LLMConfig
    from clipaudit.llm import LLMRequest, LLMResult, LLMWorker, RateLimiter, RateLimits

log = logging.getLogger("clipaudit.runtime")


LLM_CHUNK = 8
"""Requests per unit of work handed to an LLM worker; results are yielded (and recorded) per chunk."""


class Secret:
    """A string that never shows itself (``repr``/``str``): how the API key crosses into worker actors."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The secret itself (hand it to the HTTP client only)."""
        return self._value

    def __repr__(self) -> str:
        return "Secret(<redacted>)"

    __str__ = __repr__

    def __getstate__(self) -> str:
        return self._value

    def __setstate__(self, state: str) -> None:
        self._value = state


def llm_limits(llm: LLMConfig) -> RateLimits:
    """The shared rate budget of ``llm``: requests and tokens per ``rate_window_s``, ``max_in_flight`` leases."""
    from clipaudit.llm import RateLimits

    return RateLimits(requests=llm.requests_per_minute, tokens=llm.tokens_per_minute, window_s=llm.rate_window_s,
                      max_in_flight=llm.max_in_flight)


def llm_worker(llm: LLMConfig, api_key: str, limiter: RateLimiter,
               validator: Callable[[str], object] | None) -> LLMWorker:
    """An :class:`~clipaudit.llm.LLMWorker` configured from ``llm`` drawing on ``limiter``."""
    from clipaudit.llm import LLMWorker

    return LLMWorker(llm.base_url, api_key, llm.model, limiter=limiter, timeout_s=llm.timeout_s,
                     max_retries=llm.max_retries, max_in_flight=llm.max_in_flight, backoff_base_s=llm.backoff_s,
                     max_retry_after_s=llm.max_retry_after_s, prices=llm.price_table(), validator=validator,
                     repair_rounds=llm.repair_rounds)


def _unique_requests(requests: Sequence[LLMRequest]) -> list[LLMRequest]:
    unique: dict[str, LLMRequest] = {}
    for request in requests:
        unique.setdefault(request.request_id, request)
    return list(unique.values())


def _llm_chunks(requests: Sequence[LLMRequest]) -> list[list[LLMRequest]]:
    return [list(requests[i : i + LLM_CHUNK]) for i in range(0, len(requests), LLM_CHUNK)]


_DONE = object()


def map_llm_local(requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                   validator: Callable[[str], object] | None) -> Iterator[list[LLMResult]]:
    """In-process fan-out: an event loop in a helper thread, one worker, one :class:`LocalLimiter`."""
    import asyncio
    import queue
    import threading

    from clipaudit.llm import LocalLimiter

    unique = _unique_requests(requests)
    if not unique:
        return
    out: queue.Queue[object] = queue.Queue()

    async def main() -> None:
        async with llm_worker(llm, api_key, LocalLimiter(llm_limits(llm)), validator) as worker:
            tasks = [asyncio.ensure_future(worker.run(chunk)) for chunk in _llm_chunks(unique)]
            for finished in asyncio.as_completed(tasks):
                out.put(await finished)

    def target() -> None:
        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            out.put(exc)
        finally:
            out.put(_DONE)

    thread = threading.Thread(target=target, name="clipaudit-llm", daemon=True)
    thread.start()
    while (item := out.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item  # type: ignore[misc]
    thread.join()


class _BudgetActor:
    """Ray actor hosting the one :class:`~clipaudit.llm.RateBudget` all LLM worker actors draw from; calls are
    served one at a time against this actor's monotonic clock.

    It also knows which worker holds each lease in flight, so that the leases of a worker that died (it will never
    release them) are released at once by :meth:`release_worker`, instead of after the budget's ``lease_ttl_s``
    (15 minutes): until then they would take their in-flight slots from the workers left, down to none."""

    def __init__(self, limits: RateLimits) -> None:
        import time

        from clipaudit.llm import RateBudget

        self._clock = time.monotonic
        self._budget = RateBudget(limits, now=self._clock())
        self._held: dict[str, set[str]] = {}

    def try_acquire(self, lease_id: str, tokens: int, worker: str = "") -> float:
        wait = self._budget.try_acquire(self._clock(), lease_id, tokens)
        if wait <= 0:
            self._held.setdefault(worker, set()).add(lease_id)
        return wait

    def release(self, lease_id: str, worker: str = "") -> None:
        self._budget.release(self._clock(), lease_id)
        self._held.get(worker, set()).discard(lease_id)

    def release_worker(self, worker: str) -> int:
        """Release every lease ``worker`` (lost) still holds; returns how many. Their charges stay in the window
        (those requests may have been sent)."""
        leases = self._held.pop(worker, set())
        now = self._clock()
        for lease_id in leases:
            self._budget.release(now, lease_id)
        return len(leases)

    def record_actual(self, lease_id: str, tokens_used: int) -> None:
        self._budget.record_actual(self._clock(), lease_id, tokens_used)

    def pause(self, seconds: float) -> None:
        self._budget.pause(self._clock(), seconds)

    def granted(self) -> int:
        return self._budget.granted


class _ActorBudget:
    """A :class:`~clipaudit.llm.BudgetBackend` over a :class:`_BudgetActor` handle (awaits its calls), for the
    worker named ``worker``."""

    def __init__(self, handle: object, worker: str = "") -> None:
        self.handle = handle
        self.worker = worker

    async def try_acquire(self, lease_id: str, tokens: int) -> float:
        return await self.handle.try_acquire.remote(lease_id, tokens, self.worker)

    async def release(self, lease_id: str) -> None:
        await self.handle.release.remote(lease_id, self.worker)

    async def record_actual(self, lease_id: str, tokens_used: int) -> None:
        await self.handle.record_actual.remote(lease_id, tokens_used)

    async def pause(self, seconds: float) -> None:
        await self.handle.pause.remote(seconds)


class _LLMWorkerActor:
    """Async Ray actor owning one :class:`~clipaudit.llm.LLMWorker` whose limiter is the shared budget actor (its
    leases held in the name ``name``)."""

    def __init__(self, llm: LLMConfig, api_key: Secret, budget: object,
                 validator: Callable[[str], object] | None, name: str = "") -> None:
        self._args = (llm, api_key, budget, validator, name)
        self._worker: LLMWorker | None = None

    def _get(self) -> LLMWorker:
        if self._worker is None:
            from clipaudit.llm import SharedLimiter

            llm, api_key, budget, validator, name = self._args
            self._worker = llm_worker(llm, api_key.reveal(), SharedLimiter(_ActorBudget(budget, name)), validator)
        return self._worker

    async def run(self, requests: list[LLMRequest]) -> list[LLMResult]:
        return await self._get().run(requests)

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker.aclose()


MAX_WORKER_LOSSES = 3
"""LLM worker actors lost in one fan-out (each replaced, its chunk sent again) before the stage gives up."""


def map_llm_ray(requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                validator: Callable[[str], object] | None) -> Iterator[list[LLMResult]]:
    """Ray fan-out: one budget actor, ``llm.workers`` async worker actors (no CPU reserved: they wait on I/O).

    Requests are deduplicated and split by request_id, so one id only ever goes to one worker (whose own
    in-flight dedupe then sends it once); chunks are submitted at once and yielded as they finish (the caller
    records each chunk's results as it comes, so a re-run sends none of them again). A worker runs its chunks
    concurrently, drawing leases in their order.

    The actors are pinned to the driver's node: they reserve no CPU, so they always fit there, and a worker node
    lost mid-stage (a reclaimed spot instance) cannot take a request in flight with it, so no request is paid
    twice for a lost node. Should a worker actor itself die, its chunks not yet back go to a new worker, and the
    leases it held are released at once (else its in-flight slots stay taken for the budget's ``lease_ttl_s``).
    The results of a chunk come back together, so every request of those chunks that the lost worker had sent
    (in flight, or answered while the rest of its chunk was not) is sent again: with leases drawn in chunk order,
    about one chunk plus the worker's requests in flight; the only case where a request is paid twice. Past
    :data:`MAX_WORKER_LOSSES`, the stage fails and the chunks already recorded stay recorded.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from clipaudit.batches.isolation import InfrastructureError

    unique = _unique_requests(requests)
    if not unique:
        return
    n = max(1, min(llm.workers, len(unique)))
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    budget = ray.remote(_BudgetActor).options(num_cpus=0, scheduling_strategy=here).remote(llm_limits(llm))
    worker_class = ray.remote(_LLMWorkerActor).options(num_cpus=0, scheduling_strategy=here)
    names = [f"worker-{slot}" for slot in range(n)]
    workers = [worker_class.remote(llm, Secret(api_key), budget, validator, name) for name in names]
    shards: list[list[LLMRequest]] = [[] for _ in range(n)]
    for request in unique:
        shards[int(request.request_id[:12], 16) % n].append(request)
    pending = {worker.run.remote(chunk): (slot, chunk) for slot, (worker, shard) in enumerate(zip(workers, shards))
               for chunk in _llm_chunks(shard)}
    log.info("LLM fan-out: %d requests over %d worker actors sharing one rate budget", len(unique), n)
    losses = 0
    try:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            slot, chunk = pending.pop(done[0])
            try:
                results = ray.get(done[0])
            except ray.exceptions.RayActorError as exc:
                losses += 1
                if losses > MAX_WORKER_LOSSES:
                    raise InfrastructureError(f"{losses} LLM worker actors lost in one fan-out (last: "
                                              f"{type(exc).__name__}); the results recorded so far are kept: run "
                                              "the stage again") from exc
                log.warning("an LLM worker actor was lost (%s); its chunks go to a new worker", type(exc).__name__)
                lost = workers[slot]
                ray.kill(lost)
                ray.get(budget.release_worker.remote(names[slot]))
                names[slot] = f"worker-{slot}.{losses}"
                workers[slot] = worker_class.remote(llm, Secret(api_key), budget, validator, names[slot])
                stale = [ref for ref, (owner, _) in pending.items() if owner == slot]
                again = [chunk] + [pending.pop(ref)[1] for ref in stale]
                pending.update({workers[slot].run.remote(c): (slot, c) for c in again})
                continue
            yield results
        ray.get([worker.close.remote() for worker in workers])
    finally:
        for handle in [*workers, budget]:
            ray.kill(handle)
