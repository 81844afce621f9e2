"""The SFT recipe end to end through the real CLI on the tiny preset: exact resume, export
that loads with plain transformers, micro-batching that does not change the result, and no
network access during a whole run."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import crash_after_step, sft_rows, without_timing, write_jsonl
from privdpo.cli import main
from privdpo.metrics import read_metrics


def base_args(tmp_path: Path, name: str, n_rows: int = 24) -> list[str]:
    data = tmp_path / "train.jsonl"
    if not data.exists():
        write_jsonl(data, sft_rows(n_rows))
    return [
        "model.preset=tiny",
        f"data.train={data}",
        "data.eval_fraction=0.25",
        f"output.dir={tmp_path / name}",
        "output.progress_bar=false",
        "train.batch_size=4",
        "train.micro_batch_size=2",
        "train.max_steps=6",
        "train.save_every=2",
        "train.eval_every=3",
        "train.lr=1e-3",
        "train.warmup_steps=2",
    ]


def sft(tmp_path: Path, args: list[str], *flags: str) -> int:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    return main(["sft", str(config), *args, *flags])


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-with-dropout"])
def test_killed_and_resumed_run_equals_uninterrupted(tmp_path, lora):
    extra = ["model.lora.enabled=true", "model.lora.dropout=0.1"] if lora else []
    assert sft(tmp_path, base_args(tmp_path, "whole") + extra) == 0

    # Crash right after step 5's metrics are written; the last checkpoint is step 4, so the
    # resumed run must drop step 5's record and redo it exactly.
    with crash_after_step(5):
        sft(tmp_path, base_args(tmp_path, "killed") + extra)
    killed = tmp_path / "killed"
    assert max(r["step"] for r in read_metrics(killed)) == 5
    assert not (killed / "model").exists() and not (killed / "adapter").exists()

    assert sft(tmp_path, base_args(tmp_path, "killed") + extra, "--resume") == 0

    weights = "adapter/adapter_model.safetensors" if lora else "model/model.safetensors"
    a = load_file(tmp_path / "whole" / weights)
    b = load_file(killed / weights)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    whole_metrics = without_timing(read_metrics(tmp_path / "whole"))
    assert whole_metrics == without_timing(read_metrics(killed))
    assert [r["step"] for r in whole_metrics if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in whole_metrics if "eval/loss" in r] == [0, 3, 6]


def test_training_lowers_eval_loss_and_micro_batching_keeps_the_result(tmp_path):
    one = base_args(tmp_path, "micro1") + ["train.micro_batch_size=1"]
    four = base_args(tmp_path, "micro4") + ["train.micro_batch_size=4"]
    assert sft(tmp_path, one) == 0
    assert sft(tmp_path, four) == 0
    m1 = read_metrics(tmp_path / "micro1")
    m4 = read_metrics(tmp_path / "micro4")
    losses1 = [r["loss"] for r in m1 if "loss" in r]
    losses4 = [r["loss"] for r in m4 if "loss" in r]
    assert losses1 == pytest.approx(losses4, rel=1e-5)
    evals = [r["eval/loss"] for r in m4 if "eval/loss" in r]
    assert evals[-1] < evals[0]
    a = load_file(tmp_path / "micro1" / "model" / "model.safetensors")
    b = load_file(tmp_path / "micro4" / "model" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)


# Runs in a fresh interpreter: proves the export needs only transformers (and peft for an
# adapter), never privdpo.
LOAD_SCRIPT = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
out = {}
for name in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(name, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(name, local_files_only=True)
    ids = tok("Review 3: the movie was", return_tensors="pt").input_ids
    with torch.no_grad():
        out[name] = {"ids": ids[0].tolist(), "logits": model(ids).logits[0, -1].tolist()}
assert not any(m.startswith("privdpo") for m in sys.modules), "privdpo was imported"
print(json.dumps(out))
"""


def load_in_plain_python(*dirs: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, *map(str, dirs)],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_full_export_loads_with_plain_transformers(tmp_path, tiny_tokenizer):
    assert sft(tmp_path, base_args(tmp_path, "run")) == 0
    run = tmp_path / "run"
    exported = load_file(run / "model" / "model.safetensors")
    trained = load_file(run / "checkpoints" / "step-000006" / "trainable.safetensors")
    for key, value in trained.items():
        if key in exported:
            assert torch.equal(exported[key], value), key
    assert "model.embed_tokens.weight" in exported
    loaded = load_in_plain_python(run / "model")[str(run / "model")]
    assert len(loaded["logits"]) > 100 and all(math.isfinite(x) for x in loaded["logits"])
    # The reloaded tokenizer splits text exactly as the one privdpo trained with.
    assert loaded["ids"] == tiny_tokenizer("Review 3: the movie was").input_ids


def test_lora_export_adapter_and_merged_agree(tmp_path):
    args = base_args(tmp_path, "lora") + [
        "model.lora.enabled=true",
        "model.lora.r=4",
        "output.merge_lora=true",
        "train.lr=1e-2",
    ]
    assert sft(tmp_path, args) == 0
    run = tmp_path / "lora"
    assert (run / "adapter" / "adapter_config.json").is_file()
    adapter_cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert Path(adapter_cfg["base_model_name_or_path"]) == (run / "base_model").resolve()
    logits = load_in_plain_python(run / "adapter", run / "model", run / "base_model")
    adapter, merged, base = (
        logits[str(run / d)]["logits"] for d in ("adapter", "model", "base_model")
    )
    torch.testing.assert_close(torch.tensor(adapter), torch.tensor(merged), rtol=1e-4, atol=1e-4)
    # The adapter was trained: it moves the logits away from the base model's.
    assert (torch.tensor(adapter) - torch.tensor(base)).abs().max() > 1e-3


def test_a_full_run_never_touches_the_network(tmp_path, monkeypatch):
    attempts = []

    def blocked(*args, **kwargs):
        attempts.append(args)
        raise OSError("network access attempted during a privdpo run")

    monkeypatch.setattr(socket.socket, "connect", blocked)
    monkeypatch.setattr(socket.socket, "connect_ex", blocked)
    monkeypatch.setattr(socket, "create_connection", blocked)
    monkeypatch.setattr(socket, "getaddrinfo", blocked)
    args = base_args(tmp_path, "offline") + [
        "model.lora.enabled=true",
        "output.merge_lora=true",
    ]
    assert sft(tmp_path, args) == 0
    assert (tmp_path / "offline" / "model" / "model.safetensors").is_file()
    assert attempts == []
