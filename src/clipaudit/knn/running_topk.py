"""The running top-k of every row, and the one key that orders candidates.

Each row keeps its best k ``(similarity, index)`` so far (:class:`_Running`), merged and sorted by a single int64
key built from the similarity's order-preserving bit pattern and the index (:func:`_keys`): similarity
descending, ties broken by the smaller index, independently of how ``torch.topk`` orders equal values. The k-th
entry is the row's bar (:class:`_Bar`): a candidate that does not clear it can never enter the row's top-k.
:func:`merge_topk` combines two partial results of the same rows (the shares of a distributed search) by the
same key.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.knn.inputs import _torch

if TYPE_CHECKING:
    import torch

    from clipaudit.knn.blocks import _Block

_SENTINEL_ID = 2**31 - 1
_LOW_BITS = 2**32 - 1
_NARROW = 64


class _Running:
    """Running top-k (similarity, index) of every row, sorted by :func:`_keys`."""

    def __init__(self, n: int, k: int, dev: torch.device) -> None:
        torch = _torch()
        self.k = k
        self.vals = torch.full((n, k), -math.inf, dtype=torch.float32, device=dev)
        self.ids = torch.full((n, k), _SENTINEL_ID, dtype=torch.int64, device=dev)

    def bar(self, blk: _Block) -> _Bar:
        """The k-th (similarity, index) of the block's rows; padding rows get
        +inf so that they take no candidates."""
        torch = _torch()
        dev = self.vals.device
        thr = torch.full((blk.padded,), math.inf, dtype=torch.float32, device=dev)
        kth = torch.full((blk.padded,), _SENTINEL_ID, dtype=torch.int64, device=dev)
        thr[: blk.size] = self.vals[blk.start : blk.stop, self.k - 1]
        kth[: blk.size] = self.ids[blk.start : blk.stop, self.k - 1]
        return _Bar(thr, kth)

    def merge(self, rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor) -> None:
        """Merge candidates ``(rows[j], ids[j], vals[j])``: global row indices
        in ascending order, global ids, similarities.

        Rows are padded to the widest row's candidate count before one top-k,
        so rows are grouped by count (up to ``_NARROW``, then powers of two) to
        keep the padding below twice the candidates.
        """
        if rows.numel() == 0:
            return
        torch = _torch()
        urows, counts = torch.unique_consecutive(rows, return_counts=True)
        if int(counts.max()) <= _NARROW:
            self._merge_padded(urows, counts, rows, ids, vals)
            return
        group = torch.where(counts <= _NARROW, 0, torch.ceil(torch.log2(counts.double())).long())
        entry_group = torch.repeat_interleave(group, counts)
        for g in torch.unique(group).tolist():
            keep = entry_group == g
            sel = group == g
            self._merge_padded(urows[sel], counts[sel], rows[keep], ids[keep], vals[keep])

    def _merge_padded(
        self, urows: torch.Tensor, counts: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor
    ) -> None:
        """Merge the candidates of rows ``urows`` (``counts`` each, in ``rows``
        order) with one top-k over the running entries and the candidates."""
        torch = _torch()
        k = self.k
        dev = rows.device
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.repeat_interleave(torch.arange(urows.numel(), device=dev), counts)
        pos = torch.arange(rows.numel(), device=dev) - starts[slot] + k
        width = k + int(counts.max())
        cand_v = torch.full((urows.numel(), width), -math.inf, dtype=torch.float32, device=dev)
        cand_i = torch.full((urows.numel(), width), _SENTINEL_ID, dtype=torch.int64, device=dev)
        cand_v[:, :k] = self.vals[urows]
        cand_i[:, :k] = self.ids[urows]
        cand_v[slot, pos] = vals.to(torch.float32)
        cand_i[slot, pos] = ids
        order = torch.topk(_keys(cand_v, cand_i), k, dim=1).indices
        self.vals[urows] = cand_v.gather(1, order)
        self.ids[urows] = cand_i.gather(1, order)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(ids, sims)`` as numpy arrays on the host."""
        return self.ids.cpu().numpy(), self.vals.cpu().numpy()


class _Bar:
    """Per-row entry bar: a candidate ``(v, id)`` can still enter a row's
    top-k only if ``v > thr`` or ``v == thr and id < kth``."""

    def __init__(self, thr: torch.Tensor, kth: torch.Tensor) -> None:
        self.thr = thr
        self.kth = kth

    def raise_to(self, thr: torch.Tensor) -> None:
        """Raise the bar to at least ``thr`` (ties at a raised bar all pass)."""
        torch = _torch()
        raised = thr > self.thr
        self.thr = torch.where(raised, thr, self.thr)
        self.kth = torch.where(raised, _SENTINEL_ID, self.kth)

    def screen(self, vals: torch.Tensor, owner: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions ``(h, j)`` in ``vals`` (runs of row ``owner[h]``) that
        reach the bar's similarity; the index test is left to :meth:`admit`."""
        return (vals >= self.thr[owner, None]).nonzero(as_tuple=True)

    def admit(self, vals: torch.Tensor, ids: torch.Tensor, owner: torch.Tensor) -> torch.Tensor:
        """Mask of finite screened candidates that clear the bar of ``owner``."""
        thr = self.thr[owner]
        return ((vals > thr) | (ids < self.kth[owner])) & (vals > -math.inf)


def _keys(vals: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """int64 keys ordering (similarity descending, index ascending) as descending.

    The high 32 bits are the float32 bit pattern made monotone in the value
    (negative floats have their magnitude bits flipped; ``+ 0.0`` folds -0.0
    onto 0.0), the low 32 bits are ``2**32 - 1 - index``.
    """
    torch = _torch()
    bits = (vals + 0.0).view(torch.int32).to(torch.int64)
    bits = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    return (bits << 32) | (_LOW_BITS - ids)


def merge_topk(
    a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], k: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k of two partial results ``(ids, sims)`` of the same rows: similarity descending, ties by
    smaller id; ``k`` defaults to the width of ``a``. The two must not both hold the same (row, id)."""
    torch = _torch()
    ids = torch.from_numpy(np.concatenate([a[0], b[0]], axis=1).astype(np.int64, copy=False))
    vals = torch.from_numpy(np.concatenate([a[1], b[1]], axis=1).astype(np.float32, copy=False))
    width = a[0].shape[1] if k is None else k
    order = torch.topk(_keys(vals, ids), width, dim=1).indices
    return ids.gather(1, order).numpy(), vals.gather(1, order).numpy()
