"""DAF stage (Discrepancy Analysis Framework, paper section 3.1): where CLIP's neighbours of an image are not
the reference model's -> ``daf_cases`` and ``blind_pairs``, corpus figures in ``run_dir/stats/daf.json``.

Per image, from its two top-k lists in ``neighbours`` (metrics in :mod:`clipaudit.daf_metrics`):

* ``overlap`` = |CLIP top-k & reference top-k| / k, and ``rbo``, the rank-biased overlap (``daf.rbo_p``;
  ``daf.rbo``: extrapolated by default, or truncated and normalised); ``score`` = 1 - rbo (divergence);
* ``z``: the overlap as a standard score over the corpus (how far below the corpus's usual agreement);
* ``p_value``: from the permutation null (the reference lists shuffled across images, ``daf.permutations``
  times, seeded): the chance that two *unrelated* lists of this corpus share at least this many neighbours.
  Small means the models agree on the image beyond chance; a case with ``p_value`` near 1 has two
  neighbourhoods as unrelated as two random images'. The corpus-level test (stats ``null.corpus_p_value``)
  says whether the models agree beyond chance at all, so that a per-image disagreement is a departure from
  a real alignment, not noise of the measure.

Cases: images with ``overlap <= daf.max_overlap`` (when set), the ``daf.top_n`` most divergent of them (when
set), ranked by score (then fewer shared neighbours, then image_id). Each keeps its caption and its CLIP-only
neighbours with their captions: the evidence the summarize stage reads.

CLIP-blind pairs (MMVP): the unordered, deduplicated CLIP neighbour pairs with CLIP similarity >=
``daf.blind_clip_min`` and reference similarity <= ``daf.blind_reference_max`` (``blind_rule: absolute``), or
above / below quantiles of those pairs' similarities (``quantile``); reference similarities are computed exactly
(fp32) from the reference vectors.

Several references (``models.reference`` a list): every figure above is computed against each reference, and
``daf.consensus`` combines them per image: ``all`` takes the least divergent reference's figures (an image is a
case only when every reference disagrees with CLIP: one reference can be the one that is wrong), ``any`` the most
divergent's. A pair is CLIP-blind when every (``all``) or some (``any``) reference finds it different. The
``references`` column of both tables names the references that disagree; the corpus figures in the stats are the
first reference's, with every reference's under ``per_reference``.

Both tables are recomputed and replaced as a whole on every run (cheap next to the neighbours), so a re-run
never duplicates a row.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from clipaudit import daf_metrics as dm
from clipaudit.errors import ClipauditError
from clipaudit.records import (
    BLIND_PAIRS,
    BLIND_PAIRS_SCHEMA,
    DAF_CASES,
    DAF_CASES_SCHEMA,
    IMAGE_EMBEDDINGS,
    NEIGHBOURS,
    REFERENCE_MODEL,
    SAMPLES,
    StageStats,
)
from clipaudit.stages.neighbours import RoleVectors, load_vectors
from clipaudit.stages.upstream import empty_input_message, model_view

if TYPE_CHECKING:
    from clipaudit.config import Config, DafConfig
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.daf")
STAGE = "daf"


class DafError(ClipauditError, RuntimeError):
    """The DAF cannot run (the message says why and what to do)."""


@dataclass
class NeighbourLists:
    """Both roles' top-k lists as row indices into ``image_ids`` (sorted), with their similarities.

    ``reference`` / ``reference_sims`` are the first reference's lists; with several references, ``references``
    names them all (config order) and ``others`` holds the lists of the others by spec."""

    image_ids: pa.Array
    clip: np.ndarray
    clip_sims: np.ndarray
    reference: np.ndarray
    reference_sims: np.ndarray
    references: tuple[str, ...] = ("",)
    others: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def per_reference(self) -> list[NeighbourLists]:
        """These lists once per reference (each with that reference's lists as ``reference``)."""
        first = replace(self, references=self.references[:1], others={})
        return [first, *(replace(first, reference=ids, reference_sims=sims, references=(spec,))
                         for spec, (ids, sims) in self.others.items())]

    @property
    def n(self) -> int:
        """Images."""
        return len(self.image_ids)

    @property
    def k(self) -> int:
        """Neighbours per list."""
        return self.clip.shape[1]


@dataclass
class ImageScores:
    """Every image's DAF figures, row-aligned with :attr:`NeighbourLists.image_ids`."""

    counts: np.ndarray
    overlap: np.ndarray
    rbo: np.ndarray
    score: np.ndarray
    z: np.ndarray
    p_value: np.ndarray
    rank: np.ndarray
    selected: np.ndarray
    null: dm.NullDistribution
    reference_overlaps: np.ndarray | None = None
    """``(references, n)``: each image's overlap with each reference (None: one reference, ``overlap``)."""
    per_reference: tuple[ImageScores, ...] = ()
    """With several references: the figures against each (config order); empty with one."""


def _role_lists(table: pa.Table, role: str, tables: RunTables, reference: str | None = None) -> pa.Table:
    rows = table.filter(pc.equal(table.column("model"), role))
    if reference is not None and REFERENCE_MODEL in rows.column_names:
        rows = rows.filter(pc.equal(rows.column(REFERENCE_MODEL), reference))
    if rows.num_rows == 0:
        which = f"the {role} role" if reference is None else f"reference model {reference!r}"
        raise DafError(f"{NEIGHBOURS} in {tables.uri} has no rows for {which}: run the neighbours stage")
    return rows.take(pc.sort_indices(rows.column("image_id")))


def _flat_lists(lists: pa.ChunkedArray, k: int, what: str) -> pa.Array:
    arr = lists.combine_chunks()
    lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    if arr.null_count or not (lengths == k).all():
        raise DafError(f"{NEIGHBOURS}: the {what} lists do not all hold k={k} entries: re-run the neighbours stage")
    return arr.flatten()


def _id_matrix(lists: pa.ChunkedArray, image_ids: pa.Array, k: int, role: str) -> np.ndarray:
    index = pc.index_in(_flat_lists(lists, k, role), value_set=image_ids)
    if index.null_count:
        raise DafError(f"{NEIGHBOURS}: {role} lists name images that have no lists of their own: "
                       "re-run the neighbours stage")
    return index.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, k)


