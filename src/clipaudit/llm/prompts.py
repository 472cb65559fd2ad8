"""Prompt templates, cases as data, and packing cases into prompts by a token budget.

Templates are text files (the defaults ship in ``clipaudit/llm/prompts/*.txt``; ``llm.*_template`` in the
config replaces one with a file of your own). They use ``string.Template`` placeholders: ``${data}`` in every
template, ``${transform}`` in the TCAC one, ``${n_pairs}`` in the validate one; write a literal dollar as ``$$``.
The DAF default is the prompt of the paper's Figure 2, with the data block placed after its "Data format"
paragraph.

Captions are data, never instructions: :func:`data_block` renders them as JSON inside a fenced block that the
template announces as data. JSON keeps every caption on its line (newlines become ``\\n``) and backticks and
Unicode line separators are escaped, so no caption can close the fence, start a line of its own, or end the
instructions.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

import pyarrow as pa

from clipaudit.errors import ClipauditError
from clipaudit.llm.requests import LLMRequest, estimate_prompt_tokens

TEMPLATE_PLACEHOLDERS: dict[str, frozenset[str]] = {
    "daf": frozenset({"data"}),
    "tcac": frozenset({"data", "transform"}),
    "merge": frozenset({"data"}),
    "validate": frozenset({"data", "n_pairs"}),
    "distinguish": frozenset({"data"}),
}
"""The placeholders each kind of template must use (and the only ones it may use)."""

DAF = "DAF"
TCAC = "TCAC"
FENCE = "```"
_ESCAPES = {"`": "\\u0060", "\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}


def _object_schema(properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def _response_format(name: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": name, "strict": True, "schema": schema}}


FAILURE_TYPES_FORMAT = _response_format("failure_types", _object_schema({
    "failure_types": {"type": "array", "items": _object_schema({
        "name": {"type": "string"}, "description": {"type": "string"}})}}))
"""``response_format`` of the summarize requests: ``{"failure_types": [{"name", "description"}]}``."""

MERGE_FORMAT = _response_format("failure_type_groups", _object_schema({
    "failure_types": {"type": "array", "items": _object_schema({
        "name": {"type": "string"}, "description": {"type": "string"},
        "members": {"type": "array", "items": {"type": "string"}}})}}))
"""``response_format`` of the ``merge: llm`` request."""

PAIRS_FORMAT = _response_format("caption_pairs", _object_schema({
    "pairs": {"type": "array", "items": _object_schema({"a": {"type": "string"}, "b": {"type": "string"}})}}))
"""``response_format`` of the validate requests: ``{"pairs": [{"a", "b"}]}``."""

DISTINGUISH_FORMAT = _response_format("distinguishing_captions", _object_schema({
    "caption_a": {"type": "string"}, "caption_b": {"type": "string"}}))
"""``response_format`` of the export's distinguishing-caption requests: ``{"caption_a", "caption_b"}``."""


class TemplateError(ClipauditError, ValueError):
    """A prompt template that cannot be used (the message names the file and the problem)."""


@dataclass(frozen=True)
class PromptTemplate:
    """One template: its kind (``daf``, ``tcac``, ``merge``, ``validate``), its text and where it came from."""

    kind: str
    text: str
    source: str

    def render(self, data: Any, **values: Any) -> str:
        """The prompt with ``data`` as a fenced JSON block in ``${data}`` and ``values`` in the other placeholders."""
        fields = {key: str(value) for key, value in values.items()}
        return string.Template(self.text).substitute(fields, data=data_block(data))


