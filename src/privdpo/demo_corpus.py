"""A seeded toy review corpus for the controlled-sentiment demo (DPO paper, sec. 6.1).

The DPO paper fine-tunes a model on IMDb reviews, prompts it with review prefixes and
rewards positive continuations. We rebuild that at tiny scale and offline: reviews of
movies and products come from a small grammar, and a lexicon scorer (vaderSentiment's
compound score) stands in for the ground-truth reward. So the sentiment words below are
all in VADER's lexicon (valence about 1 to 3 in size on its -4..4 scale, grouped strong or
mild by meaning), while the neutral words and the nouns are not, and score 0.

Each review is 1-3 sentences and 8-40 words: an opener, opinions on aspects (with
intensifiers, negation such as "not very good", and "X, but Y" contrasts), comparisons,
recommendations and closings, all picked with a `random.Random(seed)`.

Reviewers are skewed like real review sites: the number of reviews per reviewer follows a
truncated Zipf law, P(k) proportional to k**-ZIPF_EXPONENT for k = 1..MAX_REVIEWS_PER_USER.
With exponent 2 and a cap of 100, about 60% of reviewers write one review and over 80% at
most three, while the top 5% of reviewers write about 40% of all reviews. This matters for user-level privacy:
prolific reviewers are the ones whose contribution must be bounded.
"""

from __future__ import annotations

import json
import random
import re
import string
from pathlib import Path

# --- Vocabulary -----------------------------------------------------------------------
# Each domain: the things reviewed, their aspects, and the domain's verbs and comparisons.
MOVIE = dict(
    things="movie film show series sequel documentary musical drama mystery cartoon".split(),
    aspects=(
        "story|plot|acting|cast|ending|music|soundtrack|script|dialogue|pacing|editing"
        "|action|scenery|set design|camera work|lead actor|lighting|animation|first half|finale"
    ).split("|"),
    got="watched streamed rented caught".split(),
    getting="watching seeing renting".split(),
    again="watch it again|see it again|watch the sequel".split("|"),
    other=(
        "the first one|the book|the remake|the trailer|the last film I saw"
        "|most films this year|the other films by this director"
    ).split("|"),
    facts=(
        "It runs about {number} hours.|It came out in {month}.|I saw it on {day} night."
        "|It is based on a book.|It has {number} main characters.|The film is in color."
        "|Most of it takes place in one town.|The story covers {number} years."
    ).split("|"),
)
PRODUCT = dict(
    things=(
        "phone camera laptop tablet blender kettle toaster lamp chair desk backpack"
        " jacket watch speaker keyboard mouse charger printer vacuum mattress"
    ).split(),
    aspects=(
        "battery screen sound price design build handle switch cable size weight"
        " color fabric zipper lid motor setup manual packaging delivery"
    ).split(),
    got="bought ordered got purchased".split(),
    getting="buying ordering getting".split(),
    again="buy it again|order another one|buy from this brand again".split("|"),
    other=(
        "my old one|the last model|the one I had before|the cheaper brands"
        "|the one my brother has|most others I tried"
    ).split("|"),
    facts=(
        "It came in a plain brown box.|It arrived on {day}.|It comes in black and gray."
        "|The battery lasts about {number} hours.|It weighs about {number} pounds."
        "|It took {number} days to arrive.|It has {number} buttons on the side."
        "|I use it every {day} morning."
    ).split("|"),
)
DOMAINS = (MOVIE, PRODUCT)

# Sentiment adjectives: all in VADER's lexicon with the sign of their group.
STRONG_POSITIVE = (
    "excellent wonderful amazing fantastic superb brilliant perfect great outstanding"
    " beautiful awesome delightful lovely fabulous super ideal terrific"
    " marvelous gorgeous flawless"
).split()
MILD_POSITIVE = (
    "good nice pleasant enjoyable fun charming clever useful comfortable sweet fresh clean"
    " easy helpful friendly funny interesting cool smart entertaining exciting elegant"
).split()
STRONG_NEGATIVE = (
    "terrible awful horrible dreadful disgusting pathetic useless disappointing painful"
    " stupid ugly broken miserable lousy worthless frustrating hopeless dumb"
).split()
MILD_NEGATIVE = "bad poor dull weak messy tired sad confusing annoying boring odd lame".split()
# Not in VADER's lexicon: neutral to the scorer.
NEUTRAL = (
    "long short simple plain average typical standard basic ordinary modern quiet loud"
    " small large new familiar different heavy thin dark medium normal"
).split()

