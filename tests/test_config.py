"""Typed configuration: YAML plus overrides, validated when loaded, errors that name the key or file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clipaudit.config import Config, ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_configs_load():
    demo = load_config(REPO / "configs" / "demo.yaml")
    assert demo.dataset.format == "synthetic" and demo.models.fallback == "tiny"
    assert Path(demo.run_dir).is_absolute()
    imagenet = load_config(REPO / "configs" / "imagenet.yaml")
    assert imagenet.run_dir.startswith("s3://") and imagenet.ray.address == "auto"


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "caps.txt").write_text("a.jpg#0\tx\n")
    config = load_config(write(tmp_path, {"run_dir": "out", "dataset": {
        "format": "flickr8k", "captions": "caps.txt", "images": "imgs"}}))
    assert config.run_dir == str(tmp_path / "out")
    assert config.dataset.images == str(tmp_path / "imgs")


def test_overrides_are_dotted_and_typed(tmp_path):
    config = load_config(write(tmp_path, {}), ["models.clip=tiny-clip", "embed.batch_size=7",
                                               "tcac.transforms=[hflip, invert]", "ray.num_cpus=null"])
    assert config.models.clip == "tiny-clip"
    assert config.embed.batch_size == 7
    assert config.tcac.transforms == ["hflip", "invert"]
    assert config.ray.num_cpus is None


@pytest.mark.parametrize(("data", "overrides", "message"), [
    ({"dataset": {"fromat": "x"}}, [], "unknown key dataset.fromat"),
    ({"bogus": 1}, [], "unknown key bogus"),
    ({}, ["embed.batch_size=many"], "embed.batch_size: expected an integer"),
    ({}, ["embed.batch_size=0"], "embed.batch_size: must be positive"),
    ({}, ["embed.batch_size=true"], "embed.batch_size: expected an integer"),
    ({}, ["dataset.format=tfrecord"], "dataset.format: 'tfrecord' is not one of"),
    ({}, ["dataset.caption_choice=shortest"], "dataset.caption_choice"),
    ({"dataset": {"format": "flickr8k", "images": "/nonexistent/x", "captions": "/nonexistent/y"}}, [],
     "dataset.captions: file not found: /nonexistent/y"),
    ({"dataset": {"format": "manifest"}}, [], "dataset.captions is required for format manifest"),
    ({"models": "tiny"}, [], "models: expected a mapping"),
    ({}, ["models"], "expected key=value"),
    ({"models": {"clip": "tiny-clip"}}, ["models.clip.name=x"], "'clip' is not a section"),
    ({}, ["models.clip.name=x"], "models.clip: expected a string"),
    ({}, ["name.max_types=0"], "name.max_types: must be at least 1"),
    ({}, ["name.alpha0=0"], "name.alpha0: must be positive"),
    ({}, ["name.min_z=-1"], "name.min_z: must be positive"),
    ({}, ["name.seed=x"], "name.seed: expected an integer"),
])
def test_bad_config_errors_name_the_key(tmp_path, data, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config(write(tmp_path, data), overrides)


def test_missing_config_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("run_dir: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(write(tmp_path, {"run_dir": "out"}), ["models.clip=tiny-clip"])
    again = load_config(write(tmp_path, config.to_dict()))
    assert again == config
    assert isinstance(again, Config)


@pytest.mark.parametrize(("dataset", "key"), [
    ({"format": "flickr8k", "templates": ["a {label}"]}, "templates"),
    ({"format": "synthetic", "images": "imgs"}, "images"),
    ({"format": "imagefolder", "caption_columns": ["text"]}, "caption_columns"),
    ({"format": "webdataset", "num_images": 5}, "num_images"),
    ({"format": "flickr8k", "id_column": "id"}, "id_column"),
])
def test_a_key_the_format_does_not_read_is_an_error_naming_key_and_format(tmp_path, dataset, key):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "caps.txt").write_text("a.jpg#0\tx\n")
    data = {"dataset": {"captions": "caps.txt", "images": "imgs", **dataset}}
    if dataset["format"] in ("synthetic", "imagefolder", "webdataset"):
        del data["dataset"]["captions"]
    if dataset["format"] == "synthetic" and key != "images":
        del data["dataset"]["images"]
    with pytest.raises(ConfigError, match=rf"dataset\.{key}: format {dataset['format']} does not read this key"):
        load_config(write(tmp_path, data))


def test_keys_left_at_their_defaults_and_common_keys_are_not_errors(tmp_path):
    (tmp_path / "caps.txt").write_text("a.jpg#0\tx\n")
    (tmp_path / "imgs").mkdir()
    config = load_config(write(tmp_path, {"dataset": {
        "format": "flickr8k", "captions": "caps.txt", "images": "imgs", "seed": 0, "num_images": 64, "limit": 3,
        "caption_choice": "first", "duplicate_check": "uri"}}))
    assert config.dataset.limit == 3


def test_manifest_images_is_the_base_folder_and_must_exist(tmp_path):
    (tmp_path / "m.csv").write_text("image,caption\na.jpg,x\n")
    (tmp_path / "pictures").mkdir()
    config = load_config(write(tmp_path, {"dataset": {"format": "manifest", "captions": "m.csv",
                                                      "images": "pictures"}}))
    assert config.dataset.images == str(tmp_path / "pictures")
    with pytest.raises(ConfigError, match="dataset.images: folder not found: .*nowhere"):
        load_config(write(tmp_path, {"dataset": {"format": "manifest", "captions": "m.csv", "images": "nowhere"}}))
