"""Profiles: the summary, BM25 retrieval, the encoder text, the fixed-layout feature vector."""

from __future__ import annotations

import re

import numpy as np
import pytest

from p2p_local.data.format import Item, builtin_card
from p2p_local.profile import (
    FEATURE_DIM,
    FEATURE_NAMES,
    MAX_RETRIEVAL_ITEMS,
    MAX_SUMMARY_ITEMS,
    build_profile,
    render_history,
    retrieve,
)

MOVIES = builtin_card("movielens-rating")
COMMITS = builtin_card("commit-subject")


def f(profile, name):
    return float(profile.features[FEATURE_NAMES.index(name)])


def movie(title, genres, rating, t):
    return Item(f"{title} | Genres: {'|'.join(genres)}", str(rating), float(t), {"genres": genres})


def horror_lover(n=30):
    items = []
    for i in range(n):
        items.append(movie(f"Scream {i} (1996)", ["Horror"], 5, 2 * i))
        items.append(movie(f"Love {i} (2001)", ["Romance"], 1, 2 * i + 1))
    return items


def test_layout_is_fixed_for_every_task():
    assert len(FEATURE_NAMES) == FEATURE_DIM == len(set(FEATURE_NAMES))
    for card in (
        MOVIES,
        COMMITS,
        builtin_card("popquorn-offensiveness"),
        builtin_card("popquorn-email-rewrite"),
    ):
        hist = [
            Item("some input text here", "4" if card.kind == "rating" else "Some output.", float(i))
            for i in range(5)
        ]
        p = build_profile(card, hist, Item("query text", "", 9.0))
        assert p.features.shape == (FEATURE_DIM,) and p.features.dtype == np.float32
        assert np.isfinite(p.features).all() and np.abs(p.features).max() <= 3.0
        rating_block = [n for n in FEATURE_NAMES if n.startswith("r_")]
        text_block = [n for n in FEATURE_NAMES if n.startswith("t_")]
        zero_block = text_block if card.kind == "rating" else rating_block
        assert all(f(p, n) == 0.0 for n in zero_block)


def test_empty_history_is_neutral_and_flagged():
    p = build_profile(MOVIES, [], Item("Heat (1995) | Genres: Action", ""))
    assert p.empty and p.n_history == 0 and p.retrieved == []
    assert p.summary == "No history yet."
    assert f(p, "is_empty") == 1.0 and f(p, "is_rating") == 1.0
    assert np.count_nonzero(p.features) == 2
    assert p.text.startswith("extract personalization features relevant to: " + MOVIES.description)


def test_rating_summary_text_and_query_conditional_features():
    hist = horror_lover()
    horror = build_profile(MOVIES, hist, movie("Scream 99 (2020)", ["Horror"], 0, 999))
    romance = build_profile(MOVIES, hist, movie("Love 99 (2020)", ["Romance"], 0, 999))
    assert "60 past ratings, mean 3.00" in horror.summary
    assert (
        "Rates highest genres: Horror 5.0" in horror.summary
        and "Rates lowest genres: Romance 1.0" in horror.summary
    )
    assert "Label frequency: 1: 50%, 5: 50%." in horror.text
    assert f(horror, "r_query_mean") > 0.5 > -0.5 > f(romance, "r_query_mean")
    assert f(horror, "r_neighbour_mean") == 1.0 and f(romance, "r_neighbour_mean") == -1.0
    assert f(horror, "r_mean") == pytest.approx(0.0) and f(horror, "r_hist_0") == pytest.approx(0.5)
    assert all("Scream" in it.input for it in horror.retrieved) and len(horror.retrieved) == 2
    assert horror.summary == romance.summary  # the summary is global; retrieval and features follow the query
    assert horror.fingerprint != romance.fingerprint


