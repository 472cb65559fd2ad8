"""Reading one model's rows of a role's embedding table (``image_embeddings_clip`` / ``image_embeddings_reference``):
its image ids, and its vectors chunk by chunk into one preallocated float32 matrix, checked (nulls, non-finite
values, mismatched dimensions, several models) and normalised in place; a table of variable-size vectors whose
lengths differ is read whole to name them. :func:`clipaudit.stages.neighbours.load_vectors` puts these together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.io.tables import sql_string
from clipaudit.records import CLIP_MODEL, IMAGE_EMBEDDINGS, REFERENCE_MODEL
from clipaudit.stages.neighbours.slots import NeighboursError
from clipaudit.stages.neighbours.vectors import RoleIds, normalise_in_place, vector_matrix

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables


def embedding_dataset(tables: RunTables, role: str):
    """The lance dataset of one role's embeddings; NeighboursError when it is missing or empty."""
    name = IMAGE_EMBEDDINGS[role]
    dataset = tables.db.open_table(name).to_lance() if tables.exists(name) else None
    if dataset is None or dataset.count_rows() == 0:
        raise NeighboursError(f"no embeddings for the {role} role (table {name} in {tables.uri} is missing or "
                              "empty): run embed first")
    return dataset


def _one_spec(specs: set[str], name: str) -> str:
    """The one model spec of a table; NeighboursError when it holds several."""
    if len(specs) != 1:
        raise NeighboursError(f"{name} holds vectors of several models {sorted(specs)}: use one run_dir per model")
    return next(iter(specs))


def _spec_column(role: str) -> str:
    return CLIP_MODEL if role == "clip" else REFERENCE_MODEL


def _scoped(dataset, role: str, spec: str | None) -> bool:
    """Whether one model's rows are picked out of the role's table by its spec column (False: the table is read
    whole: no spec asked for, or a table written without the column, by an older clipaudit, which holds one
    model)."""
    return bool(spec) and _spec_column(role) in dataset.schema.names


def _model_rows(dataset, role: str, spec: str | None) -> tuple[pa.Table, np.ndarray | None]:
    """The ``image_id`` and ``model`` columns of one model's rows, and their row positions in the dataset (None:
    every row). A role's table holds one model's rows per ``clip_model`` / ``reference_model``."""
    if not _scoped(dataset, role, spec):
        return dataset.to_table(columns=["image_id", "model"]), None
    column = _spec_column(role)
    keys = dataset.to_table(columns=["image_id", "model", column])
    positions = np.flatnonzero(pc.equal(keys.column(column), spec).to_numpy(zero_copy_only=False))
    if len(positions) == 0:
        raise NeighboursError(f"no embeddings of {role} model {spec!r} in {IMAGE_EMBEDDINGS[role]}: run embed first "
                              f"(with every model of models.{role})")
    return keys.take(pa.array(positions)).select(["image_id", "model"]), positions


def load_ids(tables: RunTables, role: str, spec: str | None = None) -> RoleIds:
    """One model's image ids and spec, without its vectors (errors as :func:`load_vectors`); ``spec`` picks the
    model of the role (None: the table's only one)."""
    name = IMAGE_EMBEDDINGS[role]
    table, _ = _model_rows(embedding_dataset(tables, role), role, spec)
    spec = _one_spec(set(pc.unique(table.column("model")).to_pylist()), name)
    return RoleIds(role, spec, table.column("image_id").combine_chunks())


@dataclass
class _LoadProblems:
    """What reading a role's vectors found wrong, raised once the whole table has been seen (nulls first)."""

    nulls: int = 0
    first_null: str | None = None
    first_non_finite: str | None = None

    def raise_any(self, name: str) -> None:
        """NeighboursError for the first kind of problem found, naming the first image that has it."""
        if self.nulls:
            raise NeighboursError(f"{name}: {self.nulls} image(s) have no vector (e.g. {self.first_null!r}): "
                                  "re-run embed into a new run_dir")
        if self.first_non_finite is not None:
            raise NeighboursError(f"{name}: non-finite values in the vector of {self.first_non_finite!r}")


