"""DP-DPO step cost against privdpo's non-private DPO step, on one GPU.

Workload (issue 4): a random-init model of Qwen2.5-0.5B shapes (tied embeddings, real
vocabulary), 8 preference pairs per step of about 1,000 tokens each (prompt 200, chosen
and rejected 400 each), LoRA and full fine-tuning, bf16. The reference log-probs are
fixed numbers (as when precomputed), so both modes do the same policy work; the private
step adds per-pair gradients, clipping and noise. Reports pairs/s and peak memory of each
and their ratios, as JSON.

    PYTHONPATH=src python benchmarks/dp_overhead.py --out results.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from privdpo.data.batching import pair_batch
from privdpo.data.preference import PairExample
from privdpo.logprobs import sequence_logps
from privdpo.losses import LossParams, PairLogps, sigmoid_loss
from privdpo.privacy.clipping import PerUnitGradients

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)


def make_pairs(n: int, vocab: int, gen: torch.Generator) -> list[PairExample]:
    def ids(k):
        return torch.randint(0, vocab, (k,), generator=gen).tolist()

    return [PairExample(ids(200), ids(400), ids(400), f"p{i}", None) for i in range(n)]


def build(mode: str, device):
    torch.manual_seed(0)
    config = Qwen2Config(**QWEN25_05B)
    model = AutoModelForCausalLM.from_config(
        config, dtype=torch.bfloat16, attn_implementation="sdpa"
    )
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                task_type="CAUSAL_LM",
            ),
        )
    model.to(device).train()
    return model


def pair_losses(model, batch, ref):
    logps, tokens = sequence_logps(model, batch)
    c, r = logps.chunk(2)
    tc, tr = tokens.chunk(2)
    return sigmoid_loss(PairLogps(c, r, tc, tr, ref[0], ref[1]), LossParams(beta=0.1)).losses


def step(model, optimizer, batch, ref, clipper, pairs_n, sigma=1.0, max_norm=1.0):
    if clipper is None:
        (pair_losses(model, batch, ref).sum() / pairs_n).backward()
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
    else:
        row_unit = torch.arange(pairs_n, device=batch["input_ids"].device).repeat(2)
        with clipper.units(row_unit, pairs_n):
            pair_losses(model, batch, ref).sum().backward()
        clipper.clip_and_accumulate(max_norm)
        sums = clipper.take_clipped_sum()
        for p in clipper.params:
            noise = torch.randn_like(sums[id(p)]) * (sigma * max_norm)
            p.grad = ((sums[id(p)] + noise) / pairs_n).to(p.dtype)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def measure(mode: str, private: bool, pairs, device, warmup=3, iters=10) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = build(mode, device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    clipper = PerUnitGradients(model) if private else None
    batch = {k: v.to(device) for k, v in pair_batch(pairs, pad_id=0).items()}
    ref = (
        torch.full((len(pairs),), -900.0, device=device),
        torch.full((len(pairs),), -900.0, device=device),
    )
    for _ in range(warmup):
        step(model, optimizer, batch, ref, clipper, len(pairs))
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step(model, optimizer, batch, ref, clipper, len(pairs))
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / iters
    peak = torch.cuda.max_memory_allocated() / 2**30
    if clipper is not None:
        clipper.detach()
    del model, optimizer, clipper
    return {"seconds_per_step": seconds, "pairs_per_second": len(pairs) / seconds, "peak_gib": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="dp_overhead.json")
    parser.add_argument("--modes", default="lora,full")
    args = parser.parse_args()
    device = torch.device("cuda")
    pairs = make_pairs(8, QWEN25_05B["vocab_size"], torch.Generator().manual_seed(0))
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    for mode in args.modes.split(","):
        for private in (False, True):
            name = f"{mode}-{'dp' if private else 'plain'}"
            try:
                results["runs"][name] = measure(mode, private, pairs, device)
            except torch.cuda.OutOfMemoryError as e:
                results["runs"][name] = {"error": f"out of memory: {e}"[:300]}
            print(name, results["runs"][name], flush=True)
        plain, dp = results["runs"][f"{mode}-plain"], results["runs"][f"{mode}-dp"]
        if "error" not in plain and "error" not in dp:
            results[f"{mode}_step_time_ratio"] = dp["seconds_per_step"] / plain["seconds_per_step"]
            results[f"{mode}_peak_memory_ratio"] = dp["peak_gib"] / plain["peak_gib"]
    print(json.dumps(results, indent=2))
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
