"""LLM fan-out through local Ray: async worker actors sharing one rate-budget actor, against the fake endpoint."""

from __future__ import annotations

import json
import logging

import pyarrow as pa
import pytest
from fake_openai import FakeOpenAI, max_per_window

from clipaudit.config import load_config
from clipaudit.io.tables import RunTables
from clipaudit.llm.parse import parse_failure_types
from clipaudit.llm.requests import LLMRequest
from clipaudit.pipeline import run_pipeline
from clipaudit.records import FAILURE_TYPES, LLM_CALLS
from clipaudit.runtime import RayRunner

KEY = "sk-test-ray-DO-NOT-LEAK-0123456789abcdef"
ENV = "CLIPAUDIT_TEST_KEY"


@pytest.mark.ray
def test_worker_actors_share_one_budget_and_never_send_an_id_twice(tmp_path, ray_local, monkeypatch, caplog):
    monkeypatch.setenv(ENV, KEY)
    caplog.set_level(logging.INFO, logger="clipaudit")
    run_dir = tmp_path / "run"
    overrides = [f"run_dir={run_dir}", f"llm.api_key_env={ENV}", "llm.model=gpt-4o-mini", "llm.workers=3",
                 "llm.requests_per_minute=10", "llm.rate_window_s=2.0", "llm.max_in_flight=4", "llm.timeout_s=5.0"]
    requests = [LLMRequest("gpt-4o-mini", [{"role": "user", "content": f"caption batch {i}"}], {"temperature": 0.0})
                for i in range(18)]
    with FakeOpenAI(latency_s=0.05, rate_limit=10, rate_window_s=2.0, api_key=KEY) as server:
        config = load_config(None, [*overrides, f"llm.base_url={server.base_url}"])
        runner = RayRunner(config.ray)
        chunks = list(runner.map_llm(requests + requests[:6], config.llm, KEY, parse_failure_types))
        calls = server.snapshot()
    results = [r for chunk in chunks for r in chunk]
    assert sorted(r.request_id for r in results) == sorted(r.request_id for r in requests)
    assert all(r.status == "ok" and r.attempts == 1 for r in results)
    assert len(calls) == 18 and all(c.status == 200 for c in calls), "each id sent once, no 429 from the server"
    assert max_per_window([c.t for c in calls], 2.0) <= 10, "three workers, one budget"
    assert "over 3 worker actors sharing one rate budget" in caplog.text

    tables = RunTables(str(run_dir))
    daf = pa.table({"image_id": [f"img{i}" for i in range(4)], "rank": [1, 2, 3, 4],
                    "captions": [[f"case {i}: a red car", "a blue car"] for i in range(4)]})
    tables.insert_new("daf_cases", daf, "image_id", daf.schema)
    with FakeOpenAI(api_key=KEY) as server:
        config = load_config(None, [*overrides, f"llm.base_url={server.base_url}", "llm.max_cases_per_batch=1",
                                    "llm.methods=[daf]"])
        first = run_pipeline(config, ["summarize"])["summarize"]
        assert len(server.snapshot()) == 4
        second = run_pipeline(config, ["summarize"])["summarize"]
        assert len(server.snapshot()) == 4, "a second run sends nothing"
    assert {r["status"] for r in tables.read(LLM_CALLS).to_pylist()} == {"ok"}
    (row,) = tables.read(FAILURE_TYPES).to_pylist()
    assert (row["name"], row["support"], row["batches"]) == ("counting", 4, 4)
    assert (first.counts["summarize_sent"], second.counts["summarize_cached"]) == (4, 4)
    assert json.loads((run_dir / "stats" / "summarize.json").read_text())["counts"]["ok"] == 4
    assert not [p for p in run_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert KEY not in caplog.text
