"""The resolved model: what a spec named, checked on the driver, small and picklable, loaded once per actor.

The registry (:mod:`clipaudit.models.registry`) makes it; each backend's target knows how to load itself, so this
module knows no backend.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from .base import LoadedModel, is_cuda
from .memory import check_fits
from .preprocess import Preprocess

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedModel:
    """A model named, checked and described on the driver; small and picklable (sent to Ray actors).

    Attributes:
        spec: the spec actually used (``tiny-clip`` after a fallback).
        requested_spec: the spec the configuration asked for.
        role: ``clip`` or ``reference``.
        preprocess: what ``encode_images`` expects: ``preprocess(image)`` outputs stacked on axis 0.
        is_random: True for random weights (tiny models, ``random`` architectures, fallbacks): the findings
            are meaningless.
        dim: the embedding dimension when known without loading (None for ``python:`` plug-ins).
        cache_dir: where weights are looked up (a Hugging Face hub cache directory); None: the default.
        target: backend-specific description of what to load, with its ``load(resolved, device)``.
    """

    spec: str
    requested_spec: str
    role: str
    preprocess: Preprocess
    is_random: bool
    dim: int | None = None
    cache_dir: str | None = None
    target: Any = field(default=None, repr=False)

    def load(self, device: str = "cpu") -> LoadedModel:
        """Build or load the weights on ``device`` (``cpu``, ``cuda``, ``cuda:N``); call once per actor.

        On CUDA the model runs in fp16; outputs are always float32 numpy arrays with unit rows.
        Raises ModelUnavailableError when the weights cannot be had on this machine, and
        :class:`~clipaudit.models.memory.ModelTooLargeError` (before reading them) when they cannot fit.
        """
        if is_cuda(device):
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"{self.spec}: device {device!r} requested but CUDA is not available")
        start = time.perf_counter()
        if not callable(getattr(self.target, "load", None)):
            raise TypeError(f"{self.spec}: nothing to load (make ResolvedModel with resolve_model)")
        check_fits(self, device)
        model: LoadedModel = self.target.load(self, device)
        if self.dim is not None and model.dim != self.dim:
            raise RuntimeError(f"{self.spec}: loaded a model of dimension {model.dim}, expected {self.dim}")
        logger.info("loaded %s (%s, dim %d) on %s in %.1f s", self.spec, self.role, model.dim, device,
                    time.perf_counter() - start)
        return model
