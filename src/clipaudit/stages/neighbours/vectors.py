"""One role's image ids and vectors in memory: the ids and spec of a model (and its L2-normalised vectors), a vector
column as a float32 matrix, unit-length rows, a role's rows in the order of an image set, and the images every role
embedded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.records import IMAGE_EMBEDDINGS
from clipaudit.stages.neighbours.slots import NeighboursError


@dataclass
class RoleIds:
    """One role's embedded image ids (string array, in table order) and its model spec."""

    role: str
    spec: str
    ids: pa.Array


@dataclass
class RoleVectors(RoleIds):
    """One role's image vectors: ``ids`` (string array) and their L2-normalised float32 rows, and the spec."""

    vectors: np.ndarray


def vector_matrix(column: pa.ChunkedArray | pa.Array, ids: pa.Array, table_name: str) -> np.ndarray:
    """A vector column as an ``(n, d)`` float32 array; NeighboursError naming the table on nulls or mixed sizes."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        first = ids[pc.index(pc.is_null(arr), True).as_py()].as_py()
        raise NeighboursError(f"{table_name}: {arr.null_count} image(s) have no vector (e.g. {first!r}): "
                              "re-run embed into a new run_dir")
    if pa.types.is_fixed_size_list(arr.type):
        dim = arr.type.list_size
    else:
        lengths = pc.list_value_length(arr)
        dims = pc.value_counts(lengths).to_pylist()
        if len(dims) > 1:
            dims.sort(key=lambda item: -item["counts"])
            odd = ids[pc.index(pc.not_equal(lengths, dims[0]["values"]), True).as_py()].as_py()
            found = ", ".join(f"{d['values']} ({d['counts']} rows)" for d in dims)
            raise NeighboursError(f"{table_name} holds vectors of mismatched dimensions: {found}, e.g. image "
                                  f"{odd!r}; every vector of a model must have one dimension: re-run embed "
                                  "into a new run_dir")
        dim = dims[0]["values"] if dims else 0
    values = np.ascontiguousarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    return (values if values.flags.writeable else values.copy()).reshape(len(arr), dim)


def normalise(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (zero rows stay zero), float32."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.where(norms > 0, norms, 1.0)).astype(np.float32, copy=False)


def normalise_in_place(vectors: np.ndarray) -> None:
    """Scale the rows of a float32 array to unit length in place (zero rows stay zero); same values as
    :func:`normalise`."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    np.divide(vectors, np.where(norms > 0, norms, 1.0), out=vectors)


def restrict(vectors: RoleVectors, image_ids: pa.Array) -> np.ndarray:
    """The role's rows in the order of ``image_ids`` (the role's own array, no copy, when that is its order);
    NeighboursError when it lacks some of them."""
    rows = pc.index_in(image_ids, value_set=vectors.ids)
    if rows.null_count:
        raise NeighboursError(f"{IMAGE_EMBEDDINGS[vectors.role]} lacks {rows.null_count} of the images asked for: "
                              "re-run the neighbours stage")
    index = rows.to_numpy(zero_copy_only=False)
    if len(index) == len(vectors.vectors) and np.array_equal(index, np.arange(len(index))):
        return vectors.vectors
    return vectors.vectors[index]


def common_ids(roles: Mapping[str, RoleIds]) -> pa.Array:
    """The image ids every role embedded, sorted (Arrow throughout: no Python object per id)."""
    common: pa.Array | None = None
    for role in roles.values():
        ids = role.ids.drop_null()
        common = ids if common is None else common.filter(pc.is_in(common, value_set=ids))
    if common is None:
        return pa.array([], pa.string())
    common = pc.unique(common).cast(pa.string())
    return common.take(pc.sort_indices(common))
