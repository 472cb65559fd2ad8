"""The whole run configuration: one frozen dataclass per section."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from clipaudit.config.analysis import DafConfig, LLMConfig, NameConfig, ReportConfig, TcacConfig, ValidateConfig
from clipaudit.config.compute import EmbedConfig, NeighboursConfig, RayConfig
from clipaudit.config.data import DatasetConfig, ModelsConfig
from clipaudit.config.errors import ConfigError


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    run_dir: str = "runs/demo"
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    neighbours: NeighboursConfig = field(default_factory=NeighboursConfig)
    daf: DafConfig = field(default_factory=DafConfig)
    tcac: TcacConfig = field(default_factory=TcacConfig)
    name: NameConfig = field(default_factory=NameConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data (what is written beside the outputs)."""
        return dataclasses.asdict(self)

    def for_clip_model(self, spec: str) -> Config:
        """This configuration with ``models.clip`` set to ``spec`` alone: what a per-model stage runs with."""
        if spec not in self.models.clip_models:
            raise ConfigError(f"models.clip: {spec!r} is not one of the configured CLIP-role models "
                              f"({', '.join(self.models.clip_models)})")
        return dataclasses.replace(self, models=dataclasses.replace(self.models, clip=spec))
