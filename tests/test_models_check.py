"""``clipaudit models check``: what a spec resolves to, printed, and loud failures for what is off."""

from __future__ import annotations

import json

import pytest

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


BOTH = ("clip", "reference")


def _config_dir(root, model_type: str):
    folder = root / model_type
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": model_type}))
    return folder


def test_spec_roles_come_from_the_spec_without_weights(tmp_path, monkeypatch):
    from clipaudit.models.registry import spec_roles

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    named = {"tiny-clip": BOTH, "tiny-dino": ("reference",), "probe-clip": BOTH, "probe-dino": ("reference",),
             "open_clip:ViT-B-32/openai": BOTH, "hf-random:dinov2-small": ("reference",),
             "hf-random:clip-vit-base-patch32": BOTH, "timm:vit_small_patch14_dinov2.lvd142m": ("reference",),
             f"precomputed:{tmp_path / 'no-index'}": ("clip",), "python:broken_models:constant_text": BOTH,
             "python:broken_models:ConstantText": BOTH}
    for spec, roles in named.items():
        assert spec_roles(spec) == roles, spec
    for model_type, roles in {"align": BOTH, "clip": BOTH, "siglip": BOTH, "dinov2": ("reference",),
                              "vit": ("reference",)}.items():
        assert spec_roles(f"hf:{_config_dir(tmp_path, model_type)}") == roles, model_type
    assert spec_roles(f"hf:{tmp_path / 'align'}#cls") == ("reference",)
    (tmp_path / "empty").mkdir()
    assert spec_roles(f"hf:{tmp_path / 'empty'}") == BOTH
    assert spec_roles("hf:test-org/not-cached", cache_dir=str(tmp_path / "cache")) == BOTH


def test_spec_roles_refuse_what_fills_no_role(tmp_path, monkeypatch):
    from clipaudit.models import ModelSpecError
    from clipaudit.models.registry import spec_roles

    (tmp_path / "image_only.py").write_text("class ImageOnly:\n    def encode_images(self, images):\n"
                                            "        return [[1.0, 0.0] for _ in images]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert spec_roles("python:image_only:ImageOnly") == ("reference",)
    with pytest.raises(ModelSpecError, match="fixed-resolution SigLIP 2"):
        spec_roles(f"hf:{_config_dir(tmp_path, 'siglip2')}")
    with pytest.raises(ModelSpecError, match="hf-random knows"):
        spec_roles("hf-random:no-such-net")
    with pytest.raises(ModelSpecError, match="cannot import module"):
        spec_roles("python:no_such_module_here:factory")


def test_auto_checks_in_the_role_the_config_names_even_when_resolving_fails(tmp_path):
    dino = check_spec(f"hf:{_config_dir(tmp_path, 'dinov2')}", "auto")
    assert dino["role"] == "reference" and not dino["ok"] and "no weights" in dino["problems"][0]
    align = check_spec(f"hf:{_config_dir(tmp_path, 'align')}", "auto")
    assert align["role"] == "clip" and not align["ok"] and "no weights" in align["problems"][0]
    assert check_spec("probe-dino", "auto")["role"] == "reference"