def _sim_matrix(lists: pa.ChunkedArray, k: int, role: str) -> np.ndarray:
    values = _flat_lists(lists, k, f"{role} similarity")
    return values.to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, k)


def load_lists(tables: RunTables, references: list[str] | None = None) -> NeighbourLists:
    """The CLIP lists and each reference's lists (``references``, as written in the config; None: the table's one
    reference) from ``neighbours``; DafError when missing or inconsistent."""
    columns = ["image_id", "model", "ids", "sims"]
    if tables.has_column(NEIGHBOURS, REFERENCE_MODEL):
        columns.append(REFERENCE_MODEL)
    table = tables.read(NEIGHBOURS, columns)
    if table is None or table.num_rows == 0:
        raise DafError(empty_input_message(tables, f"no neighbours in {tables.uri}", "neighbours", NEIGHBOURS))
    specs = references if references and REFERENCE_MODEL in table.column_names else [None]
    clip = _role_lists(table, "clip", tables)
    image_ids = clip.column("image_id").combine_chunks()
    k = int(pc.list_value_length(clip.column("ids").combine_chunks())[0].as_py())
    lists = {}
    for spec in specs:
        reference = _role_lists(table, "reference", tables, spec)
        if not reference.column("image_id").combine_chunks().equals(image_ids):
            raise DafError(f"{NEIGHBOURS}: the clip and reference lists cover different images: "
                           "re-run the neighbours stage")
        lists[spec or ""] = (_id_matrix(reference.column("ids"), image_ids, k, "reference"),
                             _sim_matrix(reference.column("sims"), k, "reference"))
    (first, (ids, sims)), *others = lists.items()
    return NeighbourLists(
        image_ids=image_ids,
        clip=_id_matrix(clip.column("ids"), image_ids, k, "clip"),
        clip_sims=_sim_matrix(clip.column("sims"), k, "clip"),
        reference=ids, reference_sims=sims,
        references=tuple(lists), others=dict(others),
    )


def _one_reference(lists: NeighbourLists, cfg: DafConfig) -> ImageScores:
    """The figures against ``lists.reference`` alone (selection and ranks not yet set)."""
    prefix = dm.prefix_overlaps(lists.clip, lists.reference)
    counts = prefix[:, -1]
    rbo = dm.rbo_from_agreement(prefix / np.arange(1, lists.k + 1), cfg.rbo_p, cfg.rbo)
    null = dm.permutation_null(lists.clip, lists.reference, cfg.permutations, cfg.seed, cfg.null_sample,
                               cfg.rbo_p, cfg.rbo)
    overlap = counts / lists.k
    empty = np.zeros(0, dtype=np.int64)
    return ImageScores(counts, overlap, rbo, 1.0 - rbo, dm.z_scores(overlap), dm.null_p_values(counts, null),
                       empty, empty, null)


