"""A run directory as the readers of a finished audit see it: the report, ``diff``, ``export`` and ``score``.

:class:`RunView` gives a run's tables as they are now, or as an earlier run left them (``RUN_DIR@RUN_ID``: the
LanceDB tags a finished run puts on every table, see :mod:`clipaudit.runs`), plus its stats files and resolved
config, seen whole or through one CLIP-role model (:meth:`RunView.for_clip_model`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from clipaudit.errors import ClipauditError
from clipaudit.io import fs
from clipaudit.records import CLIP_MODEL, IMAGE_EMBEDDINGS, REFERENCE_MODEL, SAMPLES
from clipaudit.runs import current_run_id, finished_runs, previous_run_id

_RANDOM_SPEC = re.compile(r"^(tiny-|hf-random:)|/random$")


class RunViewError(ClipauditError, ValueError):
    """A run directory or run id that cannot be read."""


class RunView:
    """A run directory's tables, stats and config; ``version`` (a run id) reads the tables as that run left them.

    ``clip_model`` (a spec of ``models.clip``): the view of one CLIP-role model of a run that audited several
    (see :meth:`for_clip_model`); None: the whole run."""

    def __init__(self, run_dir: str, version: str | None = None, tables: Any = None,
                 clip_model: str | None = None) -> None:
        if tables is None:
            if not fs.exists(fs.join(run_dir, "lancedb")):
                raise RunViewError(f"{run_dir}: not a clipaudit run directory (no lancedb/ folder)")
            from clipaudit.io.tables import RunTables

            tables = RunTables(run_dir)
        if clip_model is not None and getattr(tables, "clip_model", None) != clip_model:
            tables = tables.for_clip_model(clip_model)
        self.run_dir = run_dir
        self.version = version
        self.tables = tables
        self.clip_model = clip_model
        self._names: set[str] | None = None

    def for_clip_model(self, spec: str) -> RunView:
        """The view of one CLIP-role model (same run, same version): its tables are
        :meth:`~clipaudit.io.tables.RunTables.for_clip_model`'s, its stats of a per-model stage are that model's
        own (``notes.per_model[spec]``), its config has ``models.clip`` set to ``spec``."""
        view = RunView(self.run_dir, self.version, tables=self.tables.for_clip_model(spec), clip_model=spec)
        view._names = self._names
        return view

    def clip_models(self) -> list[str]:
        """The CLIP-role specs of the run: ``models.clip`` of its resolved config (a spec or a list), else the
        distinct ``clip_model`` values of its CLIP image embeddings (first seen first), else []."""
        models = (self.config() or {}).get("models") or {}
        specs = models.get("clip")
        if isinstance(specs, str) and specs:
            return [specs]
        if isinstance(specs, list) and specs:
            return [str(spec) for spec in specs]
        name = IMAGE_EMBEDDINGS["clip"]
        has_column = getattr(self.tables, "has_column", None)
        if not self.exists(name) or has_column is None or not has_column(name, CLIP_MODEL):
            return []
        table = self.read(name, [CLIP_MODEL])
        if table is None or table.num_rows == 0:
            return []
        return [str(v) for v in pc.unique(table.column(CLIP_MODEL)).to_pylist() if v]

    def first_reference_filter(self, name: str) -> str | None:
        """The SQL predicate leaving out the rows of every reference model but the first in table ``name`` (the
        reference embeddings, or ``neighbours``, whose CLIP rows have no reference) when the run has several
        references; None with one reference, or for a table without ``reference_model``."""
        references = ((self.config() or {}).get("models") or {}).get("reference")
        if not isinstance(references, list) or len(references) < 2 or not self.exists(name):
            return None
        if REFERENCE_MODEL not in self.tables.db.open_table(name).schema.names:
            return None
        return in_filter(REFERENCE_MODEL, ["", str(references[0])])

    @classmethod
    def parse(cls, spec: str) -> RunView:
        """``RUN_DIR``, ``RUN_DIR@RUN_ID`` (a finished run's tagged tables) or ``RUN_DIR@previous`` (the finished
        run before the latest)."""
        run_dir, version = spec, None
        if "@" in spec and not fs.exists(spec):
            run_dir, version = spec.rsplit("@", 1)
            if version == "previous":
                version = previous_run_id(run_dir)
                if version is None:
                    raise RunViewError(f"{run_dir}: fewer than two finished runs in its run records, no previous run")
            elif version == "latest":
                done = finished_runs(run_dir)
                if not done:
                    raise RunViewError(f"{run_dir}: no finished run in its run records")
                version = done[-1]
            elif version not in finished_runs(run_dir):
                raise RunViewError(f"{run_dir}: no finished run {version!r} (finished: "
                                   f"{', '.join(finished_runs(run_dir)) or 'none'})")
        return cls(run_dir, version)

    @property
    def label(self) -> str:
        """How this view is named in messages: the run directory, ``@run id`` when it is a tagged one."""
        return f"{self.run_dir}@{self.version}" if self.version else self.run_dir

    def exists(self, name: str) -> bool:
        """Whether table ``name`` exists (at the tagged version, when there is one)."""
        if self._names is None:
            self._names = self.tables.names()
        if name not in self._names:
            return False
        return self.version is None or self.version in self.tables.tags(name)

    def read(self, name: str, columns: Sequence[str] | None = None, where: str | None = None) -> pa.Table | None:
        """A table (at the tagged version, when there is one), None if it does not exist."""
        if not self.exists(name):
            return None
        if self.version is None:
            return self.tables.read(name, columns, where)
        return self.tables.read(name, columns, where, version=self.version)

    def count(self, name: str) -> int | None:
        """Rows of a table; None if it does not exist."""
        if not self.exists(name):
            return None
        if self.version is None:
            return self.tables.count(name)
        table = self.read(name, self._first_column(name))
        return None if table is None else table.num_rows

    def _first_column(self, name: str) -> list[str]:
        return [self.tables.db.open_table(name).schema.names[0]]

    def versions(self) -> dict[str, int]:
        """Table versions: the current ones, or those the tag points at."""
        if self.version is None:
            return self.tables.versions()
        return {name: self.tables.tags(name)[self.version] for name in sorted(self.tables.names())
                if self.version in self.tables.tags(name)}

    def stats(self, stage: str) -> dict[str, Any] | None:
        """``stats/<stage>.json`` of the latest run (None for a tagged view: the files describe the latest run)."""
        if self.version is not None:
            return None
        path = fs.join(self.run_dir, "stats", f"{stage}.json")
        stats = fs.read_json(path) if fs.exists(path) else None
        if self.clip_model is None or not isinstance(stats, dict):
            return stats
        per_model = (stats.get("notes") or {}).get("per_model")
        if isinstance(per_model, dict):
            own = per_model.get(self.clip_model)
            return None if own is None else {"stage": stage, **own}
        return stats

    def config(self) -> dict[str, Any] | None:
        """The resolved config of the latest run (None for a tagged view or where there is none)."""
        if self.version is not None:
            return None
        path = fs.join(self.run_dir, "config.resolved.yaml")
        config = yaml.safe_load(fs.read_text(path)) if fs.exists(path) else None
        if self.clip_model is not None and isinstance(config, dict):
            config = {**config, "models": {**(config.get("models") or {}), "clip": self.clip_model}}
        return config

    def run_id(self) -> str | None:
        """The run this view shows: the tag, or the latest run started in the directory."""
        return self.version or current_run_id(self.run_dir)

    def samples(self, image_ids: Iterable[str], columns: Sequence[str] = ("image_id", "uri", "caption")
                ) -> dict[str, dict[str, Any]]:
        """``samples`` rows of the given image ids, by id (read in chunks with an ``IN`` filter)."""
        ids = sorted({str(i) for i in image_ids})
        out: dict[str, dict[str, Any]] = {}
        wanted = list(dict.fromkeys(["image_id", *columns]))
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            table = self.read(SAMPLES, wanted, where=in_filter("image_id", chunk))
            if table is not None:
                out.update({row["image_id"]: row for row in table.to_pylist()})
        return out


def in_filter(column: str, values: Sequence[str]) -> str:
    """A SQL ``column IN (...)`` predicate over string values (quotes doubled)."""
    quoted = ", ".join("'" + str(v).replace("'", "''") + "'" for v in values)
    return f"{column} IN ({quoted})" if values else "false"


def is_random_spec(spec: str | None) -> bool:
    """Whether a model spec names random weights (``tiny-*``, ``hf-random:``, ``.../random``)."""
    return bool(spec) and bool(_RANDOM_SPEC.search(str(spec)))
