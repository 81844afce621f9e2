"""The DPO recipe end to end through the real CLI on the tiny preset: it learns a clear
preference, precomputed reference log-probs equal a live reference and are cached, early
stopping stops on a plateau and exports the best checkpoint, resume is exact, and every
loss in the registry trains."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import TIMING, crash_after_step, without_timing, write_jsonl
from privdpo.cli import main
from privdpo.losses import PREFERENCE_LOSSES, REFERENCE_FREE
from privdpo.metrics import read_metrics
from privdpo.models import build_preset

WORDS = ["good", "bad", "great", "awful", "fine", "nice", "poor", "lovely", "dull", "bright"]


def marker_pairs(n: int, seed: int = 0) -> list[dict]:
    """Chosen and rejected are the same random words except one: the chosen response has
    the marker word 'yes' where the rejected one has another word. A tiny model learns it
    in a few dozen steps, and before training the preference is at chance."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = rng.choices(WORDS, k=4)
        at = rng.randrange(4)
        chosen, rejected = list(words), list(words)
        chosen[at] = "yes"
        rows.append(
            {
                "prompt": f"Review {i}: the movie was",
                "chosen": " " + " ".join(chosen) + ".",
                "rejected": " " + " ".join(rejected) + ".",
                "user_id": f"u{i % 7}",
            }
        )
    return rows


@pytest.fixture(scope="module")
def other_reference(tmp_path_factory) -> Path:
    """A reference that differs from the initial policy, so rewards start near chance."""
    directory = tmp_path_factory.mktemp("reference")
    torch.manual_seed(123)
    model, tokenizer = build_preset("tiny")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def dpo(tmp_path: Path, name: str, *overrides: str, data: Path | None = None) -> int:
    if data is None:
        data = tmp_path / "pairs.jsonl"
        if not data.exists():
            write_jsonl(data, marker_pairs(64))
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    base = [
        "model.preset=tiny",
        f"data.train={data}",
        "data.eval_fraction=0.25",
        f"output.dir={tmp_path / name}",
        "output.progress_bar=false",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.lr=2e-3",
        f"dpo.reference_cache_dir={tmp_path / 'cache'}",
    ]
    return main(["dpo", str(config), *base, *overrides])


def evals_of(run: Path, key: str = "eval/rewards/accuracies") -> list[tuple[int, float]]:
    return [(r["step"], r[key]) for r in read_metrics(run) if key in r]


def test_a_clear_preference_is_learned(tmp_path, other_reference):
    assert (
        dpo(
            tmp_path,
            "run",
            "train.max_steps=30",
            "train.eval_every=10",
            "dpo.reference=path",
            f"dpo.reference_path={other_reference}",
        )
        == 0
    )
    accuracies = evals_of(tmp_path / "run")
    assert accuracies[0][0] == 0 and 0.2 <= accuracies[0][1] <= 0.8  # chance, before training
    assert accuracies[-1][1] > 0.9
    train = [r for r in read_metrics(tmp_path / "run") if "rewards/margins" in r]
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"]
    for key in ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert key in train[0]
    assert {"grad_norm", "learning_rate", "tokens_per_second"} <= train[0].keys()