def combine(per_reference: list[ImageScores], consensus: str) -> ImageScores:
    """One set of figures from several references' (``daf.consensus``): ``all``, the least divergent reference's
    value of each figure (most shared neighbours, highest RBO and z, lowest p-value); ``any``, the most
    divergent's. The null is the first reference's."""
    least = consensus == "all"

    def pick(name: str, divergent_high: bool) -> np.ndarray:
        values = np.stack([getattr(scores, name) for scores in per_reference])
        return values.min(axis=0) if least == divergent_high else values.max(axis=0)

    counts = pick("counts", divergent_high=False)
    first = per_reference[0]
    return ImageScores(counts, pick("overlap", False), pick("rbo", False), pick("score", True), pick("z", False),
                       pick("p_value", True), first.rank, first.selected, first.null,
                       np.stack([scores.overlap for scores in per_reference]), tuple(per_reference))


def score_images(lists: NeighbourLists, cfg: DafConfig) -> ImageScores:
    """Overlap, RBO, divergence score, z, permutation p-values, ranks and the selected cases (with several
    references, combined per ``daf.consensus``: see :func:`combine`)."""
    per_reference = [_one_reference(one, cfg) for one in lists.per_reference()]
    scores = per_reference[0] if len(per_reference) == 1 else combine(per_reference, cfg.consensus)
    selected, rank = dm.select_cases(scores.score, scores.counts, lists.k, cfg.max_overlap, cfg.top_n)
    return replace(scores, selected=selected, rank=rank)


def disagreeing(lists: NeighbourLists, scores: ImageScores, rows: np.ndarray, cfg: DafConfig) -> pa.ListArray:
    """For each of ``rows``, the references that disagree with CLIP on it: overlap at most ``daf.max_overlap``
    (when set), else at most the image's combined overlap."""
    per = scores.reference_overlaps if scores.reference_overlaps is not None else scores.overlap[None, :]
    bound = scores.overlap[rows] if cfg.max_overlap is None else np.full(len(rows), cfg.max_overlap)
    keep = (per[:, rows] <= bound[None, :] + 1e-9).T
    names = pa.array(list(lists.references), pa.string())
    return _ragged(names, np.broadcast_to(np.arange(len(lists.references)), keep.shape), keep)


def image_captions(tables: RunTables, image_ids: pa.Array) -> pa.Array:
    """Each image's caption from ``samples``, aligned with ``image_ids`` (an empty string where it has none)."""
    samples = tables.read(SAMPLES, ["image_id", "caption"])
    if samples is None:
        return pa.array([""] * len(image_ids), pa.string())
    rows = pc.index_in(image_ids, value_set=samples.column("image_id").combine_chunks())
    return pc.fill_null(samples.column("caption").combine_chunks().take(rows), "")


def _ragged(values: pa.Array, rows: np.ndarray, keep: np.ndarray) -> pa.ListArray:
    """A list per row of ``rows`` (``(m, w)`` indices into ``values``): the entries where ``keep``, in order."""
    offsets = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values.take(pa.array(rows[keep], pa.int64())))