def load_template(kind: str, path: str | None = None) -> PromptTemplate:
    """The template of ``kind``: the file at ``path`` (local or remote), or the packaged default.

    Raises :class:`TemplateError` when the file misses a required placeholder or uses an unknown one.
    """
    if kind not in TEMPLATE_PLACEHOLDERS:
        raise ValueError(f"unknown template kind {kind!r} (kinds: {', '.join(TEMPLATE_PLACEHOLDERS)})")
    if path is None:
        text = resources.files("clipaudit.llm").joinpath("prompts", f"{kind}.txt").read_text(encoding="utf-8")
        source = f"clipaudit/llm/prompts/{kind}.txt"
    else:
        from clipaudit.io import fs

        try:
            text = fs.read_text(path)
        except (OSError, UnicodeDecodeError) as exc:
            raise TemplateError(f"llm.{kind}_template: cannot read {path}: {exc}") from exc
        source = path
    template = string.Template(text)
    if not template.is_valid():
        raise TemplateError(f"{source}: a '$' that is not a placeholder (write a literal dollar as $$)")
    found = set(template.get_identifiers())
    missing = sorted(TEMPLATE_PLACEHOLDERS[kind] - found)
    unknown = sorted(found - TEMPLATE_PLACEHOLDERS[kind])
    if missing or unknown:
        raise TemplateError(f"{source}: a {kind} template needs the placeholders "
                            f"{', '.join('${' + n + '}' for n in sorted(TEMPLATE_PLACEHOLDERS[kind]))}"
                            + (f"; missing {', '.join(missing)}" if missing else "")
                            + (f"; unknown {', '.join(unknown)}" if unknown else ""))
    return PromptTemplate(kind, text, source)


def _escape(text: str) -> str:
    for raw, escaped in _ESCAPES.items():
        text = text.replace(raw, escaped)
    return text


def encode_data(value: Any) -> str:
    """JSON of ``value`` that cannot break out of a fenced block: a top-level list one item per line,
    newlines inside strings as ``\\n``, backticks and Unicode line separators as ``\\uXXXX`` escapes."""
    if isinstance(value, list):
        if not value:
            return "[]"
        items = ",\n".join(_escape(json.dumps(item, ensure_ascii=False, sort_keys=True)) for item in value)
        return "[\n" + items + "\n]"
    return _escape(json.dumps(value, ensure_ascii=False, sort_keys=True))


def data_block(value: Any) -> str:
    """``value`` as :func:`encode_data` JSON inside a ```json fenced block."""
    return f"{FENCE}json\n{encode_data(value)}\n{FENCE}"


def extract_data(prompt: str) -> Any:
    """The value of the first ```json block of ``prompt`` (to read back what a prompt carries)."""
    start = prompt.index(f"{FENCE}json\n") + len(FENCE) + 5
    end = prompt.index(f"\n{FENCE}", start)
    return json.loads(prompt[start:end])


@dataclass(frozen=True)
class Case:
    """One case as the LLM sees it.

    ``case_id`` is unique within its method (the image id for DAF, ``image_id|transform`` for TCAC); ``group``
    the transform for TCAC (prompts never mix transforms) and ``""`` for DAF; ``payload`` what goes into the
    data block.
    """

    case_id: str
    image_id: str
    method: str
    group: str
    payload: Any


@dataclass(frozen=True)
class PromptBatch:
    """One request and the cases it carries."""

    request: LLMRequest
    method: str
    group: str
    cases: tuple[Case, ...]

    @property
    def case_ids(self) -> list[str]:
        """Case ids in prompt order."""
        return [case.case_id for case in self.cases]

    @property
    def image_ids(self) -> list[str]:
        """Image ids in prompt order."""
        return [case.image_id for case in self.cases]

    def meta(self) -> dict[str, Any]:
        """What the request covers, for the ``meta`` column of ``llm_calls``."""
        return {"method": self.method, "group": self.group, "case_ids": self.case_ids, "image_ids": self.image_ids}


def _column(table: pa.Table, name: str) -> list[Any] | None:
    return table.column(name).to_pylist() if name in table.column_names else None


def _strings(values: Iterable[Any] | None) -> list[str]:
    return [str(v) for v in values or [] if v is not None and str(v).strip()]


