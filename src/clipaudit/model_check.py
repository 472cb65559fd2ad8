"""``clipaudit models check SPEC...``: what a model spec resolves to, and whether it works, before an audit.

For each spec: resolve it (no fallback: what is asked is what is checked), print what it resolved to (backend,
architecture, source, Hugging Face revision, weights SHA-256, embedding dimension, preprocessing, tokenizer
vocabulary, logit scale and bias), load it, embed a few probe scenes and their captions, and check:

- the weights are real where real ones were asked for (random weights only for the random forms: ``tiny-*``,
  ``.../random``, ``hf-random:``);
- the vectors are finite, of unit norm and of the dimension the spec resolved to;
- a dual encoder's tokenizer has a real vocabulary (at least 1,000 tokens: a placeholder tokenizer, which
  transformers builds silently when the files are missing, has a handful) and gives different vectors to
  different captions.

Any failed check makes the exit status non-zero; ``--json OUT`` writes every spec's facts and checks.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from typing import Any

import numpy as np

from clipaudit.errors import ClipauditError

MIN_VOCAB = 1000
ROLES = ("auto", "clip", "reference")


def role_for(spec: str, role: str, cache_dir: str | None = None) -> str:
    """The role to check ``spec`` in: ``clip`` or ``reference`` as given; for ``auto`` the CLIP role when the spec
    can fill it, else the reference role, as :func:`~clipaudit.models.registry.spec_roles` reads them from the
    spec (no weights loaded)."""
    from clipaudit.models.registry import spec_roles

    return spec_roles(spec, cache_dir)[0] if role == "auto" else role


def _probe_inputs(n: int = 4) -> tuple[list[Any], list[str]]:
    from clipaudit.probe.scenes import render_scene, scene_spec

    specs = [scene_spec(11, i) for i in range(n)]
    return [render_scene(s) for s in specs], [s.captions()[0] for s in specs]


def _unit_finite(vectors: np.ndarray, dim: int | None) -> list[str]:
    problems = []
    if not np.isfinite(vectors).all():
        problems.append("vectors hold NaN or infinite values")
    elif not np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-3):
        problems.append("vectors are not of unit norm")
    if dim is not None and vectors.shape[1] != dim:
        problems.append(f"vectors have dimension {vectors.shape[1]}, the spec resolved to {dim}")
    return problems


def check_spec(spec: str, role: str = "auto", device: str = "cpu", cache_dir: str | None = None) -> dict[str, Any]:
    """The facts and checks of one spec: ``{"spec", "role", "ok", "problems", "notes", "resolved", "provenance",
    "preprocess", "dim", "vocab_size", "logit_scale", "logit_bias"}``; never raises for the model's sake."""
    from clipaudit.models import resolve_model
    from clipaudit.models.provenance import provenance
    from clipaudit.run_view import is_random_spec

    out: dict[str, Any] = {"spec": spec, "role": role, "problems": [], "notes": []}
    try:
        role = out["role"] = role_for(spec, role, cache_dir)
        resolved = resolve_model(spec, role, cache_dir=cache_dir)
    except ClipauditError as exc:
        out.update(ok=False, problems=[f"cannot be resolved: {exc}"])
        return out
    out.update(dim=resolved.dim, provenance=provenance(resolved),
               preprocess=asdict(resolved.preprocess) if resolved.preprocess is not None else None)
    if resolved.is_random and not is_random_spec(spec):
        out["problems"].append("random weights where real ones were asked for")
    elif resolved.is_random:
        out["notes"].append("random weights, as the spec asks: findings with it are meaningless")
    if resolved.preprocess is None:
        out["notes"].append("precomputed vectors: nothing to load or embed here")
        out["ok"] = not out["problems"]
        return out
    try:
        loaded = resolved.load(device)
        images, captions = _probe_inputs()
        vectors = loaded.encode_images(np.stack([resolved.preprocess(image) for image in images]))
        out["dim"] = int(loaded.dim)
        out["problems"] += [f"images: {p}" for p in _unit_finite(vectors, resolved.dim)]
        if role == "clip":
            out["vocab_size"] = getattr(loaded, "vocab_size", None)
            out["logit_scale"] = float(loaded.logit_scale)
            out["logit_bias"] = float(getattr(loaded, "logit_bias", float("nan")))
            if out["vocab_size"] is not None and out["vocab_size"] < MIN_VOCAB:
                out["problems"].append(f"the tokenizer has only {out['vocab_size']} tokens: broken or placeholder "
                                       "tokenizer files")
            texts = loaded.encode_texts(captions)
            out["problems"] += [f"texts: {p}" for p in _unit_finite(texts, vectors.shape[1])]
            if np.isfinite(texts).all() and np.allclose(texts, texts[:1], atol=1e-6):
                out["problems"].append("every caption gets the same vector: the tokenizer or text tower is broken")
    except Exception as exc:  # noqa: BLE001 - a check reports every failure of the model as a problem
        out["problems"].append(f"cannot be loaded or run: {type(exc).__name__}: {exc}")
    out["ok"] = not out["problems"]
    return out


