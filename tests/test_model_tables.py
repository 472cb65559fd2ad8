"""One run, several CLIP-role models: the config's model list, each model's view of the tables, merged stage stats."""

from __future__ import annotations

import pyarrow as pa
import pytest

from clipaudit.config import ConfigError, load_config
from clipaudit.errors import ClipauditError
from clipaudit.io.tables import RunTables
from clipaudit.records import DAF_CASES, SAMPLES, SAMPLES_SCHEMA, StageStats
from clipaudit.stages.table import merge_stats
from clipaudit.stages.upstream import model_view

SCHEMA = pa.schema([pa.field("image_id", pa.string(), nullable=False), pa.field("overlap", pa.float32())])


def _rows(*pairs: tuple[str, float]) -> pa.Table:
    return pa.table({"image_id": [p[0] for p in pairs], "overlap": [p[1] for p in pairs]}, schema=SCHEMA)


def test_models_clip_takes_one_spec_or_a_list():
    one = load_config(None, ["models.clip=tiny-clip"])
    assert one.models.clip_models == ["tiny-clip"] and one.models.clip_slots == {"clip": "tiny-clip"}
    many = load_config(None, ['models.clip=[tiny-clip, "python:m:f", "open_clip:RN50/random"]'])
    assert many.models.clip_slots == {"clip": "tiny-clip", "clip_2": "python:m:f", "clip_3": "open_clip:RN50/random"}
    narrowed = many.for_clip_model("python:m:f")
    assert narrowed.models.clip == "python:m:f" and narrowed.run_dir == many.run_dir
    with pytest.raises(ConfigError, match="not one of the configured"):
        many.for_clip_model("tiny-dino")


@pytest.mark.parametrize("value, message", [("[]", "empty"), ("[tiny-clip, tiny-clip]", "more than once"),
                                            ('[tiny-clip, " "]', r"models.clip\[1\]: an empty spec"),
                                            ("[tiny-clip, 3]", r"models.clip")])
def test_a_bad_model_list_is_a_config_error(value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"models.clip={value}"])


def test_each_model_reads_and_replaces_only_its_rows(tmp_path):
    tables = RunTables(str(tmp_path))
    a, b = tables.for_clip_model("model-a"), tables.for_clip_model("model-b's")
    a.replace(DAF_CASES, _rows(("x", 0.1), ("y", 0.2)), SCHEMA)
    b.replace(DAF_CASES, _rows(("x", 0.5)), SCHEMA)
    assert a.read(DAF_CASES).to_pylist() == [{"image_id": "x", "overlap": pytest.approx(0.1)},
                                             {"image_id": "y", "overlap": pytest.approx(0.2)}]
    assert b.read(DAF_CASES, ["image_id"]).column("image_id").to_pylist() == ["x"]
    assert a.count(DAF_CASES) == 2 and b.count(DAF_CASES) == 1 and tables.count(DAF_CASES) == 3
    a.replace(DAF_CASES, _rows(("z", 0.3)), SCHEMA)
    assert sorted(tables.read(DAF_CASES, ["image_id", "clip_model"]).to_pylist(), key=str) == sorted([
        {"image_id": "z", "clip_model": "model-a"}, {"image_id": "x", "clip_model": "model-b's"}], key=str)


def test_keyed_inserts_are_per_model(tmp_path):
    tables = RunTables(str(tmp_path))
    a, b = tables.for_clip_model("model-a"), tables.for_clip_model("model-b")
    assert a.insert_new(DAF_CASES, _rows(("x", 0.1)), "image_id", SCHEMA) == 1
    assert a.insert_new(DAF_CASES, _rows(("x", 0.9)), "image_id", SCHEMA) == 0
    assert b.insert_new(DAF_CASES, _rows(("x", 0.9)), "image_id", SCHEMA) == 1
    assert tables.count(DAF_CASES) == 2


def test_unscoped_tables_pass_through_and_old_layouts_are_read_whole(tmp_path):
    tables = RunTables(str(tmp_path))
    view = tables.for_clip_model("model-a")
    samples = pa.table({"image_id": ["x"], "uri": ["u"], "captions": [["c"]], "caption": ["c"], "source": ["s"],
                        "label": [None]}, schema=SAMPLES_SCHEMA)
    view.insert_new(SAMPLES, samples, "image_id", SAMPLES_SCHEMA)
    assert "clip_model" not in tables.read(SAMPLES).column_names
    tables.replace(DAF_CASES, _rows(("old", 0.4)), SCHEMA)
    assert view.read(DAF_CASES, ["image_id"]).column("image_id").to_pylist() == ["old"]
    with pytest.raises(ClipauditError, match="older clipaudit"):
        view.replace(DAF_CASES, _rows(("new", 0.1)), SCHEMA)


def test_a_stage_given_several_models_at_once_says_how_to_run_it(tmp_path):
    config = load_config(None, [f"run_dir={tmp_path}", "models.clip=[tiny-clip, other]"])
    with pytest.raises(ClipauditError, match="one CLIP-role model at a time"):
        model_view(RunTables(str(tmp_path)), config)
    assert model_view(RunTables(str(tmp_path)), config.for_clip_model("other")).clip_model == "other"


def test_merged_stats_sum_counts_and_keep_each_model():
    first, second = StageStats("tcac"), StageStats("tcac")
    first.add_count("pairs_written", 3)
    first.add_time("wall", 1.0)
    first.notes["summary"] = "three"
    second.add_count("pairs_written", 0)
    second.add_time("wall", 0.5)
    merged = merge_stats("tcac", {"a": first, "b": second})
    assert merged.counts == {"pairs_written": 3} and merged.seconds == {"wall": 1.5}
    assert merged.notes["per_model"]["a"]["counts"] == {"pairs_written": 3}
    assert merged.notes["per_model"]["b"]["seconds"] == {"wall": 0.5}
    assert merged.notes["summary"] == "[a] three"
