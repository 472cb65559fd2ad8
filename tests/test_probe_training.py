"""Retraining the probe pair from the script reproduces its blind spot, and the audit finds it against the truth.

One shortened schedule (``clipaudit train-probe --quick``, about a minute on 2 cores) into a temporary folder; the
audit then loads that pair through ``CLIPAUDIT_PROBE_WEIGHTS`` and runs in-process (``ray.runner=local``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clipaudit.cli import main
from clipaudit.io.tables import RunTables
from clipaudit.models import packaged
from clipaudit.probe.scenes import ATTRIBUTES
from clipaudit.records import FAILURE_TYPES

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs" / "demo.yaml")


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("probe-weights")
    assert main(["train-probe", "--quick", "--out", str(out)]) == 0
    return out


def test_the_retrained_clip_is_blind_to_position_and_to_nothing_else(retrained):
    card = packaged.read_card(retrained)
    assert card["hidden"] == "position" and card["train"]["clip_steps"] < 1000
    sims = card["held_out"]["minimal_pair_similarity"]
    others = [sims[a]["clip"] for a in ATTRIBUTES if a != "position"]
    assert sims["position"]["clip"] > 0.9 > max(others)
    assert sims["position"]["reference"] < sims["position"]["clip"] - 0.3
    for name in packaged.PACKAGED:
        assert packaged.checked_path(name, retrained).stat().st_size < 2_500_000


def test_the_audit_finds_the_retrained_blind_spot_well_above_chance(retrained, tmp_path, monkeypatch):
    monkeypatch.setenv(packaged.WEIGHTS_ENV, str(retrained))
    run_dir = tmp_path / "demo"
    args = ["--config", DEMO, "--set", f"run_dir={run_dir}", "--set", "dataset.num_images=250",
            "--set", "ray.runner=local", "--stages", "ingest,embed,neighbours,daf,name,report"]
    assert main(["run", *args]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["random_models"] is False
    assert summary["stages"]["name"]["ran"] and not summary["stages"]["summarize"]["ran"], \
        "the offline namer's table does not make the LLM stage look as if it ran"
    probe = summary["probe"]
    assert probe["scenes"] == 250 and probe["trained_to_miss"]["hidden"] == "position"
    blind = probe["headline"]["blind_pairs"]
    assert blind["pairs"] >= 20
    assert blind["only"] >= 0.5 and blind["lift"] >= 20
    assert max(blind["by_attribute"], key=blind["by_attribute"].get) == "position"
    daf = probe["headline"]["daf_clip_only"]
    assert daf["lift"] >= 5
    assert probe["daf_reference_only"]["position"]["only"] < daf["only"]
    html = (run_dir / "report" / "index.html").read_text()
    assert "Trained blind spot" in html and "only position" in html

    types = RunTables(str(run_dir)).read(FAILURE_TYPES).to_pylist()
    contrast = sorted((t for t in types if t["namer"] == "caption_contrast"), key=lambda t: t["rank"])
    assert contrast, "the caption-contrast namer wrote no failure type"
    top = " ".join(f"{t['name']} {' '.join(t.get('terms') or [])}" for t in contrast[:2]).lower()
    assert any(word in top for word in ("left", "right", "top", "bottom", "center", "position", "spatial"))