def test_topics_from_words_when_items_have_no_genres():
    card = builtin_card("popquorn-offensiveness")
    hist = [Item(f"politicians lie about taxes {i}", "5", None) for i in range(4)]
    hist += [Item(f"puppies playing outside {i}", "1", None) for i in range(4)]
    p = build_profile(card, hist, Item("politicians again", "", None))
    assert "Rates highest topics:" in p.summary and "politicians" in p.summary
    assert f(p, "r_query_mean") > f(p, "r_mean")


def test_text_profile_captures_style():
    lower = [Item(f"body {i}", f"fix thing number {i}", float(i)) for i in range(10)]
    upper = [Item(f"body {i}", f"Fix thing number {i}.", float(i)) for i in range(10)]
    q = Item("files: src/x.py", "", 99.0)
    pl, pu = build_profile(COMMITS, lower, q), build_profile(COMMITS, upper, q)
    assert f(pl, "t_starts_lower") == 1.0 and f(pu, "t_starts_lower") == 0.0
    assert f(pu, "t_ends_period") == 1.0 and f(pl, "t_ends_period") == 0.0
    assert 'Typical openings: "fix" 100%' in pl.summary
    assert "Label frequency" not in pl.text
    assert "Register:" in pl.summary and "Output length about 4 words" in pl.summary


def test_retrieval_finds_the_matching_item_and_falls_back_to_recent():
    hist = [
        Item(t, "x", float(i))
        for i, t in enumerate(["a cat on a mat", "stock markets fell", "dogs bark", "rain"])
    ]
    assert retrieve(COMMITS, hist, Item("my cat sleeps", ""), k=1)[0].input == "a cat on a mat"
    assert [it.input for it in retrieve(COMMITS, hist, None, k=2)] == ["rain", "dogs bark"]
    assert [it.input for it in retrieve(COMMITS, hist, Item("zzz qqq", ""), k=2)] == ["rain", "dogs bark"]
    assert retrieve(COMMITS, [Item("", "", None)], Item("cat", ""), k=2) == [Item("", "", None)]
    assert retrieve(COMMITS, hist, Item("cat", ""), k=0) == []


def test_profile_never_sees_the_query_output():
    hist = horror_lover(5)
    a = build_profile(MOVIES, hist, movie("Scream 9 (2020)", ["Horror"], 1, 99))
    b = build_profile(MOVIES, hist, movie("Scream 9 (2020)", ["Horror"], 5, 99))
    assert a.text == b.text and np.array_equal(a.features, b.features) and a.fingerprint == b.fingerprint


def test_fingerprint_is_a_hash():
    p = build_profile(MOVIES, horror_lover(3), None)
    assert re.fullmatch(r"[0-9a-f]{64}", p.fingerprint)
    assert build_profile(MOVIES, horror_lover(3), None).fingerprint == p.fingerprint
    assert build_profile(MOVIES, horror_lover(4), None).fingerprint != p.fingerprint


def test_huge_history_is_bounded():
    n = 100_000
    hist = [movie(f"Film {i} (2000)", ["Drama" if i % 2 else "Comedy"], 1 + i % 5, i) for i in range(n)]
    hist[10].input = "Unique Needle (1950) | Genres: Drama"  # old: outside the retrieval window
    p = build_profile(MOVIES, hist, movie("Unique Needle 2 (1951)", ["Drama"], 0, n + 1))
    assert p.n_history == n and f(p, "log_count") > 1.5
    assert (
        f"{n} past ratings" in p.summary and f"(Statistics over the latest {MAX_SUMMARY_ITEMS}.)" in p.summary
    )
    window = {id(it) for it in hist[-MAX_RETRIEVAL_ITEMS:]}
    assert all(id(it) in window for it in p.retrieved)
    assert len(p.text) < 2000


def test_render_history():
    items = [Item("line one\nline two", "Out " * 100, None)]
    s = render_history(items)
    assert s.startswith("Input: line one line two Output: Out Out") and "\n" not in s and s.endswith("…")
