"""What a loaded model offers the embed stage, and the torch plumbing the backends share.

Nothing here imports torch at module import; the helpers import it when called.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch

ROLES = ("clip", "reference")


@runtime_checkable
class LoadedModel(Protocol):
    """A model with its weights in memory, made by ``ResolvedModel.load`` (once per actor).

    Attributes:
        spec: the spec it was loaded from.
        dim: the embedding dimension.
        device: where it runs (``"cpu"``, ``"cuda"``, ``"cuda:1"``...).
        logit_scale: CLIP role only: the exponent of the learned logit scale (about 100 for real CLIP);
            ``nan`` for image-only models.
        logit_bias: optional: the learnt bias of a sigmoid-scored model (SigLIP: scores are
            ``sigmoid(logit_scale * cos + logit_bias)`` per caption); absent or ``nan`` for softmax models.
    """

    spec: str
    dim: int
    device: str
    logit_scale: float

    def encode_images(self, pixels: np.ndarray) -> np.ndarray:
        """A batch of ``Preprocess`` outputs stacked on axis 0 -> (n, dim) float32, rows L2-normalised."""
        ...

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """CLIP role only: texts -> (n, dim) float32, rows L2-normalised."""
        ...


def l2_normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32; an all-zero row stays zero."""
    out = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(out, axis=1, keepdims=True)
    return (out / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)


def is_cuda(device: str) -> bool:
    """True for ``cuda`` and ``cuda:N``."""
    return str(device).startswith("cuda")


def prepare_module(module: Any, device: str) -> Any:
    """Eval mode, no gradients, moved to ``device``: fp16 on CUDA, fp32 elsewhere."""
    import torch

    module.eval()
    module.requires_grad_(False)
    dtype = torch.float16 if is_cuda(device) else torch.float32
    return module.to(device=device, dtype=dtype)


def batch_to_device(array: np.ndarray, device: str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A numpy batch as a tensor on ``device``: pinned memory and a non-blocking copy for CUDA."""
    import torch

    tensor = torch.from_numpy(np.ascontiguousarray(array))
    if is_cuda(device):
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    elif str(device) != "cpu":
        tensor = tensor.to(device)
    if dtype is not None and tensor.is_floating_point():
        tensor = tensor.to(dtype)
    return tensor


def tensor_to_unit_rows(tensor: torch.Tensor) -> np.ndarray:
    """Model outputs -> float32 numpy rows of unit L2 norm (normalised in fp32)."""
    import torch

    out = torch.nn.functional.normalize(tensor.float(), dim=-1)
    return out.cpu().numpy().astype(np.float32, copy=False)


def encode_pixels(pixels: np.ndarray, shape: tuple[int, ...], spec: str, dim: int, device: str, dtype: Any,
                  forward: Callable[[Any], Any]) -> np.ndarray:
    """What every backend's ``encode_images`` does around its forward: check the batch's shape (``check_pixels``),
    move it to ``device`` in ``dtype`` (pinned memory on CUDA), run ``forward`` without gradients, and return
    float32 unit rows; ``(0, dim)`` for an empty batch."""
    import torch

    check_pixels(pixels, shape, spec)
    if len(pixels) == 0:
        return empty_rows(dim)
    with torch.inference_mode():
        return tensor_to_unit_rows(forward(batch_to_device(pixels, device, dtype)))


def module_dtype(module: Any) -> torch.dtype:
    """The floating dtype of a module's first parameter."""
    return next(module.parameters()).dtype


def empty_rows(dim: int) -> np.ndarray:
    """A (0, dim) float32 array: the answer to an empty batch."""
    return np.zeros((0, dim), dtype=np.float32)


def check_pixels(pixels: np.ndarray, shape: tuple[int, ...], spec: str) -> None:
    """A clear error when a batch is not ``Preprocess`` outputs stacked (n, *shape)."""
    if not isinstance(pixels, np.ndarray) or pixels.ndim != len(shape) + 1 or tuple(pixels.shape[1:]) != shape:
        got = getattr(pixels, "shape", type(pixels).__name__)
        raise ValueError(f"{spec}: expected a batch of shape (n, {', '.join(map(str, shape))}), got {got}")


def finite_float(value: Any) -> float:
    """``float(value)`` when finite, else ValueError."""
    out = float(value)
    if not math.isfinite(out):
        raise ValueError(f"not a finite number: {value!r}")
    return out
