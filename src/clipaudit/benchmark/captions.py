"""The LLM's two distinguishing captions of each exported image pair (where the run's LLM stages ran).

One request per pair, its two own captions as the data block of ``clipaudit/llm/prompts/distinguish.txt`` (data
fenced as data, like every other prompt); the answer is parsed (JSON or a Python literal, never evaluated) into
``(caption_a, caption_b)``. Requests go through :class:`~clipaudit.runtime.llm_session.LLMSession`:
recorded in ``llm_calls`` (kind ``export``), cached (a second export sends nothing), the estimate printed first,
``llm.dry_run`` honoured, fanned out by the runner's ``map_llm``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from clipaudit.llm.parse import ParseError, _candidates, _load
from clipaudit.llm.prompts import DISTINGUISH_FORMAT, load_template, request_params
from clipaudit.llm.requests import LLMRequest
from clipaudit.records import StageStats
from clipaudit.runtime.llm_session import LLMSession, PlannedCall

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.benchmark")
KIND = "export"
_KEYS = (("caption_a", "caption_b"), ("a", "b"))


def parse_distinguishing(answer: str) -> tuple[str, str]:
    """The two captions of an answer; :class:`~clipaudit.llm.parse.ParseError` when there are not two different,
    non-empty ones."""
    if not isinstance(answer, str) or not answer.strip():
        raise ParseError("empty answer")
    for candidate in _candidates(answer.strip()):
        value = _load(candidate)
        if isinstance(value, dict):
            lowered = {str(k).strip().lower(): v for k, v in value.items()}
            for a, b in _KEYS:
                first, second = lowered.get(a), lowered.get(b)
                if isinstance(first, str) and isinstance(second, str) and first.strip() and second.strip():
                    if first.strip().lower() == second.strip().lower():
                        raise ParseError("the two captions are the same")
                    return first.strip(), second.strip()
    raise ParseError("no caption_a / caption_b in the answer")


def plan_calls(config: Config, pairs: Sequence[dict[str, Any]]) -> list[PlannedCall]:
    """One request per pair (in pair order), its two own captions as the data."""
    llm = config.llm
    template = load_template("distinguish")
    params = request_params(llm.temperature, llm.max_tokens, DISTINGUISH_FORMAT if llm.structured_output else None)
    calls = []
    for pair in pairs:
        text = template.render({"caption_a": pair["caption_a"], "caption_b": pair["caption_b"]})
        request = LLMRequest(llm.model, [{"role": "user", "content": text}], params)
        calls.append(PlannedCall(request, KIND, "", {"pair_id": pair["pair_id"]}))
    return calls


def distinguishing_captions(config: Config, tables: RunTables, pairs: Sequence[dict[str, Any]],
                            stats: StageStats) -> dict[str, tuple[str, str]]:
    """pair_id -> the LLM's (caption_a, caption_b), for the pairs with a usable answer (asked now or before)."""
    calls = plan_calls(config, pairs)
    with LLMSession(config, tables, None, KIND, stats) as session:
        answers = session.send(calls, parse_distinguishing, label=KIND)
    out: dict[str, tuple[str, str]] = {}
    for pair, call in zip(pairs, calls, strict=True):
        text = answers.get(call.request.request_id)
        if text is None:
            continue
        try:
            out[pair["pair_id"]] = parse_distinguishing(text)
        except ParseError as exc:
            log.warning("export: the answer for pair %s does not parse (%s); left without LLM captions",
                        pair["pair_id"], exc)
    return out
