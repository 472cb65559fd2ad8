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
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipaudit.placement import MAX_INSTANCES, NodeShape, Placement, PlacementError, plan_placement
from clipaudit.stages.embed_batches import Batch, ImageEncoder, TextEncoder, prepare_images
from clipaudit.stages.isolation import bisect_stream

if TYPE_CHECKING:
    from clipaudit.config import Config, EmbedConfig, LLMConfig, NeighboursConfig, RayConfig, TcacConfig
    from clipaudit.llm import LLMRequest, LLMResult, LLMWorker, RateLimiter, RateLimits
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.runtime")

warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
"""The bounded retries of the Ray maps (``max_retries`` of the tasks, ``max_restarts=0`` of the actors: see
:mod:`clipaudit.stages.isolation`) have no named parameter in Ray 2.60's ``map_batches`` and go through its
deprecated ``**ray_remote_args``; its notice says nothing a user can act on."""


def _chunks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _to_numpy_batches(table: pa.Table, rows: int) -> Iterator[Batch]:
    for chunk in _chunks(table, rows):
        yield {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}


class LocalRunner:
    """Runs the batch functions in this process, one batch after another (no Ray)."""

    device = "cpu"

    def topk(self, neighbours: NeighboursConfig) -> TopkSearch:
        """Exact top-k searches, all in-process (see :class:`TopkSearch`)."""
        return TopkSearch(neighbours, None)

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
        """tcac: decode and resize each image of ``todo`` (image_id, uri, transforms) once, then transform in
        batches, crop and embed with CLIP."""
        from clipaudit.stages.tcac_batches import TransformedEncoder, images_per_task, prepare_resized

        encoder = TransformedEncoder(model, tcac, "cpu", embed.torch_threads)
        per_task = images_per_task(embed.batch_size, len(tcac.transforms) + 1)
        for batch in _to_numpy_batches(todo, per_task):
            yield encoder(prepare_resized(batch, model.preprocess, tcac, embed.max_pixels))


