"""The LanceDB database under ``run_dir/lancedb``: every stage reads and writes its tables through here.

Writes are idempotent: :meth:`RunTables.insert_new` inserts only rows whose key is not yet present
(LanceDB ``merge_insert``), so a re-run or a resumed run never duplicates a row.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.errors import ClipauditError
from clipaudit.io import fs


def quiet_lance_logs() -> None:
    """Keep lance's and LanceDB's Rust loggers to errors (they warn ``No existing dataset ... it will be created``
    for every new table); the variables are read once, when the library is imported. A value already set wins."""
    os.environ.setdefault("LANCE_LOG", "error")
    os.environ.setdefault("LANCEDB_LOG", "error")


class RunTables:
    """The tables of one run directory."""

    tag = ""
    """Names a CLIP-role model in the files a stage writes beside the tables; empty for the whole run (see
    :attr:`ModelTables.tag`)."""

    def __init__(self, run_dir: str) -> None:
        quiet_lance_logs()
        import lancedb

        self.run_dir = run_dir
        self.uri = fs.join(run_dir, "lancedb")
        self.db = lancedb.connect(self.uri)

    def names(self) -> set[str]:
        """Names of the tables that exist."""
        return set(self.db.list_tables(limit=10_000).tables)

    def exists(self, name: str) -> bool:
        """Whether table ``name`` exists."""
        return name in self.names()

    def read(self, name: str, columns: Sequence[str] | None = None, where: str | None = None,
             version: int | str | None = None) -> pa.Table | None:
        """Read a table (optionally some columns, optionally filtered by a SQL predicate); None if it does not exist.

        ``version``: a table version number or a tag (a run id, see :mod:`clipaudit.runs`) to read the table as it
        was then; None also when the table has no such tag (it did not exist when that run finished).
        """
        if not self.exists(name):
            return None
        dataset = self.db.open_table(name).to_lance()
        if version is not None:
            if isinstance(version, str) and version not in self.tags(name):
                return None
            dataset = dataset.checkout_version(version)
        return dataset.to_table(columns=list(columns) if columns else None, filter=where)

    def versions(self) -> dict[str, int]:
        """The current version of every table."""
        return {name: int(self.db.open_table(name).version) for name in sorted(self.names())}

    def tags(self, name: str) -> dict[str, int]:
        """The tags of table ``name`` and the versions they point at (empty if the table does not exist)."""
        if not self.exists(name):
            return {}
        return {tag: int(info["version"]) for tag, info in self.db.open_table(name).tags.list().items()}

    def tag_all(self, tag: str) -> dict[str, int]:
        """Tag the current version of every table with ``tag`` (moved if it exists); returns the tagged versions.

        Tags are letters, digits, ``.``, ``-`` and ``_``; a tagged version survives version clean-up.
        """
        tagged = {}
        for name in sorted(self.names()):
            table = self.db.open_table(name)
            version = int(table.version)
            if tag in table.tags.list():
                table.tags.update(tag, version)
            else:
                table.tags.create(tag, version)
            tagged[name] = version
        return tagged

    def count(self, name: str) -> int:
        """Rows in a table (0 if it does not exist)."""
        return self.db.open_table(name).count_rows() if self.exists(name) else 0

    def insert_new(self, name: str, rows: pa.Table, key: str | Sequence[str], schema: pa.Schema) -> int:
        """Insert the rows whose ``key`` is not in the table yet; create the table if needed. Returns rows inserted."""
        keys = [key] if isinstance(key, str) else list(key)
        rows = _dedupe(rows.select(schema.names).cast(schema), keys)
        if not self.exists(name):
            self.db.create_table(name, data=rows if rows.num_rows else None, schema=schema)
            return rows.num_rows
        if rows.num_rows == 0:
            return 0
        table = self.db.open_table(name)
        before = table.count_rows()
        table.merge_insert(keys if len(keys) > 1 else keys[0]).when_not_matched_insert_all().execute(rows)
        return table.count_rows() - before

    def replace(self, name: str, rows: pa.Table, schema: pa.Schema) -> None:
        """Overwrite a table with ``rows`` (for stages whose output is recomputed as a whole)."""
        self.db.create_table(name, data=rows.select(schema.names).cast(schema), schema=schema, mode="overwrite")

    def replace_where(self, name: str, rows: pa.Table, schema: pa.Schema, where: str) -> None:
        """Replace the rows of ``name`` matching the SQL predicate ``where`` with ``rows`` (the others stay); the
        table is created when missing. Two commits (delete, add): a run killed between them recomputes the rows."""
        rows = rows.select(schema.names).cast(schema)
        if not self.exists(name):
            self.db.create_table(name, data=rows if rows.num_rows else None, schema=schema)
            return
        table = self.db.open_table(name)
        table.delete(where)
        if rows.num_rows:
            table.add(rows)

    def delete(self, name: str, where: str) -> int:
        """Delete the rows of ``name`` matching the SQL predicate ``where``; returns how many (0 without the table)."""
        if not self.exists(name):
            return 0
        table = self.db.open_table(name)
        before = table.count_rows()
        table.delete(where)
        return before - table.count_rows()

    def scope_filter(self, name: str) -> str | None:
        """None: every row of a table is this object's (see :meth:`ModelTables.scope_filter`)."""
        return None

    def positions(self, name: str) -> np.ndarray | None:
        """None: every row of a table is this object's (see :meth:`ModelTables.positions`)."""
        return None

    def rewrite(self, name: str, batches: pa.RecordBatchReader) -> None:
        """Overwrite table ``name`` with the streamed ``batches`` (their schema is the table's)."""
        self.db.create_table(name, data=batches, schema=batches.schema, mode="overwrite")

    def for_clip_model(self, clip_model: str, tag: str = "") -> ModelTables:
        """The tables as the audit of one CLIP-role model sees them (see :class:`ModelTables`)."""
        return ModelTables(self, clip_model, tag)

    def has_column(self, name: str, column: str) -> bool:
        """Whether table ``name`` exists and has ``column``."""
        return self.exists(name) and column in self.db.open_table(name).schema.names


