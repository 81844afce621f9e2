"""The TRL comparison benchmark runs end to end on the CPU with a tiny model (its GPU
numbers are in benchmarks/README.md): both tools train, and the JSON has every figure."""

from __future__ import annotations

import json
import sys

from conftest import REPO


def test_vs_trl_smoke_on_cpu(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import vs_trl
    finally:
        sys.path.pop(0)
    out = tmp_path / "smoke.json"
    argv = ["--device", "cpu", "--tiny", "--out", str(out), "--work", str(tmp_path)]
    vs_trl.main([*argv, "--configs", "qwen-full,qwen-lora,qwen-dp-full"])
    results = json.loads(out.read_text())
    assert results["device"] == "cpu" and results["versions"]["trl"]
    workload = results["workload"]
    # The two-row count holds the prompt twice; privdpo runs it once.
    assert workload["non_padding_tokens_per_pair"] > workload["privdpo_tokens_per_pair"] > 0
    for name in ("qwen-full", "qwen-lora"):
        entry = results["configs"][name]
        assert "error" not in entry, entry
        for tool in ("trl", "privdpo"):
            assert entry[tool]["pairs_per_second"] > 0
            assert entry[tool]["steps_timed"] >= 2  # steps after warm-up (and profiling)
        assert entry["pairs_per_second_ratio"] > 0
    dp = results["dp"]["qwen-dp-full"]
    assert "error" not in dp, dp
    assert dp["step_time_ratio"] > 0 and dp["mean_sampled_pairs"] > 0
