"""Tests for the toy review corpus of the controlled-sentiment demo (privdpo.demo_corpus)."""

from __future__ import annotations

import json
import random
import re
import statistics
import time
from collections import Counter

import pytest

from privdpo import demo_corpus
from privdpo.config import DataConfig
from privdpo.data.sft import load_sft_data
from privdpo.demo_corpus import generate_reviews, review_prompts, write_corpus

N = 5000


@pytest.fixture(scope="module")
def reviews() -> list[dict]:
    return generate_reviews(N, seed=0)


@pytest.fixture(scope="module")
def vader():
    module = pytest.importorskip("vaderSentiment.vaderSentiment")
    return module.SentimentIntensityAnalyzer()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


def test_same_seed_same_reviews_other_seed_other_reviews():
    state = random.getstate()
    first = generate_reviews(300, seed=7)
    assert random.getstate() == state  # the global generator is left alone
    assert generate_reviews(300, seed=7) == first
    other = generate_reviews(300, seed=8)
    assert sum(a["text"] != b["text"] for a, b in zip(first, other, strict=True)) > 250
    assert [r["user_id"] for r in first] != [r["user_id"] for r in other]


def test_review_shape(reviews):
    for r in reviews:
        assert set(r) == {"text", "user_id", "sentiment"}
        assert re.fullmatch(r"reviewer-\d{4}", r["user_id"])
        assert 8 <= len(r["text"].split()) <= 40, r["text"]
        assert 1 <= len(re.findall(r"[.!?](?: |$)", r["text"])) <= 3, r["text"]
        assert r["text"][0].isupper() and r["text"][-1] in ".!", r["text"]
    assert len({r["text"] for r in reviews}) > 0.95 * N


@pytest.mark.parametrize(
    "positive, negative, expected",
    [(0.4, 0.4, (400, 400, 200)), (0.7, 0.1, (700, 100, 200)), (0.5, 0.5, (500, 500, 0))],
)
def test_sentiment_counts_follow_the_requested_mix(positive, negative, expected):
    counts = Counter(r["sentiment"] for r in generate_reviews(1000, 3, positive, negative))
    assert (counts["positive"], counts["negative"], counts["neutral"]) == expected


