"""OpenAI Batch API files: requests out as the input JSONL, answers in from the output JSONL.

Input lines (one request each, ``custom_id`` = the request id)::

    {"custom_id": "3f9a...", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o-mini", "messages": [...], "temperature": 0.0, "max_tokens": 1024, ...}}

Output lines (as the Batch API writes them; an error file has the same shape)::

    {"id": "batch_req_...", "custom_id": "3f9a...",
     "response": {"status_code": 200, "request_id": "...", "body": {<chat.completion>}}, "error": null}

One input file holds at most 50,000 requests and 200 MB (the API's limits): more are written as further files
``NAME.2.jsonl``, ``NAME.3.jsonl``, ... Upload each with ``purpose="batch"``, create a batch with
``endpoint="/v1/chat/completions"`` and ``completion_window="24h"``, and import the output files when done.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from clipaudit.errors import ClipauditError
from clipaudit.io import fs
from clipaudit.llm.requests import LLMRequest, LLMResult, PriceTable, Status, estimate_cost
from clipaudit.llm.scrub import Scrubber

BATCH_URL = "/v1/chat/completions"
MAX_REQUESTS_PER_FILE = 50_000
MAX_BYTES_PER_FILE = 200 * 1024 * 1024


class BatchFileError(ClipauditError, ValueError):
    """A Batch API file that cannot be read (the message names the file and line)."""


def batch_line(request: LLMRequest) -> dict[str, Any]:
    """The input line of ``request``: its id as ``custom_id``, its model, messages and parameters as the body."""
    body = {"model": request.model, "messages": list(request.messages), **dict(request.params)}
    return {"custom_id": request.request_id, "method": "POST", "url": BATCH_URL, "body": body}


def _part_path(path: str, part: int) -> str:
    if part == 1:
        return path
    paths = posixpath if fs.is_remote(path) else os.path
    head, tail = paths.split(path)
    stem, dot, ext = tail.rpartition(".")
    name = f"{stem}.{part}.{ext}" if dot and stem else f"{tail}.{part}"
    return paths.join(head, name)


def export_batch(requests: Sequence[LLMRequest], path: str) -> list[str]:
    """Write ``requests`` as Batch API input JSONL at ``path`` (split into parts at the API's limits).

    Returns the paths written (none for no requests). Requests sharing an id are written once.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for request in requests:
        if request.request_id not in seen:
            seen.add(request.request_id)
            lines.append(json.dumps(batch_line(request), ensure_ascii=False, sort_keys=True))
    paths: list[str] = []
    part: list[str] = []
    size = 0
    for line in lines:
        line_bytes = len(line.encode("utf-8")) + 1
        if part and (len(part) >= MAX_REQUESTS_PER_FILE or size + line_bytes > MAX_BYTES_PER_FILE):
            paths.append(_part_path(path, len(paths) + 1))
            fs.write_text(paths[-1], "\n".join(part) + "\n")
            part, size = [], 0
        part.append(line)
        size += line_bytes
    if part:
        paths.append(_part_path(path, len(paths) + 1))
        fs.write_text(paths[-1], "\n".join(part) + "\n")
    return paths


@dataclass(frozen=True)
class BatchAnswer:
    """One output line: the answer text or why there is none, with the usage the API reported."""

    custom_id: str
    text: str | None
    error: str | None
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _answer_of(item: dict[str, Any]) -> BatchAnswer:
    custom_id = str(item["custom_id"])
    error = item.get("error")
    response = item.get("response") or {}
    body = response.get("body") if isinstance(response, dict) else None
    status = response.get("status_code") if isinstance(response, dict) else None
    if error:
        message = error.get("message") if isinstance(error, dict) else str(error)
        code = error.get("code") if isinstance(error, dict) else None
        return BatchAnswer(custom_id, None, f"batch error {code or ''}: {message}".strip())
    if not isinstance(body, dict):
        return BatchAnswer(custom_id, None, f"batch line without a response body (status {status})")
    if status is not None and status != 200:
        detail = body.get("error", {}).get("message") if isinstance(body.get("error"), dict) else body.get("error")
        return BatchAnswer(custom_id, None, f"batch status {status}: {detail}")
    usage = body.get("usage") or {}
    choices = body.get("choices") or []
    text = None
    if choices and isinstance(choices[0], dict):
        text = (choices[0].get("message") or {}).get("content")
    if not text:
        return BatchAnswer(custom_id, None, "batch answer without content")
    return BatchAnswer(custom_id, str(text), None, int(usage.get("prompt_tokens") or 0),
                       int(usage.get("completion_tokens") or 0))


def read_batch_output(paths: str | Iterable[str]) -> list[BatchAnswer]:
    """The answers of one or more Batch API output (or error) files, in file order; blank lines skipped."""
    answers = []
    for path in [paths] if isinstance(paths, str) else paths:
        try:
            text = fs.read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise BatchFileError(f"cannot read the batch output file {path}: {exc}") from exc
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                answers.append(_answer_of(item))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise BatchFileError(f"{path} line {number}: not a Batch API output line ({exc})") from exc
    return answers


def to_result(answer: BatchAnswer, request: LLMRequest, validator: Callable[[str], object] | None,
              prices: PriceTable, price_factor: float = 0.5) -> LLMResult:
    """The :class:`LLMResult` of an imported answer: validated like a live one (no repair round: it is offline),
    costed at ``price_factor`` of the table's prices."""
    scrub = Scrubber(None)
    status: Status = "ok"
    error = None if answer.error is None else scrub(answer.error)
    if answer.text is None:
        status = "failed"
    elif validator is not None:
        try:
            validator(answer.text)
        except ValueError as exc:
            status, error = "parse_failed", scrub(f"{type(exc).__name__}: {exc}")
    cost = estimate_cost(request.model, answer.prompt_tokens, answer.completion_tokens, prices)
    return LLMResult(
        request_id=request.request_id,
        prompt_hash=request.prompt_hash,
        model=request.model,
        status=status,
        text=answer.text,
        error=error,
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        cost=None if cost is None else cost * price_factor,
        attempts=1 if answer.text is not None or answer.error else 0,
        latency_s=0.0,
    )
