"""The report stage on a small complete run (``report_run``: tiny models, local runner, fake LLM, a caption holding
a script tag): escaping, missing stages said missing, thumbnails small, TCAC images re-created from their
parameters, summary.json, run ids and table tags."""

from __future__ import annotations

import json
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from report_fixtures import LLM_MARKUP, SCRIPT_CAPTION, TRANSFORMS, overrides

from clipaudit.config import ConfigError, load_config
from clipaudit.io.tables import RunTables
from clipaudit.pipeline import run_pipeline
from clipaudit.report.html import Markup, esc, join, tag
from clipaudit.runs import finished_runs, new_run_id, read_runs


class Page(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)

    def all(self, name: str) -> list[dict[str, str | None]]:
        return [attrs for tag, attrs in self.tags if tag == name]

    def with_class(self, cls: str) -> list[dict[str, str | None]]:
        return [attrs for _, attrs in self.tags if cls in (attrs.get("class") or "").split()]


@pytest.fixture(scope="module")
def page(report_run: Path) -> tuple[str, Page]:
    text = (report_run / "report" / "index.html").read_text(encoding="utf-8")
    return text, Page(text)


@pytest.fixture(scope="module")
def summary(report_run: Path) -> dict:
    return json.loads((report_run / "summary.json").read_text())


def test_captions_and_llm_answers_are_text_never_markup(page) -> None:
    text, parsed = page
    assert "<script" not in text.lower(), "no script element, not even the injected caption"
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert SCRIPT_CAPTION in "".join(parsed.text), "the caption reads as text"
    assert "&lt;img src=x onerror=&quot;alert(2)&quot;&gt;" in text and LLM_MARKUP not in text
    assert "&lt;b&gt;bold&lt;/b&gt;" in text, "LLM-written validation pairs are escaped too"
    handlers = [(tag, key) for tag, attrs in parsed.tags for key in attrs if key.startswith("on")]
    assert handlers == []
    assert not [t for t, _ in parsed.tags if t in ("script", "iframe", "object", "embed", "link")]


def test_self_contained_every_image_is_a_local_file(report_run: Path, page) -> None:
    text, parsed = page
    assert "http://" not in text and "https://" not in text, "no network: no CDN, fonts or scripts"
    sources = [attrs["src"] for attrs in parsed.all("img")]
    assert sources and all(src and not src.startswith(("/", "data:")) for src in sources)
    assert all((report_run / "report" / src).is_file() for src in sources)
    assert {src.split("/")[0] for src in sources} == {"thumbs", "charts"}
    charts = {src for src in sources if src.startswith("charts/")}
    assert charts == {"charts/daf_overlap.png", "charts/tcac_transforms.png", "charts/failure_support.png",
                      "charts/tcac_severity_shift.png", "charts/tcac_severity_recall.png"}


def test_thumbnails_are_small_jpegs(report_run: Path) -> None:
    thumbs = sorted((report_run / "report" / "thumbs").glob("*"))
    assert thumbs
    for path in thumbs:
        with Image.open(path) as image:
            assert image.format == "JPEG" and max(image.size) <= 96, path
        assert path.stat().st_size < 8_000, path
    total = sum(p.stat().st_size for p in (report_run / "report").rglob("*") if p.is_file())
    assert total < 1_000_000


def test_sections_show_the_cases(report_run: Path, page, summary) -> None:
    _, parsed = page
    assert parsed.all("div") and [a for a in parsed.all("div") if a.get("id") == "random-models"], \
        "random models are flagged prominently"
    shown = sorted(RunTables(str(report_run)).read("daf_cases").to_pylist(), key=lambda r: r["rank"])[:2]
    assert [a["data-image-id"] for a in parsed.with_class("daf-case")] == [r["image_id"] for r in shown]
    assert len(parsed.with_class("only-clip")) == sum(len(r["clip_only"]) for r in shown) > 0
    assert len(parsed.with_class("only-ref")) == sum(len(r["reference_only"]) for r in shown)
    assert len(parsed.with_class("query")) >= len(shown), "each case starts with the image itself"
    text = "".join(parsed.text)
    assert "CLIP neighbours" in text and "reference neighbours" in text and "CLIP-blind pairs" in text
    assert {a["data-transform"] for a in parsed.with_class("tcac-case")} == set(TRANSFORMS)
    assert "missing" not in [a.get("class") for a in parsed.all("div")], "every stage ran"
    for item in summary["failure_types"]:
        assert item["name"] in text
    assert "Validation pairs" in text and "success rate" in text


def _thumb(report_run: Path, html: str, transform: str) -> tuple[np.ndarray, np.ndarray]:
    """The original and transformed thumbnails of the first TCAC case of ``transform``."""
    start = html.index(f'data-transform="{transform}"')
    sources = []
    for _ in range(2):
        start = html.index('src="thumbs/', start) + len('src="')
        sources.append(html[start:html.index('"', start)])
    before, after = (np.asarray(Image.open(report_run / "report" / s).convert("RGB"), dtype=np.float64)
                     for s in sources)
    return before, after


