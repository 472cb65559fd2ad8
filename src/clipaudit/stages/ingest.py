"""Ingest stage: reads the configured corpus into the ``samples`` and ``rejects`` tables.

Every input ends either as a sample or as a reject (``stage="ingest"``). On top of the readers' rejects this
stage drops duplicates as ``duplicate`` rejects: a repeated ``image_id`` (the first one read is kept), then,
in ``image_id`` order (the first is kept), the same ``uri`` and, with ``dataset.duplicate_check: content``,
files of equal size and equal SHA-256 (only size collisions are read; http URLs are compared by uri only).
It then sets each sample's ``caption`` per ``dataset.caption_choice`` (``longest``, as in the paper, or
``first``; all captions stay in ``captions``), keeps the first ``dataset.limit`` samples by ``image_id`` and
writes both tables through :meth:`RunTables.insert_new`, so a re-run writes no new rows.

Counts in the returned stats: ``read`` (samples and rejects from the reader), ``read_samples``, ``samples``
(kept), ``rejects`` and ``rejects.<reason>``, ``beyond_limit``, ``new_samples`` / ``new_rejects`` (rows
written by this run); ``read == samples + rejects + beyond_limit``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import tarfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import pyarrow as pa

from clipaudit.io import fs
from clipaudit.io.readers import read_corpus
from clipaudit.io.readers.common import list_files, open_binary, progress, reject
from clipaudit.records import (
    REJECTS,
    REJECTS_KEY,
    REJECTS_SCHEMA,
    SAMPLES,
    SAMPLES_SCHEMA,
    Reject,
    Sample,
    StageStats,
    rejects_to_table,
    samples_to_table,
)
from clipaudit.stages.upstream import reason_counts

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.ingest")
STAGE = "ingest"
WRITE_CHUNK = 100_000
"""Rows per write: few large writes, not many small ones."""


def run_ingest(config: Config, tables: RunTables) -> StageStats:
    """Read the corpus of ``config.dataset`` into ``samples`` and ``rejects``; return counts and timings."""
    cfg = config.dataset
    stats = StageStats(stage=STAGE, notes={"format": cfg.format, "caption_choice": cfg.caption_choice})
    started = time.perf_counter()
    samples, rejects = read_all(config)
    stats.add_time("read", time.perf_counter() - started)
    stats.add_count("read", len(samples) + len(rejects))
    stats.add_count("read_samples", len(samples))

    started = time.perf_counter()
    samples = [replace(s, caption=choose_caption(s.captions, cfg.caption_choice)) for s in samples]
    samples, duplicates = drop_duplicates(samples, cfg.duplicate_check, {(r.source, r.item) for r in rejects})
    rejects.extend(duplicates)
    kept = samples[: cfg.limit] if cfg.limit is not None else samples
    stats.add_time("select", time.perf_counter() - started)

    started = time.perf_counter()
    stats.add_count("new_samples", _write(tables, SAMPLES, kept, samples_to_table, "image_id", SAMPLES_SCHEMA))
    stats.add_count("new_rejects", _write(tables, REJECTS, rejects, rejects_to_table, REJECTS_KEY, REJECTS_SCHEMA))
    stats.add_time("write", time.perf_counter() - started)
    _count_outcome(stats, kept, rejects, len(samples) - len(kept))
    return stats


def read_all(config: Config) -> tuple[list[Sample], list[Reject]]:
    """Every sample and reject the configured reader yields, in read order."""
    samples: list[Sample] = []
    rejects: list[Reject] = []
    work_dir = fs.join(config.run_dir, "work")
    for item in read_corpus(config.dataset, work_dir):
        (samples if isinstance(item, Sample) else rejects).append(item)
    return samples, rejects


def choose_caption(captions: Sequence[str], choice: str) -> str:
    """The caption that represents an image: ``longest`` (the first of the longest) or ``first``."""
    if not captions:
        raise ValueError("a sample needs at least one caption")
    if choice == "first":
        return captions[0]
    if choice == "longest":
        return max(captions, key=len)
    raise ValueError(f"dataset.caption_choice: unknown choice {choice!r} (longest, first)")


def drop_duplicates(samples: list[Sample], check: str = "content",
                    taken: set[tuple[str, str]] | None = None) -> tuple[list[Sample], list[Reject]]:
    """(unique samples sorted by image_id, ``duplicate`` rejects); see the module docstring for the rules.

    ``taken`` holds reject keys (source, item) already in use, so a duplicate's reject key stays unique.
    """
    keys = _RejectKeys(taken or set())
    by_id: dict[str, Sample] = {}
    rejects: list[Reject] = []
    for sample in samples:
        first = by_id.setdefault(sample.image_id, sample)
        if first is not sample:
            rejects.append(keys.duplicate(sample, f"image_id {sample.image_id} already read from {first.uri}"))
    unique = sorted(by_id.values(), key=lambda s: s.image_id)
    unique, same_uri = _drop_same(unique, lambda s: s.uri, "the same file", keys)
    rejects.extend(same_uri)
    if check == "content":
        digests = _content_digests(unique)
        unique, same_bytes = _drop_same(unique, lambda s: digests.get(s.image_id), "the same bytes", keys)
        rejects.extend(same_bytes)
    return unique, rejects


class _RejectKeys:
    """Makes ``duplicate`` rejects whose (source, item) key is not used yet (``id``, then ``id #2``...)."""

    def __init__(self, taken: set[tuple[str, str]]) -> None:
        self.taken = set(taken)

    def duplicate(self, sample: Sample, detail: str) -> Reject:
        item, n = sample.image_id, 1
        while (sample.source, item) in self.taken:
            n += 1
            item = f"{sample.image_id} #{n}"
        self.taken.add((sample.source, item))
        return reject(sample.source, item, "duplicate", detail)


def _drop_same(samples: list[Sample], key: Callable[[Sample], str | None], what: str,
               keys: _RejectKeys) -> tuple[list[Sample], list[Reject]]:
    """Keep the first sample of each key value (None: never a duplicate)."""
    first: dict[str, Sample] = {}
    kept: list[Sample] = []
    rejects: list[Reject] = []
    for sample in samples:
        value = key(sample)
        if value is None or first.setdefault(value, sample) is sample:
            kept.append(sample)
        else:
            rejects.append(keys.duplicate(sample, f"{what} as image_id {first[value].image_id} "
                                                  f"({sample.uri} and {first[value].uri})"))
    return kept, rejects


def _content_digests(samples: list[Sample]) -> dict[str, str]:
    """image_id -> SHA-256 of the samples whose file size another sample shares (the only possible duplicates)."""
    by_size: dict[int, list[Sample]] = defaultdict(list)
    sizes = _sizes([s.uri for s in samples])
    for sample in samples:
        if sizes.get(sample.uri) is not None:
            by_size[sizes[sample.uri]].append(sample)
    digests: dict[str, str] = {}
    for group in (g for g in by_size.values() if len(g) > 1):
        for sample in group:
            try:
                digests[sample.image_id] = hashlib.sha256(fs.read_bytes(sample.uri)).hexdigest()
            except (OSError, KeyError, tarfile.TarError) as exc:
                log.warning("cannot read %s to compare its bytes: %s", sample.uri, exc)
    return digests


def _sizes(uris: list[str]) -> dict[str, int | None]:
    """File sizes: local files (stat), tar members (each shard opened once), object-store objects (each folder
    listed once); http URLs are skipped."""
    sizes: dict[str, int | None] = {}
    members: dict[str, list[str]] = defaultdict(list)
    remote: dict[str, list[str]] = defaultdict(list)
    for uri in progress(uris, "ingest: file sizes", total=len(uris), unit="file"):
        if fs.TAR_SEPARATOR in uri:
            shard, member = uri.split(fs.TAR_SEPARATOR, 1)
            members[shard].append(member)
        elif uri.startswith(("http://", "https://")):
            continue
        elif fs.is_remote(uri):
            remote[posixpath.dirname(uri)].append(uri)
        else:
            sizes[uri] = _local_size(uri)
    for shard, names in members.items():
        shard_sizes = _member_sizes(shard)
        for name in names:
            sizes[f"{shard}{fs.TAR_SEPARATOR}{name}"] = shard_sizes.get(name)
    for folder, folder_uris in remote.items():
        listed = _folder_sizes(folder)
        sizes.update({uri: listed.get(uri) for uri in folder_uris})
    return sizes


def _local_size(uri: str) -> int | None:
    try:
        return os.stat(uri).st_size
    except OSError:
        return None


def _folder_sizes(folder: str) -> dict[str, int]:
    try:
        return {entry.path: entry.size for entry in list_files(folder)}
    except (OSError, ValueError) as exc:
        log.warning("cannot list %s to compare its files: %s", folder, exc)
        return {}


def _member_sizes(shard: str) -> dict[str, int]:
    try:
        with open_binary(shard) as handle, tarfile.open(fileobj=handle, mode="r:") as tar:
            return {m.name: m.size for m in tar if m.isfile()}
    except (OSError, tarfile.TarError, EOFError) as exc:
        log.warning("cannot list %s to compare its members: %s", shard, exc)
        return {}


def _write(tables: RunTables, name: str, rows: list, to_table: Callable[[list], pa.Table],
           key: str | list[str], schema: pa.Schema) -> int:
    """Insert the rows not yet in ``name`` (in chunks of :data:`WRITE_CHUNK`); returns rows written."""
    written = tables.insert_new(name, to_table(rows[:WRITE_CHUNK]), key, schema)
    for start in range(WRITE_CHUNK, len(rows), WRITE_CHUNK):
        written += tables.insert_new(name, to_table(rows[start:start + WRITE_CHUNK]), key, schema)
    return written


def _count_outcome(stats: StageStats, kept: list[Sample], rejects: list[Reject], beyond_limit: int) -> None:
    reasons = Counter(r.reason for r in rejects)
    stats.add_count("samples", len(kept))
    stats.add_count("rejects", len(rejects))
    for reason, n in sorted(reasons.items()):
        stats.add_count(f"rejects.{reason}", n)
    stats.add_count("beyond_limit", beyond_limit)
    log.info("ingest: %d samples, %d rejects (%s), %d beyond the limit; wrote %d new sample rows and %d new "
             "reject rows", len(kept), len(rejects), ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
             or "none", beyond_limit, stats.counts["new_samples"], stats.counts["new_rejects"])
    if not kept and rejects:
        first = rejects[0]
        log.warning("ingest: every input was rejected (%s); the first: %s of %s: %s (%s). The next stages have "
                    "nothing to work on; the rejects table lists every one", reason_counts(r.reason for r in rejects),
                    first.item, first.source, first.reason, first.detail)
