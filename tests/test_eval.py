"""`privdpo eval`: every number against an independent recomputation on tiny models, the
statistics against hand-derived cases, and the real command on a real tiny DPO run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import REPO, write_jsonl
from privdpo.cli import main
from privdpo.config import DataConfig, EvalRunConfig, load_config
from privdpo.data.preference import read_pairs
from privdpo.data.summary import DataSummary
from privdpo.errors import ConfigError, DataError
from privdpo.generation import (
    eos_token_ids,
    exact_sequence_kl,
    generate,
    sample_next,
    sequence_kl,
)
from privdpo.models import build_preset
from privdpo.recipes.eval import (
    ChoiceTask,
    best_of_n,
    best_of_n_kl_bound,
    classification_groups,
    classification_metrics,
    evaluate_preferences,
    multiple_choice_answers,
    multiple_choice_correct,
    read_tasks,
    resolve,
    task_check,
    win_rate,
)
from privdpo.stats import (
    bootstrap_ci,
    bootstrap_estimate,
    mean_estimate,
    ratio_estimate,
    resample_indices,
)

SAMPLE_PAIRS = REPO / "src" / "privdpo" / "assets" / "sample_pairs.jsonl"


@pytest.fixture(scope="module")
def models():
    """Two different random tiny models sharing one tokenizer: (policy, reference, tok)."""
    torch.manual_seed(0)
    policy, tokenizer = build_preset("tiny")
    torch.manual_seed(1)
    reference, _ = build_preset("tiny")
    return policy.eval(), reference.eval(), tokenizer


@pytest.fixture(scope="module")
def pairs(models, tmp_path_factory):
    rows = [json.loads(line) for line in SAMPLE_PAIRS.read_text().splitlines()[:6]]
    path = write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows)
    cfg = DataConfig(train=str(path), max_length=128)
    return read_pairs(str(path), cfg, models[2], DataSummary("error"))


def logp_of(model, prompt: list[int], response: list[int]) -> float:
    """log p(response | prompt), one unpadded sequence, straight from the logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logps = torch.log_softmax(logits, dim=-1)
    # The token at position len(prompt) + t is predicted by the logits at the one before.
    return sum(logps[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(response))


# ---------------------------------------------------------------------------------------
# Held-out preferences
# ---------------------------------------------------------------------------------------


def test_preference_accuracy_and_margins_match_a_recomputation(models, pairs):
    policy, reference, tokenizer = models
    beta = 0.25
    scores = evaluate_preferences(
        policy, reference, pairs, beta, tokenizer.pad_token_id, batch_size=4
    )
    expected = []
    for p in pairs:
        chosen = logp_of(policy, p.prompt_ids, p.chosen_ids) - logp_of(
            reference, p.prompt_ids, p.chosen_ids
        )
        rejected = logp_of(policy, p.prompt_ids, p.rejected_ids) - logp_of(
            reference, p.prompt_ids, p.rejected_ids
        )
        expected.append(beta * (chosen - rejected))
    assert scores.margins.tolist() == pytest.approx(expected, abs=1e-4)
    assert all(abs(m) > 1e-3 for m in expected)  # no margin near 0: the signs are certain
    assert scores.correct.tolist() == [1.0 if m > 0 else 0.0 for m in expected]
    assert 0 < scores.correct.mean() < 1  # both outcomes occur, so the check has teeth


def test_a_model_against_itself_has_zero_margins_and_no_accuracy(models, pairs):
    policy, _, tokenizer = models
    scores = evaluate_preferences(policy, policy, pairs, 0.1, tokenizer.pad_token_id)
    assert torch.equal(scores.margins, torch.zeros(len(pairs)))
    assert scores.correct.sum() == 0  # a tie is not a correct preference


# ---------------------------------------------------------------------------------------
# Generation and KL
# ---------------------------------------------------------------------------------------


def prompts_of(tokenizer) -> list[list[int]]:
    texts = ["Write a short review.\n", "The movie was", "Hello", "A long prompt about a phone:"]
    return [tokenizer(t)["input_ids"] for t in texts]


def sample(model, tokenizer, prompts, **kw):
    args = dict(
        pad_id=tokenizer.pad_token_id,
        eos_ids=eos_token_ids(model, tokenizer),
        max_new_tokens=8,
        batch_size=3,
        seed=0,
    )
    return generate(model, prompts, **{**args, **kw})


def test_generation_is_deterministic_and_stops_at_eos(models):
    policy, _, tokenizer = models
    prompts = prompts_of(tokenizer)
    first = sample(policy, tokenizer, prompts)
    assert first == sample(policy, tokenizer, prompts)
    assert first != sample(policy, tokenizer, prompts, seed=1)
    eos = set(eos_token_ids(policy, tokenizer))
    for completion in first:
        assert 1 <= len(completion) <= 8
        assert not eos & set(completion[:-1])  # an EOS can only be the last token


def test_greedy_batched_generation_equals_transformers_generate(models):
    # Left padding and position ids are right if a batch of prompts of different lengths
    # gives each prompt's own greedy continuation, as transformers computes it alone.
    policy, _, tokenizer = models
    prompts = prompts_of(tokenizer)
    ours = sample(policy, tokenizer, prompts, temperature=0.0, batch_size=4)
    eos = eos_token_ids(policy, tokenizer)
    for prompt, completion in zip(prompts, ours, strict=True):
        ids = torch.tensor([prompt])
        out = policy.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=8,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert completion == out[0, len(prompt) :].tolist()[: len(completion)]
        assert len(completion) == len(out[0]) - len(prompt)


def test_top_p_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    generator = torch.Generator().manual_seed(0)
    tiny = {sample_next(logits, 1.0, 1e-6, generator).item() for _ in range(50)}
    assert tiny == {0}  # only the most likely token
    nucleus = {sample_next(logits, 1.0, 0.8, generator).item() for _ in range(400)}
    assert nucleus == {0, 1}  # mass before token 2 is 0.8: it and token 3 are cut
    assert sample_next(logits, 0.0, 1.0, generator).item() == 0  # greedy


def test_kl_of_a_model_to_itself_is_exactly_zero(models):
    policy, _, tokenizer = models
    prompts = prompts_of(tokenizer)
    completions = sample(policy, tokenizer, prompts)
    kl = sequence_kl(policy, policy, prompts, completions, tokenizer.pad_token_id, 3)
    assert torch.equal(kl, torch.zeros(len(prompts)))


def test_kl_to_another_model_matches_a_recomputation(models):
    policy, reference, tokenizer = models
    prompts = prompts_of(tokenizer)
    completions = sample(policy, tokenizer, prompts)
    kl = sequence_kl(policy, reference, prompts, completions, tokenizer.pad_token_id, 3)
    expected = [
        logp_of(policy, p, c) - logp_of(reference, p, c)
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert kl.tolist() == pytest.approx(expected, abs=1e-4)


def tiny_vocab_model(seed: int, vocab: int = 5):
    """A one-layer Qwen2 over `vocab` tokens, with weights large enough for peaked
    next-token distributions (so the KL between two of them is far from 0)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        initializer_range=0.6,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def all_continuations(vocab: int, eos: int, horizon: int) -> list[list[int]]:
    """Every completion a sampler can return: ended by `eos`, or cut at `horizon` tokens."""
    out, frontier = [], [[]]
    for _ in range(horizon):
        grown = [seq + [v] for seq in frontier for v in range(vocab)]
        out += [s for s in grown if s[-1] == eos]
        frontier = [s for s in grown if s[-1] != eos]
    return out + frontier


def next_token_kls(policy, reference, prompt: list[int], completion: list[int]) -> list[float]:
    """The KL of the two next-token distributions at each completion position, from the
    full logits of one unpadded sequence."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logp = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
        logq = torch.log_softmax(reference(input_ids=ids).logits[0].double(), -1)
    at = range(len(prompt) - 1, len(prompt) + len(completion) - 1)
    return [float((logp[t].exp() * (logp[t] - logq[t])).sum()) for t in at]


def test_exact_kl_equals_the_brute_force_sequence_kl_over_every_continuation():
    # Vocabulary of 5 (token 0 ends a completion), horizon 3: 1 + 4 + 16 * 5 = 85 possible
    # completions per prompt. KL(pi || pi_ref) = sum_y pi(y) log(pi(y) / pi_ref(y)) over
    # all of them; the exact estimator's expectation under pi must equal it.
    vocab, eos, horizon = 5, 0, 3
    policy, reference = tiny_vocab_model(0, vocab), tiny_vocab_model(1, vocab)
    ys = all_continuations(vocab, eos, horizon)
    assert len(ys) == 85
    for prompt in ([3, 1], [2, 4, 4, 1]):
        p = torch.tensor([logp_of(policy, prompt, y) for y in ys], dtype=torch.float64)
        q = torch.tensor([logp_of(reference, prompt, y) for y in ys], dtype=torch.float64)
        assert p.exp().sum().item() == pytest.approx(1.0, abs=1e-5)  # every y, once
        brute_force = float((p.exp() * (p - q)).sum())
        assert brute_force > 0.05  # two clearly different policies

        kl, tokens = exact_sequence_kl(
            policy, reference, [prompt] * len(ys), ys, pad_id=4, batch_size=7, position_chunk=5
        )
        assert tokens.tolist() == [float(len(y)) for y in ys]
        assert float((p.exp() * kl.double()).sum()) == pytest.approx(brute_force, rel=1e-4)
        # Each sequence's value is its positions' next-token KLs, none negative...
        for i in (0, 3, 40, 84):
            assert kl[i].item() == pytest.approx(
                sum(next_token_kls(policy, reference, prompt, ys[i])), rel=1e-4, abs=1e-6
            )
        assert kl.min() >= -1e-6
        # ... and the one-sample log-ratio has the same expectation.
        one_sample = sequence_kl(policy, reference, [prompt] * len(ys), ys, pad_id=4)
        assert float((p.exp() * one_sample.double()).sum()) == pytest.approx(brute_force, rel=1e-4)


def test_exact_kl_on_sampled_completions_matches_full_logits(models):
    policy, reference, tokenizer = models
    prompts = prompts_of(tokenizer)
    completions = sample(policy, tokenizer, prompts)
    kl, tokens = exact_sequence_kl(
        policy, reference, prompts, completions, tokenizer.pad_token_id, 3, position_chunk=4
    )
    expected = [
        sum(next_token_kls(policy, reference, p, c))
        for p, c in zip(prompts, completions, strict=True)
    ]
    assert kl.tolist() == pytest.approx(expected, rel=1e-4)
    assert tokens.tolist() == [len(c) for c in completions]
    itself, _ = exact_sequence_kl(policy, policy, prompts, completions, tokenizer.pad_token_id)
    assert torch.equal(itself, torch.zeros(len(prompts)))


# ---------------------------------------------------------------------------------------
# Win rate and the bootstrap
# ---------------------------------------------------------------------------------------


def test_win_rate_of_a_judge_that_always_prefers_one_side():
    better, worse = [2.0, 3.0, 0.5], [1.0, -1.0, 0.0]
    always = win_rate(better, worse, samples=100)
    assert always["win_rate"].value == 1.0 and always["tie_rate"].value == 0.0
    assert (always["win_rate"].ci_low, always["win_rate"].ci_high) == (1.0, 1.0)
    assert win_rate(worse, better, samples=100)["win_rate"].value == 0.0
    ties = win_rate([1.0, 1.0], [1.0, 1.0], samples=100)
    assert ties["win_rate"].value == 0.5 and ties["tie_rate"].value == 1.0
    mixed = win_rate([1.0, 1.0, 0.0, 2.0], [0.0, 1.0, 1.0, 1.0], samples=0)
    assert mixed["win_rate"].value == (1 + 0.5 + 0 + 1) / 4
    assert mixed["tie_rate"].value == 0.25 and mixed["win_rate"].ci_low is None


def test_bootstrap_of_equal_values_is_a_point():
    assert bootstrap_ci([0.3] * 5, 200, 0.95, seed=0) == (0.3, 0.3)
    estimate = mean_estimate([0.1] * 7, 200, 0.9, seed=3)
    assert estimate.ci_low == estimate.value == estimate.ci_high


def test_bootstrap_matches_the_exact_bootstrap_distribution():
    # Resampling [0, 0, 1] three times gives a mean of 0, 1/3, 2/3, 1 with probabilities
    # 8/27, 12/27, 6/27, 1/27 (binomial(3, 1/3) ones). Cumulative: 0.296, 0.741, 0.963, 1.
    # 95%: the 2.5% quantile is 0; 0.963 < 0.975, so the 97.5% quantile is 1.
    # 90%: the 5% quantile is 0; 0.963 >= 0.95, so the 95% quantile is 2/3.
    values = [0.0, 0.0, 1.0]
    assert bootstrap_ci(values, 20000, 0.95, seed=0) == (0.0, 1.0)
    assert bootstrap_ci(values, 20000, 0.90, seed=0) == pytest.approx((0.0, 2 / 3))


def test_bootstrap_is_seeded_and_contains_the_mean():
    values = [0.1, 0.5, -0.2, 0.9, 0.3, 0.0, 0.7]
    a = mean_estimate(values, 500, 0.95, seed=7)
    assert a == mean_estimate(values, 500, 0.95, seed=7)
    assert a != mean_estimate(values, 500, 0.95, seed=8)
    assert a.value == pytest.approx(sum(values) / len(values))
    assert a.ci_low < a.value < a.ci_high
    assert mean_estimate(values, 0, 0.95, seed=7).ci_high is None


def test_ratio_estimate_is_the_ratio_of_sums_with_a_resampled_interval():
    kl, tokens = [2.0, 0.5, 3.0, 0.0, 1.5], [4, 1, 10, 2, 3]
    est = ratio_estimate(kl, tokens, 300, 0.9, seed=5)
    assert est.value == pytest.approx(7.0 / 20)  # not the mean of 0.5, 0.5, 0.3, 0, 0.5
    ratios = []
    for row in resample_indices(5, 300, 5):  # the same resamples, one at a time
        ratios.append(sum(kl[i] for i in row) / sum(tokens[i] for i in row))
    low, high = sorted(ratios)[int(0.05 * 299)], sorted(ratios)[int(0.95 * 299) + 1]
    assert low <= est.ci_low <= est.ci_high <= high
    assert est.ci_low == pytest.approx(float(np.quantile(ratios, 0.05)))
    assert est.ci_high == pytest.approx(float(np.quantile(ratios, 0.95)))


def test_bootstrap_estimate_leaves_out_undefined_resamples():
    # The mean of the positive items: undefined on a resample that has none.
    values = np.array([0.0, 0.0, 0.0, 3.0, 1.0])

    def positive_mean(picks):
        x = values[picks]
        with np.errstate(invalid="ignore", divide="ignore"):
            return (x * (x > 0)).sum(axis=1) / (x > 0).sum(axis=1)

    est = bootstrap_estimate(positive_mean, 5, 400, 0.9, seed=2)
    assert est.value == 2.0
    defined = []
    for row in resample_indices(5, 400, 2):
        positive = [values[i] for i in row if values[i] > 0]
        if positive:
            defined.append(sum(positive) / len(positive))
    assert 0 < 400 - len(defined) < 100  # some resamples had no positive item
    assert (est.ci_low, est.ci_high) == pytest.approx(tuple(np.quantile(defined, [0.05, 0.95])))
    assert bootstrap_estimate(lambda p: np.full(len(p), np.nan), 5, 50, 0.9, 0) is None
    assert bootstrap_estimate(positive_mean, 5, 0, 0.9, 0).ci_low is None


# ---------------------------------------------------------------------------------------
# Best-of-n
# ---------------------------------------------------------------------------------------


class CharacterSumJudge:
    """A deterministic judge with few ties: the sum of the completion's character codes,
    modulo 97."""

    name = "character_sum"

    def score(self, prompts, completions):
        assert len(prompts) == len(completions)
        return [float(sum(map(ord, c)) % 97) for c in completions]


def test_best_of_n_keeps_the_judges_favourite_of_n_samples(models):
    policy, _, tokenizer = models
    prompts = prompts_of(tokenizer)
    judge = CharacterSumJudge()
    ns = [1, 2, 4]
    results = best_of_n(
        policy, tokenizer, prompts, judge, ns, max_new_tokens=8, batch_size=3, seed=4
    )
    # Directly: 4 samples of each prompt (the same draws: one generator over the prompts
    # repeated 4 times), the judge's argmax among the first n of them.
    draws = sample(policy, tokenizer, [p for p in prompts for _ in range(4)], seed=4)
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in draws]
    assert [r.n for r in results] == ns
    for r in results:
        for i in range(len(prompts)):
            candidates = texts[4 * i : 4 * i + r.n]
            scores = [float(sum(map(ord, t)) % 97) for t in candidates]
            best = max(range(r.n), key=lambda k: (scores[k], -k))  # first of the highest
            assert r.chosen[i] == best
            assert r.completions[i] == candidates[best]
            assert r.scores[i] == max(scores)
    one, two, four = results
    assert one.chosen == [0] * len(prompts)  # best-of-1 is the first sample
    assert all(a <= b <= c for a, b, c in zip(one.scores, two.scores, four.scores, strict=True))
    assert sum(four.scores) > sum(one.scores)  # the selection does something here
    # The argmax judge really is the configured one: another judge keeps other samples.
    longest = best_of_n(
        policy, tokenizer, prompts, LengthJudge(), [4], max_new_tokens=8, batch_size=3, seed=4
    )[0]
    assert longest.completions == [
        max(texts[4 * i : 4 * i + 4], key=len) for i in range(len(prompts))
    ]


class LengthJudge:
    name = "length"

    def score(self, prompts, completions):
        return [float(len(c)) for c in completions]


def test_best_of_n_kl_bound_by_hand():
    assert best_of_n_kl_bound(1) == 0.0
    assert best_of_n_kl_bound(2) == pytest.approx(0.6931472 - 0.5)
    assert best_of_n_kl_bound(4) == pytest.approx(1.3862944 - 0.75)
    assert best_of_n_kl_bound(16) == pytest.approx(2.7725887 - 0.9375)
    with pytest.raises(ValueError):
        best_of_n_kl_bound(0)


def test_best_of_n_config_mistakes_name_their_keys():
    with pytest.raises(ConfigError) as info:
        load_config(
            EvalRunConfig,
            None,
            ["model.path=x", "eval.best_of_n=[0, 2, 2]", "generation.temperature=0"],
        )
    problems = info.value.problems
    assert any(p.startswith("eval.best_of_n: each n must be at least 1") for p in problems)
    assert any(p.startswith("judge.kind: eval.best_of_n keeps") for p in problems)
    assert any(p.startswith("generation.temperature: eval.best_of_n needs") for p in problems)
    with pytest.raises(ConfigError, match="eval.best_of_n_from: expected one of"):
        load_config(EvalRunConfig, None, ["model.path=x", "eval.best_of_n_from=sft"])


# ---------------------------------------------------------------------------------------
# Forgetting: multiple-choice tasks
# ---------------------------------------------------------------------------------------

TASKS = [
    {"question": "The capital of France is", "choices": [" Paris", " a fish"], "answer": 0},
    {"question": "Two plus two is", "choices": [" four", " five", " nine"], "answer": 2},
    {"question": "The sky is", "choices": [" blue", " green and very tall"], "answer": 1},
]


@pytest.mark.parametrize("scoring", ["sum", "mean"])
def test_multiple_choice_accuracy_matches_a_recomputation(models, tmp_path, scoring):
    policy, reference, tokenizer = models
    tasks = read_tasks(str(write_jsonl(tmp_path / "tasks.jsonl", TASKS)), tokenizer)
    for model in (policy, reference):
        expected = []
        for task in tasks:
            scores = []
            for choice in task.choice_ids:
                logp = logp_of(model, task.question_ids, choice)
                scores.append(logp / len(choice) if scoring == "mean" else logp)
            expected.append(1.0 if scores.index(max(scores)) == task.answer else 0.0)
        got = multiple_choice_correct(model, tasks, tokenizer.pad_token_id, scoring, 2)
        assert got == expected
    # The choices are the question's continuation, tokenized as the full text would be.
    assert (
        tasks[0].question_ids + tasks[0].choice_ids[0]
        == tokenizer(TASKS[0]["question"] + TASKS[0]["choices"][0])["input_ids"]
    )


def test_per_class_precision_recall_f1_by_hand():
    # true:      0 0 0 1 1 2      class 0: tp 2, fp 0, fn 1 -> P 1,   R 2/3, F1 4/5
    # predicted: 0 0 1 1 2 2      class 1: tp 1, fp 1, fn 1 -> P 1/2, R 1/2, F1 1/2
    #                             class 2: tp 1, fp 1, fn 0 -> P 1/2, R 1,   F1 2/3
    # class 3 never occurs and is never predicted: all undefined. Accuracy 4/6.
    gold, predicted = [0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 2, 2]
    m = classification_metrics(predicted, gold, 4, samples=0)
    values = lambda xs: [None if x is None else x.value for x in xs]  # noqa: E731
    assert values(m.precision) == pytest.approx([1.0, 0.5, 0.5, None])
    assert values(m.recall) == pytest.approx([2 / 3, 0.5, 1.0, None])
    assert values(m.f1) == pytest.approx([0.8, 0.5, 2 / 3, None])
    assert m.accuracy.value == pytest.approx(4 / 6)
    assert m.macro_f1.value == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # class 3 left out
    assert m.support == [3, 2, 1, 0] and m.predicted == [2, 2, 2, 0]
    # A class that occurs but is never predicted: no precision, recall and F1 of 0.
    never = classification_metrics([0, 0, 0], [0, 1, 1], 2, samples=0)
    assert never.precision[1] is None and never.recall[1].value == 0 and never.f1[1].value == 0
    assert never.precision[0].value == pytest.approx(1 / 3) and never.recall[0].value == 1

    # The intervals: each number recomputed on the same resamples, one at a time.
    m = classification_metrics(predicted, gold, 4, samples=300, confidence=0.8, seed=3)
    recalls, f1s = [], []
    for row in resample_indices(6, 300, 3):
        tp = sum(gold[i] == predicted[i] == 0 for i in row)
        fn = sum(gold[i] == 0 != predicted[i] for i in row)
        fp = sum(predicted[i] == 0 != gold[i] for i in row)
        if tp + fn:
            recalls.append(tp / (tp + fn))
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else None)
    low, high = np.quantile(recalls, [0.1, 0.9])
    assert (m.recall[0].ci_low, m.recall[0].ci_high) == pytest.approx((low, high))
    defined = [f for f in f1s if f is not None]
    assert (m.f1[0].ci_low, m.f1[0].ci_high) == pytest.approx(
        tuple(np.quantile(defined, [0.1, 0.9]))
    )
    assert m.precision[3] is None and m.support[3] == 0


