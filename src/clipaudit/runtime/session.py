"""Joining or starting Ray: the session a run works in, and the checks made on joining.

:func:`ray_session` connects to the configured cluster (or the job's cluster under ``ray job submit``), or starts a
local Ray, and shuts down only what it started. :func:`check_private_session_dirs` refuses a cluster whose nodes
share one session folder when the job ships a working_dir (see its docstring for why).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from clipaudit.placement import PlacementError

if TYPE_CHECKING:
    from clipaudit.config import RayConfig


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
