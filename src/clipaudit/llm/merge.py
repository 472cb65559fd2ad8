"""From the failure types of many answers to one taxonomy: near-duplicates merged, support counted.

Every answer names failure types for the cases of its prompt (a batch). A merged type keeps all the names merged
into it (``aliases``), and its support: the number of distinct cases in the batches that named it, and the number
of those batches. Two ways to merge:

* ``text`` (:func:`merge_by_text`): names are normalised (lower case, numbering, punctuation and generic words
  such as "failure" or "error" dropped, a light stemmer, British spellings folded) and compared as word sets
  whose words match by character 3-gram similarity (:func:`name_similarity`). Names are taken most frequent
  first; each joins the group whose first (leading) name is the most similar at or above the threshold, or leads
  a new group. Comparing with leaders only keeps chains of small changes from merging distant names.
* ``llm`` (:func:`merge_request` / :func:`merge_by_answer`): the distinct names go to the model in one more request
  that groups them; names it leaves out stay types of their own, so nothing is lost.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from clipaudit.llm.parse import ParseError, _candidates, _load
from clipaudit.llm.prompts import MERGE_FORMAT, PromptTemplate, request_params
from clipaudit.llm.requests import LLMRequest

_STOP = frozenset("a an the of in on and or to with for by at from as its their between into is are be not "
                  "when than that this".split())
_GENERIC = frozenset("failure failures fail fails failing error errors issue issues problem problems type types "
                     "mistake mistakes difficulty difficulties inability".split())
_SPELLING = {"colour": "color", "grey": "gray", "centre": "center", "behaviour": "behavior", "recognise": "recognize"}
_NUMBERING = re.compile(r"^\s*(?:failure\s*type\s*)?\(?\d+[.):]?\s*", re.IGNORECASE)
_WORD = re.compile(r"[a-z0-9]+")
WORD_MATCH = 0.7
"""Two words match when their character 3-gram Dice similarity is at least this."""


@dataclass(frozen=True)
class NamedType:
    """A failure type as one answer named it, with the cases of that answer's prompt.

    ``batch`` is the position of the prompt in plan order (prompts follow the cases' rank order), so examples can
    be listed most divergent first.
    """

    name: str
    description: str
    method: str
    request_id: str
    batch: int
    case_ids: tuple[str, ...]
    image_ids: tuple[str, ...]


@dataclass
class MergedType:
    """One entry of the taxonomy: a name, a description and the named types merged into it."""

    name: str
    description: str
    method: str
    members: list[NamedType] = field(default_factory=list)

    @property
    def support(self) -> int:
        """Distinct cases in the prompts whose answers named this type."""
        return len({case for member in self.members for case in member.case_ids})

    @property
    def batches(self) -> int:
        """Distinct answers that named this type."""
        return len({member.request_id for member in self.members})

    @property
    def aliases(self) -> list[str]:
        """Every distinct name merged into this type, first seen first."""
        return list(dict.fromkeys(member.name for member in self.members))

    @property
    def request_ids(self) -> list[str]:
        """The answers that named this type, in plan order."""
        return list(dict.fromkeys(m.request_id for m in sorted(self.members, key=lambda m: m.batch)))

    def example_ids(self, limit: int) -> list[str]:
        """Up to ``limit`` distinct image ids of the supporting cases, in the cases' rank order."""
        ids: dict[str, None] = {}
        for member in sorted(self.members, key=lambda m: m.batch):
            for image_id in member.image_ids:
                ids.setdefault(image_id)
                if len(ids) >= limit:
                    return list(ids)
        return list(ids)


def clean_name(name: str) -> str:
    """A display name: numbering such as ``1.`` or ``Failure type 2:`` and surrounding punctuation removed."""
    cleaned = _NUMBERING.sub("", unicodedata.normalize("NFKC", name)).strip(" \t\n:-*#\"'")
    return cleaned or name.strip()


def _stem(word: str) -> str:
    for suffix, replacement in (("ies", "y"), ("sses", "ss"), ("ing", ""), ("ed", "")):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            return word[: -len(suffix)] + replacement
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def name_tokens(name: str) -> list[str]:
    """The normalised words of a name (see the module docstring); never empty for a name with a letter or digit."""
    words = _WORD.findall(unicodedata.normalize("NFKC", clean_name(name)).lower())
    kept = [w for w in words if w not in _STOP and w not in _GENERIC] or words
    return [_SPELLING.get(s, s) for s in (_stem(w) for w in kept)]


def normalise_name(name: str) -> str:
    """The normalised form of a name: its sorted distinct normalised words."""
    return " ".join(sorted(set(name_tokens(name))))


def _trigrams(text: str) -> set[str]:
    padded = f"  {text} "
    return {padded[i : i + 3] for i in range(len(padded) - 2)}


def word_similarity(a: str, b: str) -> float:
    """Dice similarity of the character 3-grams of two words (1.0 for equal words)."""
    if a == b:
        return 1.0
    ga, gb = _trigrams(a), _trigrams(b)
    return 2 * len(ga & gb) / (len(ga) + len(gb))


def name_similarity(a: str, b: str) -> float:
    """Similarity of two names in [0, 1].

    Words of the two normalised names are matched one to one, best first, where their character 3-gram Dice
    similarity is at least ``WORD_MATCH`` (so ``relationship`` matches ``relation``, ``color`` never ``count``);
    with ``m`` the summed similarity of the matches, the score is the mean of the soft Jaccard
    ``m / (|A| + |B| - matches)`` and the soft overlap ``m / min(|A|, |B|)``: ``Counting`` vs ``Object counting``
    scores 0.75, ``Gender confusion`` vs ``Color confusion`` 0.42.
    """
    ta, tb = sorted(set(name_tokens(a))), sorted(set(name_tokens(b)))
    if not ta or not tb:
        return 1.0 if a.strip().lower() == b.strip().lower() else 0.0
    if ta == tb:
        return 1.0
    scored = sorted(((word_similarity(x, y), i, j) for i, x in enumerate(ta) for j, y in enumerate(tb)),
                    reverse=True)
    used_a: set[int] = set()
    used_b: set[int] = set()
    total = 0.0
    for score, i, j in scored:
        if score < WORD_MATCH:
            break
        if i not in used_a and j not in used_b:
            used_a.add(i)
            used_b.add(j)
            total += score
    matches = len(used_a)
    jaccard = total / (len(ta) + len(tb) - matches)
    overlap = total / min(len(ta), len(tb))
    return (jaccard + overlap) / 2


def _leading_member(members: Sequence[NamedType]) -> NamedType:
    """The member whose normalised name is the most frequent in the group (first seen on ties)."""
    counts = Counter(normalise_name(m.name) for m in members)
    best = max(counts.values())
    return next(m for m in members if counts[normalise_name(m.name)] == best)


def _build(members: Sequence[NamedType], name: str | None = None, description: str | None = None) -> MergedType:
    lead = _leading_member(members)
    return MergedType(clean_name(name or lead.name), (description or lead.description).strip(), lead.method,
                      list(members))


def group_by_text(types: Sequence[NamedType], threshold: float) -> list[list[int]]:
    """Indices of ``types`` grouped by name similarity (leader clustering, most frequent names first)."""
    keys = [normalise_name(t.name) for t in types]
    frequency = Counter(keys)
    order = sorted(range(len(types)), key=lambda i: (-frequency[keys[i]], i))
    leaders: list[int] = []
    groups: list[list[int]] = []
    for i in order:
        scores = [name_similarity(types[i].name, types[lead].name) if keys[i] != keys[lead] else 1.0
                  for lead in leaders]
        best = max(range(len(scores)), key=lambda g: scores[g], default=None)
        if best is not None and scores[best] >= threshold:
            groups[best].append(i)
        else:
            leaders.append(i)
            groups.append([i])
    return [sorted(group) for group in groups]


def rank(merged: Sequence[MergedType]) -> list[MergedType]:
    """Most supported first: by cases, then answers, then name."""
    return sorted(merged, key=lambda m: (-m.support, -m.batches, m.name.lower()))


def merge_by_text(types: Sequence[NamedType], threshold: float) -> list[MergedType]:
    """The taxonomy of ``types`` (one method) by name similarity, ranked."""
    return rank([_build([types[i] for i in group]) for group in group_by_text(types, threshold)])


def distinct_names(types: Sequence[NamedType]) -> list[list[int]]:
    """Indices of ``types`` grouped by identical normalised name, first seen first (what ``merge: llm`` sends)."""
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(types):
        groups.setdefault(normalise_name(t.name), []).append(i)
    return list(groups.values())


def merge_request(types: Sequence[NamedType], template: PromptTemplate, model: str, temperature: float,
                  max_tokens: int, structured: bool) -> LLMRequest:
    """The ``merge: llm`` request: the distinct names as items ``t1``, ``t2``, ... with their descriptions."""
    items = []
    for n, group in enumerate(distinct_names(types), start=1):
        lead = _leading_member([types[i] for i in group])
        items.append({"id": f"t{n}", "name": clean_name(lead.name), "description": lead.description})
    params = request_params(temperature, max_tokens, MERGE_FORMAT if structured else None)
    return LLMRequest(model, [{"role": "user", "content": template.render(items)}], params)


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def _group_of(item: Any, fallback_name: str | None = None) -> tuple[str, str, list[str]] | None:
    if not isinstance(item, dict):
        return None
    lowered = {str(k).strip().lower(): v for k, v in item.items()}
    name = _text(lowered.get("name")) or fallback_name
    members = lowered.get("members") or lowered.get("ids") or lowered.get("member_ids")
    if not name or not isinstance(members, list):
        return None
    description = _text(lowered.get("description")) or name
    return name, description, [str(m).strip() for m in members if str(m).strip()]


def parse_merge_answer(answer: str) -> list[tuple[str, str, list[str]]]:
    """Read a merge answer into ``[(name, description, member_ids), ...]``; :class:`ParseError` when none.

    Accepts ``{"failure_types": [{"name", "description", "members"}]}``, the bare list, or a mapping of name to
    ``{"description", "members"}``; JSON or a Python literal, fenced or inside prose.
    """
    if not isinstance(answer, str) or not answer.strip():
        raise ParseError("empty answer")
    for candidate in _candidates(answer.strip()):
        value = _load(candidate)
        if isinstance(value, dict):
            listed = next((v for k, v in value.items() if str(k).strip().lower() in ("failure_types", "groups")
                           and isinstance(v, list)), None)
            if listed is not None:
                value = listed
            else:
                value = [dict(v, name=k) if isinstance(v, dict) and "name" not in v else v for k, v in value.items()]
        if isinstance(value, list):
            groups = [g for g in (_group_of(item) for item in value) if g is not None]
            if groups:
                return groups
    raise ParseError("no groups with members in the answer")


def merge_by_answer(types: Sequence[NamedType], groups: Sequence[tuple[str, str, Sequence[str]]]) -> list[MergedType]:
    """The taxonomy of ``types`` from a parsed merge answer (ids as in :func:`merge_request`), ranked.

    An id in several groups counts in the first; unknown ids are ignored; names the answer left out stay types of
    their own.
    """
    distinct = distinct_names(types)
    index = {f"t{n}": group for n, group in enumerate(distinct, start=1)}
    used: set[str] = set()
    merged = []
    for name, description, members in groups:
        ids = [m for m in dict.fromkeys(members) if m in index and m not in used]
        if not ids:
            continue
        used.update(ids)
        merged.append(_build([types[i] for m in ids for i in index[m]], name, description))
    for item_id, group in index.items():
        if item_id not in used:
            merged.append(_build([types[i] for i in group]))
    return rank(merged)