def test_classification_tasks_are_rows_sharing_one_set_of_choices():
    def task(choices, answer=0):
        return ChoiceTask([1], [[2]] * len(choices), answer, "t", tuple(choices))

    tasks = [
        task([" good", " bad"]),
        task([" red", " blue", " green"]),
        task([" bad", " good"], 1),  # the same classes in another order
        task([" yes", " no"]),  # alone: an ordinary multiple-choice question
        task([" a", " a"]),  # repeated texts name no classes
        task([" a", " a"]),
        task([" good", " bad"], 1),
    ]
    assert classification_groups(tasks) == [([" good", " bad"], [0, 2, 6])]


SENTIMENT = [
    {
        "question": "The film was a joy. Sentiment:",
        "choices": [" positive", " negative"],
        "answer": 0,
    },
    {
        "question": "Dull and far too long. Sentiment:",
        "choices": [" positive", " negative"],
        "answer": 1,
    },
    {
        "question": "I loved the music. Sentiment:",
        "choices": [" negative", " positive"],
        "answer": 1,
    },
    {
        "question": "A waste of an evening. Sentiment:",
        "choices": [" positive", " negative"],
        "answer": 1,
    },
    {"question": "Great acting. Sentiment:", "choices": [" positive", " negative"], "answer": 0},
]


