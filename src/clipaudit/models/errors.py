"""Errors of the model registry: a bad spec, or weights that cannot be had on this machine."""

from __future__ import annotations

from clipaudit.errors import ClipauditError


class ModelSpecError(ClipauditError, ValueError):
    """A model spec string that cannot name a model (bad syntax, unknown architecture, wrong role)."""


class ModelUnavailableError(ClipauditError, RuntimeError):
    """The weights (or tokenizer) a spec names cannot be had on this machine.

    The message names the spec, says what was looked for, and how to provide local weights.
    """

    def __init__(self, spec: str, reason: str, *, hint: str = "") -> None:
        self.spec = spec
        self.reason = reason
        super().__init__(unavailable_message(spec, reason, hint=hint))


def unavailable_message(spec: str, reason: str, *, hint: str = "") -> str:
    """The full, actionable message of a ModelUnavailableError."""
    lines = [
        f"model {spec!r} is not available: {reason}",
        "To provide local weights:",
    ]
    if hint:
        lines.append(f"  - {hint};")
    lines.extend([
        ("  - name local weights in the spec: 'open_clip:ARCH//path/to/checkpoint.pt' (or .safetensors), "
         "or 'hf:/path/to/dir' (a directory written by save_pretrained: config.json, weights, "
         "preprocessor and tokenizer files);"),
        ("  - or put the weights in the Hugging Face cache on this machine (HF_HOME, default "
         "~/.cache/huggingface; e.g. copy the cache of a machine that ran `hf download REPO`);"),
        "  - or set `models.cache_dir` to a directory that holds such a Hugging Face hub cache.",
        "For a demo without weights set `models.fallback: tiny` (random tiny models: the findings are meaningless).",
    ])
    return "\n".join(lines)