STRONG_INTENSIFIERS = "very really extremely incredibly so absolutely totally".split()
MILD_INTENSIFIERS = "quite fairly rather mostly".split()
NEUTRAL_INTENSIFIERS = "fairly rather mostly somewhat".split()

POSITIVE_WHO = ("anyone|everyone|a friend|my family|all my friends|people like me").split("|")
OTHER_WHO = "anyone|my family|my parents|kids|students|most people".split("|")
NUMBERS = "two three four five six seven eight ten twelve".split()
DAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
MONTHS = "January February March April May June July August September October".split()

# --- Templates ------------------------------------------------------------------------
# Slots (see `fill`): {thing} {aspect} {aspect2} {be} {are} {got} {getting} {again}
# {other} {who} {number} {day} {month} {fact}; {adj} {adj2} are adjective phrases of the
# review's sentiment, {strong} a bare strong one, {mildpos} {mildneg} bare mild ones.
OPENERS = {
    "positive": [
        "I loved this {thing}.",
        "What a {strong} {thing}!",
        "This {thing} {be} {adj}.",
        "This is the best {thing} I have {got} in years.",
        "I really enjoyed {getting} this {thing}.",
        "I am so happy with this {thing}.",
        "Wow, this {thing} {be} {adj}.",
    ],
    "negative": [
        "I hated this {thing}.",
        "What a {strong} {thing}!",
        "This {thing} {be} {adj}.",
        "This is the worst {thing} I have ever {got}.",
        "I regret {getting} this {thing}.",
        "I am very disappointed with this {thing}.",
        "Ugh, this {thing} {be} {adj}.",
    ],
    "neutral": [
        "I {got} this {thing} last {day}.",
        "This {thing} {be} {adj}.",
        "I {got} this {thing} in {month}.",
        "We {got} the {thing} on {day}.",
        "I {got} this {thing} a few weeks ago.",
    ],
}
BODIES = {
    "positive": [
        "The {aspect} {be} {adj}.",
        "The {aspect} {be} {adj} and the {aspect2} {be} {adj2}.",
        "The {aspect} {be} a bit {mildneg}, but the {aspect2} {be} {adj}.",
        "The {aspect} {be} not {mildneg} at all.",
        "It {be} much better than {other}.",
        "It {be} far better than {other}, and the {aspect} {be} {adj}.",
        "Both the {aspect} and the {aspect2} {are} {adj}.",
    ],
    "negative": [
        "The {aspect} {be} {adj}.",
        "The {aspect} {be} {adj} and the {aspect2} {be} {adj2}.",
        "The {aspect} {be} {mildpos}, but the {aspect2} {be} {adj}.",
        "The {aspect} {be} not very {mildpos}.",
        "It {be} much worse than {other}.",
        "It {be} not as {mildpos} as {other}.",
        "Both the {aspect} and the {aspect2} {are} {adj}.",
    ],
    "neutral": [
        "The {aspect} {be} {adj}.",
        "The {aspect} {be} {adj} and the {aspect2} {be} {adj2}.",
        "The {aspect} {be} {mildpos}, but the {aspect2} {be} {mildneg}.",
        "The {aspect} {be} {mildneg}, but the {aspect2} {be} {mildpos}.",
        "It {be} about the same as {other}.",
        "The {aspect} {be} {adj}, about what I expected.",
        "{fact}",
        "{fact}",
    ],
}
CLOSINGS = {
    "positive": [
        "I would recommend it to {who}.",
        "I would highly recommend it.",
        "I will {again}.",
        "Five stars.",
        "Overall, {strong}.",
        "Love it!",
        "Worth every penny and every minute.",
    ],
    "negative": [
        "I would not recommend it to {who}.",
        "Do not waste your money.",
        "I will never {again}.",
        "One star.",
        "Overall, {strong}.",
        "What a waste.",
        "Avoid it.",
    ],
    "neutral": [
        "It may suit {who}.",
        "Three stars.",
        "That is all I have to say.",
        "It is what it is.",
        "Overall, it {be} {adj}.",
        "I might {again}.",
    ],
}

