"""One block product and the threshold filter that reduces it to the running top-k.

The product of two blocks (:class:`~clipaudit.knn.blocks._Block`; :meth:`_Buffer.product`, in reused storage)
gets -inf at padding, on the diagonal and at excluded pairs, and comes with the maxima of its row runs of
:data:`~clipaudit.knn.blocks.TILE` entries (and, for a self search, of its column runs of :data:`COL_TILE`): a
cheap vectorised pass. Each row keeps its current k-th best similarity (its bar); only the runs whose maximum
reaches it are gathered, in chunks of at most ``_CHUNK_ENTRIES`` entries, and looked at entry by entry
(:func:`_offer_rows`, :func:`_offer_cols`). Entries equal to a threshold always survive the filter, so ties at the
k-th place are resolved by index too. A full ``torch.topk`` over a block (or, cheaper, the k-th largest run
maximum) is needed only to seed the thresholds.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from clipaudit.knn.blocks import TILE, _Block
from clipaudit.knn.inputs import _torch

if TYPE_CHECKING:
    import torch

    from clipaudit.knn.running_topk import _Bar, _Running

COL_TILE = 16
"""Length of the column runs (a divisor of TILE): gathering a column run is strided."""

_CHUNK_ENTRIES = 2**22


class _Product:
    """A similarity block with the maxima of its row runs and column runs."""

    def __init__(self, s: torch.Tensor, row_max: torch.Tensor, col_max: torch.Tensor | None) -> None:
        self.s = s
        self.row_max = row_max
        self.col_max = col_max


class _Buffer:
    """Reused storage for a similarity block and its run maxima."""

    def __init__(self, size: int, dev: torch.device, dtype: torch.dtype) -> None:
        """Room for ``size`` similarities (the largest block: the first row block by the first column block)."""
        torch = _torch()
        self.flat = torch.empty(size, device=dev, dtype=dtype)
        self.row_flat = torch.empty(size // TILE, device=dev, dtype=dtype)
        self.col_flat = torch.empty(size // COL_TILE, device=dev, dtype=dtype)

    def product(
        self,
        rows: _Block,
        cols: _Block,
        *,
        diagonal: bool = False,
        exclude: tuple[torch.Tensor, torch.Tensor] | None = None,
        col_runs: bool = False,
    ) -> _Product:
        """``rows @ cols.T`` and its run maxima, with -inf at padding, on the
        diagonal if asked, and at the ``exclude`` (row, column) pairs."""
        torch = _torch()
        b, c = rows.padded, cols.padded
        s = self.flat[: b * c].view(b, c)
        torch.mm(rows.data, cols.data.t(), out=s)
        if cols.size < c:
            s[:, cols.size :] = -math.inf
        if rows.size < b:
            s[rows.size :] = -math.inf
        if diagonal:
            s.diagonal().fill_(-math.inf)
        if exclude is not None:
            s[exclude] = -math.inf
        row_max = self.row_flat[: b * c // TILE].view(b, c // TILE)
        torch.amax(s.view(b, c // TILE, TILE), dim=2, out=row_max)
        col_max = None
        if col_runs:
            col_max = self.col_flat[: b * c // COL_TILE].view(b // COL_TILE, c)
            torch.amax(s.view(b // COL_TILE, COL_TILE, c), dim=1, out=col_max)
        return _Product(s, row_max, col_max)


def _seed_thresholds(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th largest value of each row of ``s`` (-inf if it has fewer than k)."""
    torch = _torch()
    if k > s.shape[1]:
        return torch.full((s.shape[0],), -math.inf, dtype=torch.float32, device=s.device)
    return torch.topk(s, k, dim=1, sorted=False).values.amin(dim=1).to(torch.float32)