def _check_finite(vectors: np.ndarray, ids: pa.Array, problems: _LoadProblems) -> None:
    """Note the first image of ``ids`` whose row of ``vectors`` has a NaN or an infinity."""
    finite = np.isfinite(vectors).all(axis=1)
    if problems.first_non_finite is None and not finite.all():
        problems.first_non_finite = ids[int(np.flatnonzero(~finite)[0])].as_py()


class Ragged(Exception):
    """Vectors of one model with different lengths: read the table whole to name them (:func:`read_whole`)."""


def _fill_chunk(out: np.ndarray, column: pa.Array, ids: pa.Array, problems: _LoadProblems) -> None:
    """Copy one chunk's vectors (of images ``ids``) into ``out``, its rows of the matrix, checked and normalised
    in place; :class:`Ragged` when a variable-size vector has another length than ``out``'s rows."""
    if column.null_count:
        if problems.first_null is None:
            problems.first_null = ids[pc.index(pc.is_null(column), True).as_py()].as_py()
        problems.nulls += column.null_count
    if problems.nulls:
        return
    if not pa.types.is_fixed_size_list(column.type) and not pc.all(
            pc.equal(pc.list_value_length(column), out.shape[1])).as_py():
        raise Ragged
    out[:] = column.flatten().to_numpy(zero_copy_only=False).reshape(out.shape)
    _check_finite(out, ids, problems)
    normalise_in_place(out)


def read_chunked(dataset, name: str, dim: int | None, role: str, spec: str | None,
                 chunk_bytes: int) -> tuple[pa.Array, str, np.ndarray]:
    """Read one model's vectors chunk by chunk (``take`` of row ranges, whose buffers are freed after each chunk)
    into one preallocated float32 array, normalised in place, about ``chunk_bytes`` of vectors per ``take``
    (:data:`clipaudit.stages.neighbours.READ_CHUNK_BYTES`): ``(ids, spec, vectors)``; NeighboursError on several
    specs, null or non-finite vectors. ``dim`` None (variable-size vectors): the first vector's length, and
    :class:`Ragged` when another differs."""
    keys, positions = _model_rows(dataset, role, spec)
    resolved = _one_spec(set(pc.unique(keys.column("model")).to_pylist()), name)
    ids = keys.column("image_id").combine_chunks()
    if dim is None:
        first = dataset.take([0 if positions is None else int(positions[0])], columns=["vector"]).column("vector")
        dim = len(first[0].as_py() or [])
    vectors = np.empty((len(ids), dim), dtype=np.float32)
    step = max(1, chunk_bytes // max(1, 4 * dim))
    problems = _LoadProblems()
    for lo in range(0, len(ids), step):
        hi = min(lo + step, len(ids))
        rows = np.arange(lo, hi) if positions is None else positions[lo:hi]
        column = dataset.take(rows, columns=["vector"]).column("vector").combine_chunks()
        _fill_chunk(vectors[lo:hi], column, ids[lo:hi], problems)
    problems.raise_any(name)
    return ids, resolved, vectors


def read_whole(dataset, name: str, role: str, spec: str | None) -> tuple[pa.Array, str, np.ndarray]:
    """``(ids, spec, vectors)`` of one model in a table whose vectors are variable-size lists, read whole, to name
    mismatched dimensions; NeighboursError on several specs, null, mismatched or non-finite vectors."""
    where = f"{_spec_column(role)} = {sql_string(spec)}" if _scoped(dataset, role, spec) else None
    table = dataset.to_table(columns=["image_id", "model", "vector"], filter=where)
    if table.num_rows == 0:
        raise NeighboursError(f"no embeddings of {role} model {spec!r} in {name}: run embed first (with every "
                              f"model of models.{role})")
    ids = table.column("image_id").combine_chunks()
    resolved = _one_spec(set(pc.unique(table.column("model")).to_pylist()), name)
    vectors = vector_matrix(table.column("vector"), ids, name)
    problems = _LoadProblems()
    _check_finite(vectors, ids, problems)
    problems.raise_any(name)
    normalise_in_place(vectors)
    return ids, resolved, vectors