MIN_WORDS, MAX_WORDS = 8, 40
ZIPF_EXPONENT = 2.0
MAX_REVIEWS_PER_USER = 100
STRONG = {"positive": STRONG_POSITIVE, "negative": STRONG_NEGATIVE}
FORMATTER = string.Formatter()
AN = re.compile(r"\ba (?=[aeio]|ugly\b)")  # "a awful" -> "an awful", but "a useless"


# --- Generation -----------------------------------------------------------------------
def adjective_phrase(rng: random.Random, sentiment: str) -> str:
    """An adjective of the sentiment, sometimes intensified ("extremely dull")."""
    if sentiment == "neutral":
        adj = rng.choice(NEUTRAL)
        return f"{rng.choice(NEUTRAL_INTENSIFIERS)} {adj}" if rng.random() < 0.3 else adj
    strong = rng.random() < 0.5
    if sentiment == "positive":
        adj = rng.choice(STRONG_POSITIVE if strong else MILD_POSITIVE)
    else:
        adj = rng.choice(STRONG_NEGATIVE if strong else MILD_NEGATIVE)
    roll = rng.random()
    if roll < 0.35:
        return f"{rng.choice(STRONG_INTENSIFIERS)} {adj}"
    if roll < 0.45 and not strong:
        return f"{rng.choice(MILD_INTENSIFIERS)} {adj}"
    return adj


def fill(template: str, rng: random.Random, domain: dict, sentiment: str, be: str) -> str:
    """The template with each of its slots drawn (only the slots it uses, in order)."""
    draw = {
        "thing": lambda: rng.choice(domain["things"]),
        "aspect": lambda: rng.choice(domain["aspects"]),
        "be": lambda: be,
        "are": lambda: "were" if be == "was" else "are",
        "got": lambda: rng.choice(domain["got"]),
        "getting": lambda: rng.choice(domain["getting"]),
        "again": lambda: rng.choice(domain["again"]),
        "other": lambda: rng.choice(domain["other"]),
        "who": lambda: rng.choice(POSITIVE_WHO if sentiment == "positive" else OTHER_WHO),
        "adj": lambda: adjective_phrase(rng, sentiment),
        "strong": lambda: rng.choice(STRONG[sentiment]),
        "mildpos": lambda: rng.choice(MILD_POSITIVE),
        "mildneg": lambda: rng.choice(MILD_NEGATIVE),
        "number": lambda: rng.choice(NUMBERS),
        "day": lambda: rng.choice(DAYS),
        "month": lambda: rng.choice(MONTHS),
        "fact": lambda: fill(rng.choice(domain["facts"]), rng, domain, sentiment, be),
    }
    draw["aspect2"] = draw["aspect"]
    draw["adj2"] = draw["adj"]
    slots = {}
    for _, name, _, _ in FORMATTER.parse(template):
        if name is not None and name not in slots:
            slots[name] = draw[name]()
    if "aspect2" in slots and slots["aspect2"] == slots["aspect"]:
        slots["aspect2"] = rng.choice([a for a in domain["aspects"] if a != slots["aspect"]])
    text = AN.sub("an ", template.format(**slots))
    return text[0].upper() + text[1:]


def review_text(rng: random.Random, sentiment: str) -> str:
    """One review: an optional opener, bodies, and an optional closing; redrawn until it
    has MIN_WORDS to MAX_WORDS words."""
    domain = rng.choice(DOMAINS)
    be = "was" if domain is MOVIE or rng.random() < 0.3 else "is"
    while True:
        n_sentences = rng.choice((1, 2, 2, 3, 3, 3))
        templates = []
        if n_sentences > 1 and rng.random() < 0.7:
            templates.append(rng.choice(OPENERS[sentiment]))
        closing = n_sentences > 1 and rng.random() < 0.6
        templates += rng.sample(BODIES[sentiment], n_sentences - closing - len(templates))
        if closing:
            templates.append(rng.choice(CLOSINGS[sentiment]))
        text = " ".join(fill(t, rng, domain, sentiment, be) for t in templates)
        if MIN_WORDS <= len(text.split()) <= MAX_WORDS:
            return text


