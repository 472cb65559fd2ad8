"""An LLM session: the planned requests of one stage run sent once, cached, estimated and recorded.

Used by the summarize and validate stages and by ``clipaudit export`` (distinguishing captions). A
:class:`PlannedCall` is a request and what it is for. :class:`LLMSession` looks each up in the ``llm_calls`` table
(:class:`CallLog`: an ``ok`` row is never sent again), prints the number of requests and the most they can cost,
and then, per ``llm``: writes the prompts and the estimate under ``run_dir/llm/`` (dry run), writes or reads an
OpenAI Batch API file, or fans the requests out through a runner (Ray async actors sharing one rate budget, or one
in-process worker), recording every outcome as it arrives. The API key is read from the environment variable named
by ``llm.api_key_env`` when, and only when, something is to be sent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.errors import ClipauditError
from clipaudit.io import fs
from clipaudit.llm import batch_api
from clipaudit.llm.requests import LLMRequest, LLMResult, estimate_prompt_tokens, estimate_request_tokens, price_for
from clipaudit.llm.scrub import Scrubber
from clipaudit.records import LLM_CALLS, LLM_CALLS_KEY, LLM_CALLS_SCHEMA, StageStats

if TYPE_CHECKING:
    from clipaudit.config import Config, LLMConfig
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.llm")

LLM_DIR = "llm"
"""``run_dir/llm/``: a dry run's prompts and estimates."""


class MissingKeyError(ClipauditError, RuntimeError):
    """Requests are to be sent but the environment variable named by ``llm.api_key_env`` is not set."""


def read_api_key(llm: LLMConfig) -> str:
    """The API key from the environment variable ``llm.api_key_env``; :class:`MissingKeyError` naming the variable
    (never a value) when it is unset or empty."""
    value = os.environ.get(llm.api_key_env, "").strip()
    if not value:
        raise MissingKeyError(
            f"the environment variable {llm.api_key_env} (named by llm.api_key_env) is not set: export your API "
            f"key in it (for a local server without keys any value will do), or use --dry-run or --export-batch "
            f"to send nothing")
    return value