def test_task_check_reports_classes_before_and_after(models, tmp_path):
    policy, reference, tokenizer = models
    tasks = read_tasks(str(write_jsonl(tmp_path / "t.jsonl", TASKS + SENTIMENT)), tokenizer)
    check = task_check(policy, reference, tasks, tokenizer.pad_token_id, batch_size=4, samples=50)
    assert check["tasks"] == 8
    (block,) = check["classification"]
    assert block["classes"] == [" positive", " negative"] and block["tasks"] == 5
    gold = ["positive", "negative", "positive", "negative", "positive"]
    for side, model in (("policy", policy), ("reference", reference)):
        answers = multiple_choice_answers(model, tasks, tokenizer.pad_token_id)
        said = [SENTIMENT[i]["choices"][answers[3 + i]].strip() for i in range(5)]
        assert check[f"{side}_accuracy"] == pytest.approx(
            (sum(a == t.answer for a, t in zip(answers, tasks, strict=True))) / 8
        )
        for c, name in enumerate(["positive", "negative"]):
            entry = block[side]["per_class"][c]
            tp = sum(s == g == name for s, g in zip(said, gold, strict=True))
            assert entry["class"] == " " + name
            assert entry["support"] == gold.count(name) and entry["predicted"] == said.count(name)
            if said.count(name):
                assert entry["precision"]["value"] == pytest.approx(tp / said.count(name))
            assert entry["recall"]["value"] == pytest.approx(tp / gold.count(name))
        assert block[side]["accuracy"]["value"] == pytest.approx(
            sum(s == g for s, g in zip(said, gold, strict=True)) / 5
        )


