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


def test_a_model_too_big_for_the_memory_left_is_refused_before_loading(monkeypatch):
    import pytest

    from clipaudit.models import memory, resolve_model

    resolved = resolve_model("probe-clip", "clip")
    size = memory.weights_bytes(resolved)
    assert size and size > 1_000_000
    monkeypatch.setattr(memory, "host_available", lambda: int(size))
    message = r"weights are 1\.\d MiB, loading them needs about 1\.\d MiB of host memory"
    with pytest.raises(memory.ModelTooLargeError, match=message):
        resolved.load("cpu")
    monkeypatch.setattr(memory, "host_available", lambda: int(2 * size))
    assert resolved.load("cpu").dim == 64
    assert memory.weights_bytes(resolve_model("tiny-clip", "clip")) is None
