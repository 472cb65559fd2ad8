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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from clipaudit.stages.embed_batches import Batch, ImageEncoder, TextEncoder, prepare_images, torch_threads_for

if TYPE_CHECKING:
    from clipaudit.config import EmbedConfig, RayConfig
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

    def map_images(self, todo: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Prepare and embed ``todo`` (image_id, uri, need_<role>) batch by batch."""
        preprocessors = {role: model.preprocess for role, model in models.items()}
        encoders = [ImageEncoder(model, role, "cpu", embed.torch_threads) for role, model in models.items()]
        for batch in _to_numpy_batches(todo, embed.batch_size):
            batch = prepare_images(batch, preprocessors, embed.max_pixels)
            for encoder in encoders:
                batch = encoder(batch)
            yield batch

    def map_texts(self, captions: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        """Embed ``captions`` (caption_id, image_id, text) with the CLIP text tower."""
        encoder = TextEncoder(model, "cpu", embed.torch_threads)
        for batch in _to_numpy_batches(captions, embed.text_batch_size):
            yield encoder(batch)


class RayRunner:
    """Runs the batch functions on Ray Data: CPU tasks for decoding, actor pools for the models."""

    def __init__(self, ray_config: RayConfig, embed: EmbedConfig) -> None:
        import ray

        self.placement = _placement(ray_config, embed, ray.cluster_resources())
        self.device = self.placement.device
        log.info("model actors on %s (%s CPU, %s GPU each)", self.device,
                 self.placement.cpus_per_actor, self.placement.gpus_per_actor)

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

    def map_texts(self, captions: pa.Table, model: ResolvedModel, embed: EmbedConfig) -> Iterator[Batch]:
        """Embed caption texts in an actor pool of the CLIP model, stream the batches back."""
        import ray

        dataset = ray.data.from_arrow(_chunks(captions, embed.text_batch_size)).map_batches(
            TextEncoder,
            fn_constructor_kwargs={"model": model, "device": self.device, "threads": self.placement.threads},
            batch_size=embed.text_batch_size,
            batch_format="numpy",
            **self._actor_args(embed),
        )
        yield from dataset.iter_batches(batch_size=None, batch_format="numpy")


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
