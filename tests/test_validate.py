"""The validate stage: LLM-written caption pairs per failure type, embedded by CLIP's text tower.

The CLIP role is a ``python:`` plug-in defined here whose text tower is blind to colour words by construction,
so pairs that differ only by colour are near-identical (cos = 1) and pairs that differ by count or place are not.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from fake_openai import FakeOpenAI

from clipaudit.config import load_config
from clipaudit.io.tables import RunTables
from clipaudit.llm.parse import ParseError
from clipaudit.llm.prompts import extract_data
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    FAILURE_CHECKS,
    FAILURE_TYPES,
    FAILURE_TYPES_SCHEMA,
    LLM_CALLS,
    caption_embeddings_schema,
)
from clipaudit.runtime import LocalRunner
from clipaudit.stages.validate import ValidateError, parse_pairs, run_validate

KEY = "sk-test-validate-DO-NOT-LEAK-0123456789abcdef"
ENV = "CLIPAUDIT_TEST_KEY"
SPEC = "python:test_validate:ColourBlindText"
COLOURS = frozenset({"red", "blue", "green", "yellow", "black", "white"})
DIM = 256


class ColourBlindText:
    """A CLIP-role plug-in: a hashed bag of words that drops colour words (images: a constant vector)."""

    logit_scale = 100.0
    dim = DIM

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        out = np.full((len(texts), DIM), 1e-6, dtype=np.float32)
        for i, text in enumerate(texts):
            for word in re.findall(r"[a-z]+", text.lower()):
                if word not in COLOURS:
                    out[i, int(hashlib.md5(word.encode()).hexdigest()[:8], 16) % DIM] += 1.0
        return out

    def encode_images(self, images: list) -> np.ndarray:
        return np.ones((len(images), DIM), dtype=np.float32)


ANSWERS = {
    "Color confusion": json.dumps({"pairs": [{"a": "a red car on a street", "b": "a blue car on a street"},
                                             {"a": "a man in a white shirt", "b": "a man in a black shirt"},
                                             {"a": "a green door", "b": "a yellow door"}]}),
    "Counting": str([["two dogs on the grass", "three dogs on the grass"], ["one cat on a sofa", "four cats on a sofa"],
                     ["two dogs on the grass", "Two dogs on the grass"], ["two dogs on the grass",
                                                                           "three dogs on the grass"]]),
    "Spatial relations": '```json\n{"pairs": [["a red ball left of a box", "a red ball right of a box"], '
                         '["a red ball left of a box", "a blue ball left of a box"]]}\n```',
}


def answer(body: dict[str, Any]) -> str:
    return ANSWERS[extract_data(body["messages"][0]["content"])["name"]]


def write_types(run_dir: Path) -> RunTables:
    tables = RunTables(str(run_dir))
    rows = [{"name": name, "description": f"about {name.lower()}", "method": method, "support": 3, "batches": 1,
             "example_ids": ["img00"], "aliases": [name], "rank": rank, "merge": "text", "model": "m",
             "request_ids": ["r"]}
            for name, method, rank in (("Color confusion", "DAF", 1), ("Spatial relations", "DAF", 2),
                                       ("Counting", "TCAC", 1))]
    tables.replace(FAILURE_TYPES, pa.Table.from_pylist(rows, schema=FAILURE_TYPES_SCHEMA), FAILURE_TYPES_SCHEMA)
    return tables


def make_config(run_dir: Path, base_url: str, *extra: str) -> Any:
    return load_config(None, [f"run_dir={run_dir}", f"llm.base_url={base_url}", f"llm.api_key_env={ENV}",
                              "llm.model=gpt-4o-mini", "ray.runner=local", f"models.clip={SPEC}",
                              "validate.pairs_per_type=3", *extra])


def checks(tables: RunTables) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in tables.read(FAILURE_CHECKS).to_pylist()}


def test_success_rates_per_failure_type_and_a_free_rerun(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv(ENV, KEY)
    run_dir = tmp_path / "run"
    tables = write_types(run_dir)
    with FakeOpenAI(answer=answer, api_key=KEY) as server:
        config = make_config(run_dir, server.base_url)
        stats = run_validate(config, tables, LocalRunner())
        assert len(server.snapshot()) == 3
        run_validate(config, tables, LocalRunner())
        assert len(server.snapshot()) == 3, "a second run sends nothing"
        prompts = [c.prompt for c in server.snapshot()]
    assert "3 requests to send to gpt-4o-mini" in capsys.readouterr().out
    assert all("Write 3 pairs of image captions" in p for p in prompts)
    rows = checks(tables)
    assert [(rows[n]["success_rate"], rows[n]["n_pairs"]) for n in ("Color confusion", "Counting",
                                                                    "Spatial relations")] == [(1.0, 3), (0.0, 2),
                                                                                               (0.5, 2)]
    colour = rows["Color confusion"]
    assert colour["sims"] == pytest.approx([1.0, 1.0, 1.0], abs=1e-5) and colour["threshold"] == 0.9
    assert (colour["threshold_mode"], colour["model"], colour["status"], colour["method"]) == (
        "absolute", SPEC, "ok", "DAF")
    assert json.loads(rows["Counting"]["pairs"]) == [["two dogs on the grass", "three dogs on the grass"],
                                                     ["one cat on a sofa", "four cats on a sofa"]]
    assert all(s < 0.9 for s in rows["Counting"]["sims"])
    assert {r["kind"] for r in tables.read(LLM_CALLS).to_pylist()} == {"validate"}
    assert stats.counts["checked"] == 3 and stats.counts["pairs"] == 7
    assert not [p for p in run_dir.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]


def test_dry_run_writes_the_prompts_and_sends_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    run_dir = tmp_path / "run"
    tables = write_types(run_dir)
    with FakeOpenAI(answer=answer) as server:
        run_validate(make_config(run_dir, server.base_url, "llm.dry_run=true", "validate.max_types=1"), tables)
        assert server.snapshot() == []
    lines = [json.loads(x) for x in (run_dir / "llm" / "validate_prompts.jsonl").read_text().splitlines()]
    assert [line["meta"]["failure_type"] for line in lines] == ["Color confusion", "Counting"]
    assert not tables.exists(FAILURE_CHECKS) and not tables.exists(LLM_CALLS)


def _caption_table(texts: list[tuple[str, str]], model: str) -> pa.Table:
    vectors = ColourBlindText().encode_texts([t for _, t in texts])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return pa.table({
        "caption_id": [f"{image}#{n}" for n, (image, _) in enumerate(texts)],
        "image_id": [image for image, _ in texts], "text": [t for _, t in texts], "model": [model] * len(texts),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), DIM),
    })


def test_corpus_quantile_threshold_comes_from_unrelated_corpus_captions(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, KEY)
    run_dir = tmp_path / "run"
    tables = write_types(run_dir)
    words = ["dog", "cat", "car", "tree", "house", "boat", "horse", "bike"]
    texts = [(f"img{i}", f"a {words[i]} near a {words[(i + k) % 8]} on the {['grass', 'road'][k % 2]}")
             for i in range(8) for k in (1, 2)]
    schema = caption_embeddings_schema(DIM)
    tables.insert_new(CAPTION_EMBEDDINGS, _caption_table(texts, SPEC), "caption_id", schema)
    with FakeOpenAI(answer=answer, api_key=KEY) as server:
        config = make_config(run_dir, server.base_url, "validate.threshold_mode=corpus_quantile",
                             "validate.corpus_quantile=0.5", "validate.corpus_pairs=2000")
        run_validate(config, tables, LocalRunner())
    vectors = ColourBlindText().encode_texts([t for _, t in texts])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sims = [float(vectors[a] @ vectors[b]) for a in range(16) for b in range(16) if a // 2 != b // 2]
    rows = checks(tables)
    threshold = rows["Counting"]["threshold"]
    assert rows["Counting"]["threshold_mode"] == "corpus_quantile"
    assert abs(threshold - float(np.median(sims))) < 0.05
    for row in rows.values():
        assert row["success_rate"] == pytest.approx(np.mean(np.array(row["sims"]) >= threshold))

    tables.replace(CAPTION_EMBEDDINGS, _caption_table(texts, "tiny-clip"), schema)
    with pytest.raises(ValidateError, match="same models.clip"):
        run_validate(config, tables, LocalRunner())


def test_validate_needs_failure_types(tmp_path) -> None:
    config = make_config(tmp_path / "run", "http://127.0.0.1:9/v1")
    with pytest.raises(ValidateError, match="run the summarize stage first"):
        run_validate(config, RunTables(str(tmp_path / "run")))


def test_parse_pairs_reads_the_usual_shapes_safely() -> None:
    expected = [("a red car", "a blue car")]
    assert parse_pairs('{"pairs": [{"a": "a red car", "b": "a blue car"}]}') == expected
    assert parse_pairs("[('a red car', 'a blue car')]") == expected
    fenced = 'Sure:\n```\n{"pairs": [{"caption_a": "a red car", "caption_b": "a blue car"}]}\n```'
    assert parse_pairs(fenced) == expected
    assert parse_pairs('[{"first": "a red car", "second": "a blue car"}, ["same", "Same"]]') == expected
    for bad in ("no pairs here", '{"pairs": []}', "__import__('os').system('true')", '[["only one"]]'):
        with pytest.raises(ParseError):
            parse_pairs(bad)
