"""The contribution bound k of user-level DP-DPO, measured: ELS and ULS, k in 1-16, at
epsilon 1, 4 and 8, on the demo's task and on a heavier-tailed user distribution.

Each point is the demo's DP-DPO run (LoRA on the demo's SFT model, its on-policy pairs,
the reviewers as users) with `privacy.user_algorithm`, `privacy.contribution_bound` and
`privacy.target_epsilon` set; utility is the held-out preference accuracy of the run
(eval/rewards/accuracies at its end) and the mean VADER reward of its samples on held-out
prefixes; the prediction is the plan's (`privdpo privacy plan`: noise std over the
expected clipped signal per step, `planning.plan_user_level`). CPU, about 40 minutes on 2
cores for the full grid.

    PYTHONPATH=src python benchmarks/k_sweep.py --out k_sweep.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
from pathlib import Path

from privdpo.config import DemoRunConfig, load_config
from privdpo.demo import _dpo, _evaluate, run_demo
from privdpo.metrics import read_metrics
from privdpo.privacy.contributions import units_per_user
from privdpo.privacy.planning import plan_user_level

KS = (1, 2, 4, 8, 16)
EPSILONS = (1.0, 4.0, 8.0)
ALGORITHMS = ("uls", "els")


def heavy_tailed(rows: list[dict], seed: int = 0, exponent: float = 1.1) -> list[dict]:
    """The same pairs, their users redrawn so a few users hold many pairs: user sizes from
    a Zipf law with a heavier tail than the demo's reviewers (exponent 1.1, up to 200)."""
    rng = random.Random(seed)
    sizes = range(1, 201)
    weights = [s**-exponent for s in sizes]
    owners = []
    while len(owners) < len(rows):
        size = rng.choices(sizes, weights)[0]
        owners += [f"heavy-user-{len(set(owners)):05d}"] * size
    owners = owners[: len(rows)]
    rng.shuffle(owners)
    return [dict(r, user_id=u) for r, u in zip(rows, owners, strict=True)]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="k_sweep.json")
    parser.add_argument("--work", default=None)
    parser.add_argument("--ks", default=",".join(map(str, KS)))
    parser.add_argument("--epsilons", default=",".join(map(str, EPSILONS)))
    parser.add_argument("--eval-prompts", type=int, default=100)
    args = parser.parse_args(argv)
    ks = [int(k) for k in args.ks.split(",")]
    epsilons = [float(e) for e in args.epsilons.split(",")]
    work = Path(args.work or tempfile.mkdtemp(prefix="privdpo-k-sweep-"))
    base = work / "demo"
    cfg = load_config(
        DemoRunConfig,
        None,
        [f"output.dir={base}", "demo.frontier_betas=[]", "output.progress_bar=false"],
    )
    if not (base / "demo.json").is_file() or "running" in (base / "demo.json").read_text():
        run_demo(cfg)
    sft_model = base / "sft" / "model"
    pairs = [json.loads(line) for line in (base / "data" / "pairs.jsonl").open()]
    prompts = [json.loads(line) for line in (base / "data" / "eval_prompts.jsonl").open()]
    eval_file = work / "eval_prompts.jsonl"
    eval_file.write_text("".join(json.dumps(p) + "\n" for p in prompts[: args.eval_prompts]))
    small = load_config(
        DemoRunConfig,
        None,
        [
            f"output.dir={work}",
            f"demo.eval_prompts={args.eval_prompts}",
            "output.progress_bar=false",
        ],
    )
    distributions = {"demo": pairs, "heavy-tailed": heavy_tailed(pairs)}
    results = {"ks": ks, "epsilons": epsilons, "points": [], "distributions": {}}
    for dist, rows in distributions.items():
        data = work / f"pairs-{dist}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts = list(units_per_user([r["user_id"] for r in rows]).values())
        results["distributions"][dist] = {
            "pairs": len(rows),
            "users": len(counts),
            "median_per_user": statistics.median(counts),
            "max_per_user": max(counts),
        }
        for eps in epsilons:
            predicted = None
            for algorithm in ALGORITHMS:
                for k in ks:
                    name = f"{dist}-{algorithm}-k{k}-eps{eps:g}"
                    run_dir = work / name
                    extra = [
                        f"privacy.user_algorithm={algorithm}",
                        f"privacy.contribution_bound={k}",
                        f"privacy.target_epsilon={eps}",
                        "output.overwrite=true",
                    ]
                    _dpo(small, run_dir, sft_model, data, cfg.demo.beta, True, extra)
                    statement = json.loads((run_dir / "privacy.json").read_text())
                    if (
                        predicted is None
                    ):  # the plan `privdpo privacy plan` prints, on the train split
                        histogram = statement["units_per_user_histogram"]
                        train_counts = [int(c) for c, n in histogram.items() for _ in range(n)]
                        steps = cfg.demo.dpo_epochs * -(-sum(train_counts) // 64)
                        plan = plan_user_level(
                            train_counts, 64, steps, eps, statement["delta"], candidates=ks
                        )
                        predicted = {(r.algorithm, r.k): r.predicted_noise for r in plan}
                    accuracy = [
                        r["eval/rewards/accuracies"]
                        for r in read_metrics(run_dir)
                        if "eval/rewards/accuracies" in r
                    ]
                    evaluation = _evaluate(small, run_dir, sft_model, eval_file)
                    point = {
                        "distribution": dist,
                        "algorithm": algorithm,
                        "k": k,
                        "target_epsilon": eps,
                        "epsilon": statement["epsilon"],
                        "noise_multiplier": statement["noise_multiplier"],
                        "pairs_used": statement["units_kept"],
                        "predicted_noise": predicted.get((algorithm, k)),
                        "heldout_accuracy": accuracy[-1] if accuracy else None,
                        "reward": evaluation["metrics"]["policy_reward"]["value"],
                        "reward_ci": [
                            evaluation["metrics"]["policy_reward"]["ci_low"],
                            evaluation["metrics"]["policy_reward"]["ci_high"],
                        ],
                    }
                    results["points"].append(point)
                    print(json.dumps(point), flush=True)
                    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
