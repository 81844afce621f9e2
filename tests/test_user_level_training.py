"""User-level DP in training: ULS's averaged-then-clipped user gradients against a naive
per-user loop, ELS and ULS end to end through the real CLI with the statement checked
against dp-accounting, the contribution bound, and the errors a user can make."""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from privdpo.cli import main
from privdpo.config import PrivacyConfig
from privdpo.data.batching import pair_batch
from privdpo.data.preference import PairExample
from privdpo.models import build_preset
from privdpo.privacy import accounting, els_accounting
from privdpo.privacy.accounting import epsilon
from privdpo.privacy.contributions import units_per_user
from privdpo.privacy.dpsgd import DPSGD
from privdpo.privacy.els_accounting import els_epsilon, els_group_epsilon
from privdpo.privacy.planning import (
    PrivacyPlan,
    UserBound,
    default_bound_els,
    default_candidates,
    format_plan,
    plan_user_level,
)
from test_clipping import dpo_unit_losses, pairs
from test_dp_recipe import run
from test_dpo import marker_pairs


def skewed_pairs(n: int) -> list[dict]:
    """Marker pairs whose users hold 1 to 12 pairs: user i holds i % 12 + 1 of them."""
    rows, user = [], 0
    remaining = 1
    for row in marker_pairs(n):
        row["user_id"] = f"user-{user}"
        rows.append(row)
        remaining -= 1
        if remaining == 0:
            user += 1
            remaining = user % 12 + 1
    return rows


# ---- ULS: one clipped average per user -------------------------------------------------


def pairs_of(tokenizer, users: list[int]) -> list[PairExample]:
    """test_clipping's pairs, pair i owned by user `users[i]`."""
    return [
        dataclasses.replace(p, user_id=f"u{u}")
        for p, u in zip(pairs(tokenizer, len(users)), users, strict=True)
    ]


@pytest.mark.parametrize("micro", [3, 100], ids=["micro-3", "one-micro-batch"])
def test_uls_clipped_user_averages_equal_the_naive_loop(micro):
    torch.manual_seed(0)
    model, tokenizer = build_preset("tiny")
    model.train()
    reference = copy.deepcopy(model).eval()
    # Users 0..3 hold 3, 1, 4 and 2 pairs, interleaved in the data.
    owners = [0, 1, 0, 2, 2, 3, 0, 2, 3, 2]
    user_pairs = pairs_of(tokenizer, owners)
    groups = [[i for i, o in enumerate(owners) if o == u] for u in range(4)]
    params = [p for p in model.parameters() if p.requires_grad]

    # The naive loop: each user's gradient is the gradient of its mean pair loss.
    user_grads = []
    for group in groups:
        model.zero_grad(set_to_none=True)
        dpo_unit_losses(model, reference, [user_pairs[i] for i in group]).mean().backward()
        user_grads.append([p.grad.detach().clone() for p in params])
    model.zero_grad(set_to_none=True)
    norms = [torch.sqrt(sum(g.pow(2).sum() for g in grads)).item() for grads in user_grads]
    max_norm = sorted(norms)[1] * 1.01  # two users clipped, two not
    expected = [torch.zeros_like(p) for p in params]
    for grads, norm in zip(user_grads, norms, strict=True):
        for e, g in zip(expected, grads, strict=True):
            e += min(1.0, max_norm / (norm + 1e-6)) * g

    bound = UserBound("uls", 4, "test", users=4, units_kept=10, units_dropped=0)
    plan = PrivacyPlan("user", 4, 1.0, 1, 0.0, max_norm, 1e-5, "pld", 0.0, None, bound)
    dp = DPSGD(model, plan, PrivacyConfig(enabled=True), seed=0, groups=groups)
    seen_users = 0
    for items, item_unit, weight in dp.micro_batches([0, 1, 2, 3], micro):
        chunk = [user_pairs[i] for i in items]
        seen_users += int(item_unit.max()) + 1
        batch = pair_batch(chunk, 1, item_unit=item_unit.tolist())
        with dp.micro_batch(batch):
            (
                dpo_unit_losses(model, reference, chunk, batch, dp.head_sink) * weight
            ).sum().backward()
    got = dp.clipper.take_clipped_sum()
    assert seen_users == 4
    for p, e in zip(params, expected, strict=True):
        assert (got[id(p)] - e).norm() <= 1e-5 * e.norm() + 1e-9


