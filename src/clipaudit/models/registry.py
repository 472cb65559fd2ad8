"""The model registry: one place that turns a spec string into a model and its preprocessing.

Specs:

==========================================  =========================================================
``open_clip:ARCH/TAG``                      open_clip, pretrained tag: ``open_clip:ViT-B-32/openai``
``open_clip:ARCH//path/to/checkpoint.pt``   open_clip architecture + local checkpoint (absolute or relative)
``open_clip:ARCH/random``                   the architecture with seeded random weights (benchmarks)
``hf:ORG/NAME`` or ``hf:/path/to/dir``      transformers CLIP or DINOv2 (family from config.json)
``hf-random:dinov2-small``                  a known transformers architecture, seeded random weights (benchmarks)
``python:package.module:factory``           a user model (see :mod:`clipaudit.models.plugin`)
``precomputed:INDEX_DIR``                   CLIP role only: vectors read from a clip-retrieval index, not computed
                                            (:mod:`clipaudit.models.precomputed`)
``timm:NAME.TAG``                           reference role only: a timm image model's pooled features; also
                                            ``timm:hf-hub:ORG/NAME``, ``timm:NAME//path/to/weights.safetensors``,
                                            ``timm:NAME/random`` (:mod:`clipaudit.models.timm_backend`)
``tiny-clip`` / ``tiny-dino``               small random models for tests and demos (:mod:`clipaudit.models.tiny`)
``probe-clip`` / ``probe-dino``             the tiny architectures trained on probe scenes, weights in the package
                                            (:mod:`clipaudit.models.packaged`): the demo's pair, CLIP blind to
                                            position by its captions
==========================================  =========================================================

:func:`resolve_model` runs on the driver: it validates the spec, works out the preprocessing, and checks that
the weights can be had (the local cache, else one bounded probe of the Hub: it returns or raises within
seconds, never hangs, never downloads weights). It returns a small picklable :class:`ResolvedModel`; its
:meth:`ResolvedModel.load` builds the model where it runs (once per actor). ``load("cuda")`` puts the model on
the GPU in fp16 (inputs cast to fp16, outputs float32); on the CPU everything is fp32.

:func:`spec_roles` says which roles a spec can fill without resolving or loading it (``clipaudit models check
--role auto`` picks the role by it).

Random models (``tiny-*``, ``.../random``, ``hf-random:``, fallbacks) have ``is_random=True``: their findings
are meaningless. Their initialisation is seeded, so every process builds bit-identical weights.

Nothing here imports torch, open_clip or transformers at module import.
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from . import hf_backend, open_clip_backend, packaged, plugin, precomputed, timm_backend, tiny
from .base import ROLES
from .errors import ModelSpecError, ModelUnavailableError
from .resolved import ResolvedModel

logger = logging.getLogger(__name__)

FALLBACKS = ("none", "tiny")
PREFIXES = ("open_clip:", "hf:", "hf-random:", "python:", precomputed.PREFIX, timm_backend.PREFIX)
SPEC_HELP = ("'open_clip:ARCH/TAG' (e.g. open_clip:ViT-B-32/openai), 'open_clip:ARCH//path/to/checkpoint.pt', "
             "'hf:ORG/NAME' or 'hf:/path/to/dir', 'hf-random:dinov2-small', 'python:package.module:factory', "
             "'precomputed:INDEX_DIR' (CLIP role: a clip-retrieval index), "
             "'timm:NAME.TAG' or 'timm:hf-hub:ORG/NAME' (reference role: a timm model), "
             "'tiny-clip', 'tiny-dino', 'probe-clip', 'probe-dino'")


@dataclass(frozen=True)
class ParsedSpec:
    """A spec split into its kind (``open_clip``, ``hf``, ``hf-random``, ``python``, ``precomputed``, ``timm``,
    ``tiny``, ``packaged``) and the rest."""

    kind: str
    body: str


def parse_spec(spec: str) -> ParsedSpec:
    """Split a spec string; ModelSpecError (naming the spec and the accepted forms) when it fits none."""
    if not isinstance(spec, str) or not spec.strip():
        raise ModelSpecError(f"bad model spec {spec!r}: expected one of {SPEC_HELP}")
    text = spec.strip()
    if text in (tiny.TINY_CLIP, tiny.TINY_DINO):
        return ParsedSpec("tiny", text)
    if text in packaged.PACKAGED:
        return ParsedSpec("packaged", text)
    for prefix in PREFIXES:
        if text.startswith(prefix):
            body = text[len(prefix):]
            if not body:
                break
            return ParsedSpec(prefix[:-1], body)
    raise ModelSpecError(f"bad model spec {spec!r}: expected one of {SPEC_HELP}")


def _resolve_exact(spec: str, role: str, cache_dir: str | None) -> ResolvedModel:
    parsed = parse_spec(spec)
    spec = spec.strip()
    if parsed.kind == "tiny":
        if role == "clip" and parsed.body == tiny.TINY_DINO:
            raise ModelSpecError(f"bad model spec {spec!r} for the clip role: tiny-dino has no text tower "
                                 "(use tiny-clip)")
        target: Any = (open_clip_backend.OpenClipTarget(tiny.TINY_CLIP, random=True)
                       if parsed.body == tiny.TINY_CLIP else hf_backend.tiny_dino_target())
        return ResolvedModel(spec, spec, role, tiny.preprocess_for(parsed.body), True,
                             tiny.dim_for(parsed.body), cache_dir, target)
    if parsed.kind == "packaged":
        return _resolve_packaged(spec, parsed.body, role, cache_dir)
    if parsed.kind == "open_clip":
        target, preprocess, dim = open_clip_backend.resolve(spec, parsed.body, role, cache_dir)
        return ResolvedModel(spec, spec, role, preprocess, target.random, dim, cache_dir, target)
    if parsed.kind == "hf":
        target, preprocess, dim = hf_backend.resolve(spec, parsed.body, role, cache_dir)
        return ResolvedModel(spec, spec, role, preprocess, False, dim, cache_dir, target)
    if parsed.kind == "hf-random":
        target, preprocess, dim = hf_backend.resolve_random(spec, parsed.body, role)
        return ResolvedModel(spec, spec, role, preprocess, True, dim, cache_dir, target)
    if parsed.kind == "timm":
        target, preprocess, dim = timm_backend.resolve(spec, parsed.body, role, cache_dir)
        return ResolvedModel(spec, spec, role, preprocess, target.random, dim, cache_dir, target)
    if parsed.kind == precomputed.KIND:
        found = precomputed.resolve(spec, parsed.body, role)
        return ResolvedModel(spec, spec, role, None, False, found.dim, cache_dir, found)
    target, preprocess = plugin.resolve(spec, parsed.body)
    return ResolvedModel(spec, spec, role, preprocess, False, None, cache_dir, target)


def _resolve_packaged(spec: str, name: str, role: str, cache_dir: str | None) -> ResolvedModel:
    """``probe-clip`` / ``probe-dino``: a tiny architecture with the trained weights shipped in the package."""
    if role == "clip" and name == packaged.PROBE_DINO:
        raise ModelSpecError(f"bad model spec {spec!r} for the clip role: probe-dino has no text tower "
                             "(use probe-clip)")
    try:
        path = str(packaged.checked_path(name))
    except (FileNotFoundError, KeyError, ValueError) as exc:
        raise ModelUnavailableError(spec, str(exc)) from exc
    arch = packaged.ARCHITECTURE[name]
    target: Any = (open_clip_backend.OpenClipTarget(arch, packaged=path) if name == packaged.PROBE_CLIP
                   else hf_backend.tiny_dino_target(weights=path))
    return ResolvedModel(spec, spec, role, tiny.preprocess_for(arch), False, tiny.dim_for(arch), cache_dir, target)


def spec_roles(spec: str, cache_dir: str | None = None) -> tuple[str, ...]:
    """The roles a spec can fill, ``clip`` first: read from what the spec names, no weights loaded.

    A dual encoder fills both (the reference role uses its image tower): ``open_clip:``, ``tiny-clip``,
    ``probe-clip``, an ``hf:`` model whose ``config.json`` names a dual-encoder family. An image model fills the
    reference role only: ``timm:``, ``tiny-dino``, ``probe-dino``, any other ``hf:`` model. ``precomputed:``
    vectors fill the CLIP role only. Where only loading can tell, both, and resolving or loading in the CLIP role
    then says what is missing: a ``python:`` factory that is a function (a class without ``encode_texts`` fills
    the reference role only), an ``hf:`` model whose ``config.json`` cannot be had here.

    Raises:
        ModelSpecError: a malformed spec, or one that fills no role (a refused ``hf:`` family, an unknown
            ``hf-random:`` name, a ``python:`` factory that cannot be imported).
    """
    parsed = parse_spec(spec)
    if cache_dir:
        cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    image_only = {tiny.TINY_DINO, packaged.PROBE_DINO}
    if parsed.kind in ("tiny", "packaged"):
        return ("reference",) if parsed.body in image_only else ROLES
    if parsed.kind == "hf":
        return hf_backend.roles(spec.strip(), parsed.body, cache_dir) or ROLES
    if parsed.kind == "hf-random":
        return hf_backend.random_roles(spec.strip(), parsed.body)
    if parsed.kind == "timm":
        return ("reference",)
    if parsed.kind == precomputed.KIND:
        return ("clip",)
    if parsed.kind == "python":
        return _plugin_roles(spec.strip(), parsed.body)
    return ROLES


def _plugin_roles(spec: str, body: str) -> tuple[str, ...]:
    """A ``python:`` factory's roles as far as it tells uncalled: a class without ``encode_texts`` the reference
    role only, anything else both (what a function returns is known once it is called)."""
    factory = plugin.find_factory(spec, plugin.parse(spec, body))
    if inspect.isclass(factory) and not callable(getattr(factory, "encode_texts", None)):
        return ("reference",)
    return ROLES


def resolve_model(spec: str, role: str, *, fallback: str = "none", cache_dir: str | None = None) -> ResolvedModel:
    """Resolve a spec for a role (``clip`` or ``reference``) on the driver; fast, never downloads weights.

    Args:
        spec: a model spec (see the module docstring).
        role: ``clip`` (needs a text tower) or ``reference``.
        fallback: ``none``: unavailable weights raise ModelUnavailableError; ``tiny``: use ``tiny-clip`` /
            ``tiny-dino`` for the role instead (``is_random=True``, ``requested_spec`` kept), with a WARNING.
        cache_dir: a Hugging Face hub cache directory to look for weights in (``models.cache_dir``).

    Raises:
        ModelSpecError: a malformed spec, an unknown architecture or tag, or a model that cannot fill the role
            (a ``precomputed:`` spec in the reference role, or an index that cannot be read: no fallback, since
            random vectors cannot stand in for a user's index).
        ModelUnavailableError: the weights cannot be had here (and ``fallback`` is ``none``).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if fallback not in FALLBACKS:
        raise ValueError(f"fallback must be one of {FALLBACKS}, got {fallback!r}")
    if cache_dir:
        cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
    start = time.perf_counter()
    try:
        resolved = _resolve_exact(spec, role, cache_dir)
    except ModelUnavailableError as exc:
        if fallback != "tiny":
            raise
        name = tiny.TINY_FOR_ROLE[role]
        logger.warning("model %r for the %s role is not available (%s); using %s instead because "
                       "models.fallback is 'tiny': its weights are RANDOM and the findings are MEANINGLESS",
                       spec, role, exc.reason, name)
        tiny_model = _resolve_exact(name, role, cache_dir)
        return ResolvedModel(tiny_model.spec, spec, role, tiny_model.preprocess, True, tiny_model.dim,
                             cache_dir, tiny_model.target)
    if resolved.is_random:
        logger.warning("model %r (%s role) has random weights: the findings are meaningless", resolved.spec, role)
    logger.info("resolved %s for the %s role in %.2f s", resolved.spec, role, time.perf_counter() - start)
    return resolved
