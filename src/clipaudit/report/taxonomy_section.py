"""The report's "Failure types" section: the types each namer found, their evidence, and where the namers agree.

Two namers write ``failure_types`` (column ``namer``): ``caption_contrast`` (offline, from the words that separate
the captions of the flagged pairs from the rest of the corpus: :mod:`clipaudit.caption_contrast`) and ``llm``
(the paper's Figure 2 prompt: the summarize stage). Each type is shown with its support, its example images and
its evidence pairs (the two images and, on probe scenes, what they truly differ in). When both namers ran, each
caption-contrast type is matched to the LLM types whose name or description holds one of its terms: a match is an
agreement, a type of one namer with no match in the other is listed as found by that namer only. (Shared example
images say little: every LLM type of a batch shares the batch's cases.)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from clipaudit.report.html import Markup, join, num, pct, table, tag

CONTRAST = "caption_contrast"
LLM = "llm"
NAMER_TITLES = {CONTRAST: "caption contrast (offline)", LLM: "LLM"}


def namer_of(item: dict[str, Any]) -> str:
    """The namer of a summary failure type (``llm`` for rows written before there were two)."""
    return str(item.get("namer") or LLM)


def evidence_pairs(item: dict[str, Any]) -> list[tuple[str, str]]:
    """A type's evidence pairs as (image_a, image_b): from ``{image_a, image_b}`` records or ``"a|b"`` strings."""
    out = []
    for pair in item.get("evidence_pairs") or []:
        if isinstance(pair, dict):
            out.append((str(pair.get("image_a")), str(pair.get("image_b"))))
        elif isinstance(pair, str) and "|" in pair:
            a, b = pair.split("|", 1)
            out.append((a, b))
        elif isinstance(pair, (list, tuple)) and len(pair) == 2:
            out.append((str(pair[0]), str(pair[1])))
    return out


def _agrees(contrast: dict[str, Any], llm: dict[str, Any]) -> bool:
    """Whether the LLM type names one of the caption-contrast type's terms (as whole words)."""
    text = " " + " ".join(re.findall(r"[a-z0-9]+", f"{llm.get('name') or ''} {llm.get('description') or ''}".lower()))
    return any(len(term) > 2 and f" {term.lower()} " in text + " " for term in contrast.get("terms") or [])