def _not_in_other(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``(m, k)`` mask: entry ``[i, j]`` is True when ``a[i, j]`` is not in row ``b[i]`` (row-wise ``~isin``)."""
    out = np.empty(a.shape, dtype=bool)
    step = max(1, (1 << 22) // max(1, a.shape[1] * b.shape[1]))
    for lo in range(0, len(a), step):
        out[lo:lo + step] = ~(a[lo:lo + step, :, None] == b[lo:lo + step, None, :]).any(axis=2)
    return out


def cases_table(lists: NeighbourLists, scores: ImageScores, captions: pa.Array, cfg: DafConfig) -> pa.Table:
    """The ``daf_cases`` rows of the selected images, most divergent first; ``captions`` is aligned with
    ``lists.image_ids``. Built column by column (no Python object per case or per neighbour)."""
    names, picked = lists.image_ids, np.asarray(scores.selected, dtype=np.int64)
    clip, reference = lists.clip[picked], lists.reference[picked]
    clip_only, reference_only = _not_in_other(clip, reference), _not_in_other(reference, clip)
    own_then_clip = np.concatenate([picked[:, None], clip], axis=1)
    own_then_only = np.concatenate([np.ones((len(picked), 1), dtype=bool), clip_only], axis=1)
    everything = np.ones(clip.shape, dtype=bool)
    index = pa.array(picked, pa.int64())
    per = scores.reference_overlaps if scores.reference_overlaps is not None else scores.overlap[None, :]
    overlaps = per[:, picked].T.astype(np.float32)
    return pa.table({
        "image_id": names.take(index),
        "overlap": pa.array(scores.overlap[picked], pa.float32()),
        "score": pa.array(scores.score[picked], pa.float32()),
        "rbo": pa.array(scores.rbo[picked], pa.float32()),
        "z": pa.array(scores.z[picked], pa.float32()),
        "p_value": pa.array(scores.p_value[picked], pa.float32()),
        "rank": pa.array(scores.rank[picked], pa.int32()),
        "clip_only": _ragged(names, clip, clip_only),
        "reference_only": _ragged(names, reference, reference_only),
        "clip_ids": _ragged(names, clip, everything),
        "reference_ids": _ragged(names, reference, everything),
        "captions": _ragged(captions, own_then_clip, own_then_only),
        "caption": captions.take(index),
        "references": disagreeing(lists, scores, picked, cfg),
        "reference_overlaps": pa.ListArray.from_arrays(
            pa.array(np.arange(0, overlaps.size + 1, max(overlaps.shape[1], 1), dtype=np.int32)[:len(picked) + 1]),
            pa.array(overlaps.reshape(-1))),
    }, schema=DAF_CASES_SCHEMA)


def vector_rows(vectors: RoleVectors, image_ids: pa.Array) -> np.ndarray:
    """The row of each of ``image_ids`` in ``vectors`` (no copy of the vectors); DafError when one is missing."""
    rows = pc.index_in(image_ids, value_set=vectors.ids)
    if rows.null_count:
        raise DafError(f"{IMAGE_EMBEDDINGS[vectors.role]} lacks {rows.null_count} of the images that have "
                       "neighbour lists: re-run the neighbours stage")
    return rows.to_numpy(zero_copy_only=False).astype(np.int64)


def reference_similarities(tables: RunTables, lists: NeighbourLists, lo: np.ndarray,
                           hi: np.ndarray) -> np.ndarray:
    """``(references, pairs)``: each reference's exact cosine similarity of every pair (rows of
    ``lists.image_ids``), one reference's vectors in memory at a time."""
    sims = np.empty((len(lists.references), len(lo)), dtype=np.float32)
    for i, spec in enumerate(lists.references):
        reference = load_vectors(tables, "reference", spec or None)
        rows = vector_rows(reference, lists.image_ids)
        sims[i] = dm.pair_cosines(reference.vectors, rows[lo], rows[hi])
        del reference
    return sims


def blind_pairs(lists: NeighbourLists, tables: RunTables,
                cfg: DafConfig) -> tuple[pa.Table, dm.BlindThresholds, int]:
    """CLIP-blind pairs among the CLIP neighbour pairs: (table sorted by gap, thresholds used, pairs examined).

    With several references the pair's ``reference_sim`` is the highest of theirs (``daf.consensus: all``) or the
    lowest (``any``). Rows index ``lists.image_ids``, which is sorted, so ordering by row index is ordering by
    image_id."""
    lo, hi, clip_sim = dm.neighbour_pairs(lists.clip, lists.clip_sims)
    per = reference_similarities(tables, lists, lo, hi)
    reference_sim = per.max(axis=0) if cfg.consensus == "all" else per.min(axis=0)
    mask, thresholds = dm.blind_pair_mask(clip_sim, reference_sim, cfg.blind_rule, cfg.blind_clip_min,
                                          cfg.blind_reference_max, cfg.blind_clip_quantile,
                                          cfg.blind_reference_quantile)
    a, b = lo[mask], hi[mask]
    clip_sim, reference_sim, per = clip_sim[mask], reference_sim[mask], per[:, mask]
    gap = clip_sim - reference_sim
    order = np.lexsort((b, a, -gap))
    table = pa.table({
        "image_a": lists.image_ids.take(pa.array(a[order])),
        "image_b": lists.image_ids.take(pa.array(b[order])),
        "clip_sim": pa.array(clip_sim[order], pa.float32()),
        "reference_sim": pa.array(reference_sim[order], pa.float32()),
        "gap": pa.array(gap[order], pa.float32()),
        "rule": pa.repeat(pa.scalar(thresholds.rule, pa.string()), len(order)),
        "references": _ragged(pa.array(list(lists.references), pa.string()),
                              np.broadcast_to(np.arange(len(lists.references)), (len(order), len(lists.references))),
                              (per[:, order] <= thresholds.reference_max + 1e-6).T),
    }, schema=BLIND_PAIRS_SCHEMA)
    return table, thresholds, len(lo)


