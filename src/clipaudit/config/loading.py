"""Loading a configuration: YAML, dotted ``--set`` overrides, paths resolved against the file's folder, every field
built and type-checked (an unknown key, a wrong type or a missing file is a :class:`ConfigError` naming it)."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from clipaudit.config.errors import ConfigError
from clipaudit.config.root import Config


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    """Load ``path`` (YAML), apply ``key=value`` overrides, validate, and resolve relative paths.

    Relative paths in the file are taken relative to the file's folder; relative paths given in
    overrides, relative to the current directory. Raises :class:`ConfigError` naming the bad key or file.
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        config_path = Path(path)
        if not config_path.is_file():
            raise ConfigError(f"config file not found: {config_path}")
        try:
            loaded = yaml.safe_load(config_path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{config_path}: not valid YAML: {exc}") from exc
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{config_path}: the top level must be a mapping of sections")
        raw = _resolve_paths(loaded or {}, config_path.parent.resolve())
    for item in overrides or []:
        _apply_override(raw, item, base)
    config = _build(Config, raw, "")
    _check_files(config)
    return config


def parse_value(text: str) -> Any:
    """Parse an override's value as YAML (so ``3``, ``true``, ``[a, b]`` and ``null`` work)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


_PATH_KEYS = {("run_dir",), ("dataset", "captions"), ("dataset", "images"), ("dataset", "class_names"),
              ("models", "cache_dir")}
_PATH_KEYS |= {("llm", key) for key in ("daf_template", "tcac_template", "merge_template", "validate_template",
                                        "export_batch", "import_batch")}


def _is_remote(value: str) -> bool:
    return "://" in value


_PATH_OR_ID_KEYS = {("dataset", "path")}
"""Keys that hold a path (resolved against the config's folder when that exists) or a Hugging Face dataset id."""


def _path_or_id(value: str, base: Path) -> str:
    if _is_remote(value) or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    resolved = (base / os.path.expanduser(value)).resolve()
    return str(resolved) if resolved.exists() else value


def _precomputed_spec(spec: str, base: Path) -> str:
    """``precomputed:INDEX_DIR`` with a relative local INDEX_DIR made absolute against ``base`` (the config's
    folder, as every other path of a config file); any other spec unchanged."""
    prefix = "precomputed:"
    if not spec.startswith(prefix):
        return spec
    index = spec[len(prefix):]
    if not index or _is_remote(index) or os.path.isabs(os.path.expanduser(index)):
        return spec
    return prefix + str((base / os.path.expanduser(index)).resolve())


def _resolve_paths(raw: dict[str, Any], base: Path) -> dict[str, Any]:
    dataset = raw.get("dataset")
    if isinstance(dataset, dict) and isinstance(dataset.get("path"), str):
        value = dataset["path"]
        if dataset.get("format") == "clip_retrieval" and not _is_remote(value):
            dataset["path"] = str((base / os.path.expanduser(value)).resolve())
        else:
            dataset["path"] = _path_or_id(value, base)
    models = raw.get("models")
    if isinstance(models, dict) and isinstance(models.get("clip"), (str, list)):
        specs = models["clip"]
        resolved = [_precomputed_spec(s, base) if isinstance(s, str) else s
                    for s in (specs if isinstance(specs, list) else [specs])]
        models["clip"] = resolved if isinstance(specs, list) else resolved[0]
    for keys in _PATH_KEYS:
        node = raw
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(keys[-1]), str):
            value = node[keys[-1]]
            if not _is_remote(value) and not os.path.isabs(os.path.expanduser(value)):
                node[keys[-1]] = str((base / value).resolve())
            else:
                node[keys[-1]] = os.path.expanduser(value)
    return raw


def _apply_override(raw: dict[str, Any], item: str, base: Path) -> None:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value")
    dotted, text = item.split("=", 1)
    keys = dotted.strip().split(".")
    node = raw
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: {key!r} is not a section")
        node = child
    value = parse_value(text)
    if tuple(keys) in _PATH_KEYS and isinstance(value, str) and not _is_remote(value):
        value = str((base / os.path.expanduser(value)).resolve())
    elif tuple(keys) in _PATH_OR_ID_KEYS and isinstance(value, str):
        value = _path_or_id(value, base)
    node[keys[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"unknown key {prefix}{unknown[0]!s} (known in {where}: {', '.join(sorted(fields))})")
    kwargs = {name: _coerce(hints[name], value, f"{prefix}{name}") for name, value in raw.items()}
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(option, value, key)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return {_coerce(args[0], k, key): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {hint!r}")


def _cached_hf_dataset(fmt: str, value: str) -> bool:
    """Whether ``value`` names a dataset repo (``ORG/NAME``) in the Hugging Face hub cache."""
    if fmt != "hf_dataset" or value.count("/") != 1 or value.startswith((".", "/")):
        return False
    from clipaudit.io.hf_cache import cached_snapshot

    return cached_snapshot(value) is not None


def _check_files(config: Config) -> None:
    """Missing inputs are errors before any work; positive sizes are required."""
    ds = config.dataset
    needs: dict[str, list[str]] = {
        "flickr8k": ["captions", "images"],
        "manifest": ["captions"],
        "imagefolder": ["images"],
        "webdataset": ["images"],
        "hf_dataset": ["path"],
        "clip_retrieval": ["path"],
        "synthetic": [],
    }
    for name in needs[ds.format]:
        value = getattr(ds, name)
        if value is None:
            raise ConfigError(f"dataset.{name} is required for format {ds.format}")
        if not _is_remote(value) and not os.path.exists(value) and not _cached_hf_dataset(ds.format, value):
            raise ConfigError(f"dataset.{name}: file not found: {value}"
                              + (" (nor a dataset of that id in the Hugging Face cache)"
                                 if ds.format == "hf_dataset" else ""))
    if ds.format in ("manifest", "clip_retrieval") and ds.images is not None and not _is_remote(ds.images) \
            and not os.path.isdir(ds.images):
        raise ConfigError(f"dataset.images: folder not found: {ds.images} ({ds.format}: the base folder of relative "
                          "image paths)")
    if ds.format == "clip_retrieval" and ds.path is not None and not _is_remote(ds.path) \
            and not os.path.isdir(os.path.join(ds.path, "metadata")):
        raise ConfigError(f"dataset.path: {ds.path} is not a clip-retrieval index folder (no metadata/ folder in "
                          "it: point it at the output folder of clip-retrieval inference)")
    if ds.class_names is not None and not os.path.exists(ds.class_names):
        raise ConfigError(f"dataset.class_names: file not found: {ds.class_names}")
    if not ds.caption_columns:
        raise ConfigError("dataset.caption_columns: at least one column is required")
    for key, value in [("embed.batch_size", config.embed.batch_size),
                       ("embed.text_batch_size", config.embed.text_batch_size),
                       ("embed.actors_per_model", config.embed.actors_per_model),
                       ("embed.max_pixels", config.embed.max_pixels),
                       ("embed.write_every", config.embed.write_every),
                       ("dataset.num_images", config.dataset.num_images),
                       ("neighbours.k", config.neighbours.k)]:
        if value <= 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not 0 <= config.embed.max_reject_share <= 1:
        raise ConfigError(f"embed.max_reject_share: must be between 0 and 1, got {config.embed.max_reject_share}")
    if config.embed.cpus_per_actor is not None and config.embed.cpus_per_actor <= 0:
        raise ConfigError(f"embed.cpus_per_actor: must be positive, got {config.embed.cpus_per_actor}")
    if config.dataset.variants < 0:
        raise ConfigError(f"dataset.variants: must be 0 or more, got {config.dataset.variants}")
    if config.dataset.limit is not None and config.dataset.limit <= 0:
        raise ConfigError(f"dataset.limit: must be positive, got {config.dataset.limit}")
