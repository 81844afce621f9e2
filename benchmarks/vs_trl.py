"""privdpo against TRL's DPOTrainer: the same workload, GPU, timing and memory counters.

Workload (DESIGN.md, Performance): a random-init model of a real architecture and
vocabulary, saved with `save_pretrained` (no hub), and 256 preference pairs of varied
lengths (prompt 64-448 tokens, chosen and rejected 32-512 each, plus EOS), batch 8 pairs,
max_length 1024, lr 5e-7, bf16. Every text is made of single-token words, so both tools
see exactly the same token counts. Each tool runs the configuration through its own entry
point (`trl.DPOTrainer.train`, `privdpo.recipes.dpo.run_dpo`), alternating and repeated
(TRL, privdpo, privdpo, TRL) so that host noise falls on both sides. Timing: each step's
wall time with one device sync per step on both sides (TRL: a callback at the step's end;
privdpo: its `step_seconds` metric at log_every=1, measured after the logging step's
sync); the median over the steps after warm-up, pooled over the repetitions. Memory:
`torch.cuda.max_memory_allocated` over the whole run.

Reported per configuration: pairs/s, non-padding tokens/s (the two-row token count of the
pairs, the same for both tools), MFU (8N FLOPs per non-padding token with a live
reference, 6N with a cached one, full fine-tuning only, against the bf16 matmul peak
measured here), peak GiB, and privdpo's ratios to TRL. Also `hardware_mfu`: privdpo's
FLOPs per token it actually ran (a shared prompt counts once). And privdpo's DP-DPO step
(pair level, sigma 1) against its non-private step (alternating: DP, plain, plain, DP),
at privdpo's default (`train.compile: auto`: compiled layers computing the per-unit
gradients in their graphs) and eager (`false`), the GPU-busy share of a step
from the profiler (`train.profile`), and a Llama-3-8B-shapes user-level DP-DPO LoRA run
on pairs of 4,096 tokens.

    PYTHONPATH=src python benchmarks/vs_trl.py --out vs_trl.json
    PYTHONPATH=src python benchmarks/vs_trl.py --device cpu --tiny --out smoke.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

SHAPES = {
    "qwen2.5-0.5b": dict(
        model_type="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        rope_theta=1_000_000.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-1b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
        rope_theta=500_000.0,
        tie_word_embeddings=True,
    ),
    "llama-3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=8192,
        rope_theta=500_000.0,
        tie_word_embeddings=False,
    ),
    "tiny": dict(
        model_type="qwen2",
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
    ),
}

# (name, shape, options): the comparisons the issue asks for, in run order.
CONFIGS = {
    "qwen-full": ("qwen2.5-0.5b", {"profile": True}),
    "qwen-lora": ("qwen2.5-0.5b", {"lora": True, "profile": True}),
    "qwen-gc": ("qwen2.5-0.5b", {"gc": True}),
    "qwen-precomputed": ("qwen2.5-0.5b", {"precompute": True}),
    # TRL's fastest: liger kernels patch transformers' model classes for the whole process,
    # so these TRL runs come last and privdpo's runs are the base configuration's.
    "qwen-precomputed-liger": (
        "qwen2.5-0.5b",
        {"precompute": True, "liger": True, "base": "qwen-precomputed"},
    ),
    "llama-full": ("llama-3.2-1b", {"profile": True}),
    "llama-lora": ("llama-3.2-1b", {"lora": True}),
    "llama-precomputed": ("llama-3.2-1b", {"precompute": True}),
    "llama-precomputed-liger": (
        "llama-3.2-1b",
        {"precompute": True, "liger": True, "base": "llama-precomputed"},
    ),
    # privdpo eager (train.compile=false), against the TRL runs of the configuration in base
    "qwen-full-eager": ("qwen2.5-0.5b", {"compile": False, "base": "qwen-full"}),
    "llama-full-eager": ("llama-3.2-1b", {"compile": False, "base": "llama-full"}),
    "qwen-lora-eager": ("qwen2.5-0.5b", {"lora": True, "compile": False, "base": "qwen-lora"}),
}
# (name: base configuration, train.compile of the private runs, None for privdpo's default
# auto): DP-DPO against the base's non-private step. Until job 16 auto left a private run's
# policy layers eager (their per-unit gradient hooks broke the graphs); since job 17 the
# layers compute the per-unit gradients in their compiled graphs, and auto compiles them.
DP_CONFIGS = {
    "qwen-dp-full": ("qwen-full", None),
    "qwen-dp-lora": ("qwen-lora", None),
    "qwen-dp-full-eager": ("qwen-full", False),
    "qwen-dp-lora-eager": ("qwen-lora", False),
}
DP_MICRO_BATCH = 16  # P(a Poisson batch of mean 8 from 256 pairs > 16) = 0.3%
LORA = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}


# ---- workload -----------------------------------------------------------------------------


def make_model_dir(shape: str, root: Path, device: str) -> Path:
    """A random-init model of `shape` with privdpo's local tokenizer, saved as a Hugging
    Face directory (bf16 safetensors on a GPU run)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from privdpo.models import build_tiny_tokenizer

    out = root / shape
    if (out / "config.json").exists():
        return out
    tokenizer = build_tiny_tokenizer(512)
    spec = dict(SHAPES[shape])
    config = AutoConfig.for_model(
        spec.pop("model_type"),
        **spec,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return out


def single_token_words(tokenizer) -> list[str]:
    words = sorted(
        t[1:] for t in tokenizer.get_vocab() if t.startswith("Ġ") and t[1:].isalpha() and len(t) > 2
    )
    return [w for w in words if len(tokenizer(" " + w, add_special_tokens=False).input_ids) == 1]


def make_pairs(tokenizer, n: int, lengths, seed: int = 0) -> list[dict]:
    """`n` pairs with prompt/chosen/rejected lengths drawn from `lengths` (three ranges),
    each of single-token words; checked to tokenize to exactly those lengths."""
    words = single_token_words(tokenizer)
    rng = random.Random(seed)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    rows = []
    for i in range(n):
        p, c, r = (rng.randint(*span) for span in lengths)
        rows.append(
            {"prompt": text(p), "chosen": text(c), "rejected": text(r), "user_id": f"u{i // 2}"}
        )
    sample = rows[0]
    for key in ("prompt", "chosen"):
        got = len(tokenizer(sample[key], add_special_tokens=False).input_ids)
        assert got == len(sample[key].split()), (key, got)
    return rows


def workload_tokens(rows: list[dict]) -> float:
    """Mean non-padding tokens per pair in the two-row layout: 2P + C + R + 2 EOS."""
    return statistics.fmean(
        2 * len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2
        for r in rows
    )


def packed_tokens(rows: list[dict]) -> float:
    """Mean tokens per pair that privdpo runs with the prompt shared: P + C + R + 2."""
    return statistics.fmean(
        len(r["prompt"].split()) + len(r["chosen"].split()) + len(r["rejected"].split()) + 2
        for r in rows
    )


# ---- the two tools ------------------------------------------------------------------------


def reset_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_privdpo(model_dir, data, work: Path, opts: dict, args, extra=()) -> dict:
    from privdpo.config import DPORunConfig, load_config
    from privdpo.metrics import read_metrics
    from privdpo.recipes.dpo import run_dpo

    out = work / f"privdpo-{time.monotonic_ns()}"
    overrides = [
        f"model.path={model_dir}",
        f"model.dtype={'bfloat16' if args.device == 'cuda' else 'float32'}",
        f"data.train={data}",
        "data.eval_fraction=0",
        f"data.max_length={args.max_length}",
        f"train.device={args.device}",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        f"train.max_steps={args.steps}",
        "train.lr=5e-7",
        "train.schedule=linear",
        "train.log_every=1",
        "train.eval_at_start=false",
        f"train.gradient_checkpointing={str(opts.get('gc', False)).lower()}",
        f"train.profile={str(opts.get('profile', False)).lower()}",
        f"dpo.precompute_reference={str(opts.get('precompute', False)).lower()}",
        f"dpo.reference_cache_dir={work / 'cache'}",
        f"output.dir={out}",
        "output.progress_bar=false",
    ]
    if "compile" in opts:  # otherwise privdpo's default: compiled layers on CUDA (not DP)
        overrides.append(f"train.compile={str(opts['compile']).lower()}")
    if opts.get("lora"):
        overrides += [
            "model.lora.enabled=true",
            f"model.lora.r={LORA['r']}",
            f"model.lora.alpha={LORA['alpha']}",
            f"model.lora.target_modules=[{','.join(LORA['target_modules'])}]",
        ]
    cfg = load_config(DPORunConfig, None, overrides + list(args.privdpo) + list(extra))
    reset_memory(args.device)
    run_dpo(cfg)
    records = [r for r in read_metrics(out) if "step_seconds" in r]
    skip = args.warmup + (2 if opts.get("profile") else 0)  # profiled steps 3-5 are slower
    result = {
        "step_seconds": [r["step_seconds"] for r in records[skip:]],
        "batch_pairs": [r.get("privacy/batch_size", 8) for r in records[skip:]],
        "peak_gib": peak_gib(args.device),
    }
    if (out / "profile.json").exists():
        result["profile"] = json.loads((out / "profile.json").read_text())
    return result


def run_trl(model_dir, rows, work: Path, opts: dict, args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.ends = []

        def _now(self):
            if args.device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_begin(self, *a, **k):
            self.ends.append(self._now())

        def on_step_end(self, *a, **k):
            self.ends.append(self._now())

    peft_config = None
    if opts.get("lora"):
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            target_modules=LORA["target_modules"],
            task_type="CAUSAL_LM",
        )
    cuda = args.device == "cuda"
    config = trl.DPOConfig(
        output_dir=str(work / f"trl-{time.monotonic_ns()}"),
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=5e-7,
        lr_scheduler_type="linear",
        max_grad_norm=1.0,
        beta=0.1,
        max_length=args.max_length,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        bf16=cuda,
        use_cpu=not cuda,
        gradient_checkpointing=opts.get("gc", False),
        precompute_ref_log_probs=opts.get("precompute", False),
        use_liger_kernel=opts.get("liger", False),
        model_init_kwargs={"dtype": torch.bfloat16 if cuda else torch.float32},
        disable_tqdm=True,
        seed=0,
    )
    timer = StepTimer()
    reset_memory(args.device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = trl.DPOTrainer(
            model=str(model_dir),
            args=config,
            train_dataset=Dataset.from_list(
                [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows]
            ),
            processing_class=AutoTokenizer.from_pretrained(model_dir),
            peft_config=peft_config,
            callbacks=[timer],
        )
        trainer.train()
    steps = [b - a for a, b in zip(timer.ends[:-1], timer.ends[1:], strict=True)]
    result = {"step_seconds": steps[args.warmup :], "peak_gib": peak_gib(args.device)}
    del trainer
    return result


# ---- numbers ------------------------------------------------------------------------------


def bf16_peak_tflops() -> float:
    """Median of 10 timed 8192^3 bf16 matmuls on random data, after 3 warm-ups."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def parameter_count(model_dir) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())  # a tied weight counts once


def summarize(runs: list[dict], tokens_per_pair: float, flops_per_token, peak_tflops) -> dict:
    steps = [s for r in runs for s in r["step_seconds"]]
    median = statistics.median(steps)
    pairs_s = 8 / median
    out = {
        "median_step_seconds": median,
        "pairs_per_second": pairs_s,
        "tokens_per_second": pairs_s * tokens_per_pair,
        "peak_gib": max((r["peak_gib"] for r in runs if r["peak_gib"] is not None), default=None),
        "steps_timed": len(steps),
        "repetition_medians": [statistics.median(r["step_seconds"]) for r in runs],
    }
    if flops_per_token and peak_tflops:
        out["mfu"] = flops_per_token * out["tokens_per_second"] / (peak_tflops * 1e12)
    return out


def compare(
    name,
    shape,
    opts,
    model_dir,
    rows,
    data,
    work,
    args,
    peak_tflops,
    n_params,
    trl_runs=None,
    privdpo_runs=None,
) -> dict:
    only_privdpo = args.skip_trl or trl_runs is not None
    if opts.get("liger"):
        order = ["trl", "trl"]
    elif only_privdpo:
        order = ["privdpo", "privdpo"]
    else:
        order = ["trl", "privdpo", "privdpo", "trl"]
    runs = {"trl": list(trl_runs or []), "privdpo": list(privdpo_runs or [])}
    second = ([i for i, tool in enumerate(order) if tool == "privdpo"] + [None, None])[1]
    for i, tool in enumerate(order):
        print(f"[{name}] {tool} ({i + 1}/4)", flush=True)
        if tool == "trl":
            runs["trl"].append(run_trl(model_dir, rows, work, opts, args))
        else:  # profile only the second privdpo run
            mine = dict(opts, profile=opts.get("profile", False) and i == second)
            runs["privdpo"].append(run_privdpo(model_dir, data, work, mine, args))
    flops = None
    if not opts.get("lora"):
        flops = (6 if opts.get("precompute") else 8) * n_params
    per_pair = workload_tokens(rows)
    result = {"shape": shape, "options": opts}
    result["privdpo"] = summarize(runs["privdpo"], per_pair, flops, peak_tflops)
    p = result["privdpo"]
    if flops and peak_tflops:
        p["hardware_mfu"] = p["mfu"] * packed_tokens(rows) / per_pair
    profiles = [r["profile"] for r in runs["privdpo"] if "profile" in r]
    if profiles:
        p["gpu_busy_fraction"] = profiles[0]["gpu_busy_fraction"]
        p["profile"] = profiles[0]
    if runs["trl"]:
        t = result["trl"] = summarize(runs["trl"], per_pair, flops, peak_tflops)
        result["pairs_per_second_ratio"] = p["pairs_per_second"] / t["pairs_per_second"]
        if p["peak_gib"] and t["peak_gib"]:
            result["peak_memory_ratio"] = p["peak_gib"] / t["peak_gib"]
    result["_privdpo_runs"] = runs["privdpo"]
    result["_trl_runs"] = runs["trl"]
    return result


def dp_compare(name, base, model_dir, data, work, args, eager_runs=None, setting=None) -> dict:
    opts = {"lora": base["options"].get("lora", False)}
    if setting is not None:  # train.compile; else privdpo's default, auto
        opts["compile"] = setting
    private = [
        "privacy.enabled=true",
        "privacy.noise_multiplier=1.0",
        "privacy.max_grad_norm=1.0",
        # the Poisson batch (mean 8) in one pass, as the plain step's 8 pairs: a cap of 8
        # would split 41% of the steps (privdpo prints that note)
        f"train.micro_batch_size={DP_MICRO_BATCH}",
    ]
    # Alternating with non-private runs of their own (DP, plain, plain, DP), as TRL and
    # privdpo alternate: the host's speed drifts within a job (a Qwen step is bound by it),
    # and DP runs compared with plain runs minutes earlier measured that drift (jobs 7, 8).
    runs, plain_runs = [], []
    for i, kind in enumerate(("dp", "plain", "plain", "dp")):
        print(f"[{name}] privdpo {kind} ({i + 1}/4)", flush=True)
        if kind == "plain":
            plain_runs.append(run_privdpo(model_dir, data, work, {"lora": opts["lora"]}, args))
        else:  # the second DP run's profile: where a DP step goes
            runs.append(
                run_privdpo(model_dir, data, work, dict(opts, profile=i == 3), args, private)
            )
    dp_steps = [s for r in runs for s in r["step_seconds"]]
    dp_per_pair = [
        s / max(1, b)
        for r in runs
        for s, b in zip(r["step_seconds"], r["batch_pairs"], strict=True)
    ]
    plain = [s for r in plain_runs for s in r["step_seconds"]]
    earlier = [s for r in base["_privdpo_runs"] for s in r["step_seconds"]]
    eager = [s for r in (eager_runs or []) for s in r["step_seconds"]]
    return {
        "options": opts,
        "dp_median_step_seconds": statistics.median(dp_steps),
        "plain_median_step_seconds": statistics.median(plain),
        "plain_repetition_medians": [statistics.median(r["step_seconds"]) for r in plain_runs],
        "dp_repetition_medians": [statistics.median(r["step_seconds"]) for r in runs],
        # the base configuration's privdpo runs, earlier in the job (the ratio before job 9)
        "base_plain_median_step_seconds": statistics.median(earlier) if earlier else None,
        "step_time_ratio": statistics.median(dp_steps) / statistics.median(plain),
        "per_pair_time_ratio": statistics.median(dp_per_pair) / (statistics.median(plain) / 8),
        # against the eager non-private step too, where the job has it
        "plain_eager_median_step_seconds": statistics.median(eager) if eager else None,
        "step_time_ratio_to_eager": statistics.median(dp_steps) / statistics.median(eager)
        if eager
        else None,
        "dp_micro_batch_size": DP_MICRO_BATCH,
        "dp_passes_per_step": statistics.fmean(
            max(1, math.ceil(b / DP_MICRO_BATCH)) for r in runs for b in r["batch_pairs"]
        ),
        "dp_peak_gib": max(r["peak_gib"] or 0 for r in runs) or None,
        "mean_sampled_pairs": statistics.fmean(b for r in runs for b in r["batch_pairs"]),
        "profile": runs[1].get("profile"),
    }


def user_level_8b(work: Path, args) -> dict:
    """Llama-3-8B shapes, LoRA r16, ULS user-level DP-DPO, 8 pairs per step of 4,096
    tokens (prompt 2,048, chosen and rejected 1,024 each, counting EOS), gradient
    checkpointing on."""
    from transformers import AutoTokenizer

    shape, tokens = ("tiny", 64) if args.tiny else ("llama-3-8b", 4096)  # tiny: the smoke test
    model_dir = make_model_dir(shape, work, args.device)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    half = tokens // 2
    rows = make_pairs(tokenizer, 64, [(half, half), (half // 2 - 1,) * 2, (half // 2 - 1,) * 2], 1)
    data = work / f"pairs-{shape}-{tokens}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    local = argparse.Namespace(**{**vars(args), "steps": 5, "warmup": 1, "max_length": tokens})
    run = run_privdpo(
        model_dir,
        data,
        work,
        {"lora": True, "gc": True},
        local,
        [
            "privacy.enabled=true",
            "privacy.unit=user",
            "privacy.contribution_bound=2",
            "privacy.noise_multiplier=1.0",
        ],
    )
    return {
        "median_step_seconds": statistics.median(run["step_seconds"]),
        "step_seconds": run["step_seconds"],
        "sampled_pairs": run["batch_pairs"],
        "peak_gib": run["peak_gib"],
        "tokens_per_pair": tokens,
    }


def versions() -> dict:
    import peft
    import transformers
    import trl

    out = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "python": sys.version.split()[0],
    }
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        out["liger_kernel"] = version("liger-kernel")
    except ImportError:
        out["liger_kernel"] = None
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="vs_trl.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model and workload (smoke test)"
    )
    parser.add_argument(
        "--configs", default=",".join([*CONFIGS, *DP_CONFIGS, "attention", "llama3-8b-user-dp"])
    )
    parser.add_argument(
        "--tiny-layers",
        type=int,
        default=2,
        help="decoder layers of the tiny model (24, as Qwen2.5-0.5B: a step bound by the host)",
    )
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument(
        "--privdpo", nargs="*", default=[], help="extra key=value overrides for every privdpo run"
    )
    parser.add_argument("--skip-trl", action="store_true", help="privdpo runs only (diagnostics)")
    args = parser.parse_args(argv)
    args.max_length = 1024
    if args.tiny:
        args.steps, args.warmup = min(args.steps, 4), min(args.warmup, 1)
        SHAPES["tiny"] = {**SHAPES["tiny"], "num_hidden_layers": args.tiny_layers}
    wanted = args.configs.split(",")
    root = args.work or (
        "/dev/shm" if Path("/dev/shm").is_dir() and args.device == "cuda" else None
    )
    work = Path(tempfile.mkdtemp(prefix="privdpo-vs-trl-", dir=root))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI
    peak = bf16_peak_tflops() if args.device == "cuda" else None
    results = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/vs_trl.py", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": versions(),
        "bf16_matmul_peak_tflops": peak,
        "workload": None,
        "configs": {},
        "dp": {},
    }
    from transformers import AutoTokenizer

    lengths = [(64, 448), (32, 512), (32, 512)] if not args.tiny else [(3, 12), (2, 10), (2, 10)]
    shapes = {}

    def prepare(shape: str) -> tuple:
        """(model_dir, rows, data, parameters) of `shape`, made on first use."""
        if shape not in shapes:
            model_dir = make_model_dir(shape, work, args.device)
            rows = make_pairs(
                AutoTokenizer.from_pretrained(model_dir), 16 if args.tiny else 256, lengths
            )
            data = work / f"pairs-{shape}.jsonl"
            data.write_text("".join(json.dumps(r) + "\n" for r in rows))
            shapes[shape] = (model_dir, rows, data, parameter_count(model_dir))
            results["workload"] = {
                "pairs": len(rows),
                "lengths": {"prompt": lengths[0], "chosen": lengths[1], "rejected": lengths[2]},
                "non_padding_tokens_per_pair": workload_tokens(rows),
                "privdpo_tokens_per_pair": packed_tokens(rows),
            }
        return shapes[shape]

    def run_config(name: str) -> None:
        shape, opts = CONFIGS[name]
        shape = "tiny" if args.tiny else shape
        model_dir, rows, data, n_params = prepare(shape)
        if opts.get("liger") and results["versions"]["liger_kernel"] is None:
            results["configs"][name] = {"error": "liger-kernel is not installed here"}
            return
        base = results["configs"].get(opts.get("base"), {})
        if "base" in opts and (not base or "error" in base):
            results["configs"][name] = {"error": f"needs {opts['base']} in the same job"}
            return
        try:
            results["configs"][name] = compare(
                name,
                shape,
                opts,
                model_dir,
                rows,
                data,
                work,
                args,
                peak,
                n_params,
                base.get("_trl_runs") if "base" in opts and not opts.get("liger") else None,
                base.get("_privdpo_runs") if opts.get("liger") else None,
            )
            results["configs"][name]["parameters"] = n_params
        except Exception as e:  # one failed configuration must not lose the others
            results["configs"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(
            json.dumps(
                {k: v for k, v in results["configs"][name].items() if not k.startswith("_")}
            ),
            flush=True,
        )
        write(results, args.out)

    # Liger's kernels patch transformers' classes for the whole process: those runs last.
    for name in wanted:
        if name in CONFIGS and not CONFIGS[name][1].get("liger"):
            run_config(name)
    for name, (base_name, setting) in DP_CONFIGS.items():
        if name not in wanted:
            continue
        base = results["configs"].get(base_name)
        if base is None:  # alone: its own non-private runs are its baseline
            shape, opts = CONFIGS[base_name]
            base = {"shape": shape, "options": opts, "_privdpo_runs": []}
        if "error" in base:
            continue
        model_dir, rows, data, _ = prepare("tiny" if args.tiny else base["shape"])
        try:
            eager = results["configs"].get(f"{base_name}-eager", {}).get("_privdpo_runs")
            results["dp"][name] = dp_compare(
                name, base, model_dir, data, work, args, eager, setting
            )
        except Exception as e:
            results["dp"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(results["dp"][name]), flush=True)
        write(results, args.out)
    if "llama3-8b-user-dp" in wanted:
        try:
            results["llama3_8b_user_dp_lora"] = user_level_8b(work, args)
        except Exception as e:
            results["llama3_8b_user_dp_lora"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(json.dumps(results["llama3_8b_user_dp_lora"]), flush=True)
        write(results, args.out)
    if "attention" in wanted and "qwen-full" in results["configs"]:
        base = results["configs"]["qwen-full"]
        if "error" not in base:
            model_dir, rows, data, _ = shapes["tiny" if args.tiny else base["shape"]]
            results["attention"] = {"auto": base["privdpo"]["median_step_seconds"]}
            for backend in ("flex", "sdpa"):
                print(f"[attention] privdpo train.attention={backend}", flush=True)
                try:
                    run = run_privdpo(
                        model_dir, data, work, {}, args, [f"train.attention={backend}"]
                    )
                    results["attention"][backend] = statistics.median(run["step_seconds"])
                except Exception as e:
                    results["attention"][backend] = f"{type(e).__name__}: {e}"[:300]
            print(json.dumps(results["attention"]), flush=True)
    for name in wanted:
        if name in CONFIGS and CONFIGS[name][1].get("liger"):
            run_config(name)
    write(results, args.out)
    print_table(results)
    return results


def write(results: dict, path: str) -> None:
    """The results so far (written after every configuration, so a cut-off job keeps them)."""
    clean = json.loads(json.dumps(results, default=str))
    for entry in clean["configs"].values():
        entry.pop("_privdpo_runs", None)
        entry.pop("_trl_runs", None)
    Path(path).write_text(json.dumps(clean, indent=2) + "\n")


def print_table(results: dict) -> None:
    print(
        f"\n{results['device']}, {results['versions']}, bf16 peak {results['bf16_matmul_peak_tflops']}"
    )
    print(
        f"{'config':<24} {'TRL p/s':>8} {'ours p/s':>9} {'ratio':>6} {'TRL GiB':>8} {'ours GiB':>9} {'ratio':>6} {'MFU':>6} {'busy':>6}"
    )
    for name, r in results["configs"].items():
        if "error" in r:
            print(f"{name:<24} {r['error'][:80]}")
            continue
        t, p = r.get("trl", {}), r["privdpo"]

        def f(x, spec):
            width = spec.lstrip(">").split(".")[0]
            return format(x, spec) if x is not None else format("-", f">{width}")

        print(
            f"{name:<24} {f(t.get('pairs_per_second'), '>8.2f')} {p['pairs_per_second']:>9.2f}"
            f" {f(r.get('pairs_per_second_ratio'), '>6.2f')} {f(t.get('peak_gib'), '>8.1f')}"
            f" {f(p['peak_gib'], '>9.1f')}"
            f" {f(r.get('peak_memory_ratio'), '>6.2f')} {f(p.get('mfu'), '>6.1%')} {f(p.get('gpu_busy_fraction'), '>6.1%')}"
        )
    for name, r in results["dp"].items():
        if "error" in r:
            print(f"{name:<24} {r['error'][:80]}")
        else:
            print(
                f"{name:<24} DP/non-private step time {r['step_time_ratio']:.2f}x (per pair {r['per_pair_time_ratio']:.2f}x)"
            )
    big = results.get("llama3_8b_user_dp_lora")
    if big:
        print(f"llama-3-8b user DP LoRA: {big}")


if __name__ == "__main__":
    main()
