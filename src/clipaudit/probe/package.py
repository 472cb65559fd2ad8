"""``clipaudit train-probe``: train the probe pair, measure it on held-out scenes, and write the weights and card.

The card (``probe.json``, read by :mod:`clipaudit.models.packaged`) records the schedule, the hidden attribute,
each file's SHA-256 and size, the versions that trained it, and the measured behaviour: for minimal pairs of
held-out scenes (seed 0, the demo's), the mean cosine similarity under each model per changed attribute. A
CLIP blind to position has position pairs near 1 while the reference's are far lower; every other attribute
the CLIP separates.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from clipaudit.models import packaged
from clipaudit.probe.scenes import ATTRIBUTES, corpus_spec
from clipaudit.probe.train import TrainConfig, model_inputs, train_pair

log = logging.getLogger("clipaudit")

HELD_OUT_SEED = 0
HELD_OUT_SCENES = 100
QUICK = {"scenes": 2000, "clip_steps": 450, "reference_steps": 300}
"""The shortened schedule of ``--quick`` (tests): about a minute on 2 cores."""


def minimal_pair_similarities(clip: Any, reference: Any, seed: int = HELD_OUT_SEED,
                              scenes: int = HELD_OUT_SCENES) -> dict[str, dict[str, float]]:
    """Mean cosine similarity of minimal pairs per changed attribute, under each model (images of ``seed``, each
    drawn scene against its variant in each attribute)."""
    import torch

    group = len(ATTRIBUTES) + 1
    specs = [corpus_spec(seed, i, len(ATTRIBUTES)) for i in range(scenes * group)]
    clip_pixels, ref_pixels = model_inputs(specs)
    with torch.inference_mode():
        c = clip.encode_image(clip_pixels, normalize=True)
        r = torch.nn.functional.normalize(reference(pixel_values=ref_pixels).pooler_output, dim=-1)
    c, r = c.numpy(), r.numpy()
    base = np.arange(0, len(specs), group)
    out = {}
    for offset, attribute in enumerate(ATTRIBUTES, start=1):
        out[attribute] = {"clip": round(float((c[base] * c[base + offset]).sum(1).mean()), 4),
                          "reference": round(float((r[base] * r[base + offset]).sum(1).mean()), 4)}
    return out


def train_and_package(cfg: TrainConfig, out_dir: Path) -> dict[str, Any]:
    """Train both models, save them into ``out_dir`` with their card; return the card."""
    import open_clip
    import torch
    import transformers

    from clipaudit.models import open_clip_backend

    started = time.perf_counter()
    clip, reference = train_pair(cfg)
    seconds = time.perf_counter() - started
    out_dir.mkdir(parents=True, exist_ok=True)
    initial_clip = open_clip_backend.build("tiny-clip", None).state_dict()
    packaged.save_state(clip, initial_clip, packaged.weights_path(packaged.PROBE_CLIP, out_dir))
    packaged.save_state(reference, {}, packaged.weights_path(packaged.PROBE_DINO, out_dir))
    files = {}
    for name in packaged.PACKAGED:
        path = packaged.weights_path(name, out_dir)
        files[name] = {"file": path.name, "sha256": packaged.file_sha256(path), "bytes": path.stat().st_size,
                       "architecture": packaged.ARCHITECTURE[name]}
    card = {
        "hidden": cfg.hidden,
        "what": (f"probe-clip never saw the {cfg.hidden} of a shape named in its training captions; probe-dino "
                 "was trained on the images to predict every attribute. Audited together, the CLIP should be "
                 f"blind to {cfg.hidden} and to nothing else."),
        "train": cfg.to_dict(),
        "train_seconds": round(seconds, 1),
        "versions": {"torch": torch.__version__, "open_clip": open_clip.__version__,
                     "transformers": transformers.__version__},
        "held_out": {"seed": HELD_OUT_SEED, "scenes": HELD_OUT_SCENES,
                     "minimal_pair_similarity": minimal_pair_similarities(clip, reference)},
        "files": files,
    }
    (out_dir / packaged.CARD).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    return card


def add_train_probe_parser(commands: argparse._SubParsersAction) -> None:
    """``clipaudit train-probe [--out DIR] [--quick] [--threads N]``."""
    parser = commands.add_parser(
        "train-probe", help="train the demo's probe pair (probe-clip, probe-dino) and write weights + card",
        description="Train probe-clip (blind to position by its captions) and probe-dino (every attribute) on "
                    "probe scenes, seeded, on the CPU; write the weights and their card (probe.json).")
    parser.add_argument("--out", help="where to write (default: the package's own weights folder)")
    parser.add_argument("--quick", action="store_true", help="the shortened schedule used by the tests")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_train_probe(args: argparse.Namespace) -> int:
    """Run ``clipaudit train-probe``; print the card's measured behaviour."""
    cfg = TrainConfig(threads=args.threads, **(QUICK if args.quick else {}))
    out_dir = Path(args.out) if args.out else packaged.weights_dir()
    card = train_and_package(cfg, out_dir)
    print(f"trained in {card['train_seconds']} s; weights and card in {out_dir}")
    print("held-out minimal pairs, mean cosine similarity (clip / reference):")
    for attribute, sims in card["held_out"]["minimal_pair_similarity"].items():
        print(f"  {attribute:9s} {sims['clip']:.3f} / {sims['reference']:.3f}")
    return 0
