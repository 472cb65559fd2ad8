"""Shared test set-up: offline model hubs, no Ray usage stats, and one local Ray instance per session."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test that uses the session's local Ray (``ray_local``) is marked ``ray``, as the tests that start their own
    Ray are, so that ``-m "not ray and not autoscaler"`` leaves every Ray test out."""
    for item in items:
        if "ray_local" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (2 CPUs, no dashboard) for the tests that need one; stopped at the end."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def report_run(tmp_path_factory):
    """A small complete run (all stages, tiny models, local runner, fake LLM; a script tag injected into a caption),
    built once and shared by the report, browser and diff tests (see report_fixtures.py). Read it, never write it."""
    from report_fixtures import build_run

    run_dir = tmp_path_factory.mktemp("report_run") / "run"
    build_run(run_dir, variant=0)
    return run_dir
