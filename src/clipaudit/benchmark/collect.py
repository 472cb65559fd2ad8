"""What an audit found, read from a run's tables as benchmark rows: image pairs, invariance probes, text pairs.

Everything here reads a :class:`~clipaudit.report.summary.RunView` (a run directory, or a finished run of it) and
returns rows sorted by their key, so the same run always gives the same rows in the same order.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from clipaudit.records import (
    BLIND_PAIRS,
    CAPTION_EMBEDDINGS,
    DAF_CASES,
    FAILURE_CHECKS,
    IMAGE_EMBEDDINGS,
    SAMPLES,
    TCAC_CASES,
)
from clipaudit.run_view import RunView, in_filter

BLIND = "blind_pair"
DAF = "daf_case"
_PUNCTUATION = re.compile(r"[^\w\s]")
_ARTICLES = frozenset({"a", "an", "the"})


def caption_signature(text: str | None) -> str:
    """What a caption says once case, punctuation, articles and spacing are set aside: two captions with the same
    signature are near-identical and cannot tell their images apart."""
    words = _PUNCTUATION.sub(" ", str(text or "").casefold()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


@dataclass
class Pairs:
    """The image pairs of a run: ``rows`` (the kept pairs, by pair_id), and ``left_out`` (pairs whose captions do
    not tell the images apart, or whose image has no caption), by kind."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    left_out: dict[str, int] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Kept pairs by kind."""
        out: dict[str, int] = {}
        for row in self.rows:
            out[row["kind"]] = out.get(row["kind"], 0) + 1
        return out


def _pair(a: str, b: str) -> tuple[str, str]:
    return (a, b) if a < b else (b, a)


def candidate_pairs(view: RunView) -> dict[tuple[str, str], set[str]]:
    """Every unordered pair of the run's ``blind_pairs`` and of its ``daf_cases`` (a case and each CLIP-only
    neighbour), with the kinds it comes from; self pairs left out."""
    found: dict[tuple[str, str], set[str]] = {}
    blind = view.read(BLIND_PAIRS, ["image_a", "image_b"])
    if blind is not None:
        for a, b in zip(blind.column("image_a").to_pylist(), blind.column("image_b").to_pylist()):
            if a != b:
                found.setdefault(_pair(a, b), set()).add(BLIND)
    cases = view.read(DAF_CASES, ["image_id", "clip_only"])
    if cases is not None:
        for image_id, others in zip(cases.column("image_id").to_pylist(), cases.column("clip_only").to_pylist()):
            for other in others or []:
                if other != image_id:
                    found.setdefault(_pair(image_id, other), set()).add(DAF)
    return found


def unit_vectors(view: RunView, role: str, image_ids: Iterable[str]) -> dict[str, np.ndarray]:
    """The stored unit image vectors of ``image_ids`` under a model role (``clip`` or ``reference``; with several
    references, the first's)."""
    ids = sorted(set(image_ids))
    out: dict[str, np.ndarray] = {}
    only = view.first_reference_filter(IMAGE_EMBEDDINGS[role]) if role == "reference" else None
    for start in range(0, len(ids), 500):
        where = in_filter("image_id", ids[start:start + 500])
        table = view.read(IMAGE_EMBEDDINGS[role], ["image_id", "vector"],
                          where=where if only is None else f"{where} AND {only}")
        if table is not None:
            out.update({i: np.asarray(v, dtype=np.float32) for i, v in zip(table.column("image_id").to_pylist(),
                                                                           table.column("vector").to_pylist())})
    return out


def _sim(vectors: dict[str, np.ndarray], a: str, b: str) -> float | None:
    if a not in vectors or b not in vectors:
        return None
    return float(vectors[a] @ vectors[b])