class RayRunner:
    """Runs the batch functions on Ray Data: CPU tasks for decoding, actor pools for the models."""

    def __init__(self, ray_config: RayConfig, embed: EmbedConfig) -> None:
        self.ray_config = ray_config
        self.nodes = cluster_nodes()
        self.placement = self.plan(embed, pools=1)
        self.device = self.placement.device
        log.info("model actors on %s (%s CPU, %s GPU each); %d node shape(s): %s", self.device,
                 self.placement.cpus_per_actor, self.placement.gpus_per_actor, len(self.nodes),
                 "; ".join(node.describe() for node in self.nodes))

    def plan(self, embed: EmbedConfig, pools: int) -> Placement:
        """The placement of ``pools`` model actor pools running at once, checked against what each node has
        (PlacementError, before any work is submitted, when they cannot be placed)."""
        return plan_placement(self.nodes, device_setting=self.ray_config.device, pools=pools,
                              actors_per_pool=embed.actors_per_model, cpus_per_actor=embed.cpus_per_actor,
                              gpus_per_actor=embed.gpus_per_actor, torch_threads=embed.torch_threads)

    def topk(self, neighbours: NeighboursConfig) -> TopkSearch:
        """Exact top-k searches: on Ray actors from ``neighbours.ray_min_images`` rows (see :class:`TopkSearch`)."""
        return TopkSearch(neighbours, lambda: None)

    def map_llm(self, requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                validator: Callable[[str], object] | None = None) -> Iterator[list[LLMResult]]:
        """Send ``requests`` through ``llm.workers`` async worker actors that share one rate budget (a budget
        actor); yield the results chunk by chunk as they finish (see :func:`_map_llm_ray`)."""
        return _map_llm_ray(requests, llm, api_key, validator)

    @staticmethod
    def _actor_args(placement: Placement, embed: EmbedConfig) -> dict[str, object]:
        import ray

        args: dict[str, object] = {
            "compute": ray.data.ActorPoolStrategy(size=embed.actors_per_model),
            "num_cpus": placement.cpus_per_actor,
            "max_restarts": 0,
        }
        if placement.gpus_per_actor:
            args["num_gpus"] = placement.gpus_per_actor
        return args

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Prepare ``todo`` as CPU tasks, embed it in one actor pool per model, stream the batches back; rows
        behind a run that fails are isolated (:func:`~clipaudit.stages.isolation.bisect_stream`)."""
        return bisect_stream(lambda part: self._embed_images(part, models, embed), todo, "image_id")

    def _embed_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        import ray

        placement = self.plan(embed, pools=len(models))
        preprocessors = {role: model.preprocess for role, model in models.items()}
        dataset = ray.data.from_arrow(_chunks(todo, embed.batch_size)).map_batches(
            prepare_images,
            fn_kwargs={"preprocessors": preprocessors, "max_pixels": embed.max_pixels},
            batch_size=embed.batch_size,
            batch_format="numpy",
            num_cpus=placement.task_cpus,
            max_retries=self.ray_config.task_retries,
        )
        for role, model in models.items():
            dataset = dataset.map_batches(
                ImageEncoder,
                fn_constructor_kwargs={"model": model, "role": role, "device": self.device,
                                       "threads": placement.threads},
                batch_size=embed.batch_size,
                batch_format="numpy",
                **self._actor_args(placement, embed),
            )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def map_texts(self, texts: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        """Embed the ``text`` column in an actor pool of the CLIP model, stream the batches back (rows behind a
        failed run isolated)."""
        return bisect_stream(lambda part: self._embed_texts(part, model, embed), texts, "text")

    def _embed_texts(self, texts: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        import ray

        placement = self.plan(embed, pools=1)
        dataset = ray.data.from_arrow(_chunks(texts, embed.text_batch_size)).map_batches(
            TextEncoder,
            fn_constructor_kwargs={"model": model, "device": self.device, "threads": placement.threads},
            batch_size=embed.text_batch_size,
            batch_format="numpy",
            **self._actor_args(placement, embed),
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """tcac: CPU tasks read, decode and resize each image of ``todo`` (image_id, uri, transforms) once and draw
        its transforms' parameters; the CLIP actor pool applies the transforms in batches on its device, crops and
        embeds the (image, transform) rows; the batches stream back (rows behind a failed run isolated)."""
        return bisect_stream(lambda part: self._transform_and_embed(part, model, tcac, embed), todo, "image_id")

    def _transform_and_embed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                             embed: EmbedConfig) -> Iterator[Batch]:
        import ray

        from clipaudit.stages.tcac_batches import TransformedEncoder, images_per_task, prepare_resized

        placement = self.plan(embed, pools=1)
        per_task = images_per_task(embed.batch_size, len(tcac.transforms) + 1)
        dataset = ray.data.from_arrow(_chunks(todo, per_task)).map_batches(
            prepare_resized,
            fn_kwargs={"preprocess": model.preprocess, "tcac": tcac, "max_pixels": embed.max_pixels},
            batch_size=per_task,
            batch_format="numpy",
            num_cpus=placement.task_cpus,
            max_retries=self.ray_config.task_retries,
        ).map_batches(
            TransformedEncoder,
            fn_constructor_kwargs={"model": model, "tcac": tcac, "device": self.device,
                                   "threads": placement.threads},
            batch_size=per_task,
            batch_format="numpy",
            **self._actor_args(placement, embed),
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

    def topk(self, neighbours: NeighboursConfig) -> TopkSearch:
        """Exact top-k searches; Ray starts only when a search is large enough to use it (see
        :class:`TopkSearch`)."""
        return TopkSearch(neighbours, self.get if self._config.ray.runner == "ray" else None)

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


def cluster_nodes() -> list[NodeShape]:
    """The shapes work can be placed on: every alive node that offers CPU or GPU, plus each node type the
    cluster's autoscaler may still launch (up to its max count). Raises PlacementError when two nodes share one
    session folder (see :func:`check_private_session_dirs`)."""
    import ray

    alive = [node for node in ray.nodes() if node.get("Alive")]
    check_private_session_dirs(alive)
    shapes = [NodeShape(f"node {node['NodeManagerAddress']} {node['NodeID'][:8]}", node["Resources"].get("CPU", 0.0),
                        node["Resources"].get("GPU", 0.0))
              for node in alive if node["Resources"].get("CPU", 0.0) or node["Resources"].get("GPU", 0.0)]
    return shapes + _autoscaled_shapes()


def _autoscaled_shapes() -> list[NodeShape]:
    """The node types of the autoscaler's cluster config (none without an autoscaler)."""
    from ray._private.state import state

    try:
        config = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler state on this cluster: nothing to add
        return []
    if config is None:
        return []
    return [NodeShape(f"node type {group.name} (autoscaled)", group.resources.get("CPU", 0.0),
                      group.resources.get("GPU", 0.0), count=group.max_count if group.max_count >= 0 else MAX_INSTANCES)
            for group in config.node_group_configs if group.max_count != 0
            and (group.resources.get("CPU", 0.0) or group.resources.get("GPU", 0.0))]


