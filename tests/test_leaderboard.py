"""Several CLIP-role models in one run, on planted truth: the leaderboard ranks them by how blind they are.

The corpus: one circle per scene, at each of five positions in each of five colours (25 scenes, white
background). Three CLIP-role plug-ins are audited in one run against one reference that sees layout and colour
(``python:planted_models:colour_aware``): ``colour_blind`` (sees only where the shape is), ``position_blind``
(sees only its colour) and ``all_seeing`` (sees what the reference sees). With k = 8, each blind model's
neighbours of a scene start with the four scenes it cannot tell apart from it (identical vectors), which the
reference finds only half similar: those are its CLIP-blind pairs. The reference's eight nearest are four colour
variants and four position variants, all equally close, so its lists favour neither blind model. The all-seeing
model agrees with the reference and has no blind pairs: it is ranked last in blindness.

Then a fourth model is added to the list and the run repeated: only the new model's rows are computed (the stage
stats say so) and the first three models' rows are unchanged.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import pytest
from planted_scenes import write_corpus

from clipaudit.config import load_config
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import run_pipeline

REFERENCE = "python:planted_models:colour_aware"
COLOUR_BLIND = "python:planted_models:colour_blind"
POSITION_BLIND = "python:planted_models:position_blind"
ALL_SEEING = "python:planted_models:all_seeing"
FOURTH = "python:planted_models:layout_only"
STAGES = ["ingest", "embed", "neighbours", "daf", "tcac", "leaderboard"]


def _config(root: Path, clip: list[str]):
    return load_config(None, [
        f"run_dir={root / 'run'}", "dataset.format=manifest", f"dataset.captions={root / 'manifest.csv'}",
        f"models.clip={json.dumps(clip)}", f"models.reference={REFERENCE}", "ray.runner=local",
        "neighbours.k=8", "neighbours.device=cpu", "daf.max_overlap=0.6", "daf.permutations=20",
        "tcac.transforms=[grayscale, hflip]", "tcac.cases_per_transform=5", "embed.batch_size=16",
    ])


def _stats(run_dir: str, stage: str) -> dict:
    return json.loads((Path(run_dir) / "stats" / f"{stage}.json").read_text())


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("leaderboard")
    truth = write_corpus(root)
    config = _config(root, [COLOUR_BLIND, POSITION_BLIND, ALL_SEEING])
    run_pipeline(config, STAGES)
    return root, config, truth


def _pairs(tables: RunTables, spec: str) -> list[tuple[str, str]]:
    rows = tables.for_clip_model(spec).read("blind_pairs", ["image_a", "image_b"])
    return list(zip(rows.column("image_a").to_pylist(), rows.column("image_b").to_pylist()))


def _truth_by_id(tables: RunTables, truth: dict[str, tuple[str, str]]) -> dict[str, tuple[str, str]]:
    samples = tables.read("samples", ["image_id", "uri"]).to_pylist()
    return {row["image_id"]: truth[Path(row["uri"]).stem] for row in samples}


def test_the_leaderboard_ranks_the_all_seeing_model_last(audited):
    root, config, _ = audited
    board = RunTables(config.run_dir).read("leaderboard").to_pylist()
    assert [row["rank"] for row in board] == [1, 2, 3]
    by_model = {row["clip_model"]: row for row in board}
    assert set(by_model) == {COLOUR_BLIND, POSITION_BLIND, ALL_SEEING}
    assert by_model[ALL_SEEING]["rank"] == 3
    assert by_model[ALL_SEEING]["mean_overlap"] == pytest.approx(1.0)
    assert by_model[ALL_SEEING]["blind_pairs"] == 0
    for blind in (COLOUR_BLIND, POSITION_BLIND):
        row = by_model[blind]
        assert row["blindness"] > by_model[ALL_SEEING]["blindness"]
        assert row["mean_overlap"] < 1.0 and row["blind_pairs"] > 0
        assert row["blind_pair_rate"] == pytest.approx(row["blind_pairs"] / 25)
        assert row["chance_overlap"] == pytest.approx(8 / 24)
        assert row["top1_flip_rate_grayscale"] is not None and row["recall_at_1_after_hflip"] is not None
    ordered = sorted(board, key=lambda row: -row["blindness"])
    assert [row["clip_model"] for row in ordered] == [row["clip_model"] for row in board]


@pytest.mark.parametrize("spec, blind_to", [(COLOUR_BLIND, "colour"), (POSITION_BLIND, "position")])
def test_each_blind_models_pairs_differ_in_what_it_cannot_see(audited, spec, blind_to):
    _, config, truth = audited
    tables = RunTables(config.run_dir)
    attributes = _truth_by_id(tables, truth)
    pairs = _pairs(tables, spec)
    assert pairs, f"{spec} has no CLIP-blind pairs"
    unseen, seen = (1, 0) if blind_to == "colour" else (0, 1)
    right = [attributes[a][unseen] != attributes[b][unseen] and attributes[a][seen] == attributes[b][seen]
             for a, b in pairs]
    assert sum(right) / len(right) >= 0.9
    expected = {tuple(sorted(pair)) for pair in combinations(attributes, 2)
                if attributes[pair[0]][seen] == attributes[pair[1]][seen]}
    assert len(set(pairs) & expected) / len(expected) >= 0.9


def test_every_clip_table_keys_its_rows_by_model(audited):
    _, config, _ = audited
    tables = RunTables(config.run_dir)
    specs = {COLOUR_BLIND, POSITION_BLIND, ALL_SEEING}
    for name in ("image_embeddings_clip", "caption_embeddings", "daf_cases", "tcac_cases", "tcac_summary"):
        found = set(tables.read(name, ["clip_model"]).column("clip_model").to_pylist())
        assert found <= specs and len(found) >= 2, name
    neighbours = tables.read("neighbours", ["model", "clip_model"]).to_pylist()
    assert {(row["model"], row["clip_model"]) for row in neighbours} == {("clip", s) for s in specs} | {
        ("reference", "")}
    tcac = tables.read("tcac_cases", ["image_id", "transform", "params", "clip_model"]).to_pylist()
    params = {}
    for row in tcac:
        params.setdefault((row["image_id"], row["transform"]), set()).add(row["params"])
    assert all(len(drawn) == 1 for drawn in params.values()), "every model saw the same transform parameters"


def test_adding_a_fourth_model_computes_only_its_rows(audited):
    root, config, _ = audited
    tables = RunTables(config.run_dir)
    before = {spec: tables.for_clip_model(spec).read("tcac_cases").sort_by([("image_id", "ascending"),
                                                                           ("transform", "ascending")])
              for spec in (COLOUR_BLIND, POSITION_BLIND, ALL_SEEING)}
    grown = _config(root, [COLOUR_BLIND, POSITION_BLIND, ALL_SEEING, FOURTH])
    run_pipeline(grown, STAGES)

    embed = _stats(grown.run_dir, "embed")
    assert embed["notes"]["embedded_by_model"] == {FOURTH: 25}
    assert embed["counts"]["embedded_clip_4"] == 25
    assert not any(embed["counts"].get(f"embedded_{slot}") for slot in ("clip", "clip_2", "clip_3", "reference"))
    assert embed["notes"]["embedded_captions_by_model"] == {FOURTH: 25}
    neighbours = _stats(grown.run_dir, "neighbours")
    assert neighbours["notes"]["computed_clip_models"] == [FOURTH]
    assert neighbours["notes"]["computed"] == ["clip_4"]
    tcac = _stats(grown.run_dir, "tcac")["notes"]["per_model"]
    assert tcac[FOURTH]["counts"]["pairs_written"] == 50
    for spec in (COLOUR_BLIND, POSITION_BLIND, ALL_SEEING):
        assert tcac[spec]["counts"]["pairs_todo"] == 0 and tcac[spec]["counts"].get("pairs_written", 0) == 0
        after = tables.for_clip_model(spec).read("tcac_cases").sort_by([("image_id", "ascending"),
                                                                         ("transform", "ascending")])
        assert after.equals(before[spec])
    board = {row["clip_model"]: row for row in tables.read("leaderboard").to_pylist()}
    assert len(board) == 4
    assert board[FOURTH]["blindness"] == pytest.approx(board[COLOUR_BLIND]["blindness"])
