"""A fake Hugging Face hub cache: a folder of saved files laid out as ``huggingface_hub`` lays out a download
(``models--ORG--NAME/refs/main``, ``snapshots/<revision>/<file>`` links into ``blobs/<sha256>``), so the real
loading code finds it offline; and small checkpoints to put in it (:func:`build_align`)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

ALIGN_VISION: dict[str, Any] = {
    "image_size": 32, "width_coefficient": 0.25, "depth_coefficient": 1.0, "hidden_dim": 64,
    "kernel_sizes": [3, 5], "in_channels": [32, 16], "out_channels": [16, 64], "strides": [1, 2],
    "num_block_repeats": [1, 2], "expand_ratios": [1, 2], "depthwise_padding": []}
"""A small EfficientNet (ALIGN's vision tower): a 8-channel stem, two stages (the second repeated), 16 output
channels (the width coefficient 0.25 scales 32, 16, 64)."""
ALIGN_TEXT: dict[str, Any] = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 2, "max_position_embeddings": 128}
"""A small BERT (ALIGN's text tower)."""
TINY_ALIGN_PROCESSOR: dict[str, Any] = {
    "size": {"height": 40, "width": 40}, "crop_size": {"height": 32, "width": 32}, "do_center_crop": True,
    "rescale_factor": 1 / 127.5, "rescale_offset": True, "do_normalize": False, "include_top": False, "resample": 2}
"""kakaobrain/align-base's EfficientNetImageProcessor fields (346 -> 289 there), at 40 -> 32."""
ALIGN_TEMPERATURE = 0.05
"""Not the initial 1.0, so that a logit scale read from the wrong place shows."""


def add_repo(cache: Path, repo_id: str, files: Path, revision: str | None = None) -> Path:
    """Put every file under ``files`` into ``cache`` as repo ``repo_id`` at ``revision`` (default: a hash of the
    repo id); returns the snapshot folder."""
    revision = revision or hashlib.sha1(repo_id.encode()).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for path in sorted(p for p in files.rglob("*") if p.is_file()):
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        if not blob.exists():
            shutil.copyfile(path, blob)
        link = snapshot / path.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return snapshot


def bert_tokenizer(words: int = 4000) -> Any:
    """An uncased BERT WordPiece tokenizer built offline: BERT's special tokens, single characters and their
    ``##`` continuations, and the first ``words`` whole words of the CLIP BPE vocabulary (open_clip's file);
    ``model_max_length`` 64, as align-base's tokenizer declares."""
    from transformers import BertTokenizer

    from clipaudit.models.hf_backend import build_clip_tokenizer_from_open_clip

    clip = build_clip_tokenizer_from_open_clip().get_vocab()
    whole = [token[:-4] for token in sorted(clip, key=clip.__getitem__) if token.endswith("</w>")]
    whole = [word for word in whole if len(word) > 1 and word.isascii() and word.isalpha()][:words]
    chars = [chr(c) for c in range(33, 127) if not chr(c).isupper()]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars if c.isalnum()),
              *whole]
    tokenizer = BertTokenizer(vocab={token: i for i, token in enumerate(dict.fromkeys(tokens))})
    tokenizer.model_max_length = 64
    return tokenizer


def build_align(directory: Path, seed: int = 0) -> None:
    """Save a tiny ALIGN checkpoint in ``directory`` as ``save_pretrained`` writes kakaobrain/align-base's files:
    ``AlignModel`` (the EfficientNet and BERT above, seeded random weights, temperature
    :data:`ALIGN_TEMPERATURE`), its ``EfficientNetImageProcessor`` and its BERT tokenizer."""
    import torch
    from transformers import AlignConfig, AlignModel, EfficientNetImageProcessor

    tokenizer = bert_tokenizer()
    text = {**ALIGN_TEXT, "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(seed)
    model = AlignModel(AlignConfig(text_config=text, vision_config=ALIGN_VISION, projection_dim=16,
                                   temperature_init_value=ALIGN_TEMPERATURE))
    model.save_pretrained(directory)
    EfficientNetImageProcessor(**TINY_ALIGN_PROCESSOR).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