def check_private_session_dirs(nodes: Sequence[dict[str, Any]]) -> None:
    """Refuse to run a job with a working_dir (``ray job submit --working-dir``) on a cluster whose nodes share one
    Ray session folder (several ``ray start`` on one host with one ``--temp-dir``).

    Each node's runtime-env agent deletes the job's working_dir from that folder once its own workers are done
    with it, while the driver still runs in it on another node; the driver then dies in its next native call
    (seen: oneMKL ``Cannot load libtorch_cpu.so`` and a segfault at the neighbours stage, after the embed stage's
    actors on the second node ended)."""
    import ray

    runtime_env = ray.get_runtime_context().runtime_env
    if not (runtime_env.get("working_dir") or runtime_env.get("py_modules")):
        return
    shared = shared_session_dirs(nodes)
    if shared:
        session_dir, ids = next(iter(shared.items()))
        raise PlacementError(
            f"Ray nodes {', '.join(ids)} share the session folder {session_dir}: a node's runtime-env agent "
            "would delete the job's working_dir under a driver running on another node. Start each node on "
            "this host with its own `ray start --temp-dir DIR`")


def shared_session_dirs(nodes: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Session folders used by more than one of ``nodes`` (``ray.nodes()`` entries) -> those nodes' short ids."""
    by_dir: dict[str, list[str]] = {}
    for node in nodes:
        session_dir = os.path.dirname(os.path.dirname(node.get("ObjectStoreSocketName", "")))
        if session_dir:
            by_dir.setdefault(session_dir, []).append(node["NodeID"][:8])
    return {session_dir: ids for session_dir, ids in by_dir.items() if len(ids) > 1}


@contextmanager
def ray_session(ray_config: RayConfig) -> Iterator[None]:
    """Connect to the configured cluster, or start a local Ray, and shut it down afterwards if we started it.

    A driver already connected is reused as it is; under ``ray job submit`` (``RAY_ADDRESS`` set) the job's
    cluster is joined. Ray Data's progress bars, execution banners and issue detectors are off (clipaudit prints
    its own progress bars and per-stage stats); its actor pools wait at most ``ray.actor_start_timeout_s``.
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
        with _quiet_logger("ray._private.authentication.authentication_token_setup"):
            ray.init(num_cpus=ray_config.num_cpus, **kwargs)
    context = ray.data.DataContext.get_current()
    context.wait_for_min_actors_s = ray_config.actor_start_timeout_s
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.issue_detectors_config.detectors = []
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """Silence one logger below ERROR for the duration (a local Ray we start ourselves warns that token
    authentication is off: on 127.0.0.1, for this process only, that is what we want)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


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


# ------------------------------------------------------------------------------------------------------------------
# Exact top-k on the workers (the neighbours stage, the TCAC caption pools): `topk` of each runner.
# The kernel is clipaudit.knn; this section only places actors, hands out work and merges what comes back.
# ------------------------------------------------------------------------------------------------------------------

TOPK_START_TIMEOUT_S = 120.0
"""Seconds to wait for the first top-k actor to start before failing with what the actors ask for."""


@dataclass(frozen=True)
class TopkPlacement:
    """How many top-k actors run where, and what each reserves."""

    device: str
    workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    threads: int


def topk_placement(nodes: Sequence[dict[str, float]], neighbours: NeighboursConfig) -> TopkPlacement:
    """Top-k actors sized from what each node has (``nodes``: each alive node's resources): one per GPU when
    the cluster has GPUs and ``neighbours.device`` allows, else one per ``ray_cpus_per_worker`` CPUs of each
    node; never more CPU per actor than the smallest node has; at most ``neighbours.ray_workers``."""
    gpu_nodes = [node for node in nodes if node.get("GPU", 0) >= 1]
    if neighbours.device == "cuda" and not gpu_nodes:
        raise PlacementError("neighbours.device is cuda but the Ray cluster has no GPU")
    if gpu_nodes and neighbours.device != "cpu":
        cpus = min(neighbours.ray_cpus_per_worker, *(node.get("CPU", 0.0) for node in gpu_nodes))
        capacity = sum(int(node["GPU"]) for node in gpu_nodes)
        device, gpus = "cuda", 1.0
    else:
        node_cpus = [node["CPU"] for node in nodes if node.get("CPU", 0) > 0]
        if not node_cpus:
            raise PlacementError("the Ray cluster has no CPU for the top-k actors")
        cpus = min(neighbours.ray_cpus_per_worker, *node_cpus)
        capacity = sum(int(c / cpus + 1e-9) for c in node_cpus)
        device, gpus = "cpu", 0.0
    workers = min(neighbours.ray_workers or capacity, capacity)
    return TopkPlacement(device, workers, cpus, gpus, max(1, int(cpus)))


class TopkSearch:
    """Exact top-k for a stage: in-process below ``neighbours.ray_min_images`` rows or without Ray, else on a
    pool of Ray actors (:class:`_TopkPool`). Used as a context manager, one pool serves every call and is
    stopped on exit; called outside one, each call starts and stops its own pool.

    ``notes`` says where the last search ran, on how many workers, and how many rows the fp16 path searched
    again in fp32.
    """

    def __init__(self, neighbours: NeighboursConfig, ensure_ray: Callable[[], object] | None) -> None:
        """``ensure_ray``: called before the first Ray search (starts or joins Ray); None: never use Ray."""
        self.neighbours = neighbours
        self._ensure_ray = ensure_ray
        self._shared = False
        self._pool: _TopkPool | None = None
        self.notes: dict[str, object] = {}

    def __enter__(self) -> TopkSearch:
        self._shared = True
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the shared pool, if one was started."""
        self._shared = False
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def self_topk(self, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of every row among the other rows: :func:`clipaudit.knn.self_topk`'s ids and order."""
        from clipaudit import knn

        x, k = knn.self_inputs(vectors, k)
        cfg = self.neighbours
        if not self._on_ray(len(x)):
            device = _local_device(cfg.device)
            self.notes = {"where": "in-process", "device": device}
            if device == "cuda":
                ids, sims, again = knn.self_topk_exact(x, k, margin=cfg.lowp_margin, device=device,
                                                       block_size=cfg.block_size)
                self.notes["searched_again"] = again
                return ids, sims
            return knn.self_topk(x, k, block_size=cfg.block_size)
        with self._pool_for_call() as pool:
            return pool.self_topk(x, k, cfg, self.notes)

    def cross_topk(self, queries: np.ndarray, corpus: np.ndarray, k: int,
                   exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-k of each query among the corpus rows (``exclude``: a corpus row to leave out per query, -1
        for none): :func:`clipaudit.knn.cross_topk`'s ids and order."""
        from clipaudit import knn

        q, c, k, excl = knn.cross_inputs(queries, corpus, k, exclude)
        cfg = self.neighbours
        if not self._on_ray(len(c)):
            device = _local_device(cfg.device)
            self.notes = {"where": "in-process", "device": device}
            if device == "cuda":
                ids, sims, again = knn.cross_topk_exact(q, c, k, margin=cfg.lowp_margin, exclude=excl,
                                                        device=device, block_size=cfg.block_size)
                self.notes["searched_again"] = again
                return ids, sims
            return knn.cross_topk(q, c, k, exclude=excl, block_size=cfg.block_size)
        with self._pool_for_call() as pool:
            return pool.cross_topk(q, c, k, excl, cfg, self.notes)

    def _on_ray(self, rows: int) -> bool:
        return self._ensure_ray is not None and rows >= self.neighbours.ray_min_images

    @contextmanager
    def _pool_for_call(self) -> Iterator[_TopkPool]:
        import ray

        if self._pool is None:
            self._ensure_ray()
            nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
            pool = _TopkPool(topk_placement(nodes, self.neighbours))
            if not self._shared:
                try:
                    yield pool
                finally:
                    pool.close()
                return
            self._pool = pool
        yield self._pool


def _local_device(setting: str) -> str:
    """``cpu`` or ``cuda`` for an in-process search (``auto``: CUDA when torch sees a GPU)."""
    if setting == "cpu":
        return "cpu"
    import torch

    if setting == "cuda" and not torch.cuda.is_available():
        raise PlacementError("neighbours.device is cuda but torch sees no GPU")
    return "cuda" if torch.cuda.is_available() else "cpu"


class _TopkActor:
    """A top-k worker: holds a corpus (from the object store; on CPU not copied) and runs shares of a self
    search (:class:`clipaudit.knn.SelfSearch`) or blocks of queries of a cross search, on its device: fp32 on
    CPU; on CUDA fp16 products with fp32 accumulation, made exact by the caller or by :func:`knn.refine`."""

    def __init__(self, device: str, threads: int) -> None:
        import warnings

        import torch

        torch.set_num_threads(threads)
        if device == "cuda":
            torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
            torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
            torch.backends.cuda.matmul.allow_tf32 = False
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        self.device = device
        self.corpus: np.ndarray | None = None
        self.search: object | None = None

    def load(self, corpus: np.ndarray) -> str:
        """Hold ``corpus``; returns this actor's node id."""
        import ray

        self.corpus = corpus
        self.search = None
        return ray.get_runtime_context().get_node_id()

    def start_self(self, corpus: np.ndarray, k: int, block: int) -> str:
        """Start a share of a self search of ``corpus``; returns this actor's node id."""
        from clipaudit import knn

        node = self.load(corpus)
        self.search = knn.SelfSearch(corpus, k, block, device=self.device)
        return node

    def run_pairs(self, pairs: list[tuple[tuple[int, int], tuple[int, int]]]) -> int:
        self.search.run(pairs)
        return len(pairs)

    def self_result(self) -> tuple[np.ndarray, np.ndarray]:
        result = self.search.result()
        self.search = None
        return result

    def cross(self, queries: np.ndarray, k: int, exclude: np.ndarray | None, block: int,
              margin: int) -> tuple[np.ndarray, np.ndarray, int]:
        from clipaudit import knn

        if self.device == "cuda":
            return knn.cross_topk_exact(queries, self.corpus, k, margin=margin, exclude=exclude,
                                        device="cuda", block_size=block)
        ids, sims = knn.cross_topk(queries, self.corpus, k, exclude=exclude, block_size=block)
        return ids, sims, 0


class _TopkPool:
    """Top-k actors placed by :func:`topk_placement` (spread over the nodes); work is handed out unit by unit
    to whichever actor is free, starting as soon as the first actor is up."""

    def __init__(self, placement: TopkPlacement) -> None:
        import ray

        self.placement = placement
        options: dict[str, object] = {"num_cpus": placement.cpus_per_worker, "scheduling_strategy": "SPREAD"}
        if placement.gpus_per_worker:
            options["num_gpus"] = placement.gpus_per_worker
        actor_class = ray.remote(_TopkActor).options(**options)
        self.actors = [actor_class.remote(placement.device, placement.threads) for _ in range(placement.workers)]
        log.info("top-k: %d actors on %s (%s CPU, %s GPU, %d threads each)", placement.workers, placement.device,
                 placement.cpus_per_worker, placement.gpus_per_worker, placement.threads)

    def close(self) -> None:
        """Stop the actors."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def self_topk(self, x: np.ndarray, k: int, cfg: NeighboursConfig,
                  notes: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
        """The symmetric search: the block pairs of :func:`knn.self_tasks` go to the actors, each keeps the
        running top-k of every row over its pairs, and the driver merges one (N, k) result per actor."""
        import ray

        from clipaudit import knn

        n = len(x)
        device = self.placement.device
        block = knn.self_block_edge(n, block_size=cfg.block_size, device=device)
        wide = k if device == "cpu" else min(n - 1, k + cfg.lowp_margin)
        corpus = ray.put(x)
        starts = [actor.start_self.remote(corpus, wide, block) for actor in self.actors]
        tasks = knn.self_tasks(n, block, len(self.actors))
        active, nodes = self._run(starts, tasks, lambda actor, pairs: actor.run_pairs.remote(pairs),
                                  lambda *_: None)
        merged: tuple[np.ndarray, np.ndarray] | None = None
        for ref in [actor.self_result.remote() for actor in active]:
            part = ray.get(ref)
            merged = part if merged is None else knn.merge_topk(merged, part)
            del part
        notes.update(where="ray", device=device, workers=len(active), nodes=nodes, units=len(tasks))
        if device == "cpu":
            return merged
        ids, sims, again = knn.refine_self(x, merged[0], merged[1], k, _lowp_dtype())
        notes["searched_again"] = again
        return ids, sims

    def cross_topk(self, q: np.ndarray, c: np.ndarray, k: int, exclude: np.ndarray | None, cfg: NeighboursConfig,
                   notes: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
        """Blocks of queries go to the actors, each searching the whole corpus (in the object store once)."""
        import ray

        from clipaudit import knn

        device = self.placement.device
        block = knn.cross_block_edge(len(q), len(c), block_size=cfg.block_size, device=device)
        corpus = ray.put(c)
        starts = [actor.load.remote(corpus) for actor in self.actors]
        ids = np.empty((len(q), k), dtype=np.int64)
        sims = np.empty((len(q), k), dtype=np.float32)
        again = [0]

        def submit(actor: object, span: tuple[int, int]) -> object:
            part = None if exclude is None else exclude[span[0] : span[1]]
            return actor.cross.remote(q[span[0] : span[1]], k, part, block, cfg.lowp_margin)

        def done(span: tuple[int, int], result: tuple[np.ndarray, np.ndarray, int]) -> None:
            ids[span[0] : span[1]], sims[span[0] : span[1]], searched = result
            again[0] += searched

        spans = knn.row_spans(len(q), block)
        active, nodes = self._run(starts, spans, submit, done)
        notes.update(where="ray", device=device, workers=len(active), nodes=nodes, units=len(spans),
                     searched_again=again[0])
        return ids, sims

    def _run(self, starts: list[object], units: Sequence[object], submit: Callable[[object, object], object],
             done: Callable[[object, object], None]) -> tuple[list[object], int]:
        """Hand ``units`` to the actors whose ``starts`` finished, two in flight per actor, and pass each result
        to ``done``; returns the actors that started and on how many nodes. Fails when no actor starts within
        :data:`TOPK_START_TIMEOUT_S` (the cluster cannot place one)."""
        import time
        from collections import deque

        import ray

        waiting = dict(zip(starts, self.actors))
        in_flight: dict[object, tuple[object, object]] = {}
        todo = deque(units)
        active: list[object] = []
        nodes: set[str] = set()
        deadline = time.monotonic() + TOPK_START_TIMEOUT_S

        def give(actor: object) -> None:
            if todo:
                unit = todo.popleft()
                in_flight[submit(actor, unit)] = (actor, unit)

        while todo or in_flight:
            timeout = None if active else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([*in_flight, *waiting], num_returns=1, timeout=timeout)
            if not ready:
                raise PlacementError(self._unplaced_message())
            ref = ready[0]
            if ref in waiting:
                actor = waiting.pop(ref)
                nodes.add(ray.get(ref))
                active.append(actor)
                give(actor)
                give(actor)
            else:
                actor, unit = in_flight.pop(ref)
                done(unit, ray.get(ref))
                give(actor)
        return active, len(nodes)

    def _unplaced_message(self) -> str:
        import ray

        p = self.placement
        asks = f"{p.cpus_per_worker} CPU" + (f" and {p.gpus_per_worker} GPU" if p.gpus_per_worker else "")
        return (f"no top-k actor started within {TOPK_START_TIMEOUT_S:.0f} s: each asks for {asks}; the cluster "
                f"has {ray.available_resources()} free of {ray.cluster_resources()}. Free resources or set "
                "neighbours.ray_cpus_per_worker / neighbours.ray_workers lower")


def _lowp_dtype() -> object:
    """The dtype of the GPU products (the knn default on CUDA)."""
    import torch

    return torch.float16