def sql_string(value: str) -> str:
    """``value`` as a SQL string literal (quotes doubled)."""
    return "'" + value.replace("'", "''") + "'"


class ModelTables:
    """The run's tables as the audit of one CLIP-role model sees them.

    With several CLIP-role models in one run (``models.clip`` a list), every table of CLIP-role results
    (:data:`~clipaudit.records.CLIP_SCOPED`) holds the rows of all of them, told apart by the ``clip_model`` column
    (the spec as written in the config), which is part of each such table's key. Through this view a per-model
    stage reads only its model's rows (and the rows shared by every model, whose ``clip_model`` is empty: the
    reference role's neighbour lists), without the ``clip_model`` column, and writes only its model's rows (the
    column added, the key extended), so the stage's code is the same for one model or many. Other tables pass
    through unchanged. A table written without the column (one model, by an older clipaudit) is read whole.
    """

    def __init__(self, tables: RunTables, clip_model: str, tag: str = "") -> None:
        self.base = tables
        self.clip_model = clip_model
        self.tag = tag
        """Names this model in the files a stage writes beside the tables (the LLM prompts of a dry run) when the
        run audits several models; empty for a run of one."""
        self.run_dir, self.uri, self.db = tables.run_dir, tables.uri, tables.db

    def for_clip_model(self, clip_model: str, tag: str = "") -> ModelTables:
        """The same view (for this model) or a view of the same tables for another one."""
        if clip_model == self.clip_model and tag in ("", self.tag):
            return self
        return ModelTables(self.base, clip_model, tag)

    def scope_filter(self, name: str) -> str | None:
        """The SQL predicate selecting this model's rows of table ``name`` (None: the table is not scoped, or has
        no ``clip_model`` column)."""
        from clipaudit.records import CLIP_MODEL, CLIP_SCOPED

        if name not in CLIP_SCOPED or not self.base.has_column(name, CLIP_MODEL):
            return None
        return f"({CLIP_MODEL} = {sql_string(self.clip_model)} OR {CLIP_MODEL} = '')"

    def positions(self, name: str) -> np.ndarray | None:
        """The row positions of this model's rows in the current version of table ``name``, in table order (the
        rows :meth:`read` returns), or None when every row is this model's."""
        from clipaudit.records import CLIP_MODEL

        if self.scope_filter(name) is None:
            return None
        column = self.db.open_table(name).to_lance().to_table(columns=[CLIP_MODEL]).column(CLIP_MODEL)
        mine = pc.or_(pc.equal(column, self.clip_model), pc.equal(column, ""))
        return np.flatnonzero(mine.to_numpy(zero_copy_only=False))

    def rewrite(self, name: str, batches: pa.RecordBatchReader) -> None:
        """Replace this model's rows of table ``name`` with the streamed ``batches`` (without ``clip_model``)."""
        from clipaudit.records import CLIP_MODEL, with_clip_model

        if self.scope_filter(name) is None:
            self.base.rewrite(name, batches)
            return
        schema = with_clip_model(batches.schema)
        value = pa.scalar(self.clip_model, pa.string())

        def scoped() -> Iterator[pa.RecordBatch]:
            for batch in batches:
                yield pa.RecordBatch.from_arrays([*batch.columns, pa.repeat(value, batch.num_rows)], schema=schema)

        table = self.db.open_table(name)
        table.delete(f"{CLIP_MODEL} = {sql_string(self.clip_model)}")
        table.add(pa.RecordBatchReader.from_batches(schema, scoped()))

    def names(self) -> set[str]:
        """Names of the tables that exist."""
        return self.base.names()

    def exists(self, name: str) -> bool:
        """Whether table ``name`` exists (for any model)."""
        return self.base.exists(name)

    def has_column(self, name: str, column: str) -> bool:
        """Whether table ``name`` exists and has ``column``."""
        return self.base.has_column(name, column)

    def read(self, name: str, columns: Sequence[str] | None = None, where: str | None = None,
             version: int | str | None = None) -> pa.Table | None:
        """This model's rows of ``name`` (see :meth:`RunTables.read`); ``clip_model`` is dropped unless asked for."""
        from clipaudit.records import CLIP_MODEL

        scope = self.scope_filter(name)
        if scope is not None:
            where = scope if where is None else f"{scope} AND ({where})"
        table = self.base.read(name, columns, where, version)
        if table is not None and columns is None and CLIP_MODEL in table.schema.names:
            table = table.drop_columns([CLIP_MODEL])
        return table

    def count(self, name: str) -> int:
        """This model's rows in ``name`` (0 if it does not exist)."""
        scope = self.scope_filter(name)
        if scope is None:
            return self.base.count(name)
        return self.db.open_table(name).count_rows(scope)

    def versions(self) -> dict[str, int]:
        """The current version of every table."""
        return self.base.versions()

    def tags(self, name: str) -> dict[str, int]:
        """The tags of table ``name``."""
        return self.base.tags(name)

    def _scoped_rows(self, name: str, rows: pa.Table, schema: pa.Schema) -> tuple[pa.Table, pa.Schema] | None:
        """``rows`` and ``schema`` with this model's ``clip_model`` column, or None for a table that is not scoped."""
        from clipaudit.records import CLIP_MODEL, CLIP_SCOPED, with_clip_model

        if name not in CLIP_SCOPED:
            return None
        if self.base.exists(name) and not self.base.has_column(name, CLIP_MODEL):
            raise ClipauditError(f"table {name} in {self.uri} has no {CLIP_MODEL} column (written by an older "
                                 "clipaudit): use a new run_dir")
        rows = rows.select(schema.names).cast(schema)
        rows = rows.append_column(CLIP_MODEL, pa.repeat(pa.scalar(self.clip_model, pa.string()), rows.num_rows))
        return rows, with_clip_model(schema)

    def insert_new(self, name: str, rows: pa.Table, key: str | Sequence[str], schema: pa.Schema) -> int:
        """Insert this model's rows whose key is not in the table yet (``clip_model`` joins the key)."""
        from clipaudit.records import CLIP_MODEL

        scoped = self._scoped_rows(name, rows, schema)
        if scoped is None:
            return self.base.insert_new(name, rows, key, schema)
        keys = [key] if isinstance(key, str) else list(key)
        return self.base.insert_new(name, scoped[0], [*keys, CLIP_MODEL], scoped[1])

    def delete(self, name: str, where: str) -> int:
        """Delete this model's rows of ``name`` matching ``where`` (other models' rows stay)."""
        scope = self.scope_filter(name)
        return self.base.delete(name, where if scope is None else f"({where}) AND {scope}")

    def replace_where(self, name: str, rows: pa.Table, schema: pa.Schema, where: str) -> None:
        """Replace this model's rows of ``name`` matching ``where`` with ``rows`` (all other rows stay)."""
        scoped = self._scoped_rows(name, rows, schema)
        if scoped is None:
            self.base.replace_where(name, rows, schema, where)
            return
        from clipaudit.records import CLIP_MODEL

        self.base.replace_where(name, scoped[0], scoped[1],
                                f"({where}) AND {CLIP_MODEL} = {sql_string(self.clip_model)}")

    def replace(self, name: str, rows: pa.Table, schema: pa.Schema) -> None:
        """Replace this model's rows of ``name`` with ``rows`` (other models' rows stay)."""
        scoped = self._scoped_rows(name, rows, schema)
        if scoped is None:
            self.base.replace(name, rows, schema)
            return
        from clipaudit.records import CLIP_MODEL

        self.base.replace_where(name, scoped[0], scoped[1], f"{CLIP_MODEL} = {sql_string(self.clip_model)}")


def _dedupe(rows: pa.Table, keys: list[str]) -> pa.Table:
    """Keep the first row of each key (merge_insert requires unique keys in the source)."""
    seen: set[tuple] = set()
    keep = []
    columns = [rows.column(k).to_pylist() for k in keys]
    for i, key in enumerate(zip(*columns)):
        if key not in seen:
            seen.add(key)
            keep.append(i)
    return rows if len(keep) == rows.num_rows else rows.take(keep)
