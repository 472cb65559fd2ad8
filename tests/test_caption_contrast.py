"""The caption-contrast kernel: difference n-grams, log-odds with an informative prior, grouping into types."""

from __future__ import annotations

import math
import random

import pytest

from clipaudit.caption_contrast import (
    FailureType,
    Term,
    background_pairs,
    difference,
    family_of,
    group_terms,
    log_odds,
    name_failures,
    ngrams,
    random_pairs,
    term_family,
)
from clipaudit.probe.scenes import corpus_spec, variant


def test_ngrams_drop_stopword_only_grams_and_differences_are_symmetric():
    grams = ngrams("A dog on the left", 2)
    assert {"dog", "left", "a dog", "the left", "dog on"} <= grams
    assert "on the" not in grams and "a" not in grams
    diff = difference("two red circles on the left", "two red circles on the right")
    assert diff == difference("two red circles on the right", "two red circles on the left")
    assert {"left", "right", "the left", "on the right"} <= diff
    assert not {"red", "two red circles"} & diff


def test_log_odds_matches_the_formula_by_hand():
    foreground = [frozenset({"left"}), frozenset({"left", "red"}), frozenset({"right"})]
    background = [frozenset({"red"}), frozenset({"blue"}), frozenset({"red", "left"}), frozenset({"blue"})]
    alpha0 = 10.0
    term = log_odds(foreground, background, alpha0)["left"]
    y_f, y_b, n_f, n_b = 2, 1, 4, 5
    a = alpha0 * (y_f + y_b) / (n_f + n_b)
    delta = math.log((y_f + a) / (n_f + alpha0 - y_f - a)) - math.log((y_b + a) / (n_b + alpha0 - y_b - a))
    z = delta / math.sqrt(1 / (y_f + a) + 1 / (y_b + a))
    assert term.delta == pytest.approx(delta) and term.z == pytest.approx(z)
    assert (term.foreground, term.background) == (2, 1)
    assert log_odds(foreground, background, alpha0)["blue"].z < 0


def _probe_corpus(n: int = 300) -> list[str]:
    return [corpus_spec(7, i, 4).captions()[0] for i in range(n)]


def test_pairs_that_differ_in_position_are_named_spatial_position_first():
    rng = random.Random(0)
    foreground = []
    for index in range(120):
        spec = corpus_spec(3, index)
        moved = variant(spec, "position", rng)
        foreground.append(difference(spec.captions()[0], moved.captions()[0]))
    captions = _probe_corpus()
    background = [difference(captions[a], captions[b]) for a, b in random_pairs(len(captions), 2000, 0)]
    types = name_failures(foreground, background)
    assert types[0].family == "spatial position"
    assert {"left", "right", "top", "bottom", "center"} & set(types[0].top_words(5))
    assert len(types[0].documents) >= 110
    assert all(t.score <= types[0].score for t in types)


def test_photo_captions_whose_pairs_differ_in_colour_are_named_colour():
    colours = ["black", "brown", "white", "red", "blue"]
    animals = ["dog", "cat", "horse", "bird"]
    places = ["on the grass", "in the snow", "near a lake", "on a beach", "in a park"]
    rng = random.Random(1)
    corpus = [f"a {rng.choice(colours)} {rng.choice(animals)} runs {rng.choice(places)}" for _ in range(400)]
    foreground = []
    for _ in range(100):
        animal, place = rng.choice(animals), rng.choice(places)
        a, b = rng.sample(colours, 2)
        foreground.append(difference(f"a {a} {animal} runs {place}", f"a {b} {animal} runs {place}"))
    background = [difference(corpus[i], corpus[j]) for i, j in random_pairs(len(corpus), 3000, 2)]
    types = name_failures(foreground, background)
    assert types[0].family == "colour"
    assert "colour" in types[0].name


def test_terms_seen_in_the_same_pairs_as_a_stronger_type_join_it():
    foreground = [frozenset({"left", "squares in"}) for _ in range(5)] + [frozenset({"right"})]
    terms = [Term("left", 9.0, 1.0, 5, 0), Term("squares in", 7.0, 1.0, 5, 0), Term("grass", 5.0, 1.0, 3, 0)]
    types = group_terms(terms, foreground)
    assert [t.family for t in types] == ["spatial position", None]
    assert [term.ngram for term in types[0].terms] == ["left", "squares in"]
    assert types[1].name == "captions differ in: grass"


