"""The ``synthetic`` dataset format: a generated, licence-free corpus of probe scenes (:mod:`clipaudit.probe.scenes`).

The reader writes ``work_dir/seed-<seed>/<index>.png`` (only where missing), ``image_id`` is
``scene_<seed>_<index>`` and ``Sample.label`` the scene's attributes as compact JSON (the truth
:mod:`clipaudit.probe.truth` measures findings against). With ``dataset.variants`` = V, each drawn scene is
followed by V minimal variants of it (one attribute of one group changed, cycling kind, colour, count, position).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import TYPE_CHECKING

from PIL import Image

from clipaudit.io import fs
from clipaudit.io.readers.common import absolute, log, progress
from clipaudit.probe.scenes import corpus_spec, render_scene
from clipaudit.records import Sample

if TYPE_CHECKING:
    from clipaudit.config import DatasetConfig


def read_synthetic(cfg: DatasetConfig, work_dir: str) -> Iterator[Sample]:
    """Samples of the generated corpus; images are written into ``work_dir`` where missing."""
    variants = cfg.variants
    folder = absolute(fs.join(work_dir, f"seed-{cfg.seed}" + (f"-v{variants}" if variants else "")))
    source = f"synthetic:seed={cfg.seed}" + (f",variants={variants}" if variants else "")
    written = 0
    for index in progress(range(cfg.num_images), "synthetic scenes", total=cfg.num_images, unit="scene"):
        spec = corpus_spec(cfg.seed, index, variants)
        path = fs.join(folder, f"{index:05d}.png")
        if not fs.exists(path):
            fs.write_bytes(path, _png(render_scene(spec)))
            written += 1
        captions = spec.captions()
        yield Sample(image_id=f"scene_{cfg.seed}_{index:05d}", uri=path, captions=captions, caption=captions[0],
                     source=source, label=spec.to_json())
    log.info("synthetic: %d scenes (%d images written) in %s", cfg.num_images, written, folder)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
