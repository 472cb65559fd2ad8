"""Where the tcac stage's embedded (image, transform) batches go: each image's parts are gathered, a complete image
is scored against its caption pool into ``tcac_cases`` rows, an image that failed becomes one ``rejects`` row, and
both are written in few keyed writes."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from clipaudit.batches.embed import OK, Batch
from clipaudit.batches.isolation import LOST_FLAG
from clipaudit.batches.tcac import ORIGINAL
from clipaudit.records import (
    REJECTS,
    REJECTS_KEY,
    REJECTS_SCHEMA,
    TCAC_CASES,
    TCAC_CASES_KEY,
    TCAC_CASES_SCHEMA,
    StageStats,
)
from clipaudit.stages.tcac.plan import STAGE
from clipaudit.stages.tcac.settings import settings_for
from clipaudit.tcac_scoring import CaptionCorpus, CaptionPools, compare, pool_probabilities

if TYPE_CHECKING:
    from clipaudit.config import TcacConfig
    from clipaudit.io.tables import RunTables
    from clipaudit.models import ResolvedModel


class CaseSink:
    """Collects the embedded (image, transform) rows of each image; once an image is complete, scores it
    against its pool and buffers its ``tcac_cases`` rows; writes in few keyed writes."""

    def __init__(self, tables: RunTables, model: ResolvedModel, tcac: TcacConfig, corpus: CaptionCorpus,
                 pools: CaptionPools, gt: np.ndarray, originals: dict[str, np.ndarray],
                 expected: dict[str, list[str]], uris: dict[str, str], write_every: int,
                 stats: StageStats) -> None:
        self.tables, self.model, self.tcac, self.corpus = tables, model, tcac, corpus
        self.pools, self.gt, self.originals, self.expected, self.uris = pools, gt, originals, expected, uris
        self.write_every, self.stats = write_every, stats
        self.pending: dict[str, dict[str, tuple[np.ndarray, str]]] = {}
        self.rejected: set[str] = set()
        self.rows: list[dict[str, Any]] = []
        self.rejects: list[dict[str, str]] = []
        self.settings = {t: settings_for(tcac, t, model.preprocess) for t in tcac.transforms}

    def add(self, batch: Batch) -> int:
        """Take one embedded batch; returns the number of images it completed."""
        if LOST_FLAG in batch:
            for image_id, status, detail in zip(batch["image_id"].tolist(), batch["status"].tolist(),
                                                batch["detail"].tolist()):
                self._reject(str(image_id), str(status), str(detail))
            return len(batch["image_id"])
        for phase in ("read", "decode", "resize", "transform"):
            self.stats.add_time(phase, float(np.sum(batch[f"t_{phase}"])))
        self.stats.add_time("infer_clip", float(np.sum(batch["t_infer_clip"])))
        for transform, seconds in zip(batch["transform"], batch["t_transform"]):
            self.stats.add_time(f"transform_{transform}", float(seconds))
        vectors = np.asarray(batch["vector_clip"], dtype=np.float32)
        logit_scale = float(batch["logit_scale"][0]) if len(vectors) else float("nan")
        logit_bias = float(batch["logit_bias"][0]) if len(vectors) and "logit_bias" in batch else float("nan")
        completed = 0
        for i in range(len(vectors)):
            image_id, transform = str(batch["image_id"][i]), str(batch["transform"][i])
            if image_id in self.rejected:
                continue
            if batch["status"][i] != OK:
                self._reject(image_id, str(batch["status"][i]), str(batch["detail"][i]))
                continue
            self.stats.add_count("encoded_original" if transform == ORIGINAL else "encoded_transformed")
            parts = self.pending.setdefault(image_id, {})
            parts[transform] = (vectors[i], str(batch["params"][i]))
            if len(parts) == len(self.expected[image_id]):
                start = time.perf_counter()
                self.rows.extend(self._score(image_id, self.pending.pop(image_id), logit_scale, logit_bias))
                self.stats.add_time("score", time.perf_counter() - start)
                completed += 1
        if len(self.rows) >= self.write_every:
            self.flush()
        return completed

    def _reject(self, image_id: str, reason: str, detail: str) -> None:
        """The image leaves the stage: one ``rejects`` row, its pending parts dropped."""
        if image_id in self.rejected:
            return
        self.rejected.add(image_id)
        self.pending.pop(image_id, None)
        self.rejects.append({"source": self.uris.get(image_id, ""), "item": image_id, "stage": STAGE,
                             "reason": reason, "detail": detail})

    def _score(self, image_id: str, parts: dict[str, tuple[np.ndarray, str]],
               logit_scale: float, logit_bias: float = float("nan")) -> list[dict[str, Any]]:
        at = self.pools.position(image_id)
        pool = self.pools.pool(at)
        original = self.originals[image_id] if image_id in self.originals else parts[ORIGINAL][0]
        transforms = [t for t in self.expected[image_id] if t != ORIGINAL]
        probs = pool_probabilities(np.stack([original] + [parts[t][0] for t in transforms]),
                                   self.corpus.vectors[pool], logit_scale, logit_bias)
        gt_row = int(self.gt[at])
        where = np.flatnonzero(pool == gt_row) if gt_row >= 0 else np.zeros(0, np.int64)
        gt = int(where[0]) if len(where) else None
        texts = self.corpus.texts.take(pool)
        rows = []
        for j, transform in enumerate(transforms, start=1):
            c = compare(probs[0], probs[j], self.tcac.top_k, gt)
            rows.append({
                "image_id": image_id, "transform": transform, "model": self.model.spec,
                "params": parts[transform][1], "settings": self.settings[transform], "pool_size": len(pool),
                "top_before": [texts[i] for i in c.top_before], "probs_before": c.probs_before,
                "top_after": [texts[i] for i in c.top_after], "probs_after": c.probs_after,
                "changed": c.changed, "top1_changed": c.top1_changed,
                "gt_caption": texts[gt] if gt is not None else None,
                "gt_rank_before": c.gt_rank_before, "gt_rank_after": c.gt_rank_after,
                "gt_prob_before": c.gt_prob_before, "gt_prob_after": c.gt_prob_after,
                "tv_distance": c.tv_distance, "rank": 0, "is_case": False, "daf_case": False,
            })
        return rows

    def flush(self) -> None:
        """Write the buffered case rows and rejects (keyed: nothing is written twice)."""
        start = time.perf_counter()
        if self.rows:
            rows = pa.Table.from_pylist(self.rows, schema=TCAC_CASES_SCHEMA)
            self.stats.add_count("pairs_written", self.tables.insert_new(TCAC_CASES, rows, TCAC_CASES_KEY,
                                                                         TCAC_CASES_SCHEMA))
            self.rows.clear()
        if self.rejects:
            rejects = pa.Table.from_pylist(self.rejects, schema=REJECTS_SCHEMA)
            self.stats.add_count("rejected", self.tables.insert_new(REJECTS, rejects, REJECTS_KEY, REJECTS_SCHEMA))
            self.rejects.clear()
        self.stats.add_time("write", time.perf_counter() - start)

    def close(self) -> None:
        """Flush; an image with rows still missing is a bug in the runner."""
        self.flush()
        if self.pending:
            raise RuntimeError(f"tcac: {len(self.pending)} images came back incomplete from the runner, "
                               f"e.g. {next(iter(self.pending))!r}")