def test_families_read_plural_words_and_the_background_is_seeded():
    assert family_of("three circles") == "counting" and family_of("circles") == "shape"
    assert family_of("a dog") is None
    assert random_pairs(100, 50, 3) == random_pairs(100, 50, 3) != random_pairs(100, 50, 4)
    assert all(a != b for a, b in random_pairs(100, 200, 0))
    assert random_pairs(1, 10, 0) == []
    assert random_pairs(5, 200, 0) == [(a, b) for a in range(5) for b in range(a + 1, 5)], "a small corpus: every pair"


def test_a_word_of_a_family_names_a_term_only_where_it_differs():
    moved = difference("a red circle in the center", "a red circle on the left")
    recoloured = difference("a red circle in the center", "a blue circle in the center")
    reshaped = difference("a red circle in the center", "a red square in the center")
    assert "circle in" in moved and "circle" not in moved
    assert term_family("circle in", [moved, moved, reshaped]) is None, "the circle is in both captions"
    assert term_family("circle in", [reshaped, reshaped, moved]) == "shape"
    assert term_family("red circle", [recoloured]) == "colour"
    assert term_family("on the left", [moved]) == "spatial position"
    assert term_family("a dog", [frozenset({"dog"})]) is None


def test_top_words_skip_the_longer_forms_of_a_word_they_show():
    failure = FailureType("spatial position", [Term("left", 9, 1, 5, 0), Term("the left", 8, 1, 5, 0),
                                               Term("cleft", 7, 1, 5, 0), Term("right", 6, 1, 5, 0)])
    assert failure.top_words(3) == ["left", "cleft", "right"], "``left`` is in ``the left``, not in ``cleft``"
    assert failure.name == "spatial position (left, cleft, right)"


def test_the_background_is_half_reference_neighbours_deduplicated_and_seeded():
    near = [(0, 1), (1, 0), (2, 3), (3, 3)] + [(i, i + 1) for i in range(10, 60)]
    pairs, n_near = background_pairs(1000, near, 40, 5)
    assert len(pairs) == 40 and n_near == 20
    assert set(pairs[:20]) <= {(min(a, b), max(a, b)) for a, b in near if a != b}
    assert background_pairs(1000, list(reversed(near)), 40, 5) == (pairs, n_near), "the order of near is moot"
    assert background_pairs(1000, near, 40, 6) != (pairs, n_near)
    few, n_few = background_pairs(1000, [(0, 1), (1, 0)], 40, 5)
    assert n_few == 1 and few[0] == (0, 1) and len(few) == 40, "random pairs fill what the near pairs do not"
    assert background_pairs(4, [], 40, 0) == ([(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)], 0)


def _mixed_corpus(n_pairs: int, seed: int) -> tuple[list[frozenset[str]], list[frozenset[str]]]:
    """Foreground: minimal pairs of probe scenes, 60 % position, the rest kind, colour or count; background: random
    pairs of the scenes' captions."""
    from clipaudit.probe.scenes import scene_spec

    rng = random.Random(seed)
    specs = [scene_spec(seed, i) for i in range(400)]
    captions = [spec.captions()[i % 5] for i, spec in enumerate(specs)]
    foreground = []
    while len(foreground) < n_pairs:
        spec = specs[rng.randrange(len(specs))]
        attribute = "position" if rng.random() < 0.6 else rng.choice(["kind", "colour", "count"])
        try:
            other = variant(spec, attribute, rng)
        except IndexError:  # no kind or colour left for this scene's variant
            continue
        style = rng.randrange(5)
        foreground.append(difference(spec.captions()[style], other.captions()[style]))
    background = [difference(captions[a], captions[b]) for a, b in random_pairs(len(captions), 4 * n_pairs, seed)]
    return foreground, background


def test_mixed_minimal_pairs_are_named_by_the_attribute_that_dominates_and_determinism():
    foreground, background = _mixed_corpus(1500, 4)
    types = name_failures(foreground, background)
    assert types[0].family == "spatial position" and len(types[0].documents) > 0.5 * len(foreground)
    shape = [t for t in types if t.family == "shape"]
    assert not shape or not any(term.ngram in ("circle in", "triangle on", "square on", "squares in")
                                for term in shape[0].terms), "a moved shape's context is not a shape difference"
    again = name_failures(list(foreground), list(background))
    assert [(t.name, [x.ngram for x in t.terms], t.documents) for t in types] == \
        [(t.name, [x.ngram for x in t.terms], t.documents) for t in again]


def test_a_hundred_thousand_documents_take_seconds():
    import time

    foreground, background = _mixed_corpus(2000, 9)
    foreground, background = foreground * 25, background * 12  # 50,000 and 96,000 documents
    started = time.perf_counter()
    types = name_failures(foreground, background)
    assert time.perf_counter() - started < 15
    assert types[0].family == "spatial position"
