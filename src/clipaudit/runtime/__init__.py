"""Where work is scheduled: the one package that imports Ray for scheduling.

Stages describe their work as plain batch functions (see :mod:`clipaudit.batches.embed`) and hand them to
a runner; everything Ray-specific lives here, one module per job:

* :mod:`~clipaudit.runtime.session`: joining or starting Ray;
* :mod:`~clipaudit.runtime.capacity`: what the cluster offers, and asking its autoscaler for more;
* :mod:`~clipaudit.runtime.runners`: the Ray Data maps of the embed and TCAC stages (and the in-process runner);
* :mod:`~clipaudit.runtime.topk`: the exact top-k actors;
* :mod:`~clipaudit.runtime.llm_actors`: the rate-limited async LLM actors.

The planner these modules share is pure and lives below them: :mod:`clipaudit.placement`.
"""

from clipaudit.runtime.runners import LazyRunner, LocalRunner, RayRunner
from clipaudit.runtime.session import ray_session, shared_session_dirs
from clipaudit.runtime.topk import TopkSearch

__all__ = ["LazyRunner", "LocalRunner", "RayRunner", "TopkSearch", "ray_session", "shared_session_dirs"]
