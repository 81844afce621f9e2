"""Empirical lower bounds on epsilon from `privdpo audit`, next to the proven epsilon:
example-level DP-SFT, pair-level and user-level DP-DPO, at proven epsilon 1, 4 and 8,
with black-box and white-box canaries (18 cases), on one GPU in one process.

Model: Qwen2.5-0.5B shapes (151,936-token vocabulary, tied embeddings), random init,
saved once with `save_pretrained` (vs_trl.py's `make_model_dir`), bf16, full fine-tuning
with ghost clipping. Data: 300 training units of single-token words (SFT: a 16-token prompt
and 48-token completion; DPO: a 16-token prompt, 24-token chosen and rejected responses;
user level: 150 users of 2 pairs, contribution bound k = 2) plus m = 1,000 canaries, each
in the data with probability 1/2 (user level: canary users of 2 canary pairs). Batch 100
rows, 2 epochs (16 DP-SGD steps; 26 at user level, whose canaries bring 2 pairs each),
constant lr 1e-4, delta 1e-5. Sizes are chosen for the time: about 20 s a case on an H200,
so that all 18 fit one 9-minute command (`--cases` runs a subset). Each case is one
`privdpo audit` run (`recipes.audit.run_audit`): the noise is calibrated to the case's
epsilon, the canaries are scored (black box: log-likelihood gain or implicit reward margin
of each canary against the initial model; white box: the privatized gradient sum at its
coordinate), and the one-run bound (Steinke, Nasr and Jagielski 2023) is computed on the
held-out half with the two maxima: with the chosen guesses all right, and with every
evaluated canary right. A bound above the proven epsilon is recorded, not raised.

    PYTHONPATH=src python benchmarks/audit_bounds.py --out audit_bounds.json     # one GPU
    PYTHONPATH=src python benchmarks/audit_bounds.py --device cpu --tiny         # smoke test
    PYTHONPATH=src python benchmarks/audit_bounds.py --cases 'dpo-user-*'        # a subset

The JSON is written after every case, so a job cut off keeps what finished.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from vs_trl import make_model_dir, single_token_words  # benchmarks/ is the script's path

RECIPES = {  # name: (recipe, privacy unit)
    "sft-example": ("sft", "example"),
    "dpo-pair": ("dpo", "pair"),
    "dpo-user": ("dpo", "user"),
}
EPSILONS = (1, 4, 8)
MODES = ("black_box", "white_box")
CASES = [
    f"{recipe}-eps{eps}-{mode.replace('_', '')}"
    for recipe in RECIPES
    for eps in EPSILONS
    for mode in MODES
]

# Sizes: the GPU job (18 cases in one 9-minute command on an H200) and the CPU smoke test.
SIZES = {
    "gpu": dict(
        shape="qwen2.5-0.5b",
        units=300,
        canaries=1000,
        prompt=16,
        completion=48,
        response=24,
        batch=100,
        micro_batch=50,
        epochs=2,
        lr=1e-4,
    ),
    "tiny": dict(
        shape="tiny",
        units=24,
        canaries=20,
        prompt=3,
        completion=4,
        response=3,
        batch=8,
        micro_batch=8,
        epochs=1,
        lr=1e-3,
    ),
}
PAIRS_PER_USER = 2  # data users and canary users alike; the contribution bound k


def write_data(work: Path, tokenizer, size: dict) -> dict[str, Path]:
    """The training files: SFT rows and DPO pairs of single-token words (exact lengths),
    with user ids of PAIRS_PER_USER rows each."""
    words = single_token_words(tokenizer)
    rng = random.Random(0)

    def text(k: int) -> str:
        return "".join(" " + rng.choice(words) for _ in range(k))

    n = size["units"]
    sft = [
        {
            "prompt": text(size["prompt"]),
            "completion": text(size["completion"]),
            "user_id": f"u{i // PAIRS_PER_USER}",
        }
        for i in range(n)
    ]
    pairs = [
        {
            "prompt": text(size["prompt"]),
            "chosen": text(size["response"]),
            "rejected": text(size["response"]),
            "user_id": f"u{i // PAIRS_PER_USER}",
        }
        for i in range(n)
    ]
    files = {"sft": work / "sft.jsonl", "dpo": work / "pairs.jsonl"}
    for kind, rows in (("sft", sft), ("dpo", pairs)):
        files[kind].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return files


def case_config(name: str, model_dir: Path, data: dict[str, Path], work: Path, args) -> Path:
    """The audit config of case `name` (recipe-epsEPS-mode)."""
    recipe_name, eps, mode = name.rsplit("-", 2)
    kind, unit = RECIPES[recipe_name]
    size = SIZES["tiny" if args.tiny else "gpu"]
    config = {
        "model": {"path": str(model_dir), "dtype": "float32" if args.tiny else "bfloat16"},
        "data": {"train": str(data[kind]), "eval_fraction": 0, "max_length": 128},
        "train": {
            "epochs": size["epochs"],
            "batch_size": size["batch"],
            "micro_batch_size": size["micro_batch"],
            "lr": size["lr"],
            "schedule": "constant",
            "eval_at_start": False,
            "log_every": 10,
            "keep_checkpoints": 1,
            "device": args.device,
            "seed": 0,
        },
        "privacy": {
            "enabled": True,
            "unit": unit,
            "target_epsilon": float(eps.removeprefix("eps")),
            "delta": 1e-5,
            "ghost_clipping": True,
        },
        "audit": {
            "canaries": size["canaries"],
            "mode": "white_box" if mode == "whitebox" else "black_box",
            "items_per_user": PAIRS_PER_USER,
            "seed": 0,
        },
        "output": {"dir": str(work / "runs" / name), "progress_bar": False, "overwrite": True},
    }
    if unit == "user":
        config["privacy"]["contribution_bound"] = PAIRS_PER_USER
    if kind == "dpo":
        config["dpo"] = {"beta": 0.1, "reference_cache_dir": str(work / "reference-cache")}
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML
    return path


def run_case(name: str, config: Path) -> dict:
    """One `privdpo audit` run; its audit.json numbers, the noise and the wall time."""
    from privdpo.errors import UserError
    from privdpo.recipes.audit import run_audit

    started = time.perf_counter()
    try:
        run_audit(str(config), [])
    except UserError as e:  # above the proven epsilon: audit.json is written, keep it
        if "above the proven epsilon" not in str(e):
            raise
    seconds = time.perf_counter() - started
    run_dir = Path(json.loads(config.read_text())["output"]["dir"])
    audit = json.loads((run_dir / "audit.json").read_text())
    statement = json.loads((run_dir / "privacy.json").read_text())
    recipe_name, eps, mode = name.rsplit("-", 2)
    keep = (
        "proven_epsilon",
        "empirical_epsilon_lower_bound",
        "attainable_with_chosen_guesses",
        "max_attainable",
        "exceeds_proven",
        "canaries",
        "evaluated",
        "k_in",
        "k_out",
        "guesses",
        "correct",
        "confidence",
        "delta",
    )
    return {
        "recipe": RECIPES[recipe_name][0],
        "unit": RECIPES[recipe_name][1],
        "mode": audit["design"]["mode"],
        "target_epsilon": float(eps.removeprefix("eps")),
        **{k: audit[k] for k in keep},
        "score": audit["design"]["score"],
        "noise_multiplier": statement["noise_multiplier"],
        "sampling_rate": statement["sampling_rate"],
        "steps": statement["steps"],
        "units": statement["dataset_size"],
        "seconds": seconds,
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="audit_bounds.json")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and data (smoke test)")
    parser.add_argument(
        "--cases",
        default="*",
        help="comma-separated case names or patterns (e.g. 'sft-*,dpo-pair-eps4-*'); cases: "
        + ", ".join(CASES),
    )
    parser.add_argument("--work", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args(argv)
    patterns = args.cases.split(",")
    wanted = [c for c in CASES if any(fnmatch.fnmatchcase(c, p) for p in patterns)]
    if not wanted:
        parser.error(f"--cases {args.cases!r} matches none of {', '.join(CASES)}")
    root = args.work or (
        "/dev/shm" if Path("/dev/shm").is_dir() and args.device == "cuda" else None
    )
    if root:
        Path(root).mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="privdpo-audit-bounds-", dir=root))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # as the CLI
    import transformers
    from transformers import AutoTokenizer

    size = SIZES["tiny" if args.tiny else "gpu"]
    results = {
        "date": datetime.date.today().isoformat(),
        "command": " ".join(["python", "benchmarks/audit_bounds.py", *(argv or sys.argv[1:])]),
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sizes": {**size, "pairs_per_user": PAIRS_PER_USER, "delta": 1e-5},
        "cases": {},
    }
    started = time.perf_counter()
    model_dir = make_model_dir(size["shape"], work, args.device)
    data = write_data(work, AutoTokenizer.from_pretrained(model_dir), size)
    for name in wanted:
        print(f"[audit_bounds] {name}", flush=True)
        try:
            results["cases"][name] = run_case(name, case_config(name, model_dir, data, work, args))
        except Exception as e:  # one failed case must not lose the others
            results["cases"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        shutil.rmtree(work / "runs" / name, ignore_errors=True)  # a model and a checkpoint
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        results["total_seconds"] = time.perf_counter() - started
        print(json.dumps({name: results["cases"][name]}), flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return results


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, {results['versions']}, {results['total_seconds']:.0f} s")
    print(
        f"{'case':<28} {'proven':>7} {'bound':>6} {'max@guesses':>11} {'max':>6}"
        f" {'correct':>9} {'sigma':>6} {'s':>5}"
    )
    for name, r in results["cases"].items():
        if "error" in r:
            print(f"{name:<28} {r['error'][:80]}")
            continue
        flag = "  ABOVE PROVEN" if r["exceeds_proven"] else ""
        print(
            f"{name:<28} {r['proven_epsilon']:>7.3g} {r['empirical_epsilon_lower_bound']:>6.3g}"
            f" {r['attainable_with_chosen_guesses']:>11.3g} {r['max_attainable']:>6.3g}"
            f" {r['correct']:>4}/{r['guesses']:<4} {r['noise_multiplier']:>6.3g}"
            f" {r['seconds']:>5.1f}{flag}"
        )


if __name__ == "__main__":
    main()
