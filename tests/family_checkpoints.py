"""Small checkpoints of every transformers family ``hf:`` loads, for a fake hub cache (:mod:`hub_cache`): the real
architecture with seeded random weights, saved with its processor and tokenizer as ``save_pretrained`` writes
them; and how the library's own output of each image encoder is pooled, to compare against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from clipaudit.models.hf_backend import build_clip_tokenizer_from_open_clip

VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "image_size": 32, "patch_size": 8}
TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
IMAGENET = {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225]}


def _gemma_tokenizer() -> Any:
    """A Gemma tokenizer (SigLIP 2's class) over the CLIP BPE vocabulary, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GemmaTokenizerFast

    clip = build_clip_tokenizer_from_open_clip()
    vocab = dict(clip.get_vocab())
    for token in ("<pad>", "<eos>", "<bos>", "<unk>"):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(line.split()) for line in clip.bpe_ranks] if hasattr(clip, "bpe_ranks") else []
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", end_of_word_suffix="</w>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return GemmaTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                              unk_token="<unk>")


def siglip_tokenizer(directory: Path) -> Any:
    """SigLIP 1's own ``SiglipTokenizer`` over a sentencepiece model trained here, offline, on the words of the CLIP
    BPE vocabulary (2,000 pieces; ``</s>`` is both end and padding, as in google/siglip-*)."""
    import io

    import sentencepiece
    from transformers import SiglipTokenizer

    words = [token.removesuffix("</w>") for token in build_clip_tokenizer_from_open_clip().get_vocab()
             if token.endswith("</w>") and token[:-4].isalpha()]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([" ".join(words[i:i + 8]) for i in range(0, len(words), 8)]), model_writer=model,
        vocab_size=2000, model_type="unigram", eos_id=1, unk_id=2, bos_id=-1, pad_id=-1, eos_piece="</s>",
        unk_piece="<unk>", num_threads=1, minloglevel=2)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "spiece.model").write_bytes(model.getvalue())
    return SiglipTokenizer(str(directory / "spiece.model"))


def _save(directory: Path, model: Any, processor: Any, tokenizer: Any = None) -> None:
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


def build_clip(directory: Path) -> None:
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)
    _save(directory, CLIPModel(config), CLIPImageProcessor(size={"shortest_edge": 32},
                                                           crop_size={"height": 32, "width": 32}),
          build_clip_tokenizer_from_open_clip())


def _save_siglip(directory: Path, tokenizer: Any) -> None:
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    text = {**TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": 64,
            "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    _save(directory, SiglipModel(SiglipConfig(text_config=text, vision_config=VISION)),
          SiglipImageProcessor(size={"height": 32, "width": 32}), tokenizer)


def build_siglip(directory: Path) -> None:
    """SigLIP 1 as google/siglip-base-patch16-224 is published: ``spiece.model`` and no ``tokenizer.json``."""
    _save_siglip(directory, siglip_tokenizer(directory))
    assert not (directory / "tokenizer.json").exists()


def build_siglip2(directory: Path) -> None:
    """SigLIP 2 at a fixed resolution: ``SiglipModel`` with a Gemma tokenizer."""
    _save_siglip(directory, _gemma_tokenizer())


def build_metaclip_2(directory: Path) -> None:
    from transformers import CLIPImageProcessor, MetaClip2Config, MetaClip2Model

    tokenizer = build_clip_tokenizer_from_open_clip()
    text = {**TEXT, "vocab_size": len(tokenizer), "max_position_embeddings": 77,
            "eos_token_id": tokenizer.eos_token_id}
    _save(directory, MetaClip2Model(MetaClip2Config(text_config=text, vision_config=VISION, projection_dim=16)),
          CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer)


def build_dinov2_with_registers(directory: Path) -> None:
    from transformers import BitImageProcessor, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    _save(directory, Dinov2WithRegistersModel(Dinov2WithRegistersConfig(**VISION, num_register_tokens=4)),
          BitImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, **IMAGENET))


def build_dinov3_vit(directory: Path) -> None:
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessorFast, DINOv3ViTModel

    _save(directory, DINOv3ViTModel(DINOv3ViTConfig(**VISION, num_register_tokens=4)),
          DINOv3ViTImageProcessorFast(size={"height": 32, "width": 32}))


def build_dinov3_convnext(directory: Path) -> None:
    from transformers import DINOv3ConvNextConfig, DINOv3ConvNextModel, DINOv3ViTImageProcessorFast

    _save(directory, DINOv3ConvNextModel(DINOv3ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1])),
          DINOv3ViTImageProcessorFast(size={"height": 32, "width": 32}))


def build_ijepa(directory: Path) -> None:
    from transformers import IJepaConfig, IJepaModel, ViTImageProcessor

    _save(directory, IJepaModel(IJepaConfig(**VISION)), ViTImageProcessor(size={"height": 32, "width": 32}))


def build_aimv2(directory: Path) -> None:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, CLIPImageProcessor

    _save(directory, Aimv2VisionModel(Aimv2VisionConfig(**VISION)),
          CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}))


def build_vit(directory: Path) -> None:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    _save(directory, ViTModel(ViTConfig(**VISION)), ViTImageProcessor(size={"height": 32, "width": 32}))


def _cls(output: Any) -> torch.Tensor:
    return output.last_hidden_state[:, 0]


def _mean(output: Any) -> torch.Tensor:
    return output.last_hidden_state.mean(1)


def _pooler(output: Any) -> torch.Tensor:
    return output.pooler_output


IMAGE_ENCODERS: dict[str, tuple[Callable[[Path], None], str, Callable[[Any], torch.Tensor]]] = {
    "dinov2_with_registers": (build_dinov2_with_registers, "", _pooler),
    "dinov3_vit": (build_dinov3_vit, "", _pooler),
    "dinov3_convnext": (build_dinov3_convnext, "", _pooler),
    "ijepa": (build_ijepa, "", _mean),
    "aimv2_vision_model": (build_aimv2, "", _pooler),
    "vit-cls": (build_vit, "#cls", _cls),
    "vit-mean": (build_vit, "#mean", _mean),
}
"""name -> (builder, the spec's pooling suffix, how the library's output is pooled)."""
DUAL_ENCODERS: dict[str, Callable[[Path], None]] = {
    "clip": build_clip, "siglip": build_siglip, "siglip2": build_siglip2, "metaclip_2": build_metaclip_2}
"""Dual encoders scored by ``exp(logit_scale)``, checked against ``AutoImageProcessor``, the tokenizer and
``AutoModel``."""