def test_precomputed_reference_equals_live_and_is_cached(tmp_path, capsys):
    steps = ["train.max_steps=4", "train.eval_every=2"]
    assert dpo(tmp_path, "live", *steps) == 0
    assert dpo(tmp_path, "cached", *steps, "dpo.precompute_reference=true") == 0
    first = capsys.readouterr().out
    assert "computed and cached in" in first
    live, cached = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "cached")
    assert len(live) == len(cached)
    for a, b in zip(live, cached, strict=True):
        for key, value in a.items():
            if key not in TIMING:
                assert b[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns

    # The same input again: the cache is read, not rebuilt.
    assert dpo(tmp_path, "again", *steps, "dpo.precompute_reference=true") == 0
    assert "reused from" in capsys.readouterr().out
    assert files[0].stat().st_mtime_ns == stamp
    assert read_metrics(tmp_path / "again")[-1]["eval/loss"] == cached[-1]["eval/loss"]

    # Changed data: a new key, a new cache file.
    changed = tmp_path / "changed.jsonl"
    rows = marker_pairs(64)
    rows[0]["rejected"] = " something else entirely."
    write_jsonl(changed, rows)
    assert dpo(tmp_path, "changed", *steps, "dpo.precompute_reference=true", data=changed) == 0
    assert "computed and cached in" in capsys.readouterr().out
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    # Changed tokenization settings (EOS no longer appended): also a new key.
    assert (
        dpo(tmp_path, "no-eos", *steps, "dpo.precompute_reference=true", "data.append_eos=false")
        == 0
    )
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_early_stopping_stops_on_a_plateau_and_exports_the_best(tmp_path):
    assert (
        dpo(
            tmp_path,
            "run",
            "train.max_steps=200",
            "train.eval_every=2",
            "train.early_stopping_patience=2",
            "train.early_stopping_metric=eval/rewards/accuracies",
            "train.early_stopping_min_delta=0.0",
            "train.save_every=1000",
        )
        == 0
    )
    run = tmp_path / "run"
    accuracies = evals_of(run)
    last_step = max(r["step"] for r in read_metrics(run))
    assert last_step < 200
    reason = (run / "stopped_early.txt").read_text()
    assert "eval/rewards/accuracies did not improve by more than 0.0 for 2" in reason
    best = json.loads((run / "checkpoints" / "best" / "best.json").read_text())
    # Accuracy climbs, then plateaus: the best is the first evaluation at the top, and the
    # two evaluations after it did not improve on it.
    steps = [s for s, _ in accuracies]
    i = steps.index(best["step"])
    assert best["step"] > 0 and len(accuracies) == i + 3
    assert best["eval/rewards/accuracies"] == max(a for _, a in accuracies)
    assert all(a <= accuracies[i][1] for _, a in accuracies[i + 1 :])
    # The exported model holds the best checkpoint's weights, not the last step's.
    exported = load_file(run / "model" / "model.safetensors")
    kept = load_file(run / "checkpoints" / "best" / "trainable.safetensors")
    last = load_file(run / "checkpoints" / f"step-{last_step:06d}" / "trainable.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(exported[key], kept[key])
    assert not torch.equal(exported[key], last[key])


def test_killed_and_resumed_dpo_equals_uninterrupted(tmp_path):
    args = [
        "train.max_steps=6",
        "train.eval_every=2",
        "train.save_every=2",
        "train.early_stopping_patience=5",
        "model.lora.enabled=true",
        "model.lora.dropout=0.1",
        "dpo.disable_dropout=false",
    ]
    assert dpo(tmp_path, "whole", *args) == 0
    with crash_after_step(5):
        dpo(tmp_path, "killed", *args)
    assert dpo(tmp_path, "killed", *args, "--resume") == 0

    assert without_timing(read_metrics(tmp_path / "whole")) == without_timing(
        read_metrics(tmp_path / "killed")
    )
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("loss", sorted(PREFERENCE_LOSSES))
def test_every_loss_trains(tmp_path, loss, capsys):
    overrides = ["train.max_steps=3", "train.eval_every=3", f"dpo.loss={loss}"]
    if loss in ("cdpo", "robust"):
        overrides.append("dpo.label_smoothing=0.1")
    assert dpo(tmp_path, "run", *overrides) == 0
    out = capsys.readouterr().out
    assert ("reference policy: none" in out) == (loss in REFERENCE_FREE)
    records = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert len(records) == 3
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.5])
def test_the_adapter_disabled_reference_is_the_base_model_and_leaves_the_policy_as_it_was(
    lora_dropout,
):
    """The LoRA policy with its adapters off gives the base model's log-probs (in eval mode
    when a dropout is active), and leaves the policy's mode, adapters and flags as they
    were: trainable adapters stay trainable, a frozen one stays frozen."""
    import copy

    from privdpo.config import LoraConfig
    from privdpo.data.batching import pair_batch
    from privdpo.data.preference import PairExample
    from privdpo.models import add_lora
    from privdpo.reference import Reference

    torch.manual_seed(0)
    base, _ = build_preset("tiny")
    frozen_copy = copy.deepcopy(base).eval()
    policy = add_lora(base, LoraConfig(enabled=True, r=4, dropout=lora_dropout))
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)  # adapters that change the output
    frozen = next(p for n, p in policy.named_parameters() if "lora_A" in n)
    frozen.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in policy.named_parameters()}
    policy.train()
    rng = random.Random(0)
    pairs = [
        PairExample(
            [rng.randrange(5, 200) for _ in range(5)],
            [rng.randrange(5, 200) for _ in range(4)],
            [rng.randrange(5, 200) for _ in range(3)],
            f"pairs.jsonl:{i}",
            None,
        )
        for i in range(3)
    ]
    batch = pair_batch(pairs, pad_id=0, layout="padded", share_prompt=False)
    got = Reference("adapter_disabled", policy=policy).logps(pairs, batch)
    again = Reference("adapter_disabled", policy=policy).logps(pairs, batch)
    want = Reference("copy", model=frozen_copy).logps(pairs, batch)
    for g, a, w in zip(got, again, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, w, rtol=1e-5, atol=1e-5)
    assert policy.training and all(m.training for m in policy.modules())
    assert {n: p.requires_grad for n, p in policy.named_parameters()} == flags
    with torch.no_grad():  # the adapters are on again: the policy differs from its base
        policy.eval()
        on = policy(input_ids=batch.input_ids[:1]).logits
        off = frozen_copy(input_ids=batch.input_ids[:1]).logits
    assert (on - off).abs().max() > 1e-3