def corpus_figures(lists: NeighbourLists, scores: ImageScores, cfg: DafConfig) -> dict[str, object]:
    """The corpus-level figures written into the stats: alignment, its histogram, chance and the null."""
    k, n = lists.k, lists.n
    mean_overlap = float(scores.overlap.mean())
    histogram = np.bincount(scores.counts, minlength=k + 1)
    null = scores.null
    corpus_p, corpus_z = null.corpus_test(mean_overlap)
    chance = dm.chance_overlap(k, n)
    null_figures: dict[str, object] = {"permutations": null.permutations, "sample": null.sample}
    if null.permutations:
        null_figures.update(
            mean_overlap=float(null.mean_overlap.mean()), std_of_mean_overlap=float(null.mean_overlap.std()),
            mean_rbo=float(null.mean_rbo.mean()),
            overlap_histogram={f"{c}/{k}": int(v) for c, v in enumerate(null.counts)},
            corpus_p_value=corpus_p, corpus_z=corpus_z)
    return {
        "k": k, "images": n,
        "mean_overlap": mean_overlap,
        "median_overlap": float(np.median(scores.overlap)),
        "mean_rbo": float(scores.rbo.mean()),
        "rbo": {"p": cfg.rbo_p, "mode": cfg.rbo},
        "overlap_histogram": {f"{c}/{k}": int(v) for c, v in enumerate(histogram)},
        "share_zero_overlap": float(histogram[0] / n),
        "chance_overlap": chance,
        "chance_rbo": dm.chance_rbo(k, n, cfg.rbo_p, cfg.rbo),
        "alignment_over_chance": mean_overlap / chance,
        "null": null_figures,
        "selection": {"max_overlap": cfg.max_overlap, "top_n": cfg.top_n},
    }


def _record(stats: StageStats, lists: NeighbourLists, scores: ImageScores, cases: int, pairs: int,
            thresholds: dm.BlindThresholds, examined: int, cfg: DafConfig) -> None:
    """Counts, corpus figures (the first reference's; each reference's under ``per_reference`` when there are
    several) and a one-line summary into the stats (and the log)."""
    if scores.per_reference:
        per = {spec: corpus_figures(one, one_scores, cfg)
               for spec, one, one_scores in zip(lists.references, lists.per_reference(), scores.per_reference)}
        figures = per[lists.references[0]]
        stats.notes["per_reference"] = per
        stats.notes["consensus"] = cfg.consensus
    else:
        figures = corpus_figures(lists, scores, cfg)
    stats.notes.update(figures)
    stats.notes["blind_pairs"] = {"rule": thresholds.rule, "clip_min": thresholds.clip_min,
                                  "reference_max": thresholds.reference_max}
    stats.counts.update(images=lists.n, k=lists.k, cases=cases, blind_pairs=pairs,
                        neighbour_pairs=examined, images_zero_overlap=int(np.sum(scores.counts == 0)),
                        cases_at_chance=int(np.sum(scores.p_value[scores.selected] >= 0.05)))
    null = figures["null"]
    stats.notes["summary"] = (
        f"{lists.n} images, mean overlap@{lists.k} {figures['mean_overlap']:.3f} (chance "
        f"{figures['chance_overlap']:.4f}, null p={null.get('corpus_p_value', float('nan')):.3g}); "
        f"{cases} cases; {pairs} CLIP-blind pairs of {examined} neighbour pairs")
    log.info("daf: %s", stats.notes["summary"])


def run_daf(config: Config, tables: RunTables) -> StageStats:
    """Run the DAF over the ``neighbours`` table; writes ``daf_cases`` and ``blind_pairs``, returns the stats."""
    tables = model_view(tables, config)
    cfg = config.daf
    stats = StageStats(STAGE)
    started = time.perf_counter()
    lists = load_lists(tables, config.models.reference_models)
    captions = image_captions(tables, lists.image_ids)
    stats.add_time("read", time.perf_counter() - started)

    phase = time.perf_counter()
    scores = score_images(lists, cfg)
    cases = cases_table(lists, scores, captions, cfg)
    stats.add_time("score", time.perf_counter() - phase)

    phase = time.perf_counter()
    pairs, thresholds, examined = blind_pairs(lists, tables, cfg)
    stats.add_time("blind_pairs", time.perf_counter() - phase)

    phase = time.perf_counter()
    tables.replace(DAF_CASES, cases, DAF_CASES_SCHEMA)
    tables.replace(BLIND_PAIRS, pairs, BLIND_PAIRS_SCHEMA)
    stats.add_time("write", time.perf_counter() - phase)

    _record(stats, lists, scores, cases.num_rows, pairs.num_rows, thresholds, examined, cfg)
    stats.add_time("wall", time.perf_counter() - started)
    return stats