def daf_cases(table: pa.Table, max_cases: int | None = None) -> list[Case]:
    """Cases from ``daf_cases`` rows, most divergent first (``rank``, else ``score`` descending, then image_id).

    The payload is the list of captions: the image's own caption first, then those of its CLIP-only neighbours
    (the ``captions`` column, else ``caption``); rows with fewer than two captions carry nothing to compare and
    are left out.
    """
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    captions = _column(table, "captions") or [None] * len(ids)
    caption = _column(table, "caption") or [None] * len(ids)
    ranks = _column(table, "rank")
    scores = _column(table, "score")

    def order(i: int) -> tuple[float, str]:
        if ranks is not None and ranks[i] is not None:
            return float(ranks[i]), ids[i]
        if scores is not None and scores[i] is not None:
            return -float(scores[i]), ids[i]
        return 0.0, ids[i]

    cases = []
    for i in sorted(range(len(ids)), key=order):
        texts = _strings(captions[i]) or _strings([caption[i]])
        if len(texts) >= 2:
            cases.append(Case(ids[i], ids[i], DAF, "", texts))
    return cases[:max_cases] if max_cases is not None else cases


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def _params(value: Any) -> Any:
    """Transform parameters as data (JSON text decoded), floats to 3 decimals (digits beyond say nothing)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return value
    return _rounded(value)


def tcac_cases(table: pa.Table, max_cases: int | None = None) -> list[Case]:
    """Cases from the ``is_case`` rows of ``tcac_cases``, grouped by transform (sorted), each in ``rank`` order
    (else ``changed`` descending), then image_id; at most ``max_cases`` per transform.

    The payload holds the image's own caption (``gt_caption``, else ``caption``, when present), the transform's
    parameters and the top captions before and after.
    """
    ids = [str(v) for v in table.column("image_id").to_pylist()]
    transforms = [str(v) for v in table.column("transform").to_pylist()]
    is_case = _column(table, "is_case") or [True] * len(ids)
    ranks = _column(table, "rank")
    changed = _column(table, "changed")
    own = _column(table, "gt_caption") or _column(table, "caption") or [None] * len(ids)
    params = _column(table, "params") or [None] * len(ids)
    before = table.column("top_before").to_pylist()
    after = table.column("top_after").to_pylist()

    def order(i: int) -> tuple[str, float, str]:
        if ranks is not None and ranks[i] is not None:
            return transforms[i], float(ranks[i]), ids[i]
        return transforms[i], -float(changed[i] or 0) if changed is not None else 0.0, ids[i]

    cases: list[Case] = []
    taken: dict[str, int] = {}
    for i in sorted((i for i in range(len(ids)) if is_case[i]), key=order):
        transform = transforms[i]
        if max_cases is not None and taken.get(transform, 0) >= max_cases:
            continue
        payload: dict[str, Any] = {"top_before": _strings(before[i]), "top_after": _strings(after[i])}
        if own[i]:
            payload["caption"] = str(own[i])
        if params[i] is not None:
            payload["params"] = _params(params[i])
        cases.append(Case(f"{ids[i]}|{transform}", ids[i], TCAC, transform, payload))
        taken[transform] = taken.get(transform, 0) + 1
    return cases


def prompt_tokens(text: str) -> int:
    """Estimated prompt tokens of a one-message prompt (the estimate the rate limiter charges)."""
    return estimate_prompt_tokens([{"role": "user", "content": text}])


def render_cases(template: PromptTemplate, cases: Sequence[Case]) -> str:
    """The prompt for ``cases`` (all of one group)."""
    values = {"transform": cases[0].group} if template.kind == "tcac" and cases else {}
    return template.render([case.payload for case in cases], **values)


def pack(cases: Sequence[Case], template: PromptTemplate, budget_tokens: int, max_per_batch: int) -> list[list[Case]]:
    """Split ``cases`` into consecutive groups whose prompts stay within ``budget_tokens`` (estimated) and hold at
    most ``max_per_batch`` cases; a prompt never mixes groups (transforms). A case too large for the budget on
    its own gets a prompt of its own."""
    batches: list[list[Case]] = []
    current: list[Case] = []
    for case in cases:
        if current and (case.group != current[0].group or len(current) >= max_per_batch
                        or prompt_tokens(render_cases(template, [*current, case])) > budget_tokens):
            batches.append(current)
            current = []
        current.append(case)
    if current:
        batches.append(current)
    return batches


def build_batches(cases: Sequence[Case], template: PromptTemplate, model: str, params: dict[str, Any],
                  budget_tokens: int, max_per_batch: int) -> list[PromptBatch]:
    """The requests for ``cases``: packed by :func:`pack`, one user message each, in case order."""
    out = []
    for group in pack(cases, template, budget_tokens, max_per_batch):
        messages = [{"role": "user", "content": render_cases(template, group)}]
        out.append(PromptBatch(LLMRequest(model, messages, params), group[0].method, group[0].group, tuple(group)))
    return out


def request_params(temperature: float, max_tokens: int, response_format: dict[str, Any] | None) -> dict[str, Any]:
    """Parameters of a request: temperature, max_tokens and, when asked for, the structured-output format."""
    params: dict[str, Any] = {"temperature": temperature, "max_tokens": max_tokens}
    if response_format is not None:
        params["response_format"] = response_format
    return params