@dataclass(frozen=True)
class PlannedCall:
    """A request and what it is for: ``kind`` (``summarize``, ``merge``, ``validate``), ``method`` (``DAF``,
    ``TCAC`` or empty) and ``meta`` (JSON-able: the cases or failure type it covers)."""

    request: LLMRequest
    kind: str
    method: str
    meta: dict[str, Any] = field(default_factory=dict)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class CallLog:
    """The ``llm_calls`` table: the record of every request and the cache that makes a re-run send nothing new.

    One row per request_id holding its latest outcome; written by the driver only (a keyed merge: a failed row is
    replaced when the request is answered later).
    """

    def __init__(self, tables: RunTables, scrub: Scrubber) -> None:
        self.tables = tables
        self.scrub = scrub

    def rows(self, ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The rows of ``ids`` that exist, by request_id."""
        wanted = list(dict.fromkeys(ids))
        table = self.tables.read(LLM_CALLS)
        if table is None or not wanted:
            return {}
        table = table.filter(pc.is_in(table.column("request_id"), value_set=pa.array(wanted, pa.string())))
        return {row["request_id"]: row for row in table.to_pylist()}

    def answered(self, ids: Iterable[str]) -> dict[str, str]:
        """request_id -> answer text, for the ``ok`` rows of ``ids``."""
        return {rid: row["response"] for rid, row in self.rows(ids).items()
                if row["status"] == "ok" and row["response"] is not None}

    def record(self, calls: Mapping[str, PlannedCall], results: Sequence[LLMResult], source: str) -> None:
        """Write ``results`` (one per request) as the latest rows of their requests."""
        if not results:
            return
        rows = []
        for result in results:
            call = calls[result.request_id]
            request = {"model": call.request.model, "messages": list(call.request.messages),
                       "params": dict(call.request.params)}
            rows.append({
                "request_id": result.request_id, "prompt_hash": result.prompt_hash, "kind": call.kind,
                "method": call.method, "model": result.model, "status": result.status,
                "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
                "tokens": result.prompt_tokens + result.completion_tokens, "cost": result.cost,
                "attempts": result.attempts, "latency_s": result.latency_s,
                "response": None if result.text is None else self.scrub.secret_only(result.text),
                "error": None if result.error is None else self.scrub(result.error, limit=2000),
                "request": json.dumps(request, ensure_ascii=False, sort_keys=True),
                "meta": json.dumps(call.meta, ensure_ascii=False, sort_keys=True),
                "source": source, "updated_at": _now(),
            })
        table = pa.Table.from_pylist(rows, schema=LLM_CALLS_SCHEMA)
        if not self.tables.exists(LLM_CALLS):
            self.tables.insert_new(LLM_CALLS, table, LLM_CALLS_KEY, LLM_CALLS_SCHEMA)
            return
        handle = self.tables.db.open_table(LLM_CALLS)
        handle.merge_insert(LLM_CALLS_KEY).when_matched_update_all().when_not_matched_insert_all().execute(table)


def money(value: float | None) -> str:
    return "unknown" if value is None else f"${value:,.4f}"


class LLMSession:
    """Sends the planned calls of one stage run: cache look-up, the printed estimate, dry run, Batch API files,
    live fan-out through a runner (made on first need: Ray is started only when something is sent), recording.

    Use as a context manager; it stops a Ray session it started.
    """

    def __init__(self, config: Config, tables: RunTables, runner: object | None, stage: str,
                 stats: StageStats) -> None:
        self.config = config
        self.llm = config.llm
        self.tables = tables
        self.stage = stage
        self.stats = stats
        self._runner = runner if hasattr(runner, "map_llm") else None
        self._stack = ExitStack()
        self.calls = CallLog(tables, Scrubber(os.environ.get(self.llm.api_key_env) or None))

    def __enter__(self) -> LLMSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def dry_run(self) -> bool:
        """``llm.dry_run``: write prompts and the estimate, send nothing, write no table."""
        return self.llm.dry_run

    @property
    def offline(self) -> bool:
        """Whether nothing may be sent live: a dry run, or a Batch API file set (``llm.export_batch`` /
        ``llm.import_batch``)."""
        return self.dry_run or bool(self.llm.export_batch or self.llm.import_batch)

    def runner(self) -> Any:
        """The runner to send through: the pipeline's, else a local one or a Ray session per ``ray.runner``."""
        if self._runner is None:
            from clipaudit.runtime import LazyRunner

            runner = LazyRunner(self.config)
            self._stack.callback(runner.close)
            self._runner = runner
        return self._runner

    def estimate(self, label: str, pending: Sequence[PlannedCall], answered: int) -> dict[str, Any]:
        """The numbers behind the printed estimate: requests, tokens and the most they can cost."""
        prompt = sum(estimate_prompt_tokens(c.request.messages) for c in pending)
        completion = sum(estimate_request_tokens(c.request) - estimate_prompt_tokens(c.request.messages)
                         for c in pending)
        price = price_for(self.llm.model, self.llm.price_table())
        cost = None if price is None else (prompt * price[0] + completion * price[1]) / 1000.0
        return {"stage": self.stage, "label": label, "model": self.llm.model, "requests": len(pending),
                "answered_before": answered, "prompt_tokens": prompt, "completion_tokens_max": completion,
                "cost_usd_max": cost, "price_per_1k": None if price is None else list(price),
                "dry_run": self.dry_run}

    def print_estimate(self, estimate: dict[str, Any]) -> None:
        """Print the estimate line (the user must see it before anything is sent)."""
        plural = "" if estimate["requests"] == 1 else "s"
        head = f"{estimate['label']}: {estimate['requests']} request{plural} to send to {estimate['model']}"
        head += f" ({estimate['answered_before']} answered before)"
        if estimate["requests"]:
            price = estimate["price_per_1k"]
            cost = (f"estimated cost at most {money(estimate['cost_usd_max'])} (${price[0]:g} / ${price[1]:g} per "
                    f"1k prompt / completion tokens)" if price is not None else
                    f"cost unknown: no price for {estimate['model']} in llm.prices")
            head += (f"; about {estimate['prompt_tokens']:,} prompt tokens + at most "
                     f"{estimate['completion_tokens_max']:,} completion tokens; {cost}")
        if self.dry_run:
            head += f"; dry run: nothing sent, prompts in {fs.join(self.config.run_dir, LLM_DIR)}"
        print(head, flush=True)

    def _write_prompts(self, label: str, calls: Sequence[PlannedCall], answered: Mapping[str, str],
                       estimate: dict[str, Any]) -> str:
        lines = [json.dumps({
            "request_id": c.request.request_id, "kind": c.kind, "method": c.method, "model": c.request.model,
            "messages": list(c.request.messages), "params": dict(c.request.params),
            "prompt_tokens_estimate": estimate_prompt_tokens(c.request.messages),
            "answered": c.request.request_id in answered, "meta": c.meta,
        }, ensure_ascii=False, sort_keys=True) for c in calls]
        stem = f"{label}_{self.tables.tag}" if self.tables.tag else label
        path = fs.join(self.config.run_dir, LLM_DIR, f"{stem}_prompts.jsonl")
        fs.write_text(path, "".join(line + "\n" for line in lines))
        fs.write_json(fs.join(self.config.run_dir, LLM_DIR, f"{stem}_estimate.json"), estimate)
        return path

    def send(self, calls: Sequence[PlannedCall], validator: Callable[[str], object], label: str,
             batch_files: bool = False) -> dict[str, str]:
        """Make sure every call has been asked, as far as this run may; return request_id -> ``ok`` answer text.

        ``batch_files``: this call list honours ``llm.export_batch`` / ``llm.import_batch`` (summarize's batch
        requests); other lists send nothing while either is set.
        """
        unique = list({c.request.request_id: c for c in calls}.values())
        by_id = {c.request.request_id: c for c in unique}
        answered = self.calls.answered(by_id)
        pending = [c for c in unique if c.request.request_id not in answered]
        estimate = self.estimate(label, pending, len(answered))
        self.stats.notes.setdefault("estimates", []).append(estimate)
        self.print_estimate(estimate)
        self.stats.add_count(f"{label}_requests", len(unique))
        self.stats.add_count(f"{label}_cached", len(answered))
        if self.dry_run:
            path = self._write_prompts(label, unique, answered, estimate)
            log.info("dry run: %d prompts written to %s; nothing sent", len(unique), path)
            return answered
        if batch_files and self.llm.export_batch:
            paths = batch_api.export_batch([c.request for c in pending], self.llm.export_batch)
            log.info("%s: %d requests written as OpenAI Batch API input to %s; nothing sent", label, len(pending),
                     ", ".join(paths) or "(no file: nothing to send)")
            self.stats.notes["export_batch"] = paths
            return answered
        if batch_files and self.llm.import_batch:
            return {**answered, **self._import(by_id, pending, validator, label)}
        if self.offline:
            if pending:
                log.warning("%s: %d requests not sent while llm.export_batch / llm.import_batch is set", label,
                            len(pending))
            return answered
        return {**answered, **self._send_live(by_id, pending, validator, label)}

    def _too_large(self, pending: Sequence[PlannedCall]) -> tuple[list[PlannedCall], list[LLMResult]]:
        fits, failed = [], []
        for call in pending:
            need = estimate_request_tokens(call.request)
            if need > self.llm.tokens_per_minute:
                failed.append(LLMResult(call.request.request_id, call.request.prompt_hash, call.request.model,
                                        "failed", error=f"request needs about {need} tokens, more than "
                                        f"llm.tokens_per_minute ({self.llm.tokens_per_minute}): never sent"))
            else:
                fits.append(call)
        return fits, failed

    def _send_live(self, by_id: Mapping[str, PlannedCall], pending: Sequence[PlannedCall],
                   validator: Callable[[str], object], label: str) -> dict[str, str]:
        if not pending:
            return {}
        fits, failed = self._too_large(pending)
        self.calls.record(by_id, failed, "live")
        answers: dict[str, str] = {}
        if not fits:
            return answers
        api_key = read_api_key(self.llm)
        started = time.perf_counter()
        for chunk in self.runner().map_llm([c.request for c in fits], self.llm, api_key, validator):
            self.calls.record(by_id, chunk, "live")
            for result in chunk:
                self.stats.add_count(f"{label}_{result.status}")
                if result.ok and result.text is not None:
                    answers[result.request_id] = result.text
        self.stats.add_count(f"{label}_sent", len(fits))
        self.stats.add_time(f"llm_{label}", time.perf_counter() - started)
        return answers

    def _import(self, by_id: Mapping[str, PlannedCall], pending: Sequence[PlannedCall],
                validator: Callable[[str], object], label: str) -> dict[str, str]:
        path = self.llm.import_batch or ""
        answers = batch_api.read_batch_output(path)
        wanted = {c.request.request_id for c in pending}
        results = [batch_api.to_result(a, by_id[a.custom_id].request, validator, self.llm.price_table(),
                                       self.llm.batch_price_factor)
                   for a in answers if a.custom_id in wanted]
        self.calls.record(by_id, results, "batch")
        unknown = sum(1 for a in answers if a.custom_id not in by_id)
        for result in results:
            self.stats.add_count(f"{label}_{result.status}")
        missing = len(wanted - {r.request_id for r in results})
        log.info("%s: imported %d answers from %s (%d ok); %d lines for other requests ignored; %d requests still "
                 "without an answer", label, len(results), path, sum(r.ok for r in results), unknown, missing)
        self.stats.add_count(f"{label}_imported", len(results))
        return {r.request_id: r.text for r in results if r.ok and r.text is not None}
