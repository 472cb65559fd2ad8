"""A small complete run for the report, diff and browser tests: a synthetic corpus, tiny random models, the local
runner (no Ray), and the LLM stages against the fake OpenAI endpoint.

One caption in ``samples`` is replaced by a script tag after ingest, and the fake LLM's answers carry markup too,
so the report must escape both. ``variant`` changes the corpus seed, the TCAC seed and the failure types the fake
LLM names, so two variants differ in every way ``clipaudit diff`` reports.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fake_openai import FakeOpenAI

from clipaudit.config import Config, load_config
from clipaudit.io.tables import RunTables
from clipaudit.llm.prompts import extract_data
from clipaudit.pipeline import STAGES, run_pipeline

SCRIPT_CAPTION = "<script>alert(1)</script> a caption that tries to run a script"
LLM_MARKUP = '<img src=x onerror="alert(2)">'
KEY_ENV = "CLIPAUDIT_REPORT_TEST_KEY"
N_IMAGES = 14
TRANSFORMS = ("grayscale", "hflip", "invert", "rotation", "gaussian_blur@2", "brightness@5")
"""The cheap transforms plus one resampling one (the report re-creates each from its recorded parameters)."""

TYPES = {
    0: [("Counting", f"Miscounts objects {LLM_MARKUP}"), ("Spatial relations", "Ignores left and right.")],
    1: [("Counting", "Miscounts objects."), ("Colour binding", "Binds colours to the wrong shapes.")],
}


def fake_answer(variant: int) -> Any:
    """The fake LLM: failure types for summarize prompts, caption pairs for validate prompts."""

    def answer(body: dict[str, Any]) -> str:
        prompt = str(body["messages"][0]["content"])
        if "pairs of image captions" in prompt:
            name = str(extract_data(prompt).get("name", ""))
            return json.dumps({"pairs": [{"a": f"two red squares ({name})", "b": "three red squares"},
                                         {"a": "a circle on the left <b>bold</b>", "b": "a circle on the right"}]})
        return json.dumps({"failure_types": [{"name": name, "description": description}
                                             for name, description in TYPES[variant]]})

    return answer


def overrides(run_dir: Path, variant: int, base_url: str = "http://127.0.0.1:9/v1") -> list[str]:
    """Config overrides of the small run (tiny models, local runner, small k, few cases)."""
    return [f"run_dir={run_dir}", "dataset.format=synthetic", f"dataset.num_images={N_IMAGES}",
            f"dataset.seed={variant}", "models.clip=tiny-clip", "models.reference=tiny-dino", "ray.runner=local",
            "embed.batch_size=16", "neighbours.k=4", "daf.max_overlap=null", "daf.top_n=3", "daf.permutations=20",
            "daf.blind_rule=quantile", f"tcac.seed={variant}", f"tcac.transforms=[{','.join(TRANSFORMS)}]",
            "tcac.cases_per_transform=2",
            f"llm.base_url={base_url}", f"llm.api_key_env={KEY_ENV}", "llm.model=gpt-4o-mini", "llm.dry_run=false",
            "llm.max_cases=4", "llm.timeout_s=5", "llm.max_retries=1", "validate.pairs_per_type=2",
            "report.daf_cases=2", "report.blind_pairs=2", "report.tcac_cases=1", "report.examples_per_type=3"]


def inject_caption(run_dir: Path, text: str = SCRIPT_CAPTION) -> str:
    """Replace the caption of the first sample with ``text``; returns that image id."""
    tables = RunTables(str(run_dir))
    first = sorted(tables.read("samples", ["image_id"]).column("image_id").to_pylist())[0]
    table = tables.db.open_table("samples")
    table.update(where=f"image_id = '{first}'", values={"caption": text, "captions": [text]})
    return first


def build_run(run_dir: Path, variant: int = 0, monkeypatch: Any = None,
              stages: list[str] | None = None) -> Config:
    """Run the pipeline (all stages by default) over a fresh small run directory; returns its config."""
    import os

    if monkeypatch is not None:
        monkeypatch.setenv(KEY_ENV, "sk-report-test")
    else:
        os.environ.setdefault(KEY_ENV, "sk-report-test")
    stages = stages or list(STAGES)
    with FakeOpenAI(answer=fake_answer(variant)) as server:
        config = load_config(None, overrides(run_dir, variant, server.base_url))
        run_pipeline(config, ["ingest"])
        inject_caption(run_dir)
        run_pipeline(config, [s for s in stages if s != "ingest"])
    return config
