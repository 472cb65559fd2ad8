"""Issue 10's "done when": a Flickr8k-layout folder with hostile files goes through every stage (`clipaudit run`,
all stages, tiny models, fake LLM endpoint), on the local runner and on a local Ray. Every file is either scored or
a `rejects` row with its reason, nothing crashes, and the accounting holds: embed `in = embedded + rejected`, tcac
`in = scored + rejected`."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_openai import FakeOpenAI
from fixtures_images import huge_png
from PIL import Image
from report_fixtures import KEY_ENV, fake_answer
from test_tcac_transforms_total import hostile_images

from clipaudit.cli import main
from clipaudit.io.tables import RunTables
from clipaudit.records import IMAGE_EMBEDDINGS, REJECTS, SAMPLES, TCAC_CASES

TRANSFORMS = ["grayscale", "rotation", "affine", "hflip", "invert", "perspective", "elastic"]
GOOD = 6
REJECTED = {"truncated": "truncated", "zero_bytes": "zero_bytes", "text_named_jpg": "not_an_image",
            "huge_header": "too_large"}
"""Hostile files the embed stage must reject, by image id, with their reasons; every other file is embedded."""
TCAC_REASONS = {"transform_failed", "forward_failed", "prepare_failed"}


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")
    return buffer.getvalue()


def write_corpus(root: Path) -> set[str]:
    """images/ and Flickr8k.token.txt (two captions per image, one captioned image absent); returns the image ids
    present."""
    rng = np.random.default_rng(10)
    files = {f"good_{i}.jpg": _jpeg(Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)))
             for i in range(GOOD)}
    files.update(hostile_images())
    full = _jpeg(Image.fromarray(rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)))
    files.update({"truncated.jpg": full[: len(full) // 2], "zero_bytes.jpg": b"",
                  "text_named_jpg.jpg": b"this is a text file, not an image\n" * 5, "huge_header.png": huge_png()})
    images = root / "images"
    images.mkdir(parents=True)
    lines = []
    words = ["dog", "cat", "red ball", "two people", "a tree", "the sea", "blue car", "three birds"]
    for n, (name, data) in enumerate(sorted(files.items())):
        (images / name).write_bytes(data)
        lines += [f"{name}#0\ta {words[n % 8]} next to {words[(n + 3) % 8]}",
                  f"{name}#1\tphoto {n} of a {words[n % 5]}"]
    lines.append("absent.jpg#0\ta caption of an image that is not in the folder")
    (root / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    return {name.rsplit(".", 1)[0] for name in files}


def run_all(root: Path, runner: str, capsys) -> RunTables:
    """``clipaudit run`` with every stage over the corpus, on ``runner``, against the fake LLM endpoint."""
    run_dir = root / f"run_{runner}"
    config = root / f"config_{runner}.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "dataset": {"format": "flickr8k", "captions": str(root / "Flickr8k.token.txt"), "images": str(root / "images")},
        "models": {"clip": "tiny-clip", "reference": "tiny-dino"},
        "ray": {"runner": runner},
        "embed": {"batch_size": 8, "max_reject_share": 0.5},
        "neighbours": {"k": 3},
        "daf": {"max_overlap": None, "top_n": 3, "permutations": 10, "blind_rule": "quantile"},
        "tcac": {"transforms": TRANSFORMS, "cases_per_transform": 2},
        "llm": {"api_key_env": KEY_ENV, "model": "gpt-4o-mini", "dry_run": False, "max_cases": 4, "timeout_s": 5,
                "max_retries": 1},
        "validate": {"pairs_per_type": 2},
    }))
    with FakeOpenAI(answer=fake_answer(0)) as server:
        code = main(["run", "--config", str(config), "--set", f"llm.base_url={server.base_url}"])
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    return RunTables(str(run_dir))


def assert_accounted(tables: RunTables, present: set[str]) -> None:
    rejects = tables.read(REJECTS).to_pylist()
    by_stage: dict[str, dict[str, dict]] = {}
    for row in rejects:
        by_stage.setdefault(row["stage"], {})[row["item"]] = row
    assert by_stage["ingest"]["absent.jpg"]["reason"] == "missing_image"
    samples = set(tables.read(SAMPLES, ["image_id"]).column("image_id").to_pylist())
    assert samples == present
    embedded = set(tables.read(IMAGE_EMBEDDINGS["clip"], ["image_id"]).column("image_id").to_pylist())
    assert embedded == set(tables.read(IMAGE_EMBEDDINGS["reference"], ["image_id"]).column("image_id").to_pylist())
    embed_rejects = {item: row["reason"] for item, row in by_stage.get("embed", {}).items()}
    assert embed_rejects == REJECTED
    assert embedded == present - set(REJECTED) and len(samples) == len(embedded) + len(embed_rejects)
    embed_stats = json.loads((Path(tables.run_dir) / "stats" / "embed.json").read_text())
    c = embed_stats["counts"]
    assert c["total_in"] == c["total_embedded"] + c["total_rejected"] == len(present)
    assert f"{len(present)} in = {len(embedded)} embedded + {len(REJECTED)} rejected" in embed_stats["notes"]["summary"]

    scored = set(tables.read(TCAC_CASES, ["image_id"]).column("image_id").to_pylist())
    tcac_rejects = by_stage.get("tcac", {})
    assert not scored & set(tcac_rejects) and scored | set(tcac_rejects) == embedded
    for row in tcac_rejects.values():
        assert row["reason"] in TCAC_REASONS and ": " in row["detail"], row
    tcac_stats = json.loads((Path(tables.run_dir) / "stats" / "tcac.json").read_text())
    t = tcac_stats["counts"]
    assert t["images_in"] == t["images_scored"] + t["images_rejected"] == len(embedded)
    assert t["images_scored"] == len(scored)
    assert f"tcac: {len(embedded)} in = {len(scored)} scored + {len(tcac_rejects)} rejected" in \
        tcac_stats["notes"]["summary"]
    assert tables.count("failure_types") > 0 and tables.count("failure_checks") > 0
    assert (Path(tables.run_dir) / "report" / "index.html").is_file()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, set[str]]:
    root = tmp_path_factory.mktemp("hostile_flickr8k")
    return root, write_corpus(root)


def test_every_hostile_file_is_scored_or_rejected_locally(corpus, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-hostile-test")
    root, present = corpus
    assert_accounted(run_all(root, "local", capsys), present)


@pytest.mark.ray
def test_every_hostile_file_is_scored_or_rejected_on_ray(corpus, capsys, monkeypatch, ray_local):
    monkeypatch.setenv(KEY_ENV, "sk-hostile-test")
    root, present = corpus
    assert_accounted(run_all(root, "ray", capsys), present)
