"""Caption contrast: name failure types offline, from the words that separate the captions of flagged pairs.

A CLIP-blind pair is two images CLIP finds near-identical while the reference does not; the words that differ
between their two captions say what CLIP is missing (``on the left`` / ``on the right``). Over many pairs, the
words that differ *more often than between two random images of the corpus* name the failure.

1. **Documents.** A document is the set of n-grams (n = 1..``ngram_max``, lower-cased words; n-grams made only
   of stop words dropped) that appear in one caption of a pair and not in the other. Foreground: every CLIP-blind
   pair, and every DAF case with each of its CLIP-only neighbours. Background: seeded random pairs of the corpus.
2. **Weighted log-odds with an informative Dirichlet prior** (Monroe, Colaresi & Quinn 2008, "Fightin' Words"):
   with ``y_f``, ``y_b`` the number of foreground / background documents holding n-gram ``w``, ``n_f``, ``n_b``
   the totals, and a prior ``a_w = alpha0 * (y_f + y_b) / (n_f + n_b)`` from the pooled counts,
   ``delta_w = log((y_f + a_w) / (n_f + alpha0 - y_f - a_w)) - log((y_b + a_w) / (n_b + alpha0 - y_b - a_w))``
   and ``z_w = delta_w / sqrt(1 / (y_f + a_w) + 1 / (y_b + a_w))``. The prior shrinks rare n-grams toward no
   difference, so a word seen twice does not outrank one seen a hundred times.
3. **Failure types.** The n-grams with ``z >= min_z`` (and at least ``min_count`` foreground documents) are
   grouped, strongest first. An n-gram found mostly (``overlap``, 80 %) in the pairs of a type already formed
   joins it: the same difference in other words. Else it joins the type of an attribute family below (spatial
   position, counting, colour, size, ...) when one of its words is of that family *and that word itself
   differs* in at least half of the pairs that show the n-gram: ``on the left`` is spatial, but ``circle in``
   (from ``circle in the center`` / ``circle on the left``) is not a shape: the circle is in both captions. Any
   other n-gram joins the type whose pairs hold most of its own (at least ``loose_overlap``, half), else the
   type of a stronger family-less n-gram it shares a word with, else starts its own. A type is ranked by its
   strongest term and named by its family and top terms: ``spatial position (left, right, top)``. Its support is
   the foreground documents holding one of its terms; its evidence, those documents' pairs.

The background (:func:`background_pairs`) is half pairs of images the *reference* model finds near (what tells
near images apart in words, whatever the model: so the namer does not merely find the words that vary between
similar images) and half seeded random pairs of the corpus (every pair when the corpus is small).
Everything is deterministic (the background pairs are seeded) and linear in the number of documents.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

STOPWORDS = frozenset("""
a an the and or of on in at to with for from by is are was were be been being it its this that these those there
their his her as into onto out up some while who which what where when than then very also just has have had
""".split())

FAMILIES: dict[str, frozenset[str]] = {
    "spatial position": frozenset("""left right top bottom center centre middle above below behind front beside next
        under over near far side corner upper lower inside outside between across around background foreground
        """.split()),
    "counting": frozenset("""zero one two three four five six seven eight nine ten eleven twelve several many few
        pair couple single multiple both group lone 0 1 2 3 4 5 6 7 8 9 10""".split()),
    "colour": frozenset("""red green blue yellow orange purple black white gray grey pink brown violet colorful
        colourful dark light""".split()),
    "size": frozenset("big small large tiny huge little tall short long giant".split()),
    "shape": frozenset("circle square triangle round rectangle oval".split()),
    "orientation": frozenset("upside down rotated sideways flipped tilted vertical horizontal".split()),
    "text": frozenset("sign text written word letters reads says logo".split()),
    "negation": frozenset("no not without none nobody empty".split()),
}
"""Attribute families that name a group of terms; a term joins a family when one of its words (singular) is in it."""

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def words(text: str) -> list[str]:
    """Lower-cased word tokens."""
    return _WORD.findall(text.lower())


def ngrams(text: str, ngram_max: int = 3) -> set[str]:
    """The 1..ngram_max-grams of a caption, without those made only of stop words."""
    tokens = words(text)
    out = set()
    for n in range(1, ngram_max + 1):
        for i in range(len(tokens) - n + 1):
            gram = tokens[i:i + n]
            if not all(token in STOPWORDS for token in gram):
                out.add(" ".join(gram))
    return out


def difference(caption_a: str, caption_b: str, ngram_max: int = 3) -> frozenset[str]:
    """The n-grams of one caption that the other lacks (both ways): what tells the two images apart in words."""
    a, b = ngrams(caption_a, ngram_max), ngrams(caption_b, ngram_max)
    return frozenset(a ^ b)


@dataclass(frozen=True)
class Term:
    """An n-gram that separates the foreground from the background."""

    ngram: str
    z: float
    delta: float
    foreground: int
    background: int


def log_odds(foreground: Sequence[frozenset[str]], background: Sequence[frozenset[str]],
             alpha0: float = 100.0) -> dict[str, Term]:
    """Weighted log-odds with an informative Dirichlet prior (the module docstring) of every n-gram, by n-gram."""
    fg = Counter(gram for doc in foreground for gram in doc)
    bg = Counter(gram for doc in background for gram in doc)
    n_f, n_b = sum(fg.values()), sum(bg.values())
    pooled = n_f + n_b
    out = {}
    if pooled == 0:
        return out
    for gram in fg.keys() | bg.keys():
        y_f, y_b = fg[gram], bg[gram]
        a = alpha0 * (y_f + y_b) / pooled
        delta = (math.log((y_f + a) / (n_f + alpha0 - y_f - a)) - math.log((y_b + a) / (n_b + alpha0 - y_b - a)))
        z = delta / math.sqrt(1.0 / (y_f + a) + 1.0 / (y_b + a))
        out[gram] = Term(gram, z, delta, y_f, y_b)
    return out


def family_of(ngram: str) -> str | None:
    """The attribute family one of the n-gram's words belongs to (plural ``s`` dropped), or None."""
    for token in ngram.split():
        for candidate in (token, token[:-1] if token.endswith("s") and len(token) > 3 else token):
            for family, members in FAMILIES.items():
                if candidate in members:
                    return family
    return None


