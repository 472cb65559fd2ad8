"""Loaded transformers models behind the :class:`~clipaudit.models.base.LoadedModel` interface: pixels and texts
in, unit float32 rows out, as each family's own library computes them (see :mod:`.hf_families`).

On CUDA the weights are fp16 and batches travel through pinned memory; on the CPU everything is fp32.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .base import (
    batch_to_device,
    empty_rows,
    encode_pixels,
    module_dtype,
    prepare_module,
    tensor_to_unit_rows,
)
from .hf_families import Family
from .preprocess import Preprocess


def pooled(output: Any, pooling: str) -> Any:
    """One vector per image from an image encoder's output: ``pooler_output``, the first token, or the token mean
    of ``last_hidden_state``."""
    if pooling == "pooler":
        if getattr(output, "pooler_output", None) is None:
            raise ValueError("the model has no pooler_output: state a pooling ('#cls' or '#mean')")
        return output.pooler_output
    hidden = output.last_hidden_state
    if hidden.ndim == 4:
        return hidden.flatten(2).mean(-1)
    return hidden[:, 0] if pooling == "cls" else hidden.mean(1)


def features(output: Any) -> Any:
    """``get_image_features`` / ``get_text_features`` output as a tensor (transformers 5 wraps it in an output
    whose ``pooler_output`` is the projected embedding)."""
    return output if hasattr(output, "ndim") else output.pooler_output


class HfImageEncoder:
    """An image encoder (DINOv2, DINOv3, I-JEPA, AIMv2, any ``AutoModel``): ``pooling`` of its output,
    L2-normalised."""

    logit_scale: float = float("nan")

    def __init__(self, spec: str, model: Any, device: str, preprocess: Preprocess, pooling: str,
                 dim: int | None = None) -> None:
        self.spec = spec
        self.device = str(device)
        self.pooling = pooling
        self._model = prepare_module(model, self.device)
        self._dtype = module_dtype(self._model)
        self._shape = preprocess.output_shape
        self.dim = int(dim or 0)
        if not self.dim:
            self.dim = int(self.encode_images(np.zeros((1, *self._shape), np.float32)).shape[1])

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 -> (n, dim) float32, unit rows."""
        return encode_pixels(pixels, self._shape, self.spec, self.dim, self.device, self._dtype,
                             lambda batch: pooled(self._model(pixel_values=batch), self.pooling))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """An image encoder has no text tower: always TypeError."""
        raise TypeError(f"{self.spec} is an image-only model: it cannot encode texts")


def logit_scale_of(model: Any, family: Family) -> float:
    """The factor cosine similarities are multiplied by before the softmax (or sigmoid): ``exp(logit_scale)``,
    or ``1 / temperature`` for a family whose model divides by a temperature (ALIGN)."""
    import torch

    with torch.inference_mode():
        if family.scale == "temperature":
            return 1.0 / float(model.temperature.detach().float().item())
        return float(model.logit_scale.detach().float().exp().item())


class HfDualEncoder:
    """An image-text dual encoder (CLIP, SigLIP, MetaCLIP 2, ALIGN): image and text features, L2-normalised;
    texts tokenised as the family's processor does (:meth:`tokenize`); of the tensors it returns, those the family's
    model takes (``input_ids``, and ``attention_mask`` / ``token_type_ids`` where the tokenizer gives them) are
    passed on as they are."""

    def __init__(self, spec: str, model: Any, tokenizer: Any, device: str, preprocess: Preprocess,
                 family: Family) -> None:
        import torch

        self.spec = spec
        self.device = str(device)
        self.family = family
        self.dim = int(model.config.projection_dim if hasattr(model.config, "projection_dim")
                       else model.config.vision_config.hidden_size)
        self.logit_scale = logit_scale_of(model, family)
        with torch.inference_mode():
            bias = getattr(model, "logit_bias", None)
            self.logit_bias = float(bias.detach().float().reshape(-1)[0].item()) if bias is not None else math.nan
        self._context = int(model.config.text_config.max_position_embeddings)
        self._lower = type(tokenizer).__name__.startswith("Gemma")
        self._model = prepare_module(model, self.device)
        self._dtype = module_dtype(self._model)
        self._tokenizer = tokenizer
        self.vocab_size = len(tokenizer)
        self._shape = preprocess.output_shape

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        """The token tensors of ``texts`` as the family's processor makes them: padded to the longest text, or to
        ``max_length`` (SigLIP, ALIGN: 64), truncated to the context (or to ``max_length``); lower-cased for a Gemma
        tokenizer (SigLIP 2)."""
        if self._lower:
            texts = [text.lower() for text in texts]
        if self.family.text_padding == "max_length":
            length = min(self.family.text_length or self._context, self._context)
            return self._tokenizer(list(texts), padding="max_length", truncation=True, max_length=length,
                                   return_tensors="pt")
        return self._tokenizer(list(texts), padding=True, truncation=True, max_length=self._context,
                               return_tensors="pt")

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """(n, 3, S, S) float32 -> (n, dim) float32, unit rows."""
        return encode_pixels(pixels, self._shape, self.spec, self.dim, self.device, self._dtype,
                             lambda batch: features(self._model.get_image_features(pixel_values=batch)))

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Texts -> (n, dim) float32, unit rows."""
        import torch

        if len(texts) == 0:
            return empty_rows(self.dim)
        tokens = self.tokenize(list(texts))
        with torch.inference_mode():
            inputs = {k: batch_to_device(v.numpy(), self.device) for k, v in tokens.items()
                      if k in self.family.text_inputs}
            return tensor_to_unit_rows(features(self._model.get_text_features(**inputs)))
