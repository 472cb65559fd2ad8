"""The runners a stage hands its batch functions to: :class:`RayRunner` on Ray Data, :class:`LocalRunner`
in-process, :class:`LazyRunner` starting the configured one on first use.

:class:`RayRunner` shards the rows into blocks, runs reading/decoding as CPU tasks and model forwards in actor
pools (GPU actors with fp16 when the cluster has GPUs; the models of a pass, images or caption texts, share one
pool's actors by default: ``embed.actor_pools``), and streams the results back to the driver, which is the
single writer. :class:`LocalRunner` runs the same functions in-process, in order: for tests and for debugging
without Ray.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipaudit.batches.embed import Batch, ImageEncoders, TextEncoders, prepare_images
from clipaudit.batches.isolation import LOST_BEFORE, bisect_stream
from clipaudit.placement import Placement, PoolRequest
from clipaudit.runtime.capacity import Capacity
from clipaudit.runtime.failures import FailureClassifier
from clipaudit.runtime.llm_actors import map_llm_local, map_llm_ray
from clipaudit.runtime.session import ray_session
from clipaudit.runtime.topk import TopkSearch

if TYPE_CHECKING:
    from clipaudit.config import Config, EmbedConfig, LLMConfig, NeighboursConfig, RayConfig, TcacConfig
    from clipaudit.llm import LLMRequest, LLMResult
    from clipaudit.models import ResolvedModel

log = logging.getLogger("clipaudit.runtime")

warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
"""The bounded retries of the Ray maps (``max_retries`` of the tasks, ``max_restarts=0`` of the actors: see
:mod:`clipaudit.batches.isolation`) have no named parameter in Ray 2.60's ``map_batches`` and go through its
deprecated ``**ray_remote_args``; its notice says nothing a user can act on."""


def _chunks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(start, rows) for start in range(0, table.num_rows, rows)]


def _to_numpy_batches(table: pa.Table, rows: int) -> Iterator[Batch]:
    for chunk in _chunks(table, rows):
        yield {name: chunk.column(name).to_numpy(zero_copy_only=False) for name in chunk.column_names}


def model_pools(ray_config: RayConfig, embed: EmbedConfig, pools: int) -> PoolRequest:
    """The request of ``pools`` model actor pools (``embed.actors_per_model`` actors each) fed by decode tasks."""
    return PoolRequest(what="model actor", keys="embed.cpus_per_actor / embed.actors_per_model",
                       device_setting=ray_config.device, actors=pools * embed.actors_per_model,
                       cpus_per_actor=embed.cpus_per_actor, gpus_per_actor=embed.gpus_per_actor, with_tasks=True,
                       torch_threads=embed.torch_threads)


def pass_pools(embed: EmbedConfig, models: int) -> int:
    """How many actor pools a pass (the images, the caption texts) of ``models`` models runs at once (one when they
    share actors)."""
    return 1 if embed.actor_pools == "shared" else models


def shared_threads(placement: Placement, embed: EmbedConfig, models: int) -> int:
    """Intra-op threads of an actor hosting ``models`` models: ``embed.torch_threads`` when set, one per GPU actor;
    on CPU otherwise the threads its models would have had in actors of their own (the placement's threads, once
    per model), so sharing actors never leaves cores idle that separate pools would have used."""
    if embed.torch_threads or placement.device != "cpu":
        return placement.threads
    return placement.threads * models


def _rows_only(todo: pa.Table) -> pa.Table:
    """``todo`` without the marks the isolation layer reads (run in-process, nothing is isolated)."""
    return todo.drop_columns([LOST_BEFORE]) if LOST_BEFORE in todo.column_names else todo


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
        return map_llm_local(requests, llm, api_key, validator)

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Prepare and embed ``todo`` (image_id, uri, need_<role>) batch by batch."""
        preprocessors = {role: model.preprocess for role, model in models.items()}
        encoders = ImageEncoders(models, "cpu", embed.torch_threads)
        for batch in _to_numpy_batches(_rows_only(todo), embed.batch_size):
            yield encoders(prepare_images(batch, preprocessors, embed.max_pixels))

    def map_texts(self, texts: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Embed the ``text`` column with the text tower of each model (slot -> model; the rows of
        ``need_<slot>`` where that column is given), batch by batch."""
        encoders = TextEncoders(models, "cpu", embed.torch_threads)
        for batch in _to_numpy_batches(texts, embed.text_batch_size):
            yield encoders(batch)

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """tcac: decode and resize each image of ``todo`` (image_id, uri, transforms) once, then transform in
        batches, crop and embed with CLIP."""
        from clipaudit.batches.tcac import TransformedEncoder, images_per_task, prepare_resized

        encoder = TransformedEncoder(model, tcac, "cpu", embed.torch_threads)
        per_task = images_per_task(embed.batch_size, len(tcac.transforms) + 1)
        for batch in _to_numpy_batches(_rows_only(todo), per_task):
            yield encoder(prepare_resized(batch, model.preprocess, tcac, embed.max_pixels))


class RayRunner:
    """Runs the batch functions on Ray Data: CPU tasks for decoding, actor pools for the models.

    Every pool is placed by :meth:`place` before its work is submitted: planned against the nodes alive now and,
    on a cluster with an autoscaler, asked of the autoscaler and waited for (:class:`~clipaudit.runtime.capacity.
    Capacity`). :meth:`close` withdraws what was asked, so the autoscaler can take every worker back."""

    def __init__(self, ray_config: RayConfig) -> None:
        self.ray_config = ray_config
        self.capacity = Capacity(ray_config)
        self.device = self.capacity.device(ray_config.device)
        log.info("model actors on %s; %s", self.device, self.capacity.describe())

    def place(self, request: PoolRequest) -> Placement:
        """The placement of ``request``, its nodes there (see :meth:`Capacity.place`)."""
        placement = self.capacity.place(request)
        self.device = placement.device
        if placement.shrunk:
            log.info("%s: CPU share lowered to %g to fit the nodes (%s)", request.what, placement.cpus_per_actor,
                     placement.describe())
        return placement

    def plan(self, embed: EmbedConfig, pools: int) -> Placement:
        """The placement of ``pools`` model actor pools running at once, with CPU left for their decode tasks."""
        return self.place(model_pools(self.ray_config, embed, pools))

    def topk(self, neighbours: NeighboursConfig) -> TopkSearch:
        """Exact top-k searches: on Ray actors from ``neighbours.ray_min_images`` rows (see :class:`TopkSearch`)."""
        return TopkSearch(neighbours, lambda: self)

    def map_llm(self, requests: Sequence[LLMRequest], llm: LLMConfig, api_key: str,
                validator: Callable[[str], object] | None = None) -> Iterator[list[LLMResult]]:
        """Send ``requests`` through ``llm.workers`` async worker actors that share one rate budget (a budget
        actor); yield the results chunk by chunk as they finish (see :func:`map_llm_ray`)."""
        return map_llm_ray(requests, llm, api_key, validator)

    def close(self) -> None:
        """Withdraw every resource request this runner made of the autoscaler."""
        self.capacity.release()

    def _stream(self, run: Callable[[pa.Table], Iterator[Batch]], todo: pa.Table, key: str) -> Iterator[Batch]:
        """``run(todo)`` with failures classified: rows isolated, node losses retried, cluster errors raised."""
        return bisect_stream(run, todo, key, classify=FailureClassifier(),
                             node_loss_retries=self.ray_config.node_loss_retries)

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

    def _through_model_pools(self, dataset: Any, encoders: type[ImageEncoders] | type[TextEncoders],
                             models: dict[str, ResolvedModel], placement: Placement, embed: EmbedConfig,
                             batch_size: int) -> Any:
        """``dataset`` through the model actor pools of one pass: one pool whose actors host every model of
        ``models`` (``embed.actor_pools: shared``; on CPU with the threads of them all, :func:`shared_threads`) or a
        pool per model, one after another."""
        if embed.actor_pools == "shared":
            groups = [(models, shared_threads(placement, embed, len(models)))]
        else:
            groups = [({slot: model}, placement.threads) for slot, model in models.items()]
        for group, threads in groups:
            dataset = dataset.map_batches(
                encoders,
                fn_constructor_kwargs={"models": group, "device": self.device, "threads": threads},
                batch_size=batch_size,
                batch_format="numpy",
                **self._actor_args(placement, embed),
            )
        return dataset

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Prepare ``todo`` as CPU tasks, embed it in one actor pool whose actors host every model
        (``embed.actor_pools: shared``) or in one pool per model, stream the batches back; rows behind a run that
        fails are isolated (:func:`~clipaudit.batches.isolation.bisect_stream`)."""
        return self._stream(lambda part: self._embed_images(part, models, embed), todo, "image_id")

    def _embed_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        import ray

        placement = self.plan(embed, pools=pass_pools(embed, len(models)))
        preprocessors = {role: model.preprocess for role, model in models.items()}
        dataset = ray.data.from_arrow(_chunks(todo, embed.batch_size)).map_batches(
            prepare_images,
            fn_kwargs={"preprocessors": preprocessors, "max_pixels": embed.max_pixels},
            batch_size=embed.batch_size,
            batch_format="numpy",
            num_cpus=placement.task_cpus,
            max_retries=self.ray_config.task_retries,
        )
        dataset = self._through_model_pools(dataset, ImageEncoders, models, placement, embed, embed.batch_size)
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def map_texts(self, texts: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Embed the ``text`` column with the text tower of each model (slot -> model; the rows of ``need_<slot>``
        where that column is given) in one actor pool whose actors host every tower (``embed.actor_pools:
        shared``) or in a pool each, stream the batches back (rows behind a failed run isolated)."""
        return self._stream(lambda part: self._embed_texts(part, models, embed), texts, "text")

    def _embed_texts(self, texts: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        import ray

        placement = self.plan(embed, pools=pass_pools(embed, len(models)))
        dataset = self._through_model_pools(ray.data.from_arrow(_chunks(texts, embed.text_batch_size)), TextEncoders,
                                            models, placement, embed, embed.text_batch_size)
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """tcac: CPU tasks read, decode and resize each image of ``todo`` (image_id, uri, transforms) once and draw
        its transforms' parameters; the CLIP actor pool applies the transforms in batches on its device, crops and
        embeds the (image, transform) rows; the batches stream back (rows behind a failed run isolated)."""
        return self._stream(lambda part: self._transform_and_embed(part, model, tcac, embed), todo, "image_id")

    def _transform_and_embed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                             embed: EmbedConfig) -> Iterator[Batch]:
        import ray

        from clipaudit.batches.tcac import TransformedEncoder, images_per_task, prepare_resized

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
                runner = RayRunner(self._config.ray)
                self._stack.callback(runner.close)
                self._runner = runner
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
