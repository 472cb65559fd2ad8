"""What a ``tcac_cases`` row depends on, as configured (its ``settings`` column): the tcac settings and the model's
preprocessing resize, the resolution its transform was applied at. Rows made with other settings are refused by
:mod:`clipaudit.stages.tcac.plan`, not mixed in."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clipaudit.config import TcacConfig
    from clipaudit.models import Preprocess


def settings_for(tcac: TcacConfig, transform: str, preprocess: Preprocess) -> str:
    """JSON of everything configured that a row of ``transform`` depends on (the ``settings`` column): the tcac
    settings and, under ``input``, the model's resize (the resolution the transform was applied at)."""
    from clipaudit.transforms.severities import graded_settings, is_graded

    params = graded_settings(transform) if is_graded(transform) else tcac.params.values(transform)
    return json.dumps({"seed": tcac.seed, "pool_neighbours": tcac.pool_neighbours, "top_k": tcac.top_k,
                       "params": params, "input": input_settings(preprocess)},
                      sort_keys=True)


def input_settings(preprocess: Preprocess) -> dict[str, Any]:
    """The fields of the model's preprocessing that fix the pixels a transform is applied to and cropped from."""

    return {"image_size": preprocess.image_size, "resize_size": preprocess.resize_size,
            "resize_mode": preprocess.resize_mode, "interpolation": preprocess.interpolation,
            "style": preprocess.style}