def agreement(types: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per method: caption-contrast types with the LLM types they agree with (:func:`_agrees`), and each namer's
    unmatched types."""
    out: dict[str, Any] = {}
    for method in sorted({str(t["method"]) for t in types}):
        contrast = [t for t in types if t["method"] == method and namer_of(t) == CONTRAST]
        llm = [t for t in types if t["method"] == method and namer_of(t) == LLM]
        if not contrast or not llm:
            continue
        pairs = [(c["name"], [t["name"] for t in llm if _agrees(c, t)]) for c in contrast]
        matched = {name for _, names in pairs for name in names}
        out[method] = {"agree": [(c, names) for c, names in pairs if names],
                       "contrast_only": [c for c, names in pairs if not names],
                       "llm_only": [t["name"] for t in llm if t["name"] not in matched]}
    return out


def taxonomy_section(types: list[dict[str, Any]] | None, checks: list[dict[str, Any]],
                     thumbs: Callable[[str], Markup], truth: dict[str, Any], why_missing: Markup | None,
                     llm: dict[str, Any] | None, chart: Markup | None) -> Markup:
    """The section's HTML. ``thumbs(image_id)``: a thumbnail; ``truth``: ``"a|b"`` -> the pair's truth (probe
    scenes); ``why_missing``: the box shown when no namer wrote a table; ``chart``: the support chart."""
    parts: list[Any] = [tag("h2", "Failure types: named offline by caption contrast, and by the LLM", id="taxonomy")]
    if types is None:
        return join([*parts, why_missing or ""])
    if not types:
        parts.append(tag("p", "No namer found a failure type.", class_="muted"))
    for namer in (CONTRAST, LLM):
        for method in sorted({t["method"] for t in types if namer_of(t) == namer}):
            items = [t for t in types if namer_of(t) == namer and t["method"] == method]
            parts.append(tag("h3", f"{method}, named by {NAMER_TITLES[namer]}: {len(items)} failure types"))
            parts.append(table(["#", "failure type", "support", "validated: CLIP cannot tell the pairs apart",
                                "examples", "evidence pairs"],
                               [_row(t, thumbs, truth) for t in items], class_=f"taxonomy namer-{namer}"))
    agreed = agreement(types)
    for method, result in agreed.items():
        parts.append(tag("h3", f"{method}: where the two namers agree"))
        rows = [(tag("strong", name), ", ".join(names)) for name, names in result["agree"]]
        rows += [(tag("strong", name), tag("em", "caption contrast only")) for name in result["contrast_only"]]
        rows += [(tag("em", "LLM only"), name) for name in result["llm_only"]]
        parts.append(table(["caption contrast", "LLM"], rows, class_="namer-agreement"))
    if chart is not None:
        parts.append(chart)
    if checks:
        parts.append(_checks(checks))
    if llm:
        cost = llm.get("cost_usd")
        parts.append(tag("p", f"LLM calls: {llm['calls']:,} ", json.dumps(llm.get("by_status") or {}, sort_keys=True),
                         f", {llm.get('tokens', 0):,} tokens",
                         f", ${cost:.4f}" if cost is not None else ", cost unknown (unpriced model)", class_="muted"))
    return join(parts)


def _row(item: dict[str, Any], thumbs: Callable[[str], Markup], truth: dict[str, Any]) -> tuple[Any, ...]:
    if namer_of(item) == CONTRAST:
        support = f"{num(item.get('support'))} flagged pairs"
        validated = "-"
    else:
        support = f"{num(item.get('support'))} cases (named in {num(item.get('batches'))} answers)"
        validated = ("not validated" if item.get("n_pairs") is None and item.get("success_rate") is None else
                     f"{pct(item.get('success_rate'))} of {num(item.get('n_pairs'))} pairs")
    evidence = []
    for a, b in evidence_pairs(item):
        known = truth.get(f"{a}|{b}") or truth.get(f"{b}|{a}")
        note = ("" if known is None else
                f"truth: only {known['only']}" if known.get("only") else
                "truth: " + (", ".join(known.get("differs") or []) or "nothing"))
        evidence.append(tag("div", thumbs(a), thumbs(b), tag("div", note, class_="muted cap") if note else "",
                            class_="evidence", data_pair=f"{a}|{b}"))
    return (num(item.get("rank")),
            join([tag("strong", item["name"]), tag("div", item.get("description") or "", class_="muted")]),
            support, validated, tag("div", [thumbs(i) for i in item.get("shown_examples") or []], class_="examples"),
            tag("div", evidence, class_="evidence-pairs"))


def _checks(checks: list[dict[str, Any]]) -> Markup:
    rows = []
    for check in sorted(checks, key=lambda c: (str(c.get("method")), str(c["name"]))):
        try:
            pairs = json.loads(check.get("pairs") or "[]")
        except ValueError:
            pairs = []
        sims = list(check.get("sims") or [])
        shown = [tag("div", str(a), " \u2194 ", str(b), " ",
                     tag("span", f"({num(sims[i])})" if i < len(sims) else "", class_="prob"))
                 for i, (a, b) in enumerate(p for p in pairs[:3] if isinstance(p, list) and len(p) == 2)]
        rows.append((check.get("method") or "-", check["name"], check.get("status") or "-",
                     pct(check.get("success_rate")), num(check.get("threshold")), shown))
    return join([tag("h3", "Validation pairs"),
                 tag("p", "For each LLM-named failure type the LLM wrote caption pairs that should look different; a "
                          "pair counts when CLIP's text tower still finds them near-identical (similarity at least "
                          "the threshold).", class_="muted"),
                 table(["method", "failure type", "status", "success rate", "threshold", "pairs (similarity)"], rows,
                       class_="checks")])
