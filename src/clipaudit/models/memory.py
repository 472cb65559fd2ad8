"""Whether a model's weights fit where they are to be loaded, checked before a byte of them is read.

The weights' size is the size of their files (:func:`~clipaudit.models.provenance.provenance`'s ``weights``;
unknown for random weights, plug-ins and vector indexes, which are not checked). Loading reads them into host
memory in fp32 first, so the host needs about 1.2 times the files; a CUDA device then holds them in fp16, about
0.6 times the files (a checkpoint stored in fp16 needs less: the estimate errs on the side of loading).
"""

from __future__ import annotations

import os
from typing import Any

from clipaudit.errors import ClipauditError

from .base import is_cuda

HOST_FACTOR = 1.2
DEVICE_FACTOR = 0.6
GIB = 2**30


class ModelTooLargeError(ClipauditError, MemoryError):
    """A model whose weights cannot fit in the memory left where it is to be loaded."""


def weights_bytes(resolved: Any) -> int | None:
    """The total size of a :class:`~clipaudit.models.resolved.ResolvedModel`'s weight files, or None where it has
    none to measure."""
    describe = getattr(resolved.target, "describe", None)
    files = (describe(resolved) or {}).get("files") if callable(describe) else None
    sizes = [os.path.getsize(f) for f in files or [] if os.path.isfile(f)]
    return sum(sizes) if sizes else None


def host_available() -> int:
    """Bytes of host memory available now (psutil's ``available``: free plus reclaimable caches)."""
    import psutil

    return int(psutil.virtual_memory().available)


def device_available(device: str) -> int:
    """Bytes free on a CUDA device now."""
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return int(free)


def human(size: float) -> str:
    """A byte count as ``1.25 GiB`` or ``3.4 MiB``."""
    return f"{size / GIB:.2f} GiB" if size >= GIB else f"{size / 2**20:.1f} MiB"


def check_fits(resolved: Any, device: str) -> None:
    """ModelTooLargeError, with the figures, when the weights cannot fit in host memory (or on the CUDA device)."""
    size = weights_bytes(resolved)
    if size is None:
        return
    needs = [("host memory", HOST_FACTOR * size, host_available())]
    if is_cuda(device):
        needs.append((f"{device} memory", DEVICE_FACTOR * size, device_available(device)))
    for where, need, free in needs:
        if need > free:
            raise ModelTooLargeError(
                f"model {resolved.spec!r} does not fit: its weights are {human(size)}, loading them needs about "
                f"{human(need)} of {where} and {human(free)} is free; give its actors a "
                "larger node (embed.gpus_per_actor / a node type with more memory), an actor of its own "
                "(embed.actor_pools: per_model, when other models share its actors) or a smaller model")
