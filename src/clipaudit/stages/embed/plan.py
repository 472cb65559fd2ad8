"""What the embed stage still has to do, planned from the tables: the images some model lacks, the captions a
CLIP-role model lacks, each model's rows told apart by its spec column (so a re-run or a resumed run skips finished
work, and a model added to a list later embeds only itself)."""


from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.errors import ClipauditError
from clipaudit.io.tables import sql_string
from clipaudit.records import (
    CAPTION_EMBEDDINGS,
    CLIP_MODEL,
    IMAGE_EMBEDDINGS,
    REFERENCE_MODEL,
    REJECTS,
    SAMPLES,
)
from clipaudit.stages.upstream import empty_input_message

if TYPE_CHECKING:
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel

STAGE = "embed"


class EmbedError(ClipauditError, RuntimeError):
    """The embed stage cannot run as configured (the message says why and what to do)."""


def column_ids(table: pa.Table | None, column: str = "image_id") -> pa.Array:
    """One column of a table as one array (empty for no table)."""
    return table.column(column).combine_chunks() if table is not None else pa.array([], pa.string())


def table_of(model: ResolvedModel) -> str:
    """The table holding ``model``'s image vectors (by its role)."""
    return IMAGE_EMBEDDINGS[model.role]


def spec_column(model: ResolvedModel) -> str:
    """The column holding the spec of ``model``'s rows: ``clip_model`` or ``reference_model`` (by its role)."""
    return CLIP_MODEL if model.role == "clip" else REFERENCE_MODEL


def model_filter(tables: RunTables, name: str, model: ResolvedModel) -> str:
    """The SQL predicate selecting ``model``'s rows of table ``name`` (EmbedError for a table written without the
    spec column, by an older clipaudit)."""
    column = spec_column(model)
    if tables.exists(name) and not tables.has_column(name, column):
        raise EmbedError(f"{name} in {tables.uri} has no {column} column (written by an older clipaudit): "
                         "use a new run_dir")
    return f"{column} = {sql_string(model.requested_spec)}"


def _check_model(tables: RunTables, name: str, model: ResolvedModel) -> None:
    models = tables.read(name, ["model"], where=model_filter(tables, name, model))
    if models is None or models.num_rows == 0:
        return
    found = set(pc.unique(models.column("model")).to_pylist())
    if found != {model.spec}:
        raise EmbedError(
            f"{name} in {tables.uri} holds vectors of {sorted(found)}, but the config asks for {model.spec!r}: "
            "use a new run_dir for a different model"
        )


def plan_images(tables: RunTables, models: dict[str, ResolvedModel]) -> pa.Table:
    """Samples that some model still has to embed: columns image_id, uri, need_<slot> for each slot of ``models``.

    An image is done for a model when its vector is in that model's rows, and done for every model when the
    embed stage already rejected it.
    """
    samples = tables.read(SAMPLES, ["image_id", "uri"])
    if samples is None or samples.num_rows == 0:
        raise EmbedError(empty_input_message(tables, f"no samples in {tables.uri}", "ingest", SAMPLES))
    rejected = column_ids(tables.read(REJECTS, ["item"], where=f"stage = '{STAGE}'"), "item")
    open_rows = pc.invert(pc.is_in(samples.column("image_id"), value_set=rejected))
    needs = []
    for slot, model in models.items():
        name = table_of(model)
        _check_model(tables, name, model)
        done = column_ids(tables.read(name, ["image_id"], where=model_filter(tables, name, model)))
        need = pc.and_(open_rows, pc.invert(pc.is_in(samples.column("image_id"), value_set=done)))
        samples = samples.append_column(f"need_{slot}", need)
        needs.append(need)
    any_need = needs[0]
    for need in needs[1:]:
        any_need = pc.or_(any_need, need)
    return samples.filter(any_need).sort_by("image_id")


def plan_captions(tables: RunTables, model: ResolvedModel) -> pa.Table:
    """Captions without a vector of ``model`` yet and not rejected: caption_id (``image_id#n``), image_id, text."""
    _check_model(tables, CAPTION_EMBEDDINGS, model)
    samples = tables.read(SAMPLES, ["image_id", "captions"])
    done = set(column_ids(tables.read(CAPTION_EMBEDDINGS, ["caption_id"],
                                where=model_filter(tables, CAPTION_EMBEDDINGS, model)), "caption_id").to_pylist())
    done |= set(column_ids(tables.read(REJECTS, ["item"], where=f"stage = '{STAGE}'"), "item").to_pylist())
    rows = {"caption_id": [], "image_id": [], "text": []}
    for image_id, captions in zip(samples.column("image_id").to_pylist(), samples.column("captions").to_pylist()):
        for n, text in enumerate(captions or []):
            caption_id = f"{image_id}#{n}"
            if caption_id not in done:
                rows["caption_id"].append(caption_id)
                rows["image_id"].append(image_id)
                rows["text"].append(text)
    return pa.table(rows, schema=pa.schema([("caption_id", pa.string()), ("image_id", pa.string()),
                                            ("text", pa.string())]))
