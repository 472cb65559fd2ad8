"""The transformers model families ``hf:`` loads, as data: which class, which role, how an image becomes one vector
(the pooling), how texts are tokenised, and how image-text scores are made.

A family is found from ``config.json``'s ``model_type``. Dual encoders (the CLIP role, or the reference role using
the image tower only): ``clip``, ``siglip`` (SigLIP, and SigLIP 2 at a fixed resolution, whose checkpoints use the
same class), ``metaclip_2``, ``align`` (ALIGN: an EfficientNet image tower and a BERT text tower). Image encoders
(the reference role): ``dinov2``, ``dinov2_with_registers``, ``dinov3_vit``, ``dinov3_convnext``, ``ijepa``,
``aimv2_vision_model``; and any other transformers vision model through ``AutoModel`` when the spec states its
pooling (``hf:ORG/NAME#mean``).

Pooling, the vector of an image (before L2 normalisation):

- ``pooler``: the model's ``pooler_output``. DINOv2, DINOv2 with registers and DINOv3 ViT: the CLS token after the
  final layer norm (the register tokens are left out, as the models' own pooler does); DINOv3 ConvNeXt: the
  layer-normed global average; AIMv2: its attention-pooling head.
- ``cls``: ``last_hidden_state[:, 0]`` (the first token, as it leaves the encoder).
- ``mean``: the mean of ``last_hidden_state`` over its tokens (I-JEPA's, which has no CLS token).

Texts (dual encoders): CLIP and MetaCLIP 2 pad each batch to its longest text (their pooling takes the EOS token, so
padding does not change the vector); SigLIP pads to ``max_length`` 64 as it was trained (its pooling takes the last
position, so the padding is part of the vector); SigLIP 1's ``SiglipTokenizer`` (sentencepiece) lower-cases and strips
punctuation itself, and a Gemma tokenizer (SigLIP 2) gets lower-cased text, as SigLIP 2 was trained on. Scores: CLIP and
MetaCLIP 2 ``softmax(exp(logit_scale) * cos)`` over captions; SigLIP ``sigmoid(exp(logit_scale) * cos + logit_bias)``
per caption.

ALIGN (``AlignModel``, e.g. ``kakaobrain/align-base``), as ``AlignProcessor`` and ``AlignModel`` compute it:

- images: ``EfficientNetImageProcessor``, the ``"efficientnet"`` preprocessing style (align-base: both sides
  resized to 346, bilinear, center crop 289, ``x / 127.5 - 1``, no normalisation, no ``include_top``);
- texts: the BERT tokenizer as ``AlignProcessor`` calls it (``padding="max_length"``, ``max_length=64``), its
  ``token_type_ids`` passed on as the processor passes them. The processor does not truncate (a batch holding a
  text of more than 64 tokens is an error there); here such a text is cut at 64 tokens, the length the
  processor pads to and align-base's tokenizer declares (``model_max_length``). Texts of at most 64 tokens get
  the processor's ids exactly;
- vectors: ``get_image_features`` (the EfficientNet's pooled output, no projection) and ``get_text_features``
  (the projected first token), L2-normalised as ``AlignModel.forward`` normalises them;
- scores: ``softmax(cos / temperature)`` over captions: the logit scale is ``1 / temperature``. ``AlignModel``
  divides its float32 cosine matrix by the float32 temperature where the audit multiplies its cosines by the
  reciprocal, so logits agree to 1e-5, not bit for bit (the vectors themselves are the library's exactly).

``siglip2`` (the NaFlex variable-resolution checkpoints) is refused: its images are patch sequences of a size that
depends on the image, which a fixed ``(3, S, S)`` batch cannot hold; the fixed-resolution SigLIP 2 checkpoints load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .errors import ModelSpecError

POOLINGS = ("pooler", "cls", "mean")


@dataclass(frozen=True)
class Family:
    """One transformers family: its ``model_type``, class, roles, default pooling and text handling."""

    model_type: str
    model_class: str
    dual: bool
    """An image-text dual encoder (``get_image_features`` / ``get_text_features``); else an image encoder."""
    pooling: str | None = "pooler"
    """Image encoders: the default pooling (None: the spec must state one)."""
    text_padding: str = "longest"
    """``longest`` (pad a batch to its longest text) or ``max_length`` (pad every text to ``text_length``)."""
    text_length: int | None = None
    """``max_length`` padding: the tokens every text is padded or cut to (None: the model's own context)."""
    sigmoid: bool = False
    """Scores are per-caption sigmoids with a learnt bias (SigLIP), not a softmax over captions."""
    processor_defaults: str = "clip"
    """Which preprocessing defaults apply without a ``preprocessor_config.json``: ``clip``, ``imagenet`` or
    ``align`` (align-base's ``EfficientNetImageProcessor``)."""
    scale: str = "logit_scale"
    """Where the logit scale comes from: ``logit_scale`` (the model's ``exp(logit_scale)``) or ``temperature``
    (``1 / temperature``, ALIGN)."""
    text_inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    """The tokenizer outputs passed on to ``get_text_features`` (where the tokenizer gives them)."""

    @property
    def roles(self) -> tuple[str, ...]:
        """The roles a model of this family can fill: a dual encoder both (the reference role uses its image
        tower), an image encoder the reference role only."""
        return ("clip", "reference") if self.dual else ("reference",)


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("clip", "CLIPModel", dual=True),
    Family("siglip", "SiglipModel", dual=True, text_padding="max_length", text_length=64, sigmoid=True),
    Family("metaclip_2", "MetaClip2Model", dual=True),
    Family("align", "AlignModel", dual=True, text_padding="max_length", text_length=64, processor_defaults="align",
           scale="temperature", text_inputs=("input_ids", "attention_mask", "token_type_ids")),
    Family("dinov2", "Dinov2Model", dual=False, processor_defaults="imagenet"),
    Family("dinov2_with_registers", "Dinov2WithRegistersModel", dual=False, processor_defaults="imagenet"),
    Family("dinov3_vit", "DINOv3ViTModel", dual=False, processor_defaults="imagenet"),
    Family("dinov3_convnext", "DINOv3ConvNextModel", dual=False, processor_defaults="imagenet"),
    Family("ijepa", "IJepaModel", dual=False, pooling="mean", processor_defaults="imagenet"),
    Family("aimv2_vision_model", "Aimv2VisionModel", dual=False, processor_defaults="clip"),
)}
"""The families ``hf:`` knows, by ``model_type``."""
GENERIC = "auto"
"""The family name of any other vision model, loaded through ``AutoModel`` with a stated pooling."""
REFUSED = {"siglip2": "SigLIP 2 NaFlex checkpoints take images as variable-length patch sequences, which a fixed "
                      "(3, S, S) batch cannot hold; use a fixed-resolution SigLIP 2 checkpoint (e.g. "
                      "google/siglip2-base-patch16-224, model_type siglip)"}