def test_a_bad_task_row_names_its_file_and_line(models, tmp_path):
    rows = [TASKS[0], {"question": "Q", "choices": [" a", " b"], "answer": 2}]
    path = write_jsonl(tmp_path / "tasks.jsonl", rows)
    with pytest.raises(DataError, match=r"tasks\.jsonl:2: eval\.tasks: 'answer' must be"):
        read_tasks(str(path), models[2])


# ---------------------------------------------------------------------------------------
# Resolving what to evaluate
# ---------------------------------------------------------------------------------------


def test_a_model_directory_needs_every_missing_setting_at_once(tmp_path, models):
    policy, _, tokenizer = models
    policy.save_pretrained(tmp_path / "m", safe_serialization=True)
    tokenizer.save_pretrained(tmp_path / "m")
    cfg = load_config(EvalRunConfig, None, [f"model.path={tmp_path / 'm'}"])
    with pytest.raises(ConfigError) as info:
        resolve(cfg)
    keys = [p.split(":")[0] for p in info.value.problems]
    assert keys == ["reference.path", "eval.beta", "data.pairs", "output.dir"]


def test_a_lora_run_is_its_adapter_on_its_base_against_that_base(tmp_path):
    from privdpo.checkpoint import export_model
    from privdpo.config import DPORunConfig, dump_yaml
    from privdpo.models import add_lora
    from privdpo.recipes.eval import load_source

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.manual_seed(0)
    base, tokenizer = build_preset("tiny")
    model = add_lora(base, DPORunConfig().model.lora)
    with torch.no_grad():  # adapters that change the output (B is zero at init)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    export_model(model, tokenizer, run_dir, merge_lora=False)
    run_cfg = load_config(
        DPORunConfig,
        None,
        ["model.preset=tiny", "model.lora.enabled=true", "data.train=x.jsonl", "output.dir=r"],
    )
    (run_dir / "config.yaml").write_text(dump_yaml(run_cfg))

    cfg = load_config(EvalRunConfig, None, [f"model.path={run_dir}"])
    plan = resolve(cfg)
    assert plan.policy.kind == "adapter" and plan.policy.path == run_dir / "adapter"
    assert plan.reference.path == run_dir / "base_model"
    assert plan.beta == 0.1 and plan.pair_files == [] and plan.output_dir == run_dir
    merged, _ = load_source(plan.policy, cfg.model, "model.path")
    ref, _ = load_source(plan.reference, cfg.model, "reference.path")
    ids = torch.tensor([tokenizer("The movie was good")["input_ids"]])
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        with model.disable_adapter():
            want_ref = model(input_ids=ids).logits
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-4)
        assert torch.allclose(ref(input_ids=ids).logits, want_ref, atol=1e-6)
        assert not torch.allclose(want, want_ref, atol=1e-3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_a_checkpoint_is_the_runs_start_with_that_steps_weights(tmp_path, lora):
    """model.path=RUN/checkpoints/step-N: the last step's checkpoint gives the exported
    model, an earlier one another model; the reference is the run's."""
    from privdpo.recipes.eval import load_source

    run_dir = tmp_path / "run"
    overrides = [
        f"output.dir={run_dir}",
        "output.progress_bar=false",
        "train.max_steps=2",
        "train.save_every=1",
        "train.eval_every=null",
        "train.early_stopping_patience=null",
        f"dpo.reference_cache_dir={tmp_path / 'cache'}",
    ]
    if lora:
        overrides += ["model.lora.enabled=true", "dpo.reference=adapter_disabled"]
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["dpo", "examples/dpo_tiny.yaml", *overrides]) == 0
    finally:
        os.chdir(cwd)
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    assert len(steps) == 2
    final = resolve(load_config(EvalRunConfig, None, [f"model.path={run_dir}"]))
    models = {}
    for step in steps:
        plan = resolve(load_config(EvalRunConfig, None, [f"model.path={step}"]))
        assert plan.policy.kind == "checkpoint" and plan.output_dir == step
        assert plan.reference == final.reference and plan.beta == final.beta
        models[step.name], tokenizer = load_source(plan.policy, EvalRunConfig().model, "model.path")
    exported, _ = load_source(final.policy, EvalRunConfig().model, "model.path")
    ids = torch.tensor([tokenizer("The movie was good")["input_ids"]])
    with torch.no_grad():
        want = exported(input_ids=ids).logits
        last = models[steps[-1].name](input_ids=ids).logits
        first = models[steps[0].name](input_ids=ids).logits
    torch.testing.assert_close(last, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(first, want, atol=1e-6)


# ---------------------------------------------------------------------------------------
# The command, on a real tiny DPO run
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory) -> Path:
    """`privdpo dpo examples/dpo_tiny.yaml`, cut to 3 steps, exporting its last step."""
    run_dir = tmp_path_factory.mktemp("dpo") / "run"
    cwd = os.getcwd()
    os.chdir(REPO)  # the example's data path is relative to the repository root
    try:
        code = main(
            [
                "dpo",
                "examples/dpo_tiny.yaml",
                f"output.dir={run_dir}",
                "output.progress_bar=false",
                "train.max_steps=3",
                "train.early_stopping_patience=null",
            ]
        )
    finally:
        os.chdir(cwd)
    assert code == 0
    return run_dir


