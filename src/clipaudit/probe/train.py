"""Train the probe pair: a tiny CLIP that is blind to one attribute because of its captions, and a reference
that sees every attribute.

The blind spot is not wired in. Both models see the same probe scenes (:mod:`clipaudit.probe.scenes`: drawn
scenes, each followed by minimal variants that change its kind, colour, count or position); what differs is the
supervision:

- **probe-clip** (the ``tiny-clip`` architecture, open_clip) is trained contrastively (the CLIP loss, a learned
  temperature) on captions that never name the hidden attribute (``position``: ``two red circles and a blue
  square``). Nothing in its objective rewards telling two arrangements of the same shapes apart, so, as with
  web alt-text that rarely says left or right, it learns not to.
- **probe-dino** (the ``tiny-dino`` architecture, a transformers DINOv2) is trained on the images alone, with
  supervision on every attribute: from its CLS token, linear heads predict the kind, colour and count at each of
  the five positions, and the background. Its CLS token (what the audit embeds) must therefore encode where
  things are.

Everything is seeded (scene draws, initialisation, batch order) and runs on the CPU with ``threads`` torch
threads; :func:`train_pair` returns both models, :mod:`clipaudit.models.packaged` saves them. The default
schedule takes a few minutes on 2 cores (``make train-probe``); tests run a shortened one.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from clipaudit.probe.scenes import COLOURS, KINDS, MAX_COUNT, POSITIONS, corpus_spec, render_scene

log = logging.getLogger("clipaudit")


@dataclass(frozen=True)
class TrainConfig:
    """The training schedule of the probe pair (recorded next to the weights)."""

    hidden: str = "position"
    """The attribute the CLIP's captions never name."""
    seed: int = 1000
    """Seed of the training scenes (the demo audits seed 0: other scenes than those trained on)."""
    scenes: int = 8000
    """Training images: drawn scenes and their minimal variants."""
    variants: int = 4
    """Minimal variants after each drawn scene (one per attribute)."""
    clip_steps: int = 1500
    reference_steps: int = 1000
    batch_size: int = 128
    learning_rate: float = 5e-4
    threads: int = 2

    def __post_init__(self) -> None:
        if self.hidden != "position":
            raise ValueError(f"hidden: only 'position' can be hidden from the captions, got {self.hidden!r}")
        for name in ("scenes", "clip_steps", "reference_steps", "batch_size", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data."""
        return asdict(self)


@dataclass
class TrainingSet:
    """The training scenes, preprocessed once for each model, with their captions' tokens and attribute labels."""

    clip_pixels: Any
    reference_pixels: Any
    tokens: Any
    """(scenes, captions per scene, length) token ids of the captions without the hidden attribute, cut after the
    longest caption's end token: the text tower is causal and pools at the end token, so the padding it never
    attends to can go (the same features as at the full context, at a fraction of the cost)."""
    labels: Any
    """(scenes, heads) attribute classes: per position kind, colour, count (0 = nothing there), background."""


def attribute_labels(spec: Any) -> list[int]:
    """Per position (in POSITIONS order): kind (0 none, 1.. KINDS), colour (0 none, 1.. COLOURS), count (0..4);
    then the background (0 white, 1 gray)."""
    at = {group.position: group for group in spec.groups}
    labels: list[int] = []
    for position in POSITIONS:
        group = at.get(position)
        labels += ([0, 0, 0] if group is None else
                   [KINDS.index(group.kind) + 1, list(COLOURS).index(group.colour) + 1, group.count])
    labels.append(0 if spec.background == "white" else 1)
    return labels


HEAD_SIZES = [len(KINDS) + 1, len(COLOURS) + 1, MAX_COUNT + 1] * len(POSITIONS) + [2]
"""Classes of each attribute head of the reference, in :func:`attribute_labels` order."""


def model_inputs(specs: list[Any]) -> tuple[Any, Any]:
    """Each scene drawn once and preprocessed exactly as the audit will for each model (its own Preprocess):
    (probe-clip pixels, probe-dino pixels), float32 tensors."""
    import torch

    from clipaudit.models import tiny

    clip_pre, ref_pre = tiny.preprocess_for(tiny.TINY_CLIP), tiny.preprocess_for(tiny.TINY_DINO)
    clip_pixels, ref_pixels = [], []
    for spec in specs:
        image = render_scene(spec)
        clip_pixels.append(clip_pre(image))
        ref_pixels.append(ref_pre(image))
    return torch.from_numpy(np.stack(clip_pixels)), torch.from_numpy(np.stack(ref_pixels))


def training_set(cfg: TrainConfig) -> TrainingSet:
    """Render the training scenes and preprocess them for each model; tokenise their captions."""
    import open_clip
    import torch

    from clipaudit.models import tiny

    tiny.register_open_clip_config()
    tokenizer = open_clip.get_tokenizer(tiny.TINY_CLIP)
    specs = [corpus_spec(cfg.seed, index, cfg.variants) for index in range(cfg.scenes)]
    clip_pixels, ref_pixels = model_inputs(specs)
    captions = [spec.captions(omit=frozenset({cfg.hidden})) for spec in specs]
    per_scene = len(captions[0])
    tokens = tokenizer([c for scene in captions for c in scene]).reshape(cfg.scenes, per_scene, -1)
    tokens = tokens[:, :, :int((tokens != 0).sum(dim=-1).max())]
    return TrainingSet(clip_pixels, ref_pixels, tokens, torch.tensor([attribute_labels(spec) for spec in specs]))


def _batches(n: int, batch_size: int, steps: int, rng: random.Random) -> list[list[int]]:
    """``steps`` batches of distinct indices, epoch by epoch through a seeded shuffle."""
    out: list[list[int]] = []
    order: list[int] = []
    while len(out) < steps:
        if len(order) < batch_size:
            order = list(range(n))
            rng.shuffle(order)
        out.append(order[:batch_size])
        order = order[batch_size:]
    return out


def encode_short_text(model: Any, tokens: Any) -> Any:
    """open_clip's ``CLIP.encode_text`` (unit rows) on tokens cut to ``length < context_length``: the positional
    embedding and causal mask cut to match. Equal to the full-context features (tested), at less cost."""
    import torch.nn.functional as F
    from open_clip.transformer import text_global_pool

    length = tokens.shape[1]
    x = model.token_embedding(tokens) + model.positional_embedding[:length]
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type) @ model.text_projection
    return F.normalize(x, dim=-1)