def test_micro_batches_never_split_a_user():
    plan = PrivacyPlan("user", 3, 1.0, 1, 1.0, 1.0, 1e-5, "pld", 1.0, None)
    dp = DPSGD.__new__(DPSGD)  # only the packing is under test
    dp.plan, dp.groups = plan, [[0, 1, 2], [3], [4, 5, 6, 7, 8]]
    batches = list(dp.micro_batches([0, 1, 2], 4))
    assert [items for items, _, _ in batches] == [[0, 1, 2, 3], [4, 5, 6, 7, 8]]
    assert batches[0][1].tolist() == [0, 0, 0, 1]
    assert batches[0][2].tolist() == pytest.approx([1 / 3] * 3 + [1.0])
    assert batches[1][1].tolist() == [0] * 5  # larger than the size: a batch of its own
    # A token budget closes a micro-batch early, but never splits a user either.
    by_tokens = list(dp.micro_batches([0, 1, 2], 100, max_tokens=30, tokens_of=lambda i: 10))
    assert [items for items, _, _ in by_tokens] == [[0, 1, 2], [3], [4, 5, 6, 7, 8]]


# ---- end to end ------------------------------------------------------------------------


def user_level_run(tmp_path: Path, algorithm: str, *extra: str) -> dict:
    data = write_jsonl(tmp_path / "d.jsonl", skewed_pairs(120))
    args = [
        "data.eval_fraction=0",
        "train.batch_size=16",
        "train.micro_batch_size=8",
        "train.max_steps=4",
        "model.lora.enabled=true",
        "privacy.enabled=true",
        "privacy.unit=user",
        f"privacy.user_algorithm={algorithm}",
        "privacy.target_epsilon=8",
        *extra,
    ]
    assert run(tmp_path, "dpo", algorithm, data, *args) == 0
    statement = json.loads((tmp_path / algorithm / "privacy.json").read_text())
    exported = json.loads((tmp_path / algorithm / "adapter" / "privacy.json").read_text())
    assert statement == exported
    return statement


def test_uls_end_to_end_states_user_level_privacy(tmp_path):
    rows = skewed_pairs(120)
    counts = Counter(r["user_id"] for r in rows)
    s = user_level_run(tmp_path, "uls", "privacy.contribution_bound=3")
    kept = sum(min(n, 3) for n in counts.values())
    assert s["unit"] == "user" and s["level"] == "user-level"
    assert s["user_algorithm"] == "ULS" and s["contribution_bound"] == 3
    assert s["users"] == len(counts) and s["units_kept"] == kept
    assert s["units_dropped"] == 120 - kept
    assert s["steps"] == 4
    # Users are sampled at q = batch_size / pairs kept (batch_size pairs expected per step).
    assert s["sampling_rate"] == pytest.approx(16 / kept)
    # Standard DP-SGD accounting with the user as the unit.
    assert s["epsilon"] == pytest.approx(
        epsilon(s["sampling_rate"], s["noise_multiplier"], 4, s["delta"]), rel=1e-9
    )
    assert 0.99 * 8 <= s["epsilon"] <= 8
    assert s["delta"] < 1 / len(counts)
    assert "ULS with k = 3" in s["summary"]