def run_eval_cli(capsys, *args) -> tuple[int, str, str]:
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        code = main(["eval", "examples/eval_tiny.yaml", *map(str, args)])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    return code, out, err


SMALL = [
    "generation.num_prompts=4",
    "generation.max_new_tokens=8",
    "generation.keep_samples=3",
    "eval.bootstrap_samples=200",
]


def test_eval_command_on_a_dpo_run_writes_eval_json(dpo_run, tmp_path, capsys):
    tasks = write_jsonl(tmp_path / "tasks.jsonl", TASKS + SENTIMENT)
    code, out, err = run_eval_cli(
        capsys,
        f"model.path={dpo_run}",
        *SMALL,
        "generation.temperature=0.7",
        "eval.temperatures=[0.7, 1.5]",
        f"eval.tasks={tasks}",
        "eval.best_of_n=[1, 3]",
        "eval.best_of_n_from=both",
        "generation.keep_samples=4",
    )
    assert code == 0, err
    result = json.loads((dpo_run / "eval.json").read_text())

    assert set(result) == {
        "model",
        "reference",
        "metrics",
        "temperature_sweep",
        "best_of_n",
        "samples",
        "forgetting",
    }
    assert result["model"] == str(dpo_run / "model")
    assert result["reference"].startswith("preset tiny (seed 0")
    names = {
        "preference_accuracy",
        "mean_margin",
        "num_pairs",
        "num_prompts",
        "kl_to_reference",
        "kl_exact",
        "kl_exact_per_token",
        "win_rate",
        "tie_rate",
        "policy_reward",
        "reference_reward",
    }
    assert set(result["metrics"]) == names
    for name, m in result["metrics"].items():
        assert set(m) == {"value", "ci_low", "ci_high"}
        if not name.startswith("num_"):
            assert m["ci_low"] <= m["value"] <= m["ci_high"], name
    assert result["metrics"]["num_prompts"]["value"] == 4

    # The held-out split and the reference are the run's own: the margins and accuracy
    # equal what the run logged at its last evaluation.
    records = [json.loads(line) for line in (dpo_run / "metrics.jsonl").read_text().splitlines()]
    last_eval = [r for r in records if "eval/rewards/margins" in r][-1]
    assert last_eval["step"] == 3
    m = result["metrics"]
    assert m["mean_margin"]["value"] == pytest.approx(last_eval["eval/rewards/margins"], abs=1e-5)
    assert m["preference_accuracy"]["value"] == pytest.approx(last_eval["eval/rewards/accuracies"])
    assert m["num_pairs"]["value"] == 24  # 10% of the 240 sample pairs

    assert [row["temperature"] for row in result["temperature_sweep"]] == [0.7, 1.5]
    for row in result["temperature_sweep"]:
        assert set(row) == {"temperature", "win_rate", "reward", "reference_reward"}
    at_07 = result["temperature_sweep"][0]
    assert at_07["win_rate"] == m["win_rate"]["value"]
    assert at_07["reward"] == m["policy_reward"]["value"]

    # Best-of-n, from both models: win rates over the reference's samples (scored in the
    # samples), rewards the kept samples' scores, the bound by n.
    assert [(b["model"], b["n"]) for b in result["best_of_n"]] == [
        ("reference", 1),
        ("reference", 3),
        ("policy", 1),
        ("policy", 3),
    ]
    reference_scores = [s["reference_score"] for s in result["samples"]]
    for b in result["best_of_n"]:
        assert len(b["scores"]) == 4
        assert b["reward"]["value"] == pytest.approx(sum(b["scores"]) / 4)
        assert b["reward"]["ci_low"] <= b["reward"]["value"] <= b["reward"]["ci_high"]
        outcomes = [
            1.0 if a > r else 0.5 if a == r else 0.0
            for a, r in zip(b["scores"], reference_scores, strict=True)
        ]
        assert b["win_rate"]["value"] == pytest.approx(sum(outcomes) / 4)
        assert b["kl_bound"] == pytest.approx(best_of_n_kl_bound(b["n"]))
    for first, second in (result["best_of_n"][:2], result["best_of_n"][2:]):
        assert all(a <= b for a, b in zip(first["scores"], second["scores"], strict=True))
    assert "best-of-n" in out and "reference n=3" in out

    assert len(result["samples"]) == 4
    for s in result["samples"]:
        assert set(s) == {"prompt", "policy", "reference", "policy_score", "reference_score"}
        assert s["prompt"].startswith("Write a short")
        assert isinstance(s["policy_score"], float)
    forgetting = result["forgetting"]
    assert forgetting["tasks"] == 8
    assert 0 <= forgetting["policy_accuracy"] <= 1
    (block,) = forgetting["classification"]
    assert block["classes"] == [" positive", " negative"] and block["tasks"] == 5
    for side in ("policy", "reference"):
        per_class = block[side]["per_class"]
        assert [c["support"] for c in per_class] == [3, 2]
        assert sum(c["predicted"] for c in per_class) == 5
        for c in per_class:
            for key in ("precision", "recall", "f1"):
                if c[key] is not None:
                    assert c[key]["ci_low"] <= c[key]["value"] <= c[key]["ci_high"], key
    assert "classification over ' positive', ' negative' (5 tasks)" in out

    assert "preference_accuracy" in out and "95% CI" in out and "kl_to_reference" in out
    assert "kl_exact_per_token" in out
    assert m["kl_exact"]["value"] > 0 and m["kl_exact_per_token"]["value"] > 0
    assert f"wrote {dpo_run / 'eval.json'}" in out

    # Same seeds, same everything.
    code, _, err = run_eval_cli(
        capsys,
        f"model.path={dpo_run}",
        *SMALL,
        "generation.temperature=0.7",
        "eval.temperatures=[0.7, 1.5]",
        f"eval.tasks={tasks}",
        "eval.best_of_n=[1, 3]",
        "eval.best_of_n_from=both",
        "generation.keep_samples=4",
        f"output.dir={tmp_path / 'again'}",
    )
    assert code == 0, err
    assert json.loads((tmp_path / "again" / "eval.json").read_text()) == result