def test_tcac_images_are_recreated_from_their_parameters(report_run: Path, page) -> None:
    text, _ = page
    before, after = _thumb(report_run, text, "hflip")
    assert np.abs(before[:, ::-1] - after).mean() < 6 < np.abs(before - after).mean()
    before, after = _thumb(report_run, text, "invert")
    assert np.abs((255 - before) - after).mean() < 6
    before, after = _thumb(report_run, text, "grayscale")
    assert np.ptp(after, axis=-1).max() < 24 < np.ptp(before, axis=-1).max(), "grey after, colours before"


def test_graded_corruptions_have_their_curves_and_table(report_run: Path, page) -> None:
    text, parsed = page
    assert 'id="severities"' in text
    sources = {attrs.get("src") for attrs in parsed.all("img")}
    for chart in ("charts/tcac_severity_shift.png", "charts/tcac_severity_recall.png"):
        assert chart in sources and (report_run / "report" / chart).stat().st_size > 1000
    table = text[text.index('class="tcac-severity"'):]
    table = table[:table.index("</table>")]
    assert "gaussian_blur" in table and "brightness" in table and "level 2" in table and "level 5" in table
    summary_table = text[text.index('class="tcac-summary"'):]
    assert "brightness@5" not in summary_table[:summary_table.index("</table>")]
    before, after = _thumb(report_run, text, "brightness@5")
    assert after.mean() > before.mean() + 20


def test_summary_json(report_run: Path, summary) -> None:
    daf_stats = json.loads((report_run / "stats" / "daf.json").read_text())["notes"]
    assert summary["schema_version"] == 1
    assert summary["counts"]["in"] == summary["counts"]["embedded"] == 14
    assert summary["counts"]["rejected"] == 0
    assert summary["models"] == {"clip": "tiny-clip", "reference": "tiny-dino"} and summary["random_models"] is True
    assert summary["daf"]["mean_overlap"] == pytest.approx(daf_stats["mean_overlap"])
    assert summary["daf"]["chance_overlap"] == pytest.approx(4 / 13)
    assert summary["daf"]["cases"] == 3 and summary["daf"]["blind_pairs"] is not None
    transforms = summary["tcac"]["transforms"]
    assert sorted(transforms) == sorted(TRANSFORMS), "summary.json is written with sorted keys"
    assert all(0 <= t["top1_changed_share"] <= 1 and t["mean_changed"] >= 0 for t in transforms.values())
    types = {(t["method"], t["name"]): t for t in summary["failure_types"]}
    assert set(types) == {(m, n) for m in ("DAF", "TCAC") for n in ("Counting", "Spatial relations")}
    assert all(t["support"] > 0 and t["success_rate"] is not None and t["n_pairs"] == 2 for t in types.values())
    assert summary["llm"]["by_status"] == {"ok": summary["llm"]["calls"]}
    assert all(info["ran"] for stage, info in summary["stages"].items() if stage != "report")
    runs = read_runs(str(report_run))
    assert summary["run_id"] == runs[-1]["run_id"] == finished_runs(str(report_run))[-1]
    history = json.loads((report_run / "history" / summary["run_id"] / "summary.json").read_text())
    assert history["run_id"] == summary["run_id"]


def test_runs_tag_their_tables_and_read_back(report_run: Path, summary) -> None:
    ingest_run, full_run = finished_runs(str(report_run))
    tables = RunTables(str(report_run))
    assert set(tables.tags("samples")) == {ingest_run, full_run}
    assert "failure_types" in read_runs(str(report_run))[-1]["written"]
    before = tables.read("samples", ["caption"], version=ingest_run).column("caption").to_pylist()
    now = tables.read("samples", ["caption"]).column("caption").to_pylist()
    assert SCRIPT_CAPTION in now and SCRIPT_CAPTION not in before, "the ingest run's tag holds the table as it was"
    assert tables.read("failure_types", version=ingest_run) is None, "it did not exist when that run finished"
    assert tables.read("failure_types", version=full_run).num_rows == len(summary["failure_types"])
    assert summary["table_versions"]["failure_types"] == tables.tags("failure_types")[full_run]
    assert len(new_run_id()) == len(full_run) and new_run_id() != new_run_id()


def test_missing_stages_are_said_missing(report_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "partial"
    shutil.copytree(report_run, run_dir, ignore=shutil.ignore_patterns("report", "summary.json", "history"))
    tables = RunTables(str(run_dir))
    for name in ("tcac_cases", "tcac_summary", "llm_calls", "failure_types", "failure_checks"):
        tables.db.drop_table(name)
    for stage in ("tcac", "summarize", "validate"):
        (run_dir / "stats" / f"{stage}.json").unlink()
    run_pipeline(load_config(None, overrides(run_dir, 0)), ["report"])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["tcac"] is None and summary["failure_types"] is None and summary["llm"] is None
    assert summary["daf"]["cases"] == 3
    assert {s for s, info in summary["stages"].items() if not info["ran"]} == {"tcac", "summarize", "validate"}
    parsed = Page((run_dir / "report" / "index.html").read_text())
    assert {a["data-missing"] for a in parsed.with_class("missing")} == {"TCAC", "Failure taxonomy"}
    text = "".join(parsed.text)
    assert "TCAC: missing." in text and "Failure taxonomy: missing." in text
    assert "missing (did not run)" in text
    assert not parsed.with_class("tcac-case") and parsed.with_class("daf-case")
    images = [a["src"] for a in parsed.all("img")]
    assert all((run_dir / "report" / src).is_file() for src in images)
    assert "charts/tcac_transforms.png" not in images


def test_report_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="report.thumb_px"):
        load_config(None, ["report.thumb_px=4"])
    with pytest.raises(ConfigError, match="unknown key report.colour"):
        load_config(None, ["report.colour=red"])


