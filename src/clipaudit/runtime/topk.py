"""Exact top-k on the workers (the neighbours stage, the TCAC caption pools).

The kernel is :mod:`clipaudit.knn`; this module only places actors, hands out work and merges what comes back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.batches.isolation import InfrastructureError
from clipaudit.placement import Placement, PlacementError, PoolRequest

if TYPE_CHECKING:
    from clipaudit.config import NeighboursConfig

log = logging.getLogger("clipaudit.runtime")


TOPK_START_TIMEOUT_S = 120.0
"""Seconds to wait for the first top-k actor to start before failing with what the actors ask for."""


MAX_REPLACEMENTS_PER_ACTOR = 3
"""Top-k actors started to replace lost ones, per actor of the pool, before the search gives up."""


def topk_request(neighbours: NeighboursConfig) -> PoolRequest:
    """The top-k pool for :func:`clipaudit.placement.plan_placement`: one actor per GPU when the search runs on
    GPUs, else one per ``ray_cpus_per_worker`` CPUs of each node (never more CPU per actor than the smallest node
    has), at most ``ray_workers``; no CPU tasks feed it."""
    return PoolRequest(what="top-k actor", keys="neighbours.ray_cpus_per_worker / neighbours.ray_workers",
                       device_setting=neighbours.device, actors=None, cpus_per_actor=neighbours.ray_cpus_per_worker,
                       gpus_per_actor=1.0, gpu_cpus=neighbours.ray_cpus_per_worker,
                       max_actors=neighbours.ray_workers, with_tasks=False)


class TopkSearch:
    """Exact top-k for a stage: in-process below ``neighbours.ray_min_images`` rows or without Ray, else on a
    pool of Ray actors (:class:`_TopkPool`). Used as a context manager, one pool serves every call and is
    stopped on exit; called outside one, each call starts and stops its own pool.

    ``notes`` says where the last search ran, on how many workers, and how many rows the fp16 path searched
    again in fp32.
    """

    def __init__(self, neighbours: NeighboursConfig, ensure_ray: Callable[[], object] | None) -> None:
        """``ensure_ray``: called before the first Ray search (starts or joins Ray), returns what places the pool
        (an object with ``place(PoolRequest)``: the runner; None: a default :class:`~clipaudit.runtime.capacity.
        Capacity`); ``ensure_ray`` None: never use Ray."""
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

        if self._pool is None:
            runner = self._ensure_ray()
            if runner is None:
                from clipaudit.config import RayConfig
                from clipaudit.runtime.capacity import Capacity

                runner = Capacity(RayConfig())
            pool = _TopkPool(runner.place(topk_request(self.neighbours)))
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
    """Top-k actors placed by :func:`clipaudit.placement.plan_placement` (spread over the nodes); work is handed
    out unit by unit to whichever actor is free, starting as soon as the first actor is up.

    An actor lost with its node costs a rerun of its units, never the search: the units it had in flight, and for
    a self search every unit it had finished (its running top-k died with it), go back in the queue, and a new
    actor is started in its place (on the nodes left, or on one the autoscaler brings). The result is the same
    exact top-k."""

    def __init__(self, placement: Placement) -> None:
        import ray

        self.placement = placement
        options: dict[str, object] = {"num_cpus": placement.cpus_per_actor, "scheduling_strategy": "SPREAD"}
        if placement.gpus_per_actor:
            options["num_gpus"] = placement.gpus_per_actor
        self._actor_class = ray.remote(_TopkActor).options(**options)
        self.actors = [self._new_actor() for _ in range(placement.actors)]
        self.replaced = 0
        self._max_replacements = MAX_REPLACEMENTS_PER_ACTOR * max(1, placement.actors)
        log.info("top-k: %s, %d threads each", placement.describe(), placement.threads)

    def _new_actor(self) -> object:
        return self._actor_class.remote(self.placement.device, self.placement.threads)

    def _replace(self, actor: object, exc: BaseException) -> object:
        """A new actor in place of ``actor``, which was lost (and is stopped, should it only have been unreachable
        for a while: an ``ActorUnavailableError`` does not say it is dead, and its CPU is wanted for the new one)."""
        import ray

        ray.kill(actor)
        self.actors.remove(actor)
        self.replaced += 1
        if self.replaced > self._max_replacements:
            raise InfrastructureError(f"{self.replaced} top-k actors lost in one search (last: {exc}); the cluster "
                                      "keeps losing nodes: run the stage again")
        log.warning("top-k: an actor was lost (%s); its units run again on a new actor", type(exc).__name__)
        fresh = self._new_actor()
        self.actors.append(fresh)
        return fresh

    def close(self) -> None:
        """Stop the actors."""
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []

    def self_topk(self, x: np.ndarray, k: int, cfg: NeighboursConfig,
                  notes: dict[str, object]) -> tuple[np.ndarray, np.ndarray]:
        """The symmetric search: the block pairs of :func:`knn.self_tasks` go to the actors, each keeps the
        running top-k of every row over its pairs, and the driver merges one (N, k) result per actor. The pairs
        of an actor lost before its result was merged run again."""
        import ray

        from clipaudit import knn

        n = len(x)
        device = self.placement.device
        block = knn.self_block_edge(n, block_size=cfg.block_size, device=device)
        wide = k if device == "cpu" else min(n - 1, k + cfg.lowp_margin)
        corpus = ray.put(x)
        units: list[object] = list(knn.self_tasks(n, block, len(self.actors)))
        total = len(units)
        merged: tuple[np.ndarray, np.ndarray] | None = None
        workers, nodes = 0, 0
        while units:
            active, nodes, held = self._run(lambda actor: actor.start_self.remote(corpus, wide, block), units,
                                            lambda actor, pairs: actor.run_pairs.remote(pairs), lambda *_: None)
            workers = max(workers, len(active))
            units = []
            for actor in active:
                try:
                    part = ray.get(actor.self_result.remote())
                except ray.exceptions.RayActorError as exc:
                    units.extend(held[actor])
                    self._replace(actor, exc)
                    continue
                merged = part if merged is None else knn.merge_topk(merged, part)
                del part
        notes.update(where="ray", device=device, workers=workers, nodes=nodes, units=total,
                     actors_replaced=self.replaced)
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
        active, nodes, _ = self._run(lambda actor: actor.load.remote(corpus), spans, submit, done)
        notes.update(where="ray", device=device, workers=len(active), nodes=nodes, units=len(spans),
                     searched_again=again[0], actors_replaced=self.replaced)
        return ids, sims

    def _run(self, start: Callable[[object], object], units: Sequence[object],
             submit: Callable[[object, object], object],
             done: Callable[[object, object], None]) -> tuple[list[object], int, dict[object, list[object]]]:
        """Start every actor (``start``), hand ``units`` to those started, two in flight per actor, and pass each
        result to ``done``. Returns the actors that ended the run alive, on how many nodes the actors ran, and the
        units each of them finished. A lost actor's unit in flight goes back in the queue (and, for a self search,
        the caller reruns its finished units when its result cannot be fetched); a new actor takes its place.
        Fails when no actor is up for :data:`TOPK_START_TIMEOUT_S` (the cluster cannot place one)."""
        import time
        from collections import deque

        import ray

        waiting = {start(actor): actor for actor in self.actors}
        in_flight: dict[object, tuple[object, object]] = {}
        held: dict[object, list[object]] = {}
        todo = deque(units)
        nodes: set[str] = set()
        deadline = time.monotonic() + TOPK_START_TIMEOUT_S

        def give(actor: object) -> None:
            if todo:
                unit = todo.popleft()
                in_flight[submit(actor, unit)] = (actor, unit)

        def lose(actor: object, exc: BaseException) -> None:
            nonlocal deadline
            todo.extend(held.pop(actor, []))
            fresh = self._replace(actor, exc)
            waiting[start(fresh)] = fresh
            if not held:
                deadline = time.monotonic() + TOPK_START_TIMEOUT_S

        while todo or in_flight:
            timeout = None if held else max(0.0, deadline - time.monotonic())
            ready, _ = ray.wait([*in_flight, *waiting], num_returns=1, timeout=timeout)
            if not ready:
                raise PlacementError(self._unplaced_message())
            ref = ready[0]
            if ref in waiting:
                actor = waiting.pop(ref)
                try:
                    nodes.add(ray.get(ref))
                except ray.exceptions.RayActorError as exc:
                    lose(actor, exc)
                    continue
                held[actor] = []
                give(actor)
                give(actor)
                continue
            actor, unit = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                todo.append(unit)
                if actor in held or actor in self.actors:
                    lose(actor, exc)
                continue
            if actor not in held:  # a unit back from an actor counted lost meanwhile: it runs again elsewhere
                todo.append(unit)
                continue
            done(unit, result)
            held[actor].append(unit)
            give(actor)
        return list(held), len(nodes), held

    def _unplaced_message(self) -> str:
        import ray

        p = self.placement
        asks = f"{p.cpus_per_actor:g} CPU" + (f" and {p.gpus_per_actor:g} GPU" if p.gpus_per_actor else "")
        return (f"no top-k actor started within {TOPK_START_TIMEOUT_S:.0f} s: each asks for {asks}; the cluster "
                f"has {ray.available_resources()} free of {ray.cluster_resources()}. Free resources or set "
                "neighbours.ray_cpus_per_worker / neighbours.ray_workers lower")


def _lowp_dtype() -> object:
    """The dtype of the GPU products (the knn default on CUDA)."""
    import torch

    return torch.float16