def test_eval_with_a_judge_that_ties_everything(dpo_run, tmp_path, capsys):
    code, out, err = run_eval_cli(
        capsys,
        f"model.path={dpo_run}",
        *SMALL,
        "judge.kind=callable",
        "judge.callable=judges_for_tests:constant",
        "eval.temperatures=[]",
        f"output.dir={tmp_path}",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    m = result["metrics"]
    assert m["win_rate"]["value"] == 0.5 and m["tie_rate"]["value"] == 1.0
    assert m["policy_reward"]["value"] == m["reference_reward"]["value"] == 1.0
    assert result["temperature_sweep"] == [] and "forgetting" not in result


def test_eval_of_a_model_against_itself(dpo_run, tmp_path, capsys):
    model_dir = dpo_run / "model"
    rows = [json.loads(line) for line in SAMPLE_PAIRS.read_text().splitlines()[:12]]
    held_out = write_jsonl(tmp_path / "held_out.jsonl", rows)
    code, _, err = run_eval_cli(
        capsys,
        f"model.path={model_dir}",
        f"reference.path={model_dir}",
        f"data.pairs={held_out}",
        "data.max_length=128",
        "eval.beta=0.1",
        *SMALL,
        "judge.kind=none",
        "eval.temperatures=[]",
        f"output.dir={tmp_path}",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "eval.json").read_text())
    m = result["metrics"]
    for name in ("kl_to_reference", "kl_exact", "kl_exact_per_token"):
        assert m[name] == {"value": 0.0, "ci_low": 0.0, "ci_high": 0.0}, name
    assert m["mean_margin"]["value"] == 0.0 and m["preference_accuracy"]["value"] == 0.0
    assert m["num_pairs"]["value"] == 12
    assert "win_rate" not in m
    assert all(
        s["policy"] == s["reference"] and s["policy_score"] is None for s in result["samples"]
    )


