"""Tuning the demo's DPO: reward against the exact KL to the SFT model for DPO settings, on
one demo's SFT model, pairs and held-out prefixes (CPU).

    PYTHONPATH=src python benchmarks/demo_frontier.py --demo runs/demo --out frontier.json \\
        --try 'train.lr=3e-3' --try 'train.lr=1e-3' --try 'train.lr=1e-3 dpo.beta=0.5'

Each --try is a set of DPO overrides on top of the demo's own DPO settings
(`privdpo.demo._dpo`); each run is evaluated like the demo evaluates (VADER reward of one
sample per held-out prefix, the exact KL to the SFT model). Best-of-n of the SFT model
(n = 2, 4, 8, 16) is the baseline, evaluated once.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from privdpo.config import DemoRunConfig, EvalRunConfig, load_config
from privdpo.demo import _dpo
from privdpo.recipes.eval import run_eval


def evaluate(run_dir: Path, sft_model: Path, prompts: Path, n_prompts: int, best_of=()) -> dict:
    overrides = [
        f"model.path={run_dir}",
        f"reference.path={sft_model}",
        f"data.prompts={prompts}",
        f"generation.num_prompts={n_prompts}",
        "generation.max_new_tokens=40",
        "generation.batch_size=64",
        "judge.kind=lexicon",
        "eval.temperatures=[1.0]",
        f"eval.best_of_n=[{','.join(map(str, best_of))}]",
    ]
    return run_eval(load_config(EvalRunConfig, None, overrides))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--demo", required=True, help="a finished demo directory")
    parser.add_argument("--out", default="frontier.json")
    parser.add_argument("--try", dest="tries", action="append", default=[])
    parser.add_argument("--private", action="store_true", help="DP-DPO (the demo's) runs")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--pairs", default=None, help="another pairs file (default: the demo's)")
    args = parser.parse_args(argv)
    demo = Path(args.demo)
    sft_model = demo / "sft" / "model"
    pairs = Path(args.pairs) if args.pairs else demo / "data" / "pairs.jsonl"
    prompts = demo / "data" / "eval_prompts.jsonl"
    cfg = load_config(DemoRunConfig, None, [f"output.dir={demo}", "output.progress_bar=false"])
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    if "best_of_n" not in results:
        base = evaluate(demo / "dpo", sft_model, prompts, args.prompts, (2, 4, 8, 16))
        results["sft_reward"] = base["metrics"]["reference_reward"]
        results["best_of_n"] = base["best_of_n"]
    for text in args.tries:
        overrides = text.split()
        name = ("dp " if args.private else "") + (f"[{pairs.name}] " if args.pairs else "") + text
        run_dir = Path(f"/tmp/frontier-{abs(hash(name)) % 10**8}")
        epsilon = cfg.demo.target_epsilon if args.private else None
        extra = [*overrides, "output.overwrite=true"]
        _dpo(cfg, run_dir, sft_model, pairs, cfg.demo.beta, epsilon, extra=extra)
        m = evaluate(run_dir, sft_model, prompts, args.prompts)["metrics"]
        eps = None
        if args.private:
            eps = json.loads((run_dir / "privacy.json").read_text())["epsilon"]
        results["runs"][name] = {
            "reward": m["policy_reward"],
            "kl_exact": m["kl_exact"],
            "kl_one_sample": m["kl_to_reference"],
            "epsilon": eps,
        }
        print(name, json.dumps(results["runs"][name]), flush=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"SFT reward {results['sft_reward']['value']:.3f}")
    for b in results["best_of_n"]:
        print(
            f"best-of-{b['n']} ({b['model']}): reward {b['reward']['value']:.3f} KL <= {b['kl_bound']:.2f}"
        )
    for name, r in results["runs"].items():
        print(f"{name:40} reward {r['reward']['value']:.3f} KL exact {r['kl_exact']['value']:.2f}")


if __name__ == "__main__":
    main()
