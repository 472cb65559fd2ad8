"""What the tcac stage needs from a scheduler: the :class:`Runner` protocol (see :mod:`clipaudit.runtime`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

import pyarrow as pa

from clipaudit.batches.embed import Batch

if TYPE_CHECKING:
    from clipaudit.config import EmbedConfig, NeighboursConfig, TcacConfig
    from clipaudit.models import ResolvedModel
    from clipaudit.runtime import TopkSearch


class Runner(Protocol):
    """What the tcac stage needs from a scheduler (see :mod:`clipaudit.runtime`)."""

    def map_transformed(self, todo: pa.Table, model: ResolvedModel, tcac: TcacConfig,
                        embed: EmbedConfig) -> Iterator[Batch]:
        """Yield embedded (image, transform) batches for ``todo`` (image_id, uri, transforms)."""
        ...

    def map_texts(self, texts: pa.Table, models: dict[str, ResolvedModel], embed: EmbedConfig) -> Iterator[Batch]:
        """Yield batches of text vectors: ``vector_<slot>`` for each model slot, and ``status``."""
        ...

    def topk(self, neighbours: NeighboursConfig) -> TopkSearch:
        """Exact top-k searches (the caption pools), in-process or on Ray actors."""
        ...