def test_els_end_to_end_uses_the_median_bound_and_mog_accounting(tmp_path):
    rows = skewed_pairs(120)
    counts = Counter(r["user_id"] for r in rows)
    s = user_level_run(tmp_path, "els")
    k = s["contribution_bound"]
    # The default bound is the median number of pairs per user (an upper median when even).
    ordered = sorted(counts.values())
    assert k == ordered[len(ordered) // 2] or k == statistics.median(ordered)
    kept = sum(min(n, k) for n in counts.values())
    assert s["user_algorithm"] == "ELS" and s["units_kept"] == kept
    assert s["sampling_rate"] == pytest.approx(16 / kept)
    assert s["epsilon"] == pytest.approx(
        els_epsilon(s["sampling_rate"], s["noise_multiplier"], k, 4, s["delta"]), rel=1e-9
    )
    assert 0.99 * 8 <= s["epsilon"] <= 8
    group = els_group_epsilon(s["sampling_rate"], s["noise_multiplier"], k, 4, s["delta"])
    assert s["group_privacy_epsilon"] == pytest.approx(group) and group > s["epsilon"]


def test_missing_user_ids_name_the_rows(tmp_path, capsys):
    rows = skewed_pairs(30)
    del rows[4]["user_id"], rows[9]["user_id"]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    args = ["privacy.enabled=true", "privacy.unit=user", "privacy.target_epsilon=8"]
    assert run(tmp_path, "dpo", "run", data, "data.eval_fraction=0", *args) == 2
    err = capsys.readouterr().err
    assert "2 rows have none in column 'user_id'" in err
    assert "d.jsonl:5" in err and "d.jsonl:10" in err
    assert not (tmp_path / "run").exists()


def test_user_level_privacy_plan_shows_bounds_for_both_algorithms(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", skewed_pairs(120))
    config = tmp_path / "dp.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {data}, eval_fraction: 0}}\n"
        "train: {batch_size: 16, epochs: 2}\n"
        "dpo: {loss: sigmoid}\n"
        "privacy: {enabled: true, unit: user, target_epsilon: 8}\n"
        f"output: {{dir: {tmp_path / 'never'}}}\n"
    )
    assert main(["privacy", "plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "user-level DP-SGD, ULS" in out
    assert "contribution bounds k" in out
    table = out.split("contribution bounds k")[1]
    assert "ELS" in table and "ULS" in table
    assert not (tmp_path / "never").exists()


def test_privacy_plan_on_100k_rows_of_5k_users_answers_within_a_minute(
    tmp_path, capsys, monkeypatch
):
    """The acceptance bound of the planner: 100,000 pairs of 5,000 users (Zipf-skewed),
    the whole command (reading and tokenizing the data included) under 60 s here, cold
    (no accounting result in memory or in the disk cache). Then its table's rows: at most
    12 candidate bounds k for each algorithm, one default each, the ELS default the
    median rule's, its epsilon within 1% under the target."""
    import random
    import re
    import time

    rng = random.Random(0)
    users = rng.choices(range(5000), weights=[1 / (i + 1) for i in range(5000)], k=100_000)
    users[:5000] = range(5000)  # every user has at least one pair
    data = tmp_path / "big.jsonl"
    with data.open("w") as f:
        for i, u in enumerate(users):
            row = {
                "prompt": f"Review {i}:",
                "chosen": " great fun.",
                "rejected": " bad.",
                "user_id": f"u{u}",
            }
            f.write(json.dumps(row) + "\n")
    config = tmp_path / "plan.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {data}, eval_fraction: 0}}\n"
        "train: {batch_size: 64, max_steps: 1000}\n"
        "dpo: {loss: sigmoid}\n"
        "privacy: {enabled: true, unit: user, target_epsilon: 8}\n"
        f"output: {{dir: {tmp_path / 'never'}}}\n"
    )
    monkeypatch.setenv(els_accounting.CACHE_DIR_ENV, str(tmp_path / "empty-cache"))
    for cached in (
        accounting._calibrate_noise,
        accounting._composed_epsilon,
        els_accounting._calibrate_els_noise,
        els_accounting._els_composed_epsilon,
        els_accounting._els_step_pld,
    ):
        cached.cache_clear()
    started = time.perf_counter()
    assert main(["privacy", "plan", str(config)]) == 0
    seconds = time.perf_counter() - started
    out = capsys.readouterr().out
    assert "5000 users, 100000 pairs" in out
    assert out.count("*") >= 2  # both defaults marked
    assert seconds < 60, f"privacy plan took {seconds:.1f} s"

    # The planner's rows for these counts (its results in memory now) are the table printed.
    delta = float(re.search(r"\(delta ([0-9.e-]+)\), 5000 users", out).group(1))
    counts = list(units_per_user([f"u{u}" for u in users]).values())
    rows = plan_user_level(counts, 64, 1000, 8.0, delta)
    assert format_plan(rows) in out
    candidates = default_candidates(counts)
    assert len(candidates) <= 12
    assert [r.k for r in rows] == candidates * 2
    assert sum(r.is_default for r in rows) == 2
    els_default = next(r for r in rows if r.algorithm == "els" and r.is_default)
    assert els_default.k == default_bound_els(counts)
    els = els_epsilon(
        els_default.sampling_rate, els_default.noise_multiplier, els_default.k, 1000, delta
    )
    assert 0.99 * 8 <= els <= 8
