"""The LanceDB database under ``run_dir/lancedb``: every stage reads and writes its tables through here.

Writes are idempotent: :meth:`RunTables.insert_new` inserts only rows whose key is not yet present
(LanceDB ``merge_insert``), so a re-run or a resumed run never duplicates a row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import pyarrow as pa

from clipaudit.io import fs


def quiet_lance_logs() -> None:
    """Keep lance's and LanceDB's Rust loggers to errors (they warn ``No existing dataset ... it will be created``
    for every new table); the variables are read once, when the library is imported. A value already set wins."""
    os.environ.setdefault("LANCE_LOG", "error")
    os.environ.setdefault("LANCEDB_LOG", "error")


class RunTables:
    """The tables of one run directory."""

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
