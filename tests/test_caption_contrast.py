"""The caption-contrast kernel: difference n-grams, log-odds with an informative prior, grouping into types."""

from __future__ import annotations

import math
import random

import pytest

from clipaudit.caption_contrast import (
    Term,
    difference,
    family_of,
    group_terms,
    log_odds,
    name_failures,
    ngrams,
    random_pairs,
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
    assert random_pairs(10, 50, 3) == random_pairs(10, 50, 3) != random_pairs(10, 50, 4)
    assert all(a != b for a, b in random_pairs(5, 200, 0))
    assert random_pairs(1, 10, 0) == []