def split_pooling(spec: str, body: str) -> tuple[str, str | None]:
    """``ORG/NAME#mean`` -> (``ORG/NAME``, ``mean``); no ``#``: (body, None); ModelSpecError for an unknown one."""
    source, sep, pooling = body.rpartition("#") if "#" in body else (body, "", "")
    if not sep:
        return body, None
    if pooling not in POOLINGS:
        raise ModelSpecError(f"bad model spec {spec!r}: pooling {pooling!r} after '#' must be one of "
                             f"{', '.join(POOLINGS)}")
    return source, pooling


def family_of(spec: str, config: dict[str, Any], role: str, pooling: str | None) -> tuple[Family, str | None]:
    """The family of a ``config.json`` for ``role`` and the pooling an image encoder uses (a stated one wins over
    the family's default); ModelSpecError for a model that cannot fill the role or has no pooling to use."""
    model_type = str(config.get("model_type", ""))
    if model_type in REFUSED:
        raise ModelSpecError(f"bad model spec {spec!r}: {REFUSED[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None:
        if role == "clip":
            duals = ", ".join(f.model_type for f in FAMILIES.values() if f.dual)
            raise ModelSpecError(f"bad model spec {spec!r} for the clip role: model_type {model_type!r} is not a "
                                 f"dual encoder hf: knows ({duals})")
        if pooling is None:
            raise ModelSpecError(f"bad model spec {spec!r}: model_type {model_type!r} is not a family hf: knows "
                                 f"({', '.join(FAMILIES)}); state how its output becomes one vector: "
                                 f"'hf:ORG/NAME#cls', '#mean' or '#pooler'")
        return Family(model_type, "AutoModel", dual=False, pooling=None, processor_defaults="imagenet"), pooling
    if role == "clip" and not family.dual:
        raise ModelSpecError(f"bad model spec {spec!r} for the clip role: a {model_type} model has no text tower")
    if family.dual:
        if pooling is not None:
            raise ModelSpecError(f"bad model spec {spec!r}: a {model_type} dual encoder has its own image "
                                 "features; no '#pooling' applies")
        return family, None
    return family, pooling or family.pooling


def roles_of(spec: str, config: dict[str, Any], pooling: str | None) -> tuple[str, ...]:
    """The roles a model of this ``config.json`` can fill, from the config alone (nothing loaded): both for a
    dual encoder hf: knows, the reference role for any other model or a stated pooling (which only image encoders
    take); ModelSpecError for a refused family."""
    model_type = str(config.get("model_type", ""))
    if model_type in REFUSED:
        raise ModelSpecError(f"bad model spec {spec!r}: {REFUSED[model_type]}")
    family = FAMILIES.get(model_type)
    if family is None or pooling is not None:
        return ("reference",)
    return family.roles


def embedding_dim(family: Family, config: dict[str, Any]) -> int | None:
    """The embedding dimension from ``config.json`` without loading (None where it is not written there)."""
    if family.dual:
        if family.model_type == "siglip":
            return int((config.get("vision_config") or {}).get("hidden_size", 768))
        return int(config.get("projection_dim", 640 if family.model_type == "align" else 512))
    if family.model_type == "dinov3_convnext":
        sizes = config.get("hidden_sizes")
        return int(sizes[-1]) if sizes else None
    size = config.get("hidden_size")
    return int(size) if size is not None else None


def model_image_size(family: Family, config: dict[str, Any]) -> int:
    """The input resolution the model's config states (224 where it states none)."""
    vision = config.get("vision_config") if family.dual else config
    size = (vision or {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)
