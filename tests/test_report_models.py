"""The report, summary.json, ``clipaudit diff`` and ``clipaudit export`` of a run that audited two CLIP-role models.

The corpus: one circle per scene at each of five positions in each of five colours (25 scenes). Two CLIP-role
plug-ins are audited in one run against a reference that sees layout and colour: ``colour_blind`` (sees only where
the shape is) and ``position_blind`` (sees only its colour), so their DAF cases differ. No Ray, no LLM.
"""

from __future__ import annotations

import csv
import json
import os
import re
from pathlib import Path

import pytest

from clipaudit.cli import main
from clipaudit.config import load_config
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import run_pipeline
from clipaudit.probe.scenes import SceneSpec, ShapeGroup, render_scene
from clipaudit.report.diff import diff_runs, format_diff
from clipaudit.report.models import model_page, model_slug
from clipaudit.report.render import top_daf_cases
from clipaudit.run_view import RunView

REFERENCE = "python:planted_models:colour_aware"
COLOUR_BLIND = "python:planted_models:colour_blind"
POSITION_BLIND = "python:planted_models:position_blind"
SPECS = [COLOUR_BLIND, POSITION_BLIND]
STAGES = ["ingest", "embed", "neighbours", "daf", "tcac", "leaderboard", "report"]
SHOWN = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("models_report")
    with open(root / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["image", "caption"])
        for position in ("left", "right", "top", "bottom", "center"):
            for colour in ("red", "green", "blue", "yellow", "purple"):
                spec = SceneSpec((ShapeGroup("circle", colour, position, 1),), "white")
                render_scene(spec).save(root / f"{position}_{colour}.png")
                writer.writerow([f"{position}_{colour}.png", spec.captions()[0]])
    config = load_config(None, [
        f"run_dir={root / 'run'}", "dataset.format=manifest", f"dataset.captions={root / 'manifest.csv'}",
        f"models.clip={json.dumps(SPECS)}", f"models.reference={REFERENCE}", "ray.runner=local",
        "neighbours.k=8", "neighbours.device=cpu", "daf.max_overlap=0.6", "daf.permutations=20",
        "tcac.transforms=[grayscale, hflip]", "tcac.cases_per_transform=3", "embed.batch_size=16",
        f"report.daf_cases={SHOWN}", "report.blind_pairs=3", "report.tcac_cases=1", "report.workers=2",
    ])
    run_pipeline(config, STAGES)
    return root / "run"


def _cases(run_dir: Path, spec: str) -> set[str]:
    rows = RunTables(str(run_dir)).for_clip_model(spec).read("daf_cases", ["image_id"])
    return set(rows.column("image_id").to_pylist())


def test_summary_has_each_model_and_the_leaderboard(run: Path) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["clip_models"] == SPECS
    assert set(summary["per_model"]) == set(SPECS)
    assert [row["rank"] for row in summary["leaderboard"]] == [1, 2]
    assert {row["clip_model"] for row in summary["leaderboard"]} == set(SPECS)
    for spec in SPECS:
        part = summary["per_model"][spec]
        assert "per_model" not in part
        assert part["models_requested"]["clip"] == spec
        assert part["daf"]["cases"] == len(_cases(run, spec))
        assert part["daf"]["mean_overlap"] is not None and part["daf"]["source"] == "stats"
        assert set(part["tcac"]["transforms"]) == {"grayscale", "hflip"}
        assert part["stages"]["daf"]["ran"] and part["stages"]["report"]["ran"]
    first = summary["per_model"][SPECS[0]]
    assert summary["daf"] == first["daf"] and summary["tcac"] == first["tcac"]
    assert summary["stages"]["leaderboard"]["ran"]


