"""privdpo's DPO against TRL's DPOTrainer: same tiny model, same pairs, same (different)
reference model, same optimizer settings, fp32. The first logged metrics must agree to
1e-5 relative and the losses of later steps to 1e-4."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from conftest import write_jsonl
from privdpo.cli import main
from privdpo.config import LoraConfig, ModelConfig
from privdpo.metrics import read_metrics
from privdpo.models import add_lora, build_preset, load_model_and_tokenizer

trl = pytest.importorskip("trl", reason="TRL is in the test extras")

METRICS = [
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
]
STEPS = 4
LR = 5e-3
LORA = dict(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])


def pairs() -> list[dict]:
    # Prompts end without a space and responses start with one, so tokenizing the joined
    # text never merges across the boundary (TRL and privdpo handle that case differently).
    words = ["good", "bad", "great", "awful", "fine", "nice", "poor", "lovely"]
    return [
        {
            "prompt": f"Review {i}: the film was",
            "chosen": f" {words[i]} and the music was {words[7 - i]}.",
            "rejected": f" {words[7 - i]}, sadly" + " very" * (i % 3) + ".",
        }
        for i in range(8)
    ]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """A policy and a *different* reference, saved as local Hugging Face directories."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, seed in (("policy", 0), ("reference", 1)):
        torch.manual_seed(seed)
        model, tokenizer = build_preset("tiny")
        model.save_pretrained(root / name, safe_serialization=True)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


def run_privdpo(tmp_path: Path, models: dict, lora: bool) -> list[dict]:
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs())
    config = tmp_path / "config.yaml"
    config.write_text("{}\n")
    args = [
        f"model.path={models['policy']}",
        f"data.train={data}",
        "data.eval_fraction=0",
        "data.max_length=512",
        f"output.dir={tmp_path / 'privdpo'}",
        "output.progress_bar=false",
        "train.batch_size=8",
        "train.micro_batch_size=4",  # accumulation must not change the numbers
        f"train.max_steps={STEPS}",
        f"train.lr={LR}",
        "train.schedule=linear",
        "train.max_grad_norm=1.0",
        "dpo.beta=0.1",
    ]
    if lora:
        args += ["model.lora.enabled=true", "dpo.reference=adapter_disabled"]
        args += [f"model.lora.{k}={json.dumps(v)}" for k, v in LORA.items()]
    else:
        args += ["dpo.reference=path", f"dpo.reference_path={models['reference']}"]
    assert main(["dpo", str(config), *args]) == 0
    summary = json.loads((tmp_path / "privdpo" / "data_summary.json").read_text())
    assert summary["notes"] == {} and summary["dropped"] == {}
    return [r for r in read_metrics(tmp_path / "privdpo") if "loss" in r]


def run_trl(tmp_path: Path, models: dict, lora: bool) -> list[dict]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(models["policy"])
    if lora:
        # The same initial adapter as privdpo's: same seed, same loading and wrapping code.
        model, _ = load_model_and_tokenizer(ModelConfig(path=str(models["policy"])), seed=0)
        model = add_lora(model, LoraConfig(enabled=True, **LORA))
        ref_model = None  # TRL then disables the adapter, as privdpo does
    else:
        model = AutoModelForCausalLM.from_pretrained(models["policy"])
        ref_model = AutoModelForCausalLM.from_pretrained(models["reference"])
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=STEPS,
        learning_rate=LR,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        beta=0.1,
        loss_type=["sigmoid"],
        max_length=512,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        seed=0,
        dataloader_drop_last=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=Dataset.from_list(pairs()),
            processing_class=tokenizer,
        )
        trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r and "rewards/chosen" in r]


@pytest.mark.parametrize(
    "lora", [False, True], ids=["full-separate-reference", "lora-adapter-disabled"]
)
def test_dpo_matches_trl(tmp_path, models, lora):
    ours = run_privdpo(tmp_path, models, lora)
    theirs = run_trl(tmp_path, models, lora)
    assert len(ours) == len(theirs) == STEPS
    for key in METRICS:
        assert ours[0][key] == pytest.approx(theirs[0][key], rel=1e-5, abs=1e-7), key
    for step in range(1, STEPS):
        for key in METRICS:
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=1e-4, abs=1e-6), (
                step,
                key,
            )
    # The run moved: the comparison is not between two untrained models.
    assert ours[-1]["loss"] < ours[0]["loss"] - 1e-3
