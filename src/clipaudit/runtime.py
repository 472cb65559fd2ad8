"""Where work is scheduled: the one module that imports Ray for scheduling.

Stages describe their work as plain batch functions (see :mod:`clipaudit.stages.embed_batches`) and hand
them to a runner. :class:`RayRunner` shards the rows into blocks, runs reading/decoding as CPU tasks and
model forwards in actor pools (GPU actors with fp16 when the cluster has GPUs), and streams the results back
to the driver, which is the single writer. :class:`LocalRunner` runs the same functions in-process, in order:
for tests and for debugging without Ray.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipaudit.stages.embed_batches import Batch, ImageEncoder, TextEncoder, prepare_images, torch_threads_for

if TYPE_CHECKING:
    from clipaudit.config import Config, EmbedConfig, LLMConfig, RayConfig, TcacConfig
    from clipaudit.llm import LLMRequest, LLMResult, LLMWorker, RateLimiter, RateLimits
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.runtime")


@dataclass(frozen=True)
class Placement:
    """Where model forwards run and what each actor reserves."""

    device: str
    cpus_per_actor: float
    gpus_per_actor: float
    threads: int


def _chunks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _to_numpy_batches(table: pa.Table, rows: int) -> Iterator[Batch]:
    for chunk in _chunks(table, rows):
        yield {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}


class LocalRunner:
    """Runs the batch functions in this process, one batch after another (no Ray)."""

    device = "cpu"

    def map_llm(self, requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                validator: Callable[[str], object] | None = None) -> Iterator[list[LLMResult]]:
        """Send ``requests`` (deduplicated by request_id) through one in-process async worker under one
        local rate budget; yield the results chunk by chunk as they finish."""
        return _map_llm_local(requests, llm, api_key, validator)

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Prepare and embed ``todo`` (image_id, uri, need_<role>) batch by batch."""
        preprocessors = {role: model.preprocess for role, model in models.items()}
        encoders = [ImageEncoder(model, role, "cpu", embed.torch_threads) for role, model in models.items()]
        for batch in _to_numpy_batches(todo, embed.batch_size):
            batch = prepare_images(batch, preprocessors, embed.max_pixels)
            for encoder in encoders:
                batch = encoder(batch)
            yield batch

    def map_texts(self, texts: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        """Embed the ``text`` column with the CLIP text tower."""
        encoder = TextEncoder(model, "cpu", embed.torch_threads)
        for batch in _to_numpy_batches(texts, embed.text_batch_size):
            yield encoder(batch)

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """tcac: decode each image of ``todo`` (image_id, uri, transforms) once, transform, embed with CLIP."""
        from clipaudit.stages.tcac_batches import TransformedEncoder, images_per_task, prepare_transformed

        encoder = TransformedEncoder(model, "cpu", embed.torch_threads)
        per_task = images_per_task(embed.batch_size, len(tcac.transforms) + 1)
        for batch in _to_numpy_batches(todo, per_task):
            yield encoder(prepare_transformed(batch, model.preprocess, tcac, embed.max_pixels))


class RayRunner:
    """Runs the batch functions on Ray Data: CPU tasks for decoding, actor pools for the models."""

    def __init__(self, ray_config: RayConfig, embed: EmbedConfig) -> None:
        import ray

        self.placement = _placement(ray_config, embed, ray.cluster_resources())
        self.device = self.placement.device
        log.info("model actors on %s (%s CPU, %s GPU each)", self.device,
                 self.placement.cpus_per_actor, self.placement.gpus_per_actor)

    def map_llm(self, requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                validator: Callable[[str], object] | None = None) -> Iterator[list[LLMResult]]:
        """Send ``requests`` through ``llm.workers`` async worker actors that share one rate budget (a budget
        actor); yield the results chunk by chunk as they finish (see :func:`_map_llm_ray`)."""
        return _map_llm_ray(requests, llm, api_key, validator)

    def _actor_args(self, embed: EmbedConfig) -> dict[str, object]:
        import ray

        args: dict[str, object] = {
            "compute": ray.data.ActorPoolStrategy(size=embed.actors_per_model),
            "num_cpus": self.placement.cpus_per_actor,
        }
        if self.placement.gpus_per_actor:
            args["num_gpus"] = self.placement.gpus_per_actor
        return args

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Prepare ``todo`` as CPU tasks, embed it in one actor pool per model, stream the batches back."""
        import ray

        preprocessors = {role: model.preprocess for role, model in models.items()}
        dataset = ray.data.from_arrow(_chunks(todo, embed.batch_size)).map_batches(
            prepare_images,
            fn_kwargs={"preprocessors": preprocessors, "max_pixels": embed.max_pixels},
            batch_size=embed.batch_size,
            batch_format="numpy",
            num_cpus=1,
        )
        for role, model in models.items():
            dataset = dataset.map_batches(
                ImageEncoder,
                fn_constructor_kwargs={"model": model, "role": role, "device": self.device,
                                       "threads": self.placement.threads},
                batch_size=embed.batch_size,
                batch_format="numpy",
                **self._actor_args(embed),
            )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def map_texts(self, texts: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        """Embed the ``text`` column in an actor pool of the CLIP model, stream the batches back."""
        import ray

        dataset = ray.data.from_arrow(_chunks(texts, embed.text_batch_size)).map_batches(
            TextEncoder,
            fn_constructor_kwargs={"model": model, "device": self.device, "threads": self.placement.threads},
            batch_size=embed.text_batch_size,
            batch_format="numpy",
            **self._actor_args(embed),
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """tcac: CPU tasks decode each image of ``todo`` (image_id, uri, transforms) once and apply its transforms;
        the CLIP actor pool embeds the (image, transform) rows; the batches stream back."""
        import ray

        from clipaudit.stages.tcac_batches import TransformedEncoder, images_per_task, prepare_transformed

        per_task = images_per_task(embed.batch_size, len(tcac.transforms) + 1)
        dataset = ray.data.from_arrow(_chunks(todo, per_task)).map_batches(
            prepare_transformed,
            fn_kwargs={"preprocess": model.preprocess, "tcac": tcac, "max_pixels": embed.max_pixels},
            batch_size=per_task,
            batch_format="numpy",
            num_cpus=1,
        ).map_batches(
            TransformedEncoder,
            fn_constructor_kwargs={"model": model, "device": self.device, "threads": self.placement.threads},
            batch_size=embed.batch_size,
            batch_format="numpy",
            **self._actor_args(embed),
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


class LazyRunner:
    """The runner a pipeline hands its stages: the configured one (``ray.runner``), started on first use, so a
    run whose stages schedule nothing (a dry run, a re-run with nothing left) starts no Ray."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._stack = ExitStack()
        self._runner: LocalRunner | RayRunner | None = None

    def get(self) -> LocalRunner | RayRunner:
        """The started runner."""
        if self._runner is None:
            if self._config.ray.runner == "local":
                self._runner = LocalRunner()
            else:
                self._stack.enter_context(ray_session(self._config.ray))
                self._runner = RayRunner(self._config.ray, self._config.embed)
        return self._runner

    @property
    def device(self) -> str:
        """Where model forwards run (starts the runner)."""
        return self.get().device

    def map_images(self, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        """See :meth:`RayRunner.map_images`."""
        return self.get().map_images(*args, **kwargs)

    def map_texts(self, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        """See :meth:`RayRunner.map_texts`."""
        return self.get().map_texts(*args, **kwargs)

    def map_transformed(self, *args: Any, **kwargs: Any) -> Iterator[Batch]:
        """See :meth:`RayRunner.map_transformed`."""
        return self.get().map_transformed(*args, **kwargs)

    def map_llm(self, *args: Any, **kwargs: Any) -> list[LLMResult]:
        """See :meth:`RayRunner.map_llm`."""
        return self.get().map_llm(*args, **kwargs)

    def close(self) -> None:
        """Stop what was started (Ray, if this runner started it)."""
        self._stack.close()


def _placement(ray_config: RayConfig, embed: EmbedConfig, resources: dict[str, float]) -> Placement:
    """GPU actors (fp16) when the cluster has GPUs and the config allows; CPU actors with a CPU share otherwise."""
    has_gpu = resources.get("GPU", 0) > 0
    if ray_config.device == "cuda" and not has_gpu:
        raise RuntimeError("ray.device is cuda but the Ray cluster has no GPU")
    if has_gpu and ray_config.device != "cpu":
        return Placement("cuda", min(embed.cpus_per_actor, 1.0), embed.gpus_per_actor, embed.torch_threads or 1)
    threads = torch_threads_for(embed.cpus_per_actor, embed.torch_threads)
    return Placement("cpu", embed.cpus_per_actor, 0.0, threads)


@contextmanager
def ray_session(ray_config: RayConfig) -> Iterator[None]:
    """Connect to the configured cluster, or start a local Ray, and shut it down afterwards if we started it.

    A driver already connected is reused as it is; under ``ray job submit`` (``RAY_ADDRESS`` set) the job's
    cluster is joined.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kwargs: dict[str, object] = {"include_dashboard": False, "logging_level": logging.WARNING,
                                 "log_to_driver": True}
    if ray_config.address:
        ray.init(address=ray_config.address, **kwargs)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)
    else:
        ray.init(num_cpus=ray_config.num_cpus, **kwargs)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


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


def _map_llm_local(requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
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
    served one at a time against this actor's monotonic clock."""

    def __init__(self, limits: RateLimits) -> None:
        import time

        from clipaudit.llm import RateBudget

        self._clock = time.monotonic
        self._budget = RateBudget(limits, now=self._clock())

    def try_acquire(self, lease_id: str, tokens: int) -> float:
        return self._budget.try_acquire(self._clock(), lease_id, tokens)

    def release(self, lease_id: str) -> None:
        self._budget.release(self._clock(), lease_id)

    def record_actual(self, lease_id: str, tokens_used: int) -> None:
        self._budget.record_actual(self._clock(), lease_id, tokens_used)

    def pause(self, seconds: float) -> None:
        self._budget.pause(self._clock(), seconds)

    def granted(self) -> int:
        return self._budget.granted


class _ActorBudget:
    """A :class:`~clipaudit.llm.BudgetBackend` over a :class:`_BudgetActor` handle (awaits its calls)."""

    def __init__(self, handle: object) -> None:
        self.handle = handle

    async def try_acquire(self, lease_id: str, tokens: int) -> float:
        return await self.handle.try_acquire.remote(lease_id, tokens)

    async def release(self, lease_id: str) -> None:
        await self.handle.release.remote(lease_id)

    async def record_actual(self, lease_id: str, tokens_used: int) -> None:
        await self.handle.record_actual.remote(lease_id, tokens_used)

    async def pause(self, seconds: float) -> None:
        await self.handle.pause.remote(seconds)


class _LLMWorkerActor:
    """Async Ray actor owning one :class:`~clipaudit.llm.LLMWorker` whose limiter is the shared budget actor."""

    def __init__(self, llm: LLMConfig, api_key: Secret, budget: object,
                 validator: Callable[[str], object] | None) -> None:
        self._args = (llm, api_key, budget, validator)
        self._worker: LLMWorker | None = None

    def _get(self) -> LLMWorker:
        if self._worker is None:
            from clipaudit.llm import SharedLimiter

            llm, api_key, budget, validator = self._args
            self._worker = llm_worker(llm, api_key.reveal(), SharedLimiter(_ActorBudget(budget)), validator)
        return self._worker

    async def run(self, requests: list[LLMRequest]) -> list[LLMResult]:
        return await self._get().run(requests)

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker.aclose()


def _map_llm_ray(requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                 validator: Callable[[str], object] | None) -> Iterator[list[LLMResult]]:
    """Ray fan-out: one budget actor, ``llm.workers`` async worker actors (no CPU reserved: they wait on I/O).

    Requests are deduplicated and split by request_id, so one id only ever goes to one worker (whose own
    in-flight dedupe then sends it once); chunks are submitted at once and yielded as they finish.
    """
    import ray

    unique = _unique_requests(requests)
    if not unique:
        return
    n = max(1, min(llm.workers, len(unique)))
    budget = ray.remote(_BudgetActor).options(num_cpus=0).remote(llm_limits(llm))
    worker_class = ray.remote(_LLMWorkerActor).options(num_cpus=0)
    workers = [worker_class.remote(llm, Secret(api_key), budget, validator) for _ in range(n)]
    shards: list[list[LLMRequest]] = [[] for _ in range(n)]
    for request in unique:
        shards[int(request.request_id[:12], 16) % n].append(request)
    pending = [worker.run.remote(chunk) for worker, shard in zip(workers, shards) for chunk in _llm_chunks(shard)]
    log.info("LLM fan-out: %d requests over %d worker actors sharing one rate budget", len(unique), n)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            yield ray.get(done[0])
        ray.get([worker.close.remote() for worker in workers])
    finally:
        for handle in [*workers, budget]:
            ray.kill(handle)