# ---------------------------------------------------------------------------------------
# Mistakes: exit 2, one clear message
# ---------------------------------------------------------------------------------------


def test_bad_keys_exit_2_with_the_closest_key(capsys, tmp_path):
    code, out, err = run_eval_cli(
        capsys,
        "eval.temperature=[0.5]",
        "generation.max_new_token=8",
        "judge.kind=gpt4",
    )
    assert code == 2, out
    assert err.startswith("privdpo eval: error: config has 3 problem(s)")
    assert "eval.temperature: unknown key; did you mean 'eval.temperatures'?" in err
    assert "generation.max_new_token: unknown key; did you mean 'generation.max_new_tokens'?" in err
    assert "judge.kind: expected one of 'none', 'lexicon', 'reward_model', 'callable'" in err
    assert "Traceback" not in err


def test_bad_paths_exit_2_naming_the_key(capsys, dpo_run, tmp_path):
    code, _, err = run_eval_cli(capsys, "model.path=Qwen/Qwen2.5-0.5B")
    assert code == 2 and "model.path: 'Qwen/Qwen2.5-0.5B' is not a local directory" in err
    code, _, err = run_eval_cli(capsys, f"model.path={dpo_run}", f"reference.path={tmp_path}")
    assert code == 2 and f"reference.path: {tmp_path} is not a local model directory" in err
    code, _, err = run_eval_cli(
        capsys,
        f"model.path={dpo_run}",
        "judge.kind=callable",
        "judge.callable=nowhere_at_all:judge",
    )
    assert code == 2 and "judge.callable: cannot import module 'nowhere_at_all'" in err
    code, _, err = run_eval_cli(
        capsys, f"model.path={dpo_run}", f"data.pairs={tmp_path / 'missing.jsonl'}"
    )
    assert code == 2 and "missing.jsonl: no such file" in err
    assert "Traceback" not in err


def test_eval_help_lists_every_key(capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for key in (
        "model.path",
        "reference.path",
        "data.pairs",
        "generation.top_p",
        "judge.kind",
        "eval.temperatures",
        "eval.bootstrap_samples",
        "eval.tasks",
        "eval.best_of_n",
        "eval.best_of_n_from",
        "output.dir",
    ):
        assert f"  {key} = " in out, key


def test_the_example_config_points_at_the_dpo_example_run():
    example = yaml.safe_load((REPO / "examples" / "eval_tiny.yaml").read_text())
    dpo = yaml.safe_load((REPO / "examples" / "dpo_tiny.yaml").read_text())
    assert example["model"]["path"] == dpo["output"]["dir"]
    assert example["judge"]["kind"] == "lexicon"
    load_config(EvalRunConfig, REPO / "examples" / "eval_tiny.yaml", [])
