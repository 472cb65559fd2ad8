"""Typed run configuration: YAML plus ``--set key=value`` overrides, validated when loaded.

Every section is a frozen dataclass. :func:`load_config` reads YAML, applies dotted overrides,
builds the dataclasses field by field (an unknown key, a wrong type or a missing file is a
:class:`ConfigError` that names it) and resolves relative paths against the config file's folder.
"""

from clipaudit.config.analysis import DafConfig, LLMConfig, NameConfig, ReportConfig, TcacConfig, ValidateConfig
from clipaudit.config.compute import EmbedConfig, NeighboursConfig, RayConfig
from clipaudit.config.data import (
    COMMON_DATASET_KEYS,
    FORMAT_KEYS,
    DatasetConfig,
    ModelsConfig,
    slot_name,
    unread_dataset_keys,
)
from clipaudit.config.errors import ConfigError
from clipaudit.config.loading import load_config, parse_value
from clipaudit.config.root import Config

__all__ = [
    "COMMON_DATASET_KEYS", "FORMAT_KEYS", "Config", "ConfigError", "DafConfig", "DatasetConfig", "EmbedConfig",
    "LLMConfig", "ModelsConfig", "NameConfig", "NeighboursConfig", "RayConfig", "ReportConfig", "TcacConfig",
    "ValidateConfig", "load_config", "parse_value", "slot_name", "unread_dataset_keys",
]
