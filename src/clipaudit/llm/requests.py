"""Request and result records for the LLM transport, plus token and cost estimates.

Both records are plain dataclasses of JSON-friendly values so they pickle cheaply
(Ray) and turn into Arrow rows via :meth:`LLMResult.to_dict`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["ok", "failed", "parse_failed"]
Message = dict[str, Any]
PriceTable = Mapping[str, tuple[float, float]]
"""``{model: (usd_per_1k_prompt_tokens, usd_per_1k_completion_tokens)}``."""

ID_HEX_CHARS = 24
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4
REPLY_PRIMING_TOKENS = 3
DEFAULT_COMPLETION_TOKENS = 256


def _canonical_hash(value: object) -> str:
    """Hex sha256 of the canonical JSON form of ``value`` (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:ID_HEX_CHARS]


@dataclass(frozen=True, eq=True)
class LLMRequest:
    """One chat-completion call.

    ``params`` holds the extra keyword arguments of ``chat.completions.create``
    (``temperature``, ``max_tokens``, ``response_format``, ...).

    ``request_id`` is the first 24 hex chars of the sha256 of the canonical JSON of
    ``(model, messages, params)``: equal requests share an id, so it doubles as a
    cache and dedupe key. ``prompt_hash`` hashes ``messages`` only, so the same
    prompt sent to several models or settings can be grouped.
    """

    model: str
    messages: Sequence[Message]
    params: Mapping[str, Any] = field(default_factory=dict)
    request_id: str = field(init=False, compare=False)
    prompt_hash: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        messages = [dict(m) for m in self.messages]
        params = dict(self.params)
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "prompt_hash", _canonical_hash(messages))
        object.__setattr__(
            self,
            "request_id",
            _canonical_hash({"model": self.model, "messages": messages, "params": params}),
        )

    def __hash__(self) -> int:
        return hash(self.request_id)


@dataclass
class LLMResult:
    """Outcome of one :class:`LLMRequest`; every request sent yields exactly one.

    ``status`` is ``"ok"`` (answered, and valid if a validator was given),
    ``"parse_failed"`` (answered but the answer did not validate; ``text`` holds it)
    or ``"failed"`` (no usable answer; ``error`` says why, already scrubbed of secrets).
    Token counts come from the server's ``usage`` when it reports one, otherwise
    from :func:`estimate_tokens`. ``cost`` is ``None`` when the model has no price.
    ``attempts`` counts HTTP calls made (retries and repairs included);
    ``latency_s`` is wall time from the first attempt to the outcome, backoff included.
    """

    request_id: str
    prompt_hash: str
    model: str
    status: Status
    text: str | None = None
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    attempts: int = 0
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        """True when the answer arrived and validated."""
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields, for Arrow tables or JSON lines."""
        return dataclasses.asdict(self)


def estimate_tokens(text: str) -> int:
    """Rough token count of ``text``: ``ceil(len(text) / 4)``, at least 1 for non-empty text.

    Four characters per token is OpenAI's rule of thumb for English; it is used only
    to charge the tokens-per-minute budget before the server reports real usage.
    """
    return math.ceil(len(text) / CHARS_PER_TOKEN)


def _message_text(message: Message) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def estimate_prompt_tokens(messages: Sequence[Message]) -> int:
    """Estimated prompt tokens: text estimate plus 4 per message and 3 for reply priming."""
    return REPLY_PRIMING_TOKENS + sum(MESSAGE_OVERHEAD_TOKENS + estimate_tokens(_message_text(m)) for m in messages)


def completion_budget(params: Mapping[str, Any]) -> int:
    """Completion tokens a request may use: ``max_completion_tokens``, ``max_tokens`` or 256."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = params.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_COMPLETION_TOKENS


def estimate_request_tokens(request: LLMRequest) -> int:
    """Tokens to reserve for ``request``: prompt estimate plus its completion budget.

    This mirrors how OpenAI charges the tokens-per-minute limit at admission
    (prompt + ``max_tokens``); the limiter is corrected with real usage afterwards.
    """
    return estimate_prompt_tokens(request.messages) + completion_budget(request.params)


def price_for(model: str, prices: PriceTable) -> tuple[float, float] | None:
    """Price pair of ``model``: exact match first, else the longest table key that prefixes it."""
    if model in prices:
        return prices[model]
    matches = [key for key in prices if model.startswith(key)]
    return prices[max(matches, key=len)] if matches else None


def estimate_cost(model: str, prompt_tokens: int, completion_tokens: int, prices: PriceTable) -> float | None:
    """USD cost of a call from the per-1k-token price table; ``None`` for an unpriced model."""
    pair = price_for(model, prices)
    if pair is None:
        return None
    per_1k_prompt, per_1k_completion = pair
    return (prompt_tokens * per_1k_prompt + completion_tokens * per_1k_completion) / 1000.0