def format_check(result: dict[str, Any]) -> str:
    """The printed block of one spec."""
    facts = result.get("provenance") or {}
    pre = result.get("preprocess") or {}
    lines = [f"{result['spec']}: {'OK' if result['ok'] else 'FAILED'} ({result['role']} role)"]
    if facts:
        lines.append(f"  ran         {facts['ran']} ({facts['backend']}, {facts.get('architecture') or '-'})")
        lines.append(f"  source      {facts.get('source') or '-'}"
                     + (f" @ {facts['revision']}" if facts.get("revision") else ""))
        lines.append(f"  weights     {facts.get('weights_sha256') or 'none (random or not a file)'}")
    if result.get("dim") is not None:
        lines.append(f"  dimension   {result['dim']}")
    if pre:
        lines.append(_preprocess_line(pre))
    if result.get("vocab_size") is not None:
        lines.append(f"  tokenizer   {result['vocab_size']} tokens")
    if result.get("logit_scale") is not None:
        bias = result.get("logit_bias")
        lines.append(f"  scores      logit scale {result['logit_scale']:.4g}"
                     + (f", bias {bias:.4g} (sigmoid)" if bias is not None and np.isfinite(bias) else " (softmax)"))
    lines += [f"  note        {note}" for note in result["notes"]]
    lines += ["  PROBLEM     " + problem.replace("\n", "\n              ") for problem in result["problems"]]
    return "\n".join(lines) + "\n"


def _preprocess_line(pre: dict[str, Any]) -> str:
    """The printed preprocessing of a check (an ``"efficientnet"`` style also names its rescale and steps)."""
    line = (f"  preprocess  {pre['resize_size']} -> {pre['image_size']} px, {pre['interpolation']}, "
            f"{pre['resize_mode']}, style {pre['style']}, mean {tuple(round(m, 4) for m in pre['mean'])}, "
            f"std {tuple(round(s, 4) for s in pre['std'])}")
    if pre["style"] == "efficientnet":
        steps = [name for name in ("normalize", "include_top") if pre[name]]
        line += (f", x * {pre['rescale_factor']:.6g}{' - 1' if pre['rescale_offset'] else ''}"
                 + "".join(f", then {step}" for step in steps))
    return line


def add_models_parser(commands: argparse._SubParsersAction) -> None:
    """``clipaudit models check SPEC [SPEC ...] [--role auto|clip|reference] [--device D] [--cache-dir DIR]
    [--json OUT]``."""
    models = commands.add_parser("models", help="check model specs before an audit")
    actions = models.add_subparsers(dest="action", required=True)
    check = actions.add_parser("check", help="resolve, load and try each spec; exit 1 if any check fails",
                               description=__doc__.split("\n\n")[1] if __doc__ else None)
    check.add_argument("specs", nargs="+", metavar="SPEC", help="model specs (see README, Models)")
    check.add_argument("--role", choices=ROLES, default="auto",
                       help="the role to check each spec in (auto: CLIP if it has a text tower, else reference)")
    check.add_argument("--device", default="cpu", help="where to load the models (cpu, cuda, cuda:1)")
    check.add_argument("--cache-dir", metavar="DIR", help="a Hugging Face hub cache to look for weights in "
                       "(as models.cache_dir)")
    check.add_argument("--json", dest="json_out", metavar="OUT", help="also write the results as JSON to OUT")
    check.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def run_models(args: argparse.Namespace) -> int:
    """Run ``clipaudit models check``: print one block per spec; 0 when every check passed, else 1."""
    results = [check_spec(spec, args.role, args.device, args.cache_dir) for spec in args.specs]
    for result in results:
        sys.stdout.write(format_check(result))
    if args.json_out:
        with open(args.json_out, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, sort_keys=True, default=str)
    return 0 if all(result["ok"] for result in results) else 1
