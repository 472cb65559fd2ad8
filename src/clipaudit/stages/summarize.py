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

import logging
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from clipaudit.errors import ClipauditError
from clipaudit.io import failure_types
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
from clipaudit.records import (
    DAF_CASES,
    FAILURE_TYPES_SCHEMA,
    TCAC_CASES,
    StageStats,
)
from clipaudit.runtime.llm_session import LLMSession, PlannedCall, money
from clipaudit.stages.upstream import empty_input_message, model_view

if TYPE_CHECKING:
    from clipaudit.config import Config
    from clipaudit.io.tables import RunTables

log = logging.getLogger("clipaudit.summarize")
STAGE = "summarize"
STATUSES = ("ok", "failed", "parse_failed")
_DESCRIPTION_PREFIX = re.compile(r"^\s*description\s*:\s*", re.IGNORECASE)
_EXAMPLE_HEADING = "failure type heading"


class SummarizeError(ClipauditError, RuntimeError):
    """The summarize stage cannot run (the message says why and what to do)."""


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
        f"{len(named)} named; {counts['tokens']:,} tokens, cost {money(counts['cost'])}")
    if unanswered:
        stats.notes["summary"] += f"; {unanswered} requests without an answer: a re-run sends only those"
    log.info("%s", stats.notes["summary"])
    stats.add_time("wall", time.perf_counter() - started)
    return stats