def train_clip(data: TrainingSet, cfg: TrainConfig) -> Any:
    """The probe CLIP: ``tiny-clip`` from its seeded initialisation, trained with the CLIP loss on the captions
    without the hidden attribute (one of each scene's phrasings per step, seeded)."""
    import torch
    import torch.nn.functional as F

    from clipaudit.models.open_clip_backend import build

    model = build("tiny-clip", None)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=cfg.learning_rate)
    rng = random.Random(f"probe-clip/{cfg.seed}")
    started = time.perf_counter()
    for step, batch in enumerate(_batches(len(data.tokens), cfg.batch_size, cfg.clip_steps, rng)):
        index = torch.tensor(batch)
        phrasing = torch.tensor([rng.randrange(data.tokens.shape[1]) for _ in batch])
        images = model.encode_image(data.clip_pixels[index], normalize=True)
        texts = encode_short_text(model, data.tokens[index, phrasing])
        logits = model.logit_scale.exp() * images @ texts.T
        target = torch.arange(len(batch))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        if step % 100 == 0 or step == cfg.clip_steps - 1:
            log.info("probe-clip step %d/%d loss %.3f (%.0f s)", step + 1, cfg.clip_steps, loss.item(),
                     time.perf_counter() - started)
    model.eval()
    return model


def train_reference(data: TrainingSet, cfg: TrainConfig) -> Any:
    """The probe reference: ``tiny-dino`` from its seeded initialisation, trained to predict every attribute of
    the scene from its CLS token (linear heads, cross-entropy summed over the heads; the heads are dropped)."""
    import torch
    import torch.nn.functional as F

    from clipaudit.models import hf_backend, tiny

    with tiny.seeded():
        backbone = hf_backend.build_random(hf_backend.tiny_dino_target())
        heads = torch.nn.Linear(backbone.config.hidden_size, sum(HEAD_SIZES))
    backbone.train()
    params = list(backbone.parameters()) + list(heads.parameters())
    optimiser = torch.optim.Adam(params, lr=cfg.learning_rate)
    rng = random.Random(f"probe-reference/{cfg.seed}")
    bounds = np.cumsum([0, *HEAD_SIZES])
    started = time.perf_counter()
    for step, batch in enumerate(_batches(len(data.labels), cfg.batch_size, cfg.reference_steps, rng)):
        index = torch.tensor(batch)
        logits = heads(backbone(pixel_values=data.reference_pixels[index]).pooler_output)
        labels = data.labels[index]
        loss = sum(F.cross_entropy(logits[:, bounds[h]:bounds[h + 1]], labels[:, h]) for h in range(len(HEAD_SIZES)))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 100 == 0 or step == cfg.reference_steps - 1:
            log.info("probe-dino step %d/%d loss %.3f (%.0f s)", step + 1, cfg.reference_steps, loss.item(),
                     time.perf_counter() - started)
    backbone.eval()
    return backbone


def train_pair(cfg: TrainConfig) -> tuple[Any, Any]:
    """Both probe models, trained on ``cfg.threads`` CPU threads: (open_clip CLIP, transformers Dinov2Model)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        started = time.perf_counter()
        data = training_set(cfg)
        log.info("probe: %d training scenes rendered in %.1f s", cfg.scenes, time.perf_counter() - started)
        return train_clip(data, cfg), train_reference(data, cfg)
    finally:
        torch.set_num_threads(threads)
