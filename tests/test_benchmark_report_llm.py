"""The benchmark on a complete small run (``report_run``: tiny models, fake LLM): the report's Benchmark section
counts what an export holds, and an export of a run whose LLM stages ran asks the LLM for distinguishing captions
(data fenced, recorded and cached in ``llm_calls``)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
from fake_openai import FakeOpenAI
from report_fixtures import KEY_ENV

from clipaudit.benchmark.captions import KIND
from clipaudit.benchmark.export import export_benchmark, plan_counts
from clipaudit.io.tables import RunTables
from clipaudit.llm.prompts import extract_data
from clipaudit.records import LLM_CALLS, SAMPLES, SAMPLES_SCHEMA, samples_to_table
from clipaudit.report.benchmark_section import benchmark_section
from clipaudit.report.render import missing
from clipaudit.run_view import RunView


def test_the_report_says_what_an_export_would_hold(report_run: Path) -> None:
    html = (report_run / "report" / "index.html").read_text(encoding="utf-8")
    counts = plan_counts(RunView(str(report_run)))
    assert 'id="benchmark"' in html and 'href="#benchmark"' in html
    assert f"clipaudit export {report_run} BENCH_DIR" in html and "clipaudit score BENCH_DIR --model SPEC" in html
    section = html[html.index('id="benchmark"'):]
    assert f"<td>CLIP-blind pairs</td><td>{counts['pairs']['blind_pair']}</td>" in section
    for transform, n in counts["invariance"].items():
        assert f"<td>TCAC probes: {transform}</td><td>{n}</td>" in section
    assert sum(counts["text_pairs"].values()) > 0 and sum(counts["invariance"].values()) > 0


def test_a_run_without_findings_says_so(tmp_path: Path) -> None:
    RunTables(str(tmp_path)).insert_new(SAMPLES, samples_to_table([]), "image_id", SAMPLES_SCHEMA)
    html = str(benchmark_section(RunView(str(tmp_path)), missing)())
    assert 'data-missing="Benchmark"' in html and "Run the daf, tcac or validate stage first" in html


def _answer(body: dict) -> str:
    data = extract_data(str(body["messages"][0]["content"]))
    return json.dumps({"caption_a": f"only: {data['caption_a']}", "caption_b": f"only: {data['caption_b']}"})


def test_export_asks_the_llm_for_distinguishing_captions_once(report_run: Path, tmp_path: Path,
                                                               monkeypatch) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(report_run, run_dir)
    monkeypatch.setenv(KEY_ENV, "sk-report-test")
    with FakeOpenAI(answer=_answer) as server:
        sets = [f"llm.base_url={server.base_url}"]
        first = export_benchmark(str(run_dir), str(tmp_path / "a"), overrides=sets)
        sent = len(server.calls)
        second = export_benchmark(str(run_dir), str(tmp_path / "b"), overrides=sets)
        assert len(server.calls) == sent, "the second export is answered from llm_calls"
    pairs = pq.read_table(tmp_path / "a" / "pairs.parquet").to_pylist()
    assert pairs and first["counts"]["llm_captions"] == len(pairs) == sent
    assert all(p["llm_caption_a"] == f"only: {p['caption_a']}" and p["llm_caption_b"] == f"only: {p['caption_b']}"
               for p in pairs)
    assert (tmp_path / "a" / "pairs.parquet").read_bytes() == (tmp_path / "b" / "pairs.parquet").read_bytes()
    assert second["counts"] == first["counts"]
    calls = RunTables(str(run_dir)).read(LLM_CALLS).to_pylist()
    mine = [c for c in calls if c["kind"] == KIND]
    assert len(mine) == len(pairs) and {c["status"] for c in mine} == {"ok"}
    assert all("BEGIN DATA\n```json\n" in json.loads(c["request"])["messages"][0]["content"] for c in mine)