@dataclass
class FailureType:
    """A group of separating terms, with the flagged pairs that show it."""

    family: str | None
    terms: list[Term] = field(default_factory=list)
    documents: list[int] = field(default_factory=list)
    """Indices of the foreground documents holding one of the terms, in foreground order."""

    @property
    def score(self) -> float:
        """The strongest term's z."""
        return max(term.z for term in self.terms)

    def top_words(self, n: int = 3) -> list[str]:
        """The type's most separating terms, shortest form first among equals (``left`` over ``the left``)."""
        seen: list[str] = []
        for term in sorted(self.terms, key=lambda t: (-t.z, len(t.ngram), t.ngram)):
            if not any(_contains(term.ngram, other) or _contains(other, term.ngram) for other in seen):
                seen.append(term.ngram)
            if len(seen) == n:
                break
        return seen

    @property
    def name(self) -> str:
        """``family (term, term, term)``, or the terms alone for a type of no known family."""
        top = ", ".join(self.top_words())
        return f"{self.family} ({top})" if self.family else f"captions differ in: {top}"


def _contains(longer: str, shorter: str) -> bool:
    """Whether n-gram ``shorter`` is ``longer`` or a run of its words (``the left`` in ``on the left``)."""
    return f" {shorter} " in f" {longer} "


def term_family(ngram: str, documents: Iterable[frozenset[str]]) -> str | None:
    """The attribute family of ``ngram`` as its pairs show it: a family of one of its words (plural ``s`` dropped)
    such that the word itself differs (is a one-word n-gram of the document) in at least half of ``documents``
    (the foreground documents holding the n-gram); the most frequent such family, ties by :data:`FAMILIES`
    order; None when there is none."""
    candidates: dict[str, list[str]] = {}
    for token in dict.fromkeys(ngram.split()):
        family = family_of(token)
        if family is not None:
            candidates.setdefault(family, []).append(token)
    if not candidates:
        return None
    docs = list(documents)
    if not docs:
        return None
    best, best_count = None, 0
    for family in FAMILIES:
        tokens = candidates.get(family)
        if not tokens:
            continue
        count = sum(1 for doc in docs if any(token in doc for token in tokens))
        if 2 * count >= len(docs) and count > best_count:
            best, best_count = family, count
    return best


