"""How the work runs: model batches and actors (``embed``), Ray (``ray``), nearest-neighbour search
(``neighbours``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from clipaudit.config.errors import ConfigError


@dataclass(frozen=True)
class EmbedConfig:
    """How the embed stage sizes its work."""

    batch_size: int = 32
    """Images per model forward."""
    text_batch_size: int = 256
    """Captions per text-tower forward."""
    actor_pools: Literal["shared", "per_model"] = "shared"
    """How the image pass and the caption-text pass host their models. ``shared``: one actor pool per pass, each actor
    loads every model of the pass and runs them one after another on each batch (one actor start-up per pass however
    many CLIP models, one hop per batch, all the models on one GPU). ``per_model``: one pool per model, each actor loads
    one model (models too big to share a GPU or a node's memory)."""
    actors_per_model: int = 1
    """Actors per pool (per GPU on a GPU cluster): the shared pool's size, or each model's pool size with
    ``actor_pools: per_model``."""
    cpus_per_actor: float | None = None
    """CPU share reserved by each model actor (a shared actor is one actor) when no GPU is used. None (the
    default): 0.5, halved until every model actor of the stage and a decode task fit on the nodes (three CLIP
    models and a reference in pools of their own on one 2-CPU machine: 0.25 each). A value set here is kept as it
    is, and a plan it does not fit is refused with the reason (on 2 CPUs, two actors at 1 CPU each would leave the
    readers nothing)."""
    gpus_per_actor: float = 1.0
    """GPU share of each model actor when a GPU is used."""
    torch_threads: int = 0
    """Intra-op threads per CPU actor; 0: the CPU share rounded up, once per model the actor hosts (a shared actor
    of two models at 0.5 CPU: 2 threads, as two actors of their own would have)."""
    max_pixels: int = 64_000_000
    """Images with more pixels than this are rejected as too large (decompression-bomb guard)."""
    write_every: int = 2048
    """Rows buffered before one write to LanceDB (few large writes, not many small)."""
    max_reject_share: float = 0.05
    """The embed and tcac stages fail when they reject more than this share of the images they tried (and more
    than one image); 1: never. Rejected rows are in ``rejects`` either way."""


@dataclass(frozen=True)
class RayConfig:
    """How Ray is reached: a local instance by default, or an existing cluster."""

    address: str | None = None
    """None: start a local Ray; ``auto`` or ``ray://host:port``: join that cluster."""
    num_cpus: int | None = None
    """Local Ray only: CPUs to use (None: all)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: GPU actors with fp16 when the cluster has GPUs, CPU otherwise."""
    runner: Literal["ray", "local"] = "ray"
    """``local``: run the batch work in-process without Ray (debugging, tiny corpora)."""
    actor_start_timeout_s: int = 900
    """A stage whose model actors have not all started after this long fails (a backstop: the placement check
    refuses plans that cannot fit before any work; this covers nodes that never come, e.g. an autoscaler out of
    quota). Leave room for an autoscaler to launch GPU nodes."""

    task_retries: int = 2
    """Times Ray re-runs a CPU task (decode, resize) whose worker died, before the rows behind it are isolated
    (see :mod:`clipaudit.batches.isolation`)."""
    autoscale_timeout_s: int = 600
    """On a cluster with an autoscaler: how long a stage waits for the nodes its plan asked the autoscaler for
    before it fails (saying what it asked for, what came, and how long it waited)."""
    node_loss_retries: int = 3
    """Times a stage's distributed run is started again, for the rows not yet back, after a node of the cluster
    was lost (a reclaimed spot instance); a node loss never makes a row a reject."""

    def __post_init__(self) -> None:
        if self.actor_start_timeout_s < 1:
            raise ConfigError(f"ray.actor_start_timeout_s: must be at least 1, got {self.actor_start_timeout_s}")
        if self.autoscale_timeout_s < 1:
            raise ConfigError(f"ray.autoscale_timeout_s: must be at least 1, got {self.autoscale_timeout_s}")
        if self.node_loss_retries < 0:
            raise ConfigError(f"ray.node_loss_retries: must be at least 0, got {self.node_loss_retries}")
        if self.task_retries < 0:
            raise ConfigError(f"ray.task_retries: must be at least 0, got {self.task_retries}")


@dataclass(frozen=True)
class NeighboursConfig:
    """Nearest-neighbour search settings (the neighbours stage), checked when built."""

    k: int = 10
    """Neighbours per image and model role, the image itself excluded; must be smaller than the image count."""
    block_size: int | None = None
    """Rows per block of the exact search; None: chosen from a memory budget (see :mod:`clipaudit.knn`)."""
    method: Literal["exact", "ann"] = "exact"
    """``exact``: blocked matmul top-k; ``ann``: a LanceDB vector index, its recall@k measured on a sample."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the exact search runs: ``auto`` is CUDA (fp16 products) when torch sees a GPU, else CPU (fp32)."""
    ann_index: Literal["IVF_FLAT", "IVF_PQ", "IVF_HNSW_SQ"] = "IVF_HNSW_SQ"
    """ann: the LanceDB index type (cosine distance)."""
    ann_partitions: int | None = None
    """ann: IVF partitions; None: about sqrt(N)."""
    ann_nprobes: int = 20
    """ann: partitions searched per query."""
    ann_refine_factor: int = 5
    """ann: candidates re-ranked with exact distances, as a multiple of k; 0: no refinement."""
    recall_sample: int = 1000
    """ann: images whose ANN lists are compared with exact search (recall@k in the stats); 0: not measured."""
    seed: int = 0
    """Seeds the recall sample."""
    ray_min_images: int = 50_000
    """Exact searches over at least this many rows (images; captions for the TCAC pools) run on Ray workers
    when ``ray.runner`` is ``ray``; smaller ones, and every search under ``ray.runner: local``, in-process."""
    ray_workers: int | None = None
    """Ray top-k actors; None: one per GPU when the search runs on GPUs, else as many as the nodes' CPUs hold
    at ``ray_cpus_per_worker`` each."""
    ray_cpus_per_worker: float = 1.0
    """CPUs each top-k actor reserves (fractions allowed; capped at the smallest node's CPUs); it runs
    ``max(1, floor(cpus))`` torch threads."""
    lowp_margin: int = 10
    """Extra candidates per row searched in fp16 on a GPU before the exact fp32 re-score keeps k."""

    def __post_init__(self) -> None:
        problems = [f"neighbours.{key}: must be at least {low}, got {value}"
                    for key, value, low in (("k", self.k, 1), ("block_size", self.block_size, 1),
                                            ("ann_partitions", self.ann_partitions, 1),
                                            ("ann_nprobes", self.ann_nprobes, 1),
                                            ("ann_refine_factor", self.ann_refine_factor, 0),
                                            ("recall_sample", self.recall_sample, 0),
                                            ("ray_min_images", self.ray_min_images, 0),
                                            ("ray_workers", self.ray_workers, 1),
                                            ("lowp_margin", self.lowp_margin, 0))
                    if value is not None and value < low]
        if not self.ray_cpus_per_worker > 0:
            problems.append(f"neighbours.ray_cpus_per_worker: must be above 0, got {self.ray_cpus_per_worker}")
        if problems:
            raise ConfigError("; ".join(problems))
