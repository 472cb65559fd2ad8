"""Safe parsing of failure-type answers, and the request that asks for a clean re-emit.

Answers are read as JSON first and as a Python literal (``ast.literal_eval``) second;
nothing is ever evaluated. Markdown code fences and prose around the object are
tolerated. Accepted shapes::

    {"failure_types": [{"name": "...", "description": "..."}, ...]}
    {"Failure type 1": "description", ...}          # also with single quotes
    {"Failure type 1": {"name": "...", "description": "..."}, ...}
    [{"name": "...", "description": "..."}, ...]
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from typing import Any

from clipaudit.llm.requests import LLMRequest

MAX_ANSWER_CHARS = 100_000
MAX_ECHO_CHARS = 4_000
LIST_KEYS = ("failure_types", "failure types", "failures", "types")
NAME_KEYS = ("name", "failure_type", "type", "title", "label")
DESCRIPTION_KEYS = ("description", "desc", "explanation", "details", "definition")
REPAIR_INSTRUCTION = (
    "Your previous answer could not be parsed. Reply again with the same content as "
    "one valid JSON object and nothing else (no code fences, no prose), in the form "
    '{"failure_types": [{"name": "<short name>", "description": "<one sentence>"}]}.'
)

_FENCE = re.compile(r"```[A-Za-z0-9_-]*\s*\n?(.*?)```", re.DOTALL)


class ParseError(ValueError):
    """The answer holds no readable list of (name, description) pairs."""


def _candidates(text: str) -> Iterator[str]:
    """Substrings that may hold the object: whole text, fenced blocks, outermost brackets."""
    yield text
    for block in _FENCE.findall(text):
        yield block.strip()
    for opener, closer in (("{", "}"), ("[", "]")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            yield text[start : end + 1]


def _load(candidate: str) -> Any:
    """JSON value of ``candidate``, else its Python literal value; ``None`` when neither."""
    try:
        return json.loads(candidate)
    except ValueError:
        pass
    try:
        return ast.literal_eval(candidate)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def _pick(item: dict[Any, Any], keys: tuple[str, ...]) -> str | None:
    lowered = {str(k).strip().lower(): v for k, v in item.items()}
    for key in keys:
        value = lowered.get(key)
        if isinstance(value, (str, int, float)) and str(value).strip():
            return str(value).strip()
    return None


def _from_item(item: Any, fallback_name: str | None = None) -> tuple[str, str]:
    if isinstance(item, dict):
        name = _pick(item, NAME_KEYS) or fallback_name
        description = _pick(item, DESCRIPTION_KEYS)
        if name and description:
            return name, description
    if isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(x, str) for x in item):
        name, description = item[0].strip(), item[1].strip()
        if name and description:
            return name, description
    if isinstance(item, str) and fallback_name and item.strip():
        return fallback_name, item.strip()
    raise ParseError(f"cannot read a (name, description) pair from {type(item).__name__}")


def _normalise(value: Any) -> list[tuple[str, str]]:
    if isinstance(value, list):
        return [_from_item(item) for item in value]
    if not isinstance(value, dict):
        raise ParseError(f"expected an object or a list, got {type(value).__name__}")
    for key, item in value.items():
        if str(key).strip().lower() in LIST_KEYS and isinstance(item, list):
            return [_from_item(entry) for entry in item]
    lists = [v for v in value.values() if isinstance(v, list)]
    if len(value) == 1 and lists:
        return [_from_item(item) for item in lists[0]]
    return [_from_item(v, str(k).strip()) for k, v in value.items()]


def parse_failure_types(answer: str) -> list[tuple[str, str]]:
    """Read ``answer`` into ``[(name, description), ...]`` or raise :class:`ParseError`."""
    if not isinstance(answer, str) or not answer.strip():
        raise ParseError("empty answer")
    if len(answer) > MAX_ANSWER_CHARS:
        raise ParseError(f"answer longer than {MAX_ANSWER_CHARS} characters")
    last_error = "no JSON object or Python literal found"
    for candidate in _candidates(answer.strip()):
        value = _load(candidate)
        if value is None:
            continue
        try:
            pairs = _normalise(value)
        except ParseError as err:
            last_error = str(err)
            continue
        if pairs:
            return pairs
        last_error = "no failure types in the answer"
    raise ParseError(last_error)


def repair_request(original: LLMRequest, bad_answer: str) -> LLMRequest:
    """A follow-up of ``original`` that shows the model its bad answer and asks for valid JSON.

    Same model and parameters (temperature forced to 0); the bad answer is cut to
    4,000 characters.
    """
    messages = [
        *original.messages,
        {"role": "assistant", "content": bad_answer[:MAX_ECHO_CHARS]},
        {"role": "user", "content": REPAIR_INSTRUCTION},
    ]
    params = {**original.params, "temperature": 0.0}
    return LLMRequest(model=original.model, messages=messages, params=params)
