"""LLM transport: requests and results, shared rate limits, a retrying async worker, answer parsing.

Importing this package is cheap; ``LLMWorker`` (which imports ``openai``) loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from clipaudit.llm.parse import ParseError, parse_failure_types, repair_request
from clipaudit.llm.ratelimit import (
    BudgetBackend,
    Lease,
    LocalBudget,
    LocalLimiter,
    RateBudget,
    RateLimiter,
    RateLimits,
    RequestTooLarge,
    SharedLimiter,
    UnlimitedLimiter,
)
from clipaudit.llm.requests import (
    LLMRequest,
    LLMResult,
    PriceTable,
    estimate_cost,
    estimate_request_tokens,
    estimate_tokens,
)

if TYPE_CHECKING:
    from clipaudit.llm.client import LLMWorker

__all__ = [
    "BudgetBackend",
    "LLMRequest",
    "LLMResult",
    "LLMWorker",
    "Lease",
    "LocalBudget",
    "LocalLimiter",
    "ParseError",
    "PriceTable",
    "RateBudget",
    "RateLimiter",
    "RateLimits",
    "RequestTooLarge",
    "SharedLimiter",
    "UnlimitedLimiter",
    "estimate_cost",
    "estimate_request_tokens",
    "estimate_tokens",
    "parse_failure_types",
    "repair_request",
]


def __getattr__(name: str) -> Any:
    if name == "LLMWorker":
        from clipaudit.llm.client import LLMWorker

        return LLMWorker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