def test_index_opens_with_the_leaderboard_linking_each_models_page(run: Path) -> None:
    report = run / "report"
    index = (report / "index.html").read_text()
    assert index.index('id="leaderboard"') < index.index('id="disagree"')
    board = re.search(r'<table class="leaderboard">.*?</table>', index, re.S).group(0)
    for spec in SPECS:
        page = model_page(spec)
        assert re.fullmatch(r"model-[a-z0-9-]+-[0-9a-f]{8}\.html", page)
        assert f'href="{page}"' in board and spec in board
        assert (report / page).is_file()
    assert model_slug("A/b:c") != model_slug("a-b-c")
    for src in re.findall(r'src="([^"]+)"', index):
        assert not src.startswith(("http:", "https:", "//")) and (report / src).is_file(), src
    charts = re.findall(r'src="(charts/leaderboard_[a-z0-9_]+\.png)"', index)
    assert len(charts) == 4


def test_each_model_page_shows_its_own_daf_cases(run: Path) -> None:
    report = run / "report"
    view = RunView(str(run))
    for spec in SPECS:
        page = (report / model_page(spec)).read_text()
        assert 'href="index.html"' in page and spec in page
        shown = re.findall(r'class="case daf-case" data-image-id="([^"]+)"', page)
        expected = [row["image_id"] for row in top_daf_cases(view.for_clip_model(spec), SHOWN)]
        assert shown == expected and set(shown) <= _cases(run, spec)
        assert f"--clip-model {spec}" in page
        for src in re.findall(r'src="([^"]+)"', page):
            assert (report / src).is_file(), src
        assert f'src="charts/{model_slug(spec)}-daf_overlap.png"' in page
    assert len(list(report.glob("model-*.html"))) == len(SPECS)


def test_where_the_models_disagree(run: Path) -> None:
    index = (run / "report" / "index.html").read_text()
    section = index[index.index('id="disagree"'):]
    shown = re.findall(r'class="case disagreement" data-image-id="([^"]+)"', section)
    a, b = (_cases(run, spec) for spec in SPECS)
    assert a ^ b, "the planted models should disagree about some cases"
    assert shown and len(shown) <= SHOWN
    assert set(shown) <= a ^ b
    for spec in SPECS:
        assert f'data-clip-model="{spec}"' in section


def test_diff_of_the_run_with_itself_compares_each_model(run: Path) -> None:
    d = diff_runs(RunView(str(run)), RunView(str(run)))
    assert set(d["per_model"]) == set(SPECS)
    assert d["clip_models"] == {"both": SPECS, "only_a": [], "only_b": []}
    for spec in SPECS:
        part = d["per_model"][spec]
        assert not part["models_changed"]
        deltas = [c["delta"] for c in part["daf"].values() if isinstance(c, dict)]
        deltas += [c["delta"] for c in part["counts"].values()]
        deltas += [c["delta"] for t in part["tcac"]["transforms"].values() for c in t.values()]
        assert deltas and all(delta in (0, 0.0, None) for delta in deltas)
        assert d["leaderboard"][spec]["rank"]["delta"] == 0
        assert d["leaderboard"][spec]["blindness"]["delta"] == 0
    text = format_diff(d)
    assert all(f"== CLIP model {spec} ==" in text for spec in SPECS)
    assert "leaderboard (rank; blindness)" in text


def test_export_picks_a_model(run: Path, tmp_path: Path, capsys) -> None:
    assert main(["export", str(run), str(tmp_path / "second"), "--clip-model", POSITION_BLIND, "--llm", "off",
                 "--images", "reference"]) == 0
    manifest = json.loads((tmp_path / "second" / "benchmark.json").read_text())
    assert manifest["source"]["clip_model"] == POSITION_BLIND
    assert manifest["source"]["models"]["clip"] == POSITION_BLIND
    assert main(["export", str(run), str(tmp_path / "first"), "--llm", "off", "--images", "reference"]) == 0
    first = json.loads((tmp_path / "first" / "benchmark.json").read_text())
    assert first["source"]["clip_model"] == COLOUR_BLIND
    assert first["counts"] != manifest["counts"]
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "bad"), "--clip-model", "tiny-clip"]) == 2
    err = capsys.readouterr().err
    assert "tiny-clip" in err and COLOUR_BLIND in err and POSITION_BLIND in err
    assert not os.path.exists(tmp_path / "bad" / "benchmark.json")