def _runs_kth(run_max: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """The k-th largest run maximum along ``dim`` (-inf if there are fewer than k runs): k distinct entries of
    the row (or column) reach it, so it is a lower bound of the row's k-th similarity."""
    torch = _torch()
    if k > run_max.shape[dim]:
        other = run_max.shape[1 - dim]
        return torch.full((other,), -math.inf, dtype=torch.float32, device=run_max.device)
    return torch.topk(run_max, k, dim=dim, sorted=False).values.amin(dim=dim).to(torch.float32)


def _offer_rows(state: _Running, prod: _Product, rows: _Block, cols: _Block, *, seed: str | None = None) -> None:
    """Merge the entries of the block that can enter their row's top-k.

    ``seed``: ``full`` raises the rows' bars to their k-th similarity in this block, ``runs`` to the k-th
    largest maximum of their runs (cheaper, a little lower); None leaves them as they are.
    Runs whose maximum reaches the row's bar are gathered, in chunks of rows
    holding at most ``_CHUNK_ENTRIES`` run entries, and checked entry by entry.
    """
    bar = state.bar(rows)
    if seed == "full":
        bar.raise_to(_seed_thresholds(prod.s, state.k))
    elif seed == "runs":
        bar.raise_to(_runs_kth(prod.row_max, state.k, dim=1))
    b, c = prod.s.shape
    runs = prod.s.view(b, c // TILE, TILE)
    hit = prod.row_max >= bar.thr[:, None]
    for lo, hi in _chunks(hit.sum(dim=1), _CHUNK_ENTRIES // TILE):
        r, t = hit[lo:hi].nonzero(as_tuple=True)
        r += lo
        runs_hit = runs[r, t]
        h, j = bar.screen(runs_hit, r)
        _admit(state, bar, r[h], t[h] * TILE + j + cols.start, runs_hit[h, j], rows.start)


def _offer_cols(state: _Running, prod: _Product, rows: _Block, cols: _Block, *, seed: bool = False) -> None:
    """Merge the entries of the block that can enter their column's top-k (``seed``: first raise the columns'
    bars to the k-th largest maximum of their runs)."""
    bar = state.bar(cols)
    if seed:
        bar.raise_to(_runs_kth(prod.col_max, state.k, dim=0))
    b, c = prod.s.shape
    runs = prod.s.view(b // COL_TILE, COL_TILE, c)
    hit = prod.col_max >= bar.thr[None, :]
    for lo, hi in _chunks(hit.sum(dim=0), _CHUNK_ENTRIES // COL_TILE):
        col, t = hit[:, lo:hi].t().nonzero(as_tuple=True)
        col += lo
        runs_hit = runs[t, :, col]
        h, j = bar.screen(runs_hit, col)
        _admit(state, bar, col[h], t[h] * COL_TILE + j + rows.start, runs_hit[h, j], cols.start)


def _admit(state: _Running, bar: _Bar, owner: torch.Tensor, ids: torch.Tensor, vals: torch.Tensor, base: int) -> None:
    """Merge the screened candidates of block-local rows ``owner`` that clear the bar."""
    keep = bar.admit(vals, ids, owner)
    state.merge(owner[keep] + base, ids[keep], vals[keep])


def _chunks(hits: torch.Tensor, limit: int) -> list[tuple[int, int]]:
    """Split ``range(len(hits))`` into consecutive spans of at most ``limit``
    total hits (a single index may exceed it)."""
    total = int(hits.sum())
    n = hits.numel()
    if total <= limit:
        return [(0, n)]
    ends = _torch().cumsum(hits, 0).cpu().numpy()
    spans, lo = [], 0
    while lo < n:
        base = ends[lo - 1] if lo else 0
        hi = max(int(np.searchsorted(ends, base + limit, side="right")), lo + 1)
        spans.append((lo, hi))
        lo = hi
    return spans


def _excluded_pairs(excl: torch.Tensor, rows: _Block, cols: _Block) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-local (row, column) of the excluded indices that fall in ``cols``."""
    local = excl[rows.start : rows.stop]
    r = ((local >= cols.start) & (local < cols.stop)).nonzero().squeeze(1)
    return r, local[r] - cols.start
