"""Summarize stage (paper section 3.1.4): an LLM names the failure types the DAF and TCAC cases show -> the
``failure_types`` taxonomy, every request recorded in ``llm_calls``.

1. Cases: ``daf_cases`` (the image's caption, then its CLIP-only neighbours' captions) and the ``is_case`` rows
   of ``tcac_cases`` (top captions before and after, per transform), most divergent first (``llm.methods``,
   ``llm.max_cases``).
2. Prompts: the paper's Figure 2 prompt for DAF, a matching one for TCAC (templates in
   ``clipaudit/llm/prompts/``, replaceable by ``llm.daf_template`` / ``llm.tcac_template``); cases are packed
   into prompts up to ``llm.batch_tokens`` estimated tokens, as JSON inside a fenced data block.
3. Requests: one per prompt, keyed by a hash of (model, messages, parameters). Those with an ``ok`` row in
   ``llm_calls`` are not sent again. Before anything is sent the number of requests and the estimated cost are
   printed; ``llm.dry_run`` writes the prompts and the estimate under ``run_dir/llm/`` instead;
   ``llm.export_batch`` writes an OpenAI Batch API input file, ``llm.import_batch`` reads its answers. Otherwise
   the runner fans them out (Ray: async worker actors sharing one rate budget; local: one in-process worker),
   each answer is parsed (JSON or the Python dict the paper asks for), an unparseable one repaired once, and
   every outcome is written to ``llm_calls`` as it arrives (``ok``, ``failed``, ``parse_failed``).
4. Merge: the failure types of all answers become one taxonomy per method (``llm.merge``: ``text`` or ``llm``),
   with support counts and example images, written to ``failure_types`` as the ``llm`` namer's rows (replaced
   as a whole; the name stage's ``caption_contrast`` rows stay).

The API key is read from the environment variable named by ``llm.api_key_env`` when, and only when, something
is to be sent; it reaches the HTTP client and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from clipaudit.errors import ClipauditError
from clipaudit.io import failure_types, fs
from clipaudit.llm import batch_api
from clipaudit.llm.merge import (
    MergedType,
    NamedType,
    distinct_names,
    merge_by_answer,
    merge_by_text,
    merge_request,
    parse_merge_answer,
)
from clipaudit.llm.parse import ParseError, parse_failure_types
from clipaudit.llm.prompts import (
    DAF,
    FAILURE_TYPES_FORMAT,
    TCAC,
    Case,
    PromptBatch,
    build_batches,
    daf_cases,
    load_template,
    request_params,
    tcac_cases,
)
from clipaudit.llm.requests import LLMRequest, LLMResult, estimate_prompt_tokens, estimate_request_tokens, price_for
from clipaudit.llm.scrub import Scrubber
from clipaudit.records import (
    DAF_CASES,
    FAILURE_TYPES_SCHEMA,
    LLM_CALLS,
    LLM_CALLS_KEY,
    LLM_CALLS_SCHEMA,
    TCAC_CASES,
    StageStats,
)
from clipaudit.stages.upstream import empty_input_message, model_view

if TYPE_CHECKING:
    from clipaudit.config import Config, LLMConfig
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.summarize")
STAGE = "summarize"
LLM_DIR = "llm"
STATUSES = ("ok", "failed", "parse_failed")
_DESCRIPTION_PREFIX = re.compile(r"^\s*description\s*:\s*", re.IGNORECASE)
_EXAMPLE_HEADING = "failure type heading"


class SummarizeError(ClipauditError, RuntimeError):
    """The summarize stage cannot run (the message says why and what to do)."""


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


def _money(value: float | None) -> str:
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
            cost = (f"estimated cost at most {_money(estimate['cost_usd_max'])} (${price[0]:g} / ${price[1]:g} per "
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


_CASE_COLUMNS = {
    DAF_CASES: ("image_id", "captions", "caption", "rank", "score"),
    TCAC_CASES: ("image_id", "transform", "is_case", "rank", "changed", "gt_caption", "caption", "params",
                 "top_before", "top_after"),
}
"""The columns :func:`~clipaudit.llm.prompts.daf_cases` / :func:`~clipaudit.llm.prompts.tcac_cases` read."""


def _read_cases(tables: RunTables, name: str) -> pa.Table | None:
    """The columns of a cases table the prompts use (those it has), only its ``is_case`` rows when it has that
    column; None when the table does not exist."""
    if not tables.exists(name):
        return None
    present = set(tables.db.open_table(name).schema.names)
    columns = [c for c in _CASE_COLUMNS[name] if c in present]
    return tables.read(name, columns, where="is_case = true" if "is_case" in present else None)


def load_cases(config: Config, tables: RunTables) -> dict[str, list[Case]]:
    """The cases of each method in ``llm.methods``, from the tables the daf / tcac stages wrote (only the
    columns and, for TCAC, the ``is_case`` rows the prompts use)."""
    llm = config.llm
    wanted = {"daf": (DAF_CASES, DAF, daf_cases), "tcac": (TCAC_CASES, TCAC, tcac_cases)}
    present = {m: _read_cases(tables, wanted[m][0]) for m in llm.methods}
    if all(table is None for table in present.values()):
        reasons = [empty_input_message(tables, f"no {wanted[m][0]} table in {tables.uri}", m, wanted[m][0])
                   for m in llm.methods]
        raise SummarizeError("; ".join(reasons) + f" (llm.methods: {', '.join(llm.methods)})")
    cases: dict[str, list[Case]] = {}
    for method, table in present.items():
        name, label, reader = wanted[method]
        if table is None:
            log.warning("no %s table: summarizing without the %s cases", name, label)
            continue
        cases[label] = reader(table, llm.max_cases)
    return cases


def plan_batches(config: Config, cases: Mapping[str, Sequence[Case]]) -> list[PromptBatch]:
    """The summarize prompts: DAF cases with the DAF template, TCAC cases (per transform) with the TCAC one."""
    llm = config.llm
    params = request_params(llm.temperature, llm.max_tokens, FAILURE_TYPES_FORMAT if llm.structured_output else None)
    templates = {DAF: ("daf", llm.daf_template), TCAC: ("tcac", llm.tcac_template)}
    batches: list[PromptBatch] = []
    for method, method_cases in cases.items():
        if method_cases:
            template = load_template(*templates[method])
            batches.extend(build_batches(method_cases, template, llm.model, params, llm.batch_tokens,
                                         llm.max_cases_per_batch))
    return batches


def _description(text: str) -> str:
    return _DESCRIPTION_PREFIX.sub("", text).strip()


def named_types(batches: Sequence[PromptBatch], answers: Mapping[str, str]) -> list[NamedType]:
    """Every failure type every ``ok`` answer named, with its prompt's cases (answers that no longer parse are
    skipped with a warning; the format example echoed back is dropped)."""
    named = []
    for index, batch in enumerate(batches):
        text = answers.get(batch.request.request_id)
        if text is None:
            continue
        try:
            pairs = parse_failure_types(text)
        except ParseError as exc:
            log.warning("answer %s does not parse any more (%s); skipped", batch.request.request_id, exc)
            continue
        for name, description in pairs:
            if name.strip().lower() == _EXAMPLE_HEADING:
                continue
            named.append(NamedType(name.strip(), _description(description), batch.method,
                                   batch.request.request_id, index, tuple(batch.case_ids), tuple(batch.image_ids)))
    return named


def merge_taxonomy(config: Config, session: LLMSession, types: Sequence[NamedType]) -> tuple[list[MergedType], str]:
    """The merged taxonomy of one method's ``types`` and how it was merged (``text`` or ``llm``).

    ``merge: llm`` sends one request (cached like every other); without an answer it falls back to ``text``.
    """
    llm = config.llm
    if llm.merge == "llm" and len(distinct_names(types)) > 1:
        template = load_template("merge", llm.merge_template)
        request = merge_request(types, template, llm.model, llm.temperature, llm.max_tokens, llm.structured_output)
        method = types[0].method
        call = PlannedCall(request, "merge", method, {"method": method, "names": len(distinct_names(types))})
        answer = session.send([call], parse_merge_answer, label="merge").get(request.request_id)
        if answer is not None:
            try:
                return merge_by_answer(types, parse_merge_answer(answer)), "llm"
            except ParseError as exc:
                log.warning("the merge answer does not parse (%s): merging by name similarity", exc)
        elif not session.dry_run:
            log.warning("no merge answer for %s: merging by name similarity instead", method)
    return merge_by_text(types, llm.merge_threshold), "text"


def taxonomy_table(merged: Sequence[tuple[MergedType, str]], model: str, max_examples: int) -> pa.Table:
    """``failure_types`` rows; within a method, names made unique and ranks 1.. in the given order."""
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], int] = {}
    ranks: dict[str, int] = {}
    for item, how in merged:
        key = (item.method, item.name.lower())
        seen[key] = seen.get(key, 0) + 1
        name = item.name if seen[key] == 1 else f"{item.name} ({seen[key]})"
        ranks[item.method] = ranks.get(item.method, 0) + 1
        rows.append({"name": name, "description": item.description, "method": item.method,
                     "support": item.support, "batches": item.batches, "example_ids": item.example_ids(max_examples),
                     "aliases": item.aliases, "rank": ranks[item.method], "merge": how, "model": model,
                     "request_ids": item.request_ids, "namer": failure_types.LLM})
    return pa.Table.from_pylist(rows, schema=FAILURE_TYPES_SCHEMA)


def _status_counts(session: LLMSession, ids: Iterable[str]) -> dict[str, Any]:
    rows = session.calls.rows(ids)
    counts: dict[str, Any] = {status: 0 for status in STATUSES}
    for row in rows.values():
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    counts["tokens"] = sum(int(row["tokens"] or 0) for row in rows.values())
    costs = [row["cost"] for row in rows.values() if row["cost"] is not None]
    counts["cost"] = sum(costs) if costs else None
    return counts


def run_summarize(config: Config, tables: RunTables, runner: object | None = None) -> StageStats:
    """Run the summarize stage (see the module docstring); ``runner`` is the pipeline's, or None to make one only
    if something is to be sent."""
    tables = model_view(tables, config)
    stats = StageStats(STAGE)
    started = time.perf_counter()
    cases = load_cases(config, tables)
    for method, method_cases in cases.items():
        stats.add_count(f"cases_{method.lower()}", len(method_cases))
    batches = plan_batches(config, cases)
    calls = [PlannedCall(b.request, "summarize", b.method, b.meta()) for b in batches]
    with LLMSession(config, tables, runner, STAGE, stats) as session:
        answers = session.send(calls, parse_failure_types, label=STAGE, batch_files=True)
        if session.dry_run or config.llm.export_batch:
            stats.notes["summary"] = f"{len(calls)} summarize requests planned; nothing sent, no table written"
            stats.add_time("wall", time.perf_counter() - started)
            return stats
        named = named_types(batches, answers)
        merged: list[tuple[MergedType, str]] = []
        for method in (DAF, TCAC):
            types = [t for t in named if t.method == method]
            if types:
                taxonomy, how = merge_taxonomy(config, session, types)
                merged.extend((item, how) for item in taxonomy)
        counts = _status_counts(session, [c.request.request_id for c in calls])
    table = taxonomy_table(merged, config.llm.model, config.llm.max_examples)
    failure_types.replace_rows(tables, table, failure_types.LLM)
    unanswered = len(calls) - counts["ok"]
    stats.counts.update({"requests": len(calls), "ok": counts["ok"], "failed": counts["failed"],
                         "parse_failed": counts["parse_failed"], "unanswered": unanswered,
                         "named_types": len(named), "failure_types": table.num_rows, "tokens": counts["tokens"]})
    stats.notes["cost_usd"] = counts["cost"]
    per_method = {m: sum(1 for item, _ in merged if item.method == m) for m in (DAF, TCAC)}
    stats.notes["summary"] = (
        f"summarize: {len(calls)} requests: {counts['ok']} ok, {counts['failed']} failed, {counts['parse_failed']} "
        f"unparseable; {table.num_rows} failure types (DAF {per_method[DAF]}, TCAC {per_method[TCAC]}) from "
        f"{len(named)} named; {counts['tokens']:,} tokens, cost {_money(counts['cost'])}")
    if unanswered:
        stats.notes["summary"] += f"; {unanswered} requests without an answer: a re-run sends only those"
    log.info("%s", stats.notes["summary"])
    stats.add_time("wall", time.perf_counter() - started)
    return stats