def test_html_builder_escapes_data_and_keeps_markup() -> None:
    assert esc("<a href='x'>&</a>") == "&lt;a href=&#x27;x&#x27;&gt;&amp;&lt;/a&gt;"
    assert esc(Markup("<b>ok</b>")) == "<b>ok</b>" and esc(None) == ""
    assert tag("img", src='x" onerror="alert(1)', alt=None, hidden=True) == \
        '<img src="x&quot; onerror=&quot;alert(1)" hidden>'
    assert tag("div", "<i>", tag("b", "x"), ["a", "<"], class_="c", data_k=1) == \
        '<div class="c" data-k="1">&lt;i&gt;<b>x</b>a&lt;</div>'
    assert join(["<", Markup("<br>")], sep=", ") == "&lt;, <br>"


def _view_of(tmp_path: Path, tables: dict[str, pa.Table]):
    """A RunView over a run directory holding ``tables``."""
    from clipaudit.run_view import RunView

    run = RunTables(str(tmp_path))
    for name, rows in tables.items():
        run.replace(name, rows, rows.schema)
    return RunView(str(tmp_path))


def test_top_daf_cases_and_blind_pairs_are_those_the_full_sort_picked(tmp_path: Path) -> None:
    from clipaudit.report.render import top_blind_pairs, top_daf_cases

    rng = np.random.default_rng(4)
    ranks = [None, *rng.choice(np.arange(1, 400), size=59, replace=False).tolist()]
    ranks[5] = ranks[9]  # a tie, broken by image_id
    cases = pa.table({"image_id": [f"img_{i:03d}" for i in rng.permutation(60)],
                      "rank": pa.array(ranks, pa.int32()), "caption": [f"c{i}" for i in range(60)]})
    gaps = [0.2, None, 0.5, 0.2, -0.1, 0.5, 0.0, 0.3]
    pairs = pa.table({"image_a": [f"a{i}" for i in range(8)], "image_b": [f"b{i}" for i in range(8)],
                      "gap": pa.array(gaps, pa.float32())})
    view = _view_of(tmp_path, {"daf_cases": cases, "blind_pairs": pairs})
    reads: list[tuple] = []
    read = view.read
    view.read = lambda name, columns=None, where=None: reads.append((name, columns, where)) or read(name, columns,
                                                                                                   where)
    for n in (0, 1, 7, 12, 100):
        expected = sorted(cases.to_pylist(), key=lambda r: (r.get("rank") or 0, r["image_id"]))[:n]
        assert top_daf_cases(view, n) == expected
        expected_pairs = sorted(pairs.to_pylist(), key=lambda r: -(r.get("gap") or 0.0))[:n]
        assert top_blind_pairs(view, n) == expected_pairs
    full_reads = [where for name, columns, where in reads if name == "daf_cases" and columns is None]
    assert len(full_reads) == 4 and all(where and where.startswith("rank IS NULL") for where in full_reads)


def test_counts_match_the_python_set_accounting(tmp_path: Path) -> None:
    from clipaudit.records import IMAGE_EMBEDDINGS, REJECTS, SAMPLES
    from clipaudit.report.summary import _counts

    samples = pa.table({"image_id": [f"s{i}" for i in range(50)] + ["s1"]})
    clip = pa.table({"image_id": [f"s{i}" for i in range(0, 45)] + ["other"]})
    reference = pa.table({"image_id": [f"s{i}" for i in range(3, 50)]})
    rejects = pa.table({"stage": ["embed", "embed", "ingest", "embed", "embed", "tcac"],
                        "item": ["s47", "s48", "s48", "gone", "s47", "s3"],
                        "reason": ["decode", "decode", "size", "decode", "nan", "worker_lost"]})
    view = _view_of(tmp_path, {SAMPLES: samples, IMAGE_EMBEDDINGS["clip"]: clip,
                               IMAGE_EMBEDDINGS["reference"]: reference, REJECTS: rejects})
    counts = _counts(view)
    assert counts == {"samples": 50, "in": 50, "embedded": 42, "rejected": 2, "rejects": 6,
                      "rejects_by_reason": {"embed/decode": 3, "embed/nan": 1, "ingest/size": 1,
                                            "tcac/worker_lost": 1},
                      "rejects_retryable": 1, "rejects_final": 5, "retryable_reasons": ["worker_lost"],
                      "captions_embedded": None}
    assert list(counts["rejects_by_reason"]) == sorted(counts["rejects_by_reason"])