def collect_pairs(view: RunView, similarities: bool = True) -> Pairs:
    """The run's confused image pairs with both images' own captions; pairs whose captions have the same
    :func:`caption_signature` (or lack one) are left out and counted. ``similarities``: add both models' cosine
    similarity of each pair from the stored vectors."""
    found = candidate_pairs(view)
    ids = {i for pair in found for i in pair}
    samples = view.samples(ids, ("image_id", "uri", "caption"))
    vectors = {role: unit_vectors(view, role, ids) for role in IMAGE_EMBEDDINGS} if similarities else {}
    result = Pairs()
    for (a, b), kinds in sorted(found.items()):
        kind = BLIND if BLIND in kinds else DAF
        cap_a, cap_b = ((samples.get(i) or {}).get("caption") for i in (a, b))
        if not caption_signature(cap_a) or caption_signature(cap_a) == caption_signature(cap_b):
            result.left_out[kind] = result.left_out.get(kind, 0) + 1
            continue
        result.rows.append({
            "pair_id": f"{a}|{b}", "image_a": a, "image_b": b,
            "uri_a": samples[a]["uri"], "uri_b": samples[b]["uri"], "caption_a": cap_a, "caption_b": cap_b,
            "kind": kind, "blind_pair": BLIND in kinds, "daf_case": DAF in kinds,
            "clip_sim": _sim(vectors.get("clip", {}), a, b), "reference_sim": _sim(vectors.get("reference", {}), a, b),
        })
    return result


def probe_rows(view: RunView) -> list[dict[str, Any]]:
    """The TCAC cases (``is_case`` rows) whose own caption was in the pool, by (transform, image_id)."""
    table = view.read(TCAC_CASES, ["image_id", "transform", "params", "settings", "pool_size", "top_before",
                                   "gt_caption", "gt_rank_before", "gt_rank_after", "is_case"])
    if table is None:
        return []
    rows = [r for r in table.to_pylist() if r["is_case"] and r["gt_caption"]]
    return sorted(rows, key=lambda r: (r["transform"], r["image_id"]))


def text_pair_rows(view: RunView) -> list[dict[str, Any]]:
    """The caption pairs of every validated failure type (``failure_checks``), with its threshold and the audited
    text tower's similarity; by (method, failure type, pair order)."""
    table = view.read(FAILURE_CHECKS)
    if table is None:
        return []
    rows = []
    for check in sorted(table.to_pylist(), key=lambda c: (str(c.get("method") or ""), str(c["name"]))):
        try:
            pairs = json.loads(check.get("pairs") or "[]")
        except ValueError:
            pairs = []
        sims = list(check.get("sims") or [])
        for index, pair in enumerate(pairs):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(t, str) and t for t in pair)):
                continue
            rows.append({"failure_type": check["name"], "method": check.get("method"),
                         "description": check.get("description"), "caption_a": pair[0], "caption_b": pair[1],
                         "threshold": check.get("threshold"),
                         "audited_sim": sims[index] if index < len(sims) else None})
    return rows


def caption_corpus_vectors(view: RunView) -> tuple[list[str], np.ndarray]:
    """The corpus captions in the order the tcac stage read them (``samples`` order, each caption of each
    sample) that have a stored CLIP text vector, and those vectors."""
    samples = view.read(SAMPLES, ["captions"])
    stored = view.read(CAPTION_EMBEDDINGS, ["text", "vector"])
    if samples is None or stored is None or stored.num_rows == 0:
        return [], np.zeros((0, 1), np.float32)
    from clipaudit.tcac_scoring import caption_key

    known: dict[str, np.ndarray] = {}
    for text, vector in zip(stored.column("text").to_pylist(), stored.column("vector").to_pylist()):
        known.setdefault(caption_key(text), np.asarray(vector, dtype=np.float32))
    texts = [t for captions in samples.column("captions").to_pylist() for t in captions or []
             if caption_key(t) in known]
    if not texts:
        return [], np.zeros((0, 1), np.float32)
    return texts, np.stack([known[caption_key(t)] for t in texts])
