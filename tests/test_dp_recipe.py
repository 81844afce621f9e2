"""DP-SGD through the real CLI: with no noise and no effective clipping a private step is
the non-private step; the budget stops a run before it is crossed; resume keeps the
ledger; the statement and the plan say what the accountant says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_after_step, without_timing, write_jsonl
from privdpo.cli import main
from privdpo.metrics import read_metrics
from privdpo.models import build_preset
from privdpo.privacy.accounting import epsilon
from test_dpo import marker_pairs

# Three DP-DPO steps at sigma 1 on pairs of mean batch 8, no held-out split: the runs that
# compare two ways of computing the same private model.
SHORT_PRIVATE_RUN = [
    "privacy.enabled=true",
    "privacy.noise_multiplier=1.0",
    "train.max_steps=3",
    "train.batch_size=8",
    "data.eval_fraction=0",
]


def run(tmp_path: Path, command: str, name: str, data: Path, *overrides: str) -> int:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    base = [
        "model.preset=tiny",
        f"data.train={data}",
        f"output.dir={tmp_path / name}",
        "output.progress_bar=false",
        "train.lr=1e-3",
        f"dpo.reference_cache_dir={tmp_path / 'cache'}" if command == "dpo" else "",
    ]
    return main([command, str(config), *[b for b in base if b], *overrides])


def equal_length_sft_rows(tokenizer, n: int) -> list[dict]:
    """Rows whose completions all have the same number of tokens, so the token mean over
    a batch equals the mean of the per-example means that DP-SGD uses."""
    words = ["good", "bad", "great", "awful", "fine", "nice", "poor", "lovely", "dull"]
    rows, lengths = [], set()
    for i in range(200):
        completion = f" {words[i % 9]} and {words[(i * 4) % 9]}."
        n_tokens = len(tokenizer(completion, add_special_tokens=False).input_ids)
        if not lengths or n_tokens in lengths:
            lengths.add(n_tokens)
            rows.append({"prompt": f"Review {i}: it was", "completion": completion})
        if len(rows) == n:
            return rows
    raise AssertionError("not enough equal-length rows")


def weights(run_dir: Path) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two non-empty safetensors dicts with the same keys and tensors equal to 1e-5."""
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_no_noise_and_huge_clip_equals_the_non_private_step(tmp_path, command, tiny_tokenizer):
    if command == "sft":
        data = write_jsonl(tmp_path / "d.jsonl", equal_length_sft_rows(tiny_tokenizer, 12))
    else:
        data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(12))
    # q = batch_size / N = 1: the Poisson sample is every unit, the batch of the plain run.
    same = ["data.eval_fraction=0", "train.batch_size=12", "train.micro_batch_size=4"]
    # A large Adam epsilon makes the first update lr * g / (|g| + 1): smooth in the gradient,
    # so comparing updates compares gradients (with a tiny epsilon it would be sign(g)).
    same += ["train.max_steps=1", "train.adam_eps=1.0", "train.lr=100"]
    assert run(tmp_path, command, "plain", data, *same, "train.max_grad_norm=null") == 0
    private = ["privacy.enabled=true", "privacy.noise_multiplier=0", "privacy.max_grad_norm=1e9"]
    assert run(tmp_path, command, "private", data, *same, *private) == 0
    torch.manual_seed(0)
    initial = dict(build_preset("tiny")[0].named_parameters())
    a, b = weights(tmp_path / "plain"), weights(tmp_path / "private")
    for key in a:
        # The two updates agree to 1e-5 of their size.
        plain_update = a[key] - initial[key].detach()
        private_update = b[key] - initial[key].detach()
        assert plain_update.norm() > 0, key
        assert (private_update - plain_update).norm() <= 1e-5 * plain_update.norm(), key
    statement = json.loads((tmp_path / "private" / "model" / "privacy.json").read_text())
    # No noise, no guarantee: said so in strict JSON (no Infinity).
    assert statement["noise_multiplier"] == 0 and statement["epsilon"] is None
    assert statement["private"] is False and "Not differentially private" in statement["summary"]


