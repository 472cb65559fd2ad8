"""``clipaudit models check``: what a spec resolves to, printed, and loud failures for what is off."""

from __future__ import annotations

import json

from clipaudit.cli import main
from clipaudit.model_check import check_spec


def test_good_specs_pass_with_their_facts(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert main(["models", "check", "probe-clip", "probe-dino", "tiny-clip", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "probe-clip: OK (clip role)" in printed and "probe-dino: OK (reference role)" in printed
    assert "tokenizer   49408 tokens" in printed and "random weights, as the spec asks" in printed
    results = {r["spec"]: r for r in json.loads(out.read_text())}
    assert results["probe-clip"]["provenance"]["weights_sha256"] and results["probe-dino"]["dim"] == 64
    assert results["tiny-clip"]["provenance"]["random"] is True


def test_broken_models_fail_loudly(capsys):
    assert main(["models", "check", "python:broken_models:constant_text", "open_clip:ViT-B-32/no-such-tag",
                 "--role", "clip"]) == 1
    printed = capsys.readouterr().out
    assert "every caption gets the same vector" in printed
    assert "open_clip:ViT-B-32/no-such-tag: FAILED" in printed and "cannot be resolved" in printed
    nan = check_spec("python:broken_models:nan_images", "clip")
    assert not nan["ok"] and any("NaN" in p or "cannot be loaded or run" in p for p in nan["problems"])


def test_a_reference_only_model_is_refused_in_the_clip_role():
    result = check_spec("probe-dino", "clip")
    assert not result["ok"] and "no text tower" in result["problems"][0]