def reviews_per_user(rng: random.Random, n: int) -> list[int]:
    """Review counts of the reviewers, summing to `n`: each drawn from the truncated Zipf
    law P(k) ~ k**-ZIPF_EXPONENT, k <= MAX_REVIEWS_PER_USER; the last one is cut to fit."""
    ks = range(1, MAX_REVIEWS_PER_USER + 1)
    weights = [k**-ZIPF_EXPONENT for k in ks]
    counts = []
    while sum(counts) < n:
        counts.extend(rng.choices(ks, weights, k=max(1, (n - sum(counts)) // 4)))
    total = 0
    for i, c in enumerate(counts):
        if total + c >= n:
            return counts[:i] + [n - total]
        total += c
    return counts


def generate_reviews(n: int, seed: int, positive: float = 0.4, negative: float = 0.4) -> list[dict]:
    """`n` reviews `{"text", "user_id", "sentiment"}` in random order, deterministic for a
    seed. Exactly round(n * positive) are positive and round(n * negative) negative; the
    rest are neutral. User ids look like "reviewer-0042"; counts per user are Zipf-skewed."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    for name, value in (("positive", positive), ("negative", negative)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} is a fraction of the reviews in [0, 1], got {value}")
    if positive + negative > 1:
        raise ValueError(
            f"positive + negative must be <= 1 (the rest is neutral), got {positive + negative}"
        )
    rng = random.Random(seed)
    n_pos, n_neg = round(n * positive), round(n * negative)
    n_neg = min(n_neg, n - n_pos)
    labels = ["positive"] * n_pos + ["negative"] * n_neg + ["neutral"] * (n - n_pos - n_neg)
    rng.shuffle(labels)

    counts = reviews_per_user(rng, n)
    width = max(4, len(str(len(counts) - 1)))
    # Ids are numbered at random, so "reviewer-0000" is not always the most prolific.
    ids = [f"reviewer-{i:0{width}d}" for i in rng.sample(range(len(counts)), len(counts))]
    users = [uid for uid, c in zip(ids, counts, strict=True) for _ in range(c)]
    rng.shuffle(users)

    return [
        {"text": review_text(rng, label), "user_id": user, "sentiment": label}
        for label, user in zip(labels, users, strict=True)
    ]


def write_corpus(path: Path, n: int, seed: int) -> Path:
    """Write `n` reviews as JSONL rows `{"text", "user_id"}` (privdpo's SFT `text` format,
    user ids in the default `data.user_id_column`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = generate_reviews(n, seed)
    path.write_text(
        "".join(json.dumps({"text": r["text"], "user_id": r["user_id"]}) + "\n" for r in rows),
        encoding="utf-8",
    )
    return path


def review_prompts(
    reviews: list[dict], seed: int, min_tokens: int = 2, max_tokens: int = 8
) -> list[dict]:
    """One prompt `{"prompt", "user_id"}` per review: the review's first k words, k drawn
    uniformly from [min_tokens, max_tokens] (and below the review's length, so something
    is left to complete). The DPO paper takes 2-8 *tokens* of IMDb reviews; we count
    whitespace words so that prompts do not depend on a tokenizer. Pass reviews held out
    of SFT training, so the policy has not seen them whole."""
    if min_tokens < 1 or max_tokens < min_tokens:
        raise ValueError(
            f"need 1 <= min_tokens <= max_tokens, got min_tokens={min_tokens},"
            f" max_tokens={max_tokens}"
        )
    rng = random.Random(seed)
    prompts = []
    for review in reviews:
        ends = [m.end() for m in re.finditer(r"\S+", review["text"])]
        if len(ends) <= min_tokens:
            raise ValueError(
                f"review of {review['user_id']} has {len(ends)} words, too few for a prompt"
                f" of at least {min_tokens} words with a continuation: {review['text']!r}"
            )
        k = rng.randint(min_tokens, min(max_tokens, len(ends) - 1))
        prompts.append({"prompt": review["text"][: ends[k - 1]], "user_id": review["user_id"]})
    return prompts
