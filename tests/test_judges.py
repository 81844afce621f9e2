"""Judges: the lexicon ranks sentiment, a local reward model scores the last token's
logit in any batch, a callable is imported by path, and bad judges fail naming the key."""

from __future__ import annotations

import pytest
import torch

from privdpo.config import JudgeConfig
from privdpo.errors import UserError
from privdpo.judges import (
    CallableJudge,
    Judge,
    LexiconJudge,
    RewardModelJudge,
    load_judge,
    pairwise_outcomes,
)


def test_lexicon_ranks_positive_above_negative():
    judge = load_judge(JudgeConfig(kind="lexicon"))
    assert isinstance(judge, LexiconJudge) and isinstance(judge, Judge)
    good, bad, flat = judge.score(
        ["p", "p", "p"], ["great wonderful movie", "terrible awful movie", "a movie"]
    )
    assert good > flat > bad
    assert good > 0 > bad and flat == 0.0


def test_no_judge_is_none():
    assert load_judge(JudgeConfig()) is None


def test_pairwise_outcomes_win_tie_loss():
    assert pairwise_outcomes([2.0, 1.0, 0.0], [1.0, 1.0, 1.0]) == [1.0, 0.5, 0.0]
    with pytest.raises(ValueError):
        pairwise_outcomes([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------
# callable
# ---------------------------------------------------------------------------------------


def test_callable_judge_by_import_path():
    judge = load_judge(JudgeConfig(kind="callable", callable="judges_for_tests:prefer_long"))
    assert isinstance(judge, CallableJudge)
    assert judge.score(["a", "b"], ["xx", "xxxxx"]) == [2.0, 5.0]


@pytest.mark.parametrize(
    "path, needle",
    [
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
        ("judges_for_tests:missing", "has no attribute 'missing'"),
        ("judges_for_tests:not_a_function", "is not callable"),
        ("judges_for_tests", "write 'package.module:function'"),
    ],
)
def test_bad_callable_path_names_the_key(path, needle):
    with pytest.raises(UserError) as info:
        CallableJudge(path)
    assert str(info.value).startswith("judge.callable: ")
    assert needle in str(info.value)


def test_callable_returning_the_wrong_number_of_scores_is_refused():
    judge = CallableJudge("judges_for_tests:wrong_length")
    with pytest.raises(UserError, match="returned 1 scores for 2 completions"):
        judge.score(["a", "b"], ["c", "d"])


# ---------------------------------------------------------------------------------------
# reward model
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny random Qwen2 sequence classifier saved as a user would have it."""
    from transformers import AutoModelForSequenceClassification, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_labels=1,
        pad_token_id=tiny_tokenizer.pad_token_id,
        eos_token_id=tiny_tokenizer.eos_token_id,
    )
    model = AutoModelForSequenceClassification.from_config(config)
    directory = tmp_path_factory.mktemp("reward-model")
    model.save_pretrained(directory, safe_serialization=True)
    tiny_tokenizer.save_pretrained(directory)
    return directory


def test_reward_model_scores_the_last_tokens_logit_in_any_batch(reward_model_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    prompts = ["Write a review.\n", "Say hi.\n", "Write a long review of a film.\n"]
    completions = ["Great film.", "hi", "The film was long and the music was very good."]
    judge = load_judge(JudgeConfig(kind="reward_model", path=str(reward_model_dir), batch_size=2))
    assert isinstance(judge, RewardModelJudge)
    scores = judge.score(prompts, completions)

    # Independently: each text alone (no padding), rendered with the chat template, the
    # label-0 logit at its last position computed from the backbone and the score head.
    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_model_dir)
    for prompt, completion, score in zip(prompts, completions, scores, strict=True):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            tokenize=False,
        )
        ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state
            expected = model.score(hidden)[0, -1, 0].item()
        assert score == pytest.approx(expected, abs=1e-5)
    one_by_one = RewardModelJudge(str(reward_model_dir), batch_size=1)
    assert one_by_one.score(prompts, completions) == pytest.approx(scores, abs=1e-5)


def test_reward_model_path_errors_name_the_key(tmp_path):
    with pytest.raises(UserError, match=r"^judge\.path: .*no config\.json"):
        load_judge(JudgeConfig(kind="reward_model", path=str(tmp_path / "nope")))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"^judge\.path: .*no \.safetensors"):
        load_judge(JudgeConfig(kind="reward_model", path=str(tmp_path)))