def test_budget_exhaustion_stops_before_crossing(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(40))
    args = [
        "data.eval_fraction=0.2",  # 32 training pairs; evaluating each step must not
        "train.eval_every=1",  # hide the budget stop
        "train.batch_size=8",
        "train.max_steps=200",
        "privacy.enabled=true",
        "privacy.noise_multiplier=0.8",
        "privacy.target_epsilon=3",
        "privacy.delta=1e-3",
    ]
    assert run(tmp_path, "dpo", "run", data, *args) == 0
    run_dir = tmp_path / "run"
    statement = json.loads((run_dir / "privacy.json").read_text())
    steps = statement["steps"]
    q = 8 / 32
    assert 0 < steps < 200
    assert statement["epsilon"] <= 3
    assert epsilon(q, 0.8, steps, 1e-3) == pytest.approx(statement["epsilon"], rel=1e-9)
    assert epsilon(q, 0.8, steps + 1, 1e-3) > 3  # one more step would have crossed it
    assert "privacy budget" in (run_dir / "stopped_early.txt").read_text()
    assert max(r["step"] for r in read_metrics(run_dir)) == steps
    assert (run_dir / "model" / "model.safetensors").is_file()


def test_resume_keeps_the_ledger(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(40))
    args = [
        "data.eval_fraction=0.2",
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.max_steps=6",
        "train.save_every=2",
        "train.eval_every=3",
        "model.lora.enabled=true",
        "privacy.enabled=true",
        "privacy.target_epsilon=6",
    ]
    assert run(tmp_path, "dpo", "whole", data, *args) == 0
    with crash_after_step(5):
        run(tmp_path, "dpo", "killed", data, *args)
    state = json.loads(
        (tmp_path / "killed" / "checkpoints" / "step-000004" / "state.json").read_text()
    )
    assert state["extra"]["privacy_ledger"]["segments"][0][2] == 4
    assert run(tmp_path, "dpo", "killed", data, *args, "--resume") == 0

    whole, killed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "killed")
    assert without_timing(whole) == without_timing(killed)
    eps = [r["privacy/epsilon"] for r in whole if "privacy/epsilon" in r]
    assert len(eps) == 6 and eps == sorted(eps) and eps[-1] <= 6
    s1 = json.loads((tmp_path / "whole" / "privacy.json").read_text())
    s2 = json.loads((tmp_path / "killed" / "privacy.json").read_text())
    assert s1 == s2 and s1["steps"] == 6 and s1["unit"] == "pair"
    assert s1["epsilon"] == pytest.approx(6, rel=0.01) and s1["epsilon"] <= 6


def test_privacy_plan_prints_the_plan_without_training(tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", marker_pairs(50))
    config = tmp_path / "dp.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {data}, eval_fraction: 0}}\n"
        "train: {batch_size: 10, micro_batch_size: 5, epochs: 3}\n"
        "dpo: {loss: sigmoid}\n"
        "privacy: {enabled: true, target_epsilon: 4, delta: 1.0e-4, max_grad_norm: 0.5}\n"
        f"output: {{dir: {tmp_path / 'never'}}}\n"
    )
    assert main(["privacy", "plan", str(config)]) == 0
    out = capsys.readouterr().out
    assert "units (N)               50" in out
    assert "sampling rate q         0.2" in out
    assert "steps                   15" in out
    assert "clipping norm C         0.5" in out
    sigma = float(out.split("noise multiplier sigma")[1].split()[0])
    eps = epsilon(0.2, sigma, 15, 1e-4)
    assert 0.99 * 4 <= eps <= 4
    assert not (tmp_path / "never").exists()


def test_gradient_checkpointing_leaves_a_private_lora_run_unchanged(tmp_path):
    """DP-DPO with LoRA and the adapter-disabled reference (whose context switches the
    adapters back to trainable) ends with the same adapter with or without recomputed
    activations."""
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(24))
    args = [*SHORT_PRIVATE_RUN, "model.lora.enabled=true"]
    assert run(tmp_path, "dpo", "plain", data, *args) == 0
    assert (
        run(tmp_path, "dpo", "checkpointed", data, *args, "train.gradient_checkpointing=true") == 0
    )
    assert_same_tensors(
        load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors"),
        load_file(tmp_path / "checkpointed" / "adapter" / "adapter_model.safetensors"),
    )