def test_sentiments_are_shuffled(reviews):
    first_half = Counter(r["sentiment"] for r in reviews[: N // 2])
    assert 900 <= first_half["positive"] <= 1100 and 400 <= first_half["neutral"] <= 600


@pytest.mark.parametrize(
    "positive, negative", [(-0.1, 0.4), (0.4, 1.5), (0.7, 0.4)], ids=["neg", "big", "sum"]
)
def test_bad_mix_is_rejected(positive, negative):
    with pytest.raises(ValueError, match="positive|negative"):
        generate_reviews(10, 0, positive, negative)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_few_prolific_reviewers_many_occasional(seed):
    counts = sorted(Counter(r["user_id"] for r in generate_reviews(N, seed)).values())[::-1]
    n_users = len(counts)
    assert 0.2 * N < n_users < 0.45 * N
    top = counts[: n_users // 20]
    assert sum(top) > 0.3 * N  # the top 5% of reviewers write over 30% of reviews
    assert counts[0] >= 40  # and the most prolific writes dozens
    assert sum(c <= 3 for c in counts) > 0.75 * n_users
    assert sum(c == 1 for c in counts) > 0.5 * n_users
    assert max(counts) <= demo_corpus.MAX_REVIEWS_PER_USER


def test_vocabulary_has_a_few_hundred_words(reviews):
    vocab = {w for r in reviews for w in words(r["text"])}
    assert 250 <= len(vocab) <= 600


def test_word_lists_match_vader_lexicon(vader):
    lexicon = vader.lexicon
    for group in ("STRONG_POSITIVE", "MILD_POSITIVE"):
        for w in getattr(demo_corpus, group):
            assert lexicon.get(w, 0) > 0, (group, w)
    for group in ("STRONG_NEGATIVE", "MILD_NEGATIVE"):
        for w in getattr(demo_corpus, group):
            assert lexicon.get(w, 0) < 0, (group, w)
    nouns = [w for d in demo_corpus.DOMAINS for key in ("things", "aspects") for w in d[key]]
    for w in demo_corpus.NEUTRAL + [w for noun in nouns for w in noun.split()]:
        assert w not in lexicon, w


def test_neutral_reviews_carry_sentiment_only_in_mixed_sentences(reviews, vader):
    """Neutral reviews use VADER words only in "X was good, but Y was dull" contrasts."""
    mild = set(demo_corpus.MILD_POSITIVE + demo_corpus.MILD_NEGATIVE)
    for r in reviews:
        if r["sentiment"] == "neutral":
            scored = {w for w in words(r["text"]) if w in vader.lexicon}
            assert scored <= mild, r["text"]


def test_vader_scores_follow_the_labels(reviews, vader):
    scores = {"positive": [], "negative": [], "neutral": []}
    for r in reviews:
        scores[r["sentiment"]].append(vader.polarity_scores(r["text"])["compound"])
    means = {k: statistics.mean(v) for k, v in scores.items()}
    print("vader compound means:", {k: round(v, 3) for k, v in means.items()})
    assert means["positive"] > 0.6  # measured 0.81
    assert means["negative"] < -0.5  # measured -0.72
    assert abs(means["neutral"]) < 0.1  # measured 0.02
    assert sum(s > 0 for s in scores["positive"]) > 0.97 * len(scores["positive"])
    assert sum(s < 0 for s in scores["negative"]) > 0.97 * len(scores["negative"])


def test_prompts_are_short_prefixes_of_their_reviews(reviews):
    held_out = reviews[:1000]
    prompts = review_prompts(held_out, seed=5)
    assert prompts == review_prompts(held_out, seed=5)
    lengths = Counter()
    for p, r in zip(prompts, held_out, strict=True):
        assert set(p) == {"prompt", "user_id"} and p["user_id"] == r["user_id"]
        n_words = len(p["prompt"].split())
        lengths[n_words] += 1
        assert r["text"].startswith(p["prompt"]) and len(p["prompt"]) < len(r["text"])
        assert r["text"][len(p["prompt"])] == " "  # cut at a word boundary
    assert set(lengths) == set(range(2, 9))
    short = review_prompts(held_out, seed=5, min_tokens=3, max_tokens=4)
    assert {len(p["prompt"].split()) for p in short} == {3, 4}


def test_prompts_reject_bad_lengths():
    with pytest.raises(ValueError, match="min_tokens"):
        review_prompts([{"text": "a b c", "user_id": "u"}], 0, min_tokens=5, max_tokens=2)
    with pytest.raises(ValueError, match="too few"):
        review_prompts([{"text": "a b", "user_id": "u"}], 0)


def test_corpus_loads_as_sft_text_without_dropped_rows(tmp_path, tiny_tokenizer):
    start = time.perf_counter()
    path = write_corpus(tmp_path / "reviews" / "train.jsonl", N, seed=1)
    assert time.perf_counter() - start < 2.0
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == N and all(set(r) == {"text", "user_id"} for r in rows)

    small = write_corpus(tmp_path / "small.jsonl", 400, seed=1)
    cfg = DataConfig(train=str(small), eval_fraction=0.1)
    train, evals, summary = load_sft_data(cfg, tiny_tokenizer, False, seed=0)
    assert summary.total_dropped == 0 and not summary.notes
    assert len(train) + len(evals) == 400
    written = Counter(r["user_id"] for r in generate_reviews(400, seed=1))
    assert Counter(e.user_id for e in train + evals) == written


def test_reviews_take_a_few_dozen_tiny_tokens(reviews, tiny_tokenizer):
    """The tiny tokenizer knows only a short corpus, so words split into pieces."""
    n_tokens = [len(tiny_tokenizer(r["text"])["input_ids"]) for r in reviews[:1000]]
    print(
        f"tiny-tokenizer tokens per review: mean {statistics.mean(n_tokens):.1f},"
        f" max {max(n_tokens)}"
    )
    assert statistics.mean(n_tokens) < 60 and max(n_tokens) < 128