def group_terms(terms: Iterable[Term], foreground: Sequence[frozenset[str]], overlap: float = 0.8,
                loose_overlap: float = 0.5) -> list[FailureType]:
    """Group separating terms into failure types (the module docstring), strongest type first.

    Terms are taken strongest first. A term whose foreground documents are mostly (``overlap``) documents of a
    type already formed joins that type: it is the same difference seen through other words (``squares in``
    separates two captions because ``in the center`` does). Else a term of an attribute family
    (:func:`term_family`: one of its words is of the family and differs in most of its pairs) joins that
    family's type. Any other joins the type whose documents hold the largest share of its own, when that share
    is at least ``loose_overlap``; else the type of a family-less term it shares a word with; else it starts a
    type.
    """
    holding: dict[str, set[int]] = {}
    for i, doc in enumerate(foreground):
        for gram in doc:
            holding.setdefault(gram, set()).add(i)
    types: list[FailureType] = []
    covered: list[set[int]] = []
    by_family: dict[str, int] = {}
    for term in sorted(terms, key=lambda t: (-t.z, t.ngram)):
        docs = holding.get(term.ngram, set())
        target: int | None = None
        best, shared = None, 0
        if docs and types:
            counts = [len(docs & covered[t]) for t in range(len(types))]
            best = max(range(len(types)), key=lambda t: (counts[t], -t))
            shared = counts[best]
        family = term_family(term.ngram, (foreground[i] for i in docs))
        if best is not None and shared >= overlap * len(docs):
            target = best
        elif family is not None:
            target = by_family.get(family)
            if target is None:
                target = by_family[family] = len(types)
                types.append(FailureType(family))
                covered.append(set())
        elif best is not None and shared >= loose_overlap * len(docs):
            target = best
        if target is None:
            words_of = set(term.ngram.split()) - STOPWORDS
            target = next((t for t, failure in enumerate(types) if failure.family is None
                           and any(words_of & (set(x.ngram.split()) - STOPWORDS) for x in failure.terms)), None)
        if target is None:
            target = len(types)
            types.append(FailureType(None))
            covered.append(set())
        types[target].terms.append(term)
        covered[target].update(docs)
    for failure, docs in zip(types, covered):
        failure.documents = sorted(docs)
    return sorted(types, key=lambda t: (-t.score, t.name))


def name_failures(foreground: Sequence[frozenset[str]], background: Sequence[frozenset[str]], *,
                  min_z: float = 3.0, min_count: int = 3, alpha0: float = 100.0) -> list[FailureType]:
    """The failure types the foreground documents show against the background ones, strongest first."""
    scored = log_odds(foreground, background, alpha0)
    significant = [t for t in scored.values() if t.z >= min_z and t.foreground >= min_count]
    return group_terms(significant, foreground)


def random_pairs(n: int, count: int, seed: int) -> list[tuple[int, int]]:
    """``count`` seeded pairs of distinct indices below ``n`` (drawn with replacement); every pair ``(a, b)``,
    ``a < b``, once, in order, when there are no more than ``count`` of them; [] when n < 2."""
    if n < 2 or count < 1:
        return []
    if n * (n - 1) // 2 <= count:
        return [(a, b) for a in range(n) for b in range(a + 1, n)]
    rng = random.Random(f"caption-contrast/{seed}")
    out = []
    for _ in range(count):
        a = rng.randrange(n)
        b = rng.randrange(n - 1)
        out.append((a, b + (b >= a)))
    return out


def background_pairs(n: int, near: Iterable[tuple[int, int]], count: int,
                     seed: int) -> tuple[list[tuple[int, int]], int]:
    """The background pairs of a corpus of ``n`` captions (indices), and how many of them (the first) are near
    pairs: up to half of ``count`` from ``near`` (pairs the reference model finds near; deduplicated as unordered
    pairs, a seeded sample when there are more), the rest :func:`random_pairs`. Deterministic in its arguments
    (``near`` is sorted first)."""
    unique = sorted({(min(a, b), max(a, b)) for a, b in near if a != b})
    half = count // 2
    if len(unique) > half:
        unique = sorted(random.Random(f"caption-contrast-near/{seed}").sample(unique, half))
    return unique + random_pairs(n, count - len(unique), seed), len(unique)