@pytest.mark.slow  # compiles on the CPU; tests/test_clipping.py has the fast twin
@pytest.mark.parametrize("lora", [True, False])
def test_a_private_run_with_compiled_layers_gives_the_eager_model(tmp_path, lora):
    """train.compile: true on a private run (what auto does on a GPU: the per-unit
    gradients computed inside each compiled layer's graph, the reference and head tiles
    compiled): the same model as the eager run, after a compiled non-private run in the
    same process (whose layer graphs, without the hooks, must not be reused)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(24))
    args = [*SHORT_PRIVATE_RUN, f"model.lora.enabled={str(lora).lower()}"]
    plain = [a for a in args if not a.startswith("privacy.")]
    assert run(tmp_path, "dpo", "plain", data, *plain, "train.compile=true") == 0
    assert run(tmp_path, "dpo", "eager", data, *args, "train.compile=false") == 0
    assert run(tmp_path, "dpo", "compiled", data, *args, "train.compile=true") == 0
    name = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    assert_same_tensors(
        load_file(tmp_path / "eager" / name), load_file(tmp_path / "compiled" / name)
    )


def test_the_share_of_split_poisson_batches_is_the_binomial_tail():
    """P(Binomial(N, q) > cap), checked against the exact sum of fractions."""
    from fractions import Fraction
    from math import comb

    from privdpo.privacy.planning import batch_over_share

    n, q = 40, Fraction(1, 5)
    for cap in (0, 3, 8, 12, 39):
        exact = sum(comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(cap + 1, n + 1))
        assert batch_over_share(n, float(q), cap) == pytest.approx(float(exact), abs=1e-12)
    assert batch_over_share(n, 0.2, 40) == 0.0


def test_a_micro_batch_cap_at_the_mean_batch_gets_a_note(capsys):
    from privdpo.privacy.planning import micro_batch_note

    note = micro_batch_note(256, 8 / 256, 8, "pairs")
    # P(X > 8) = 40.7% for X ~ Binomial(256, 1/32); 15 is the smallest cap over which at
    # most 1% of batches go (P(X > 14) = 1.6%, P(X > 15) = 0.7%).
    assert "in 41% of steps" in note and "15 keeps 99.3% of steps in one pass" in note
    assert micro_batch_note(256, 8 / 256, 16, "pairs") is None


def test_a_private_micro_batch_over_the_batch_size_gives_the_same_model(tmp_path, capsys):
    """With privacy, micro_batch_size may exceed batch_size (the Poisson batch varies): a
    step's sampled pairs then run in one pass, and the model is the one that micro-batches
    of 2 give (clipping is per unit, the noise seeded by the step)."""
    data = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(24))
    args = SHORT_PRIVATE_RUN
    assert run(tmp_path, "dpo", "small", data, *args, "train.micro_batch_size=2") == 0
    assert "over train.micro_batch_size 2 in" in capsys.readouterr().out
    assert run(tmp_path, "dpo", "large", data, *args, "train.micro_batch_size=24") == 0
    assert "note: the sampled batch" not in capsys.readouterr().out
    assert_same_tensors(weights(tmp_path / "small"), weights(tmp_path / "large"))
    # Without privacy the batch is fixed, and a micro-batch must divide it.
    assert run(tmp_path, "dpo", "plain", data, "train.micro_batch_size=24") == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_noise_is_gaussian_with_the_accounted_std(monkeypatch, dtype):
    """With nothing clipped, each gradient coordinate is N(0, (sigma C / (q N))^2), drawn
    in chunks of at most NOISE_CHUNK values from one seeded generator per step (fresh
    values for every chunk), and cast to the parameters' dtype."""
    from privdpo.config import PrivacyConfig
    from privdpo.privacy import dpsgd
    from privdpo.privacy.planning import PrivacyPlan

    monkeypatch.setattr(dpsgd, "NOISE_CHUNK", 5000)
    torch.manual_seed(0)
    model = build_preset("tiny")[0].to(dtype)
    plan = PrivacyPlan("pair", 100, 0.08, 2, 2.0, 0.5, 1e-5, "pld", 1.0, None)
    dp = dpsgd.DPSGD(model, plan, PrivacyConfig(enabled=True), seed=3, groups=[[0]] * 100)
    params = dp.clipper.params

    def noise(step: int) -> torch.Tensor:
        dp.noise_and_scale(step)
        assert all(p.grad.dtype == dtype and p.grad.shape == p.shape for p in params)
        return torch.cat([p.grad.float().flatten() for p in params])

    first = noise(0)
    std = 2.0 * 0.5 / (0.08 * 100)
    assert first.numel() > 100_000
    assert abs(first.mean().item()) < 4 * std / first.numel() ** 0.5
    assert first.std().item() == pytest.approx(std, rel=0.02)
    assert len({round(float(p.grad.flatten()[0]), 6) for p in params}) == len(params)
    assert torch.equal(noise(0), first)  # seeded by the step
    assert not torch.equal(noise(1), first)
