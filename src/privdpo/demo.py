"""`privdpo demo`: the DPO paper's controlled sentiment experiment, offline and small.

Rafailov et al. 2023 ("Direct Preference Optimization", section 6.1) fine-tune a model on
movie reviews, prompt it with review prefixes, and use a sentiment classifier as the
ground-truth reward; the point is the reward-vs-KL frontier: how much reward a method buys
for each nat of divergence from the reference. Here, with nothing downloaded:

1. a review corpus from the project's own generator (`demo_corpus`), reviewers with a
   skewed number of reviews each, split into two disjoint groups of reviewers: *public*
   reviewers (a stand-in for a public corpus) and *private* ones (the users to protect),
   each private reviewer giving one review (`prefixes_per_reviewer`): user-level DP's
   noise on the mean gradient falls as one over the number of users, so the same number
   of prefixes from more reviewers is what makes private training learn;
2. a tokenizer fit on, and SFT of a preset model from random initialization on, the
   public reviews (it learns the grammar, positive and negative alike), without privacy;
3. prompts = 2-8-word prefixes of the private reviewers' reviews; `privdpo pairs`
   samples completions from the SFT model and the VADER lexicon judge prefers the more
   positive (every two samples far enough apart make a pair);
4. DPO without privacy at several betas (the main one with checkpoints along training),
   and DPO with user-level DP (ULS, the private reviewers are the users; every user in
   every step) at several epsilons, both full fine-tuning of the SFT model. The lineage
   of the DP-DPO models shows that no earlier stage saw a private reviewer (parallel
   composition), so their epsilons are true end to end for them;
5. every point evaluated against the SFT model on held-out prefixes: mean judge reward,
   positive-review rate, exact KL to the SFT model, win rate; and best-of-n sampling from
   the SFT model, the baseline practitioners compare DPO with (its KL is at most
   log n - (n-1)/n);
6. `demo.html`: the table, the frontier figure, the two claims checked on this run (a DPO
   point at KL <= 5 nats reaches best-of-4's reward; DP-DPO at epsilon 8 keeps 60% of
   DPO's gain), the privacy statement, and links to each run's own report.

Every number is produced by the run; the defaults were chosen by measurement
(`benchmarks/demo_frontier.py`, benchmarks/README.md). `DemoConfig` scales it up (a
bigger preset, more reviews, a GPU).
"""

from __future__ import annotations

import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.figure import Figure

from privdpo.config import (
    DemoRunConfig,
    DPORunConfig,
    EvalRunConfig,
    SFTRunConfig,
    load_config,
)
from privdpo.demo_corpus import generate_reviews, review_prompts
from privdpo.errors import UserError
from privdpo.judges import LexiconJudge
from privdpo.models import PRESETS, build_preset, build_tiny_tokenizer, load_model_and_tokenizer
from privdpo.pairs import make_pairs, write_pairs
from privdpo.privacy import lineage
from privdpo.recipes.dpo import run_dpo
from privdpo.recipes.eval import run_eval
from privdpo.recipes.sft import run_sft
from privdpo.report import figure_img, html_table, reward_kl_figure

MARKER = "demo.json"  # what makes a directory the demo's own, safe to replace
POSITIVE = 0.05  # VADER's conventional threshold for a positive text (compound score)


def run_demo(cfg: DemoRunConfig) -> dict:
    d = cfg.demo
    root = Path(cfg.output.dir)
    _fresh_directory(root)
    data = root / "data"
    data.mkdir(parents=True)
    (root / MARKER).write_text('{"status": "running"}\n', encoding="utf-8")

    # ---- 1. corpus, split by reviewer ------------------------------------------------
    reviews = generate_reviews(d.reviews, d.seed)
    private_reviews, public_reviews = split_by_reviewer(
        reviews, d.pair_prompts, d.prefixes_per_reviewer, d.seed
    )
    if len(public_reviews) < d.eval_prompts + MIN_SFT_REVIEWS:
        raise UserError(
            f"demo.reviews: {d.reviews} reviews leave {len(public_reviews)} public ones once"
            f" {d.pair_prompts} prefixes are drawn from private reviewers (at most"
            f" {d.prefixes_per_reviewer} each); at least {d.eval_prompts + MIN_SFT_REVIEWS} are"
            " needed (held-out prefixes and SFT): raise demo.reviews or"
            " demo.prefixes_per_reviewer, or lower demo.pair_prompts"
        )
    eval_reviews, sft_reviews = public_reviews[: d.eval_prompts], public_reviews[d.eval_prompts :]
    corpus = _write_jsonl(
        data / "public_reviews.jsonl",
        [{"text": r["text"], "user_id": r["user_id"]} for r in sft_reviews],
    )
    pair_prompts = review_prompts(private_reviews, d.seed)
    eval_prompts = review_prompts(eval_reviews, d.seed + 1)
    _write_jsonl(data / "eval_prompts.jsonl", eval_prompts)
    private_users = {r["user_id"] for r in private_reviews}
    public_users = {r["user_id"] for r in public_reviews}
    _say(
        f"1/6 corpus: {len(reviews)} reviews by {len(private_users | public_users)} reviewers,"
        f" split by reviewer: {len(public_users)} public reviewers ({len(sft_reviews)} reviews"
        f" for the tokenizer and SFT, {len(eval_prompts)} prefixes held out for evaluation)"
        f" and {len(private_users)} private reviewers ({len(pair_prompts)} prefixes for the"
        f" DPO pairs, at most {d.prefixes_per_reviewer} per reviewer)"
    )

    # ---- 2. SFT from random initialization -------------------------------------------
    _say(
        f"2/6 SFT of the {d.preset} preset from random initialization on the public reviews"
        " (no privacy: the public reviewers are not the users protected below)"
    )
    # The preset's shape with a tokenizer fit to the public reviews: a word is then about
    # one token, which a model this small needs to learn the grammar. The fit is a stage
    # of the lineage: the DP-DPO statement checks its users against its own.
    torch.manual_seed(d.seed)
    tokenizer = build_tiny_tokenizer(
        PRESETS[d.preset]["vocab_size"] * 2, [r["text"] for r in sft_reviews]
    )
    model, tokenizer = build_preset(d.preset, tokenizer=tokenizer)
    init = root / "init"
    model.save_pretrained(init, safe_serialization=True)
    tokenizer.save_pretrained(init)
    del model
    tokenizer_lineage(init, corpus, [r["user_id"] for r in sft_reviews], cfg.demo.user_salt_file)
    common = [
        f"train.device={d.device}",
        f"output.progress_bar={cfg.output.progress_bar}",
        f"data.user_salt_file={d.user_salt_file}",
    ]
    sft_cfg = load_config(
        SFTRunConfig,
        None,
        [
            f"model.path={init}",
            f"data.train={corpus}",
            "data.eval_fraction=0.05",
            "data.max_length=128",
            f"train.seed={d.seed}",
            f"train.epochs={d.sft_epochs}",
            "train.batch_size=32",
            "train.micro_batch_size=32",
            "train.lr=3e-3",
            "train.warmup_steps=20",
            f"output.dir={root / 'sft'}",
            *common,
        ],
    )
    sft_model = run_sft(sft_cfg)["model"]

    # ---- 3. on-policy pairs with the lexicon judge -----------------------------------
    _say(
        f"3/6 pairs: {d.samples_per_prompt} samples per prefix from the SFT model, the VADER"
        " lexicon judge prefers the more positive"
        + (
            " (every two samples far enough apart make a pair)"
            if d.pairs_per_prompt == "all"
            else ""
        )
    )
    model, tokenizer = load_model_and_tokenizer(_local(sft_model), d.seed)
    rows, summary = make_pairs(
        model,
        tokenizer,
        pair_prompts,
        LexiconJudge(),
        num_samples=d.samples_per_prompt,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=d.max_new_tokens,
        batch_size=64,
        seed=d.seed,
        min_score_gap=d.min_score_gap,
        pairs_per_prompt=d.pairs_per_prompt,
    )
    del model
    pairs_file = write_pairs(data / "pairs.jsonl", rows)
    _say(f"    {summary}")

    # ---- 4. DPO at several betas, user-level DP-DPO at several epsilons ----------------
    main_dir = _dpo(cfg, root / "dpo", sft_model, pairs_file, d.beta, checkpoints=d.checkpoints)
    points = [Point(f"DPO beta={d.beta:g}", "dpo", main_dir, beta=d.beta)]
    for beta in d.frontier_betas:
        run_dir = _dpo(cfg, root / f"dpo-beta-{beta:g}", sft_model, pairs_file, beta)
        points.append(Point(f"DPO beta={beta:g}", "dpo", run_dir, beta=beta))
    for eps in [d.target_epsilon, *d.frontier_epsilons]:
        name = "dp-dpo" if eps == d.target_epsilon else f"dp-dpo-eps-{eps:g}"
        run_dir = _dpo(cfg, root / name, sft_model, pairs_file, d.beta, epsilon=eps)
        points.append(Point(f"DP-DPO eps={eps:g}", "dp", run_dir, beta=d.beta, epsilon=eps))

    # ---- 5. evaluation against the SFT model -----------------------------------------
    _say(
        "5/6 evaluation on the held-out prefixes against the SFT model: reward, exact KL,"
        f" and best-of-n (n = {', '.join(map(str, d.best_of_n))}) of the SFT model"
    )
    prompts = data / "eval_prompts.jsonl"
    results = {points[0].name: _evaluate(cfg, main_dir, sft_model, prompts, d.best_of_n)}
    for p in points[1:]:
        results[p.name] = _evaluate(cfg, p.run_dir, sft_model, prompts)
    for step_dir in _checkpoints(main_dir):
        step = int(step_dir.name.removeprefix("step-"))
        point = Point(f"DPO beta={d.beta:g} step {step}", "dpo-step", step_dir, d.beta, step=step)
        points.append(point)
        results[point.name] = _evaluate(cfg, step_dir, sft_model, prompts)
    statements = {
        p.name: json.loads((p.run_dir / "privacy.json").read_text(encoding="utf-8"))
        for p in points
        if p.kind == "dp"
    }
    for p in points:
        if p.kind == "dp":  # the epsilon each run proved, not the one it aimed at
            p.epsilon = statements[p.name]["epsilon"]
    headline = f"DP-DPO eps={d.target_epsilon:g}"
    statement = statements[headline]
    table = frontier_rows(results, points)
    verdicts = frontier_verdicts(table, points[0].name, headline)

    # ---- 6. the demo's page ------------------------------------------------------------
    page = root / "demo.html"
    page.write_text(_page(table, verdicts, points, statement, root), encoding="utf-8")
    summary_json = {
        "table": table,
        "verdicts": verdicts,
        "privacy": statement,
        "runs": {p.name: str(p.run_dir) for p in points},
    }
    (root / MARKER).write_text(json.dumps(summary_json, indent=2) + "\n", encoding="utf-8")
    _say(
        "6/6 results: mean VADER reward of one completion per held-out prefix (95% bootstrap"
        " interval), exact KL to the SFT model in nats per completion (best-of-n: its bound)"
    )
    print(format_table(table))
    print("\n" + "\n".join(v["text"] for v in verdicts))
    print("\n" + privacy_lines(statement))
    print(f"\ndemo finished. The report is {page}")
    return summary_json


@dataclass
class Point:
    """One model on the frontier: its name, kind (dpo, dpo-step, dp), what to evaluate
    (a run directory or a checkpoint), its beta, for DP its epsilon, for a checkpoint its
    step."""

    name: str
    kind: str
    run_dir: Path
    beta: float
    epsilon: float | None = None
    step: int | None = None


# ---- steps -------------------------------------------------------------------------------


def split_by_reviewer(reviews: list[dict], private_reviews: int, per_reviewer: int, seed: int):
    """(private, public) reviews, no reviewer in both: reviewers in a seeded random order
    go to the private side, each giving at most `per_reviewer` of their reviews, until it
    holds `private_reviews` reviews (fewer if the reviewers run out); the rest of a private
    reviewer's reviews are used nowhere."""
    users = sorted({r["user_id"] for r in reviews})
    random.Random(f"privdpo-demo-split-{seed}").shuffle(users)
    by_user: dict[str, list[dict]] = {}
    for r in reviews:
        by_user.setdefault(r["user_id"], []).append(r)
    private: list[dict] = []
    public: list[dict] = []
    for u in users:
        if len(private) < private_reviews:
            private.extend(by_user[u][: min(per_reviewer, private_reviews - len(private))])
        else:
            public.extend(by_user[u])
    return private, public


def tokenizer_lineage(model_dir: Path, corpus: Path, user_ids: list[str], salt_file: str) -> None:
    """The lineage of the demo's starting model: random initialization, and a tokenizer fit
    on `corpus` (a stage without privacy, whose users are the corpus's reviewers)."""
    salt = lineage.load_salt(salt_file)
    record = lineage.input_record(corpus, len(user_ids), "tokenizer")
    lin = lineage.new_lineage(
        "tokenizer",
        model_dir,
        [record],
        {"kind": "random initialization", "trained_by_privdpo": False},
        {"origin": f"fit on {corpus}"},
    )
    hashes = lineage.hash_users(user_ids, salt)
    stage = lineage.stage_record(
        lineage.stage_id_for(model_dir, [record]),
        "tokenizer fit",
        model_dir,
        False,
        None,
        hashes,
        salt,
    )
    lin["stages"] = [stage]
    users = {"stages": {stage["id"]: {"salt_id": lineage.salt_id(salt), "hashes": hashes}}}
    lineage.write_lineage(lin, users, model_dir)


def privacy_lines(statement: dict) -> str:
    """The DP-DPO model's guarantee for the console: this stage's epsilon beside the end-
    to-end one, what the latter covers, then the statement itself."""
    end = statement["end_to_end"]
    earlier = ", ".join(
        f"{s['recipe']} ({s['overlapping_users']} shared users)" for s in end["parallel_stages"]
    )
    lines = [
        f"privacy of the DP-DPO model: this stage epsilon = {statement['stage_epsilon']:.4g},"
        f" end to end epsilon = {end['epsilon']:.4g} (delta = {end['delta']:.3g},"
        f" {end['composition']} composition{'; earlier stages: ' + earlier if earlier else ''})",
        statement["summary"],
    ]
    return "\n".join(lines)


def _dpo(
    cfg: DemoRunConfig,
    run_dir: Path,
    sft_model: Path,
    pairs: Path,
    beta: float,
    epsilon: float | None = None,
    checkpoints: int = 1,
    extra=(),
) -> Path:
    """One DPO run on the SFT model: the demo's non-private settings, or with `epsilon`
    user-level DP (ULS; the private reviewers are the users) with the DP settings.
    `checkpoints`: that many evenly spaced checkpoints are kept (the last at the end)."""
    d = cfg.demo
    if epsilon is None:
        label = f"DPO (beta={beta:g})"
        finetune, lr, epochs, batch = d.finetune, d.lr, d.dpo_epochs, 64
    else:
        label = f"DP-DPO (user level, ULS, epsilon={epsilon:g}, beta={beta:g})"
        finetune, lr, epochs, batch = d.dp_finetune, d.dp_lr, d.dp_epochs, d.dp_batch_size
    how = "full fine-tuning" if finetune == "full" else "LoRA"
    _say(f"4/6 {label}: {how} of the SFT model, reference = the SFT model")
    overrides = [
        f"model.path={sft_model}",
        f"data.train={pairs}",
        f"data.eval_fraction={EVAL_FRACTION}",
        "data.max_length=128",
        f"train.seed={d.seed}",
        f"train.epochs={epochs}",
        f"train.batch_size={batch}",
        "train.micro_batch_size=64",
        f"train.lr={lr}",
        "train.warmup_steps=5",
        "train.eval_at_start=false",
        f"train.keep_checkpoints={checkpoints + 1}",
        f"dpo.beta={beta}",
        f"output.dir={run_dir}",
        f"train.device={d.device}",
        f"output.progress_bar={cfg.output.progress_bar}",
        f"data.user_salt_file={d.user_salt_file}",
    ]
    if finetune == "full":
        overrides += ["model.lora.enabled=false", "dpo.reference=copy"]
    else:
        r, targets = (8, LORA_TARGETS) if epsilon is None else (d.dp_lora_r, d.dp_lora_targets)
        overrides += [
            "model.lora.enabled=true",
            f"model.lora.r={r}",
            f"model.lora.alpha={2 * r}",
            f"model.lora.target_modules=[{','.join(targets)}]",
            "dpo.reference=adapter_disabled",
        ]
    if checkpoints > 1:
        units = sum(1 for _ in pairs.open(encoding="utf-8")) * (1 - EVAL_FRACTION)  # training
        steps = epochs * math.ceil(units / batch)
        overrides.append(f"train.save_every={max(1, math.ceil(steps / checkpoints))}")
    if epsilon is not None:
        overrides += [
            "privacy.enabled=true",
            "privacy.unit=user",
            "privacy.user_algorithm=uls",
            f"privacy.target_epsilon={epsilon}",
            f"privacy.contribution_bound={d.dp_contribution_bound}",
            "privacy.max_grad_norm=1.0",
        ]
    run_dpo(load_config(DPORunConfig, None, [*overrides, *extra]))
    return run_dir


EVAL_FRACTION = 0.1  # of the pairs, held out by every DPO run
MIN_SFT_REVIEWS = 500  # public reviews the SFT needs at least, besides the held-out ones
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _checkpoints(run_dir: Path) -> list[Path]:
    """The run's kept checkpoints before its last step (the last is the exported model)."""
    steps = sorted((run_dir / "checkpoints").glob("step-*"))
    return steps[:-1]


def _evaluate(cfg: DemoRunConfig, model: Path, sft_model: Path, prompts: Path, best_of=()):
    d = cfg.demo
    overrides = [
        f"model.path={model}",
        f"reference.path={sft_model}",
        f"data.prompts={prompts}",
        f"generation.num_prompts={d.eval_prompts}",
        f"generation.keep_samples={d.eval_prompts}",
        f"generation.max_new_tokens={d.max_new_tokens}",
        "generation.batch_size=64",
        f"generation.seed={d.seed}",
        "judge.kind=lexicon",
        "eval.temperatures=[1.0]",
        f"eval.best_of_n=[{','.join(map(str, best_of))}]",
        f"eval.device={d.device}",
    ]
    return run_eval(load_config(EvalRunConfig, None, overrides))


KIND_ORDER = {"sft": 0, "best-of-n": 1, "dpo-step": 2, "dpo": 3, "dp": 4}


def frontier_rows(results: dict, points: list[Point]) -> list[dict]:
    """The table: the SFT model (the reference side of every eval: the same prompts and
    seed give the same SFT samples in each), best-of-n of the SFT model, then every point:
    mean reward with its interval, positive rate, KL to the SFT model (exact estimate, or
    best-of-n's bound), win rate against the SFT model, epsilon."""
    first = results[points[0].name]
    rows = [
        _row(
            "SFT",
            "sft",
            first["metrics"]["reference_reward"],
            _positive(first, "reference_score"),
            0.0,
        )
    ]
    for b in first["best_of_n"]:
        if b["model"] == "reference":
            rows.append(
                _row(
                    f"best-of-{b['n']}",
                    "best-of-n",
                    b["reward"],
                    sum(s > POSITIVE for s in b["scores"]) / len(b["scores"]),
                    b["kl_bound"],
                    win_rate=b["win_rate"],
                    kl_is_bound=True,
                )
            )
    for p in points:
        m = results[p.name]["metrics"]
        rows.append(
            _row(
                p.name,
                p.kind,
                m["policy_reward"],
                _positive(results[p.name], "policy_score"),
                m["kl_exact"]["value"],
                kl_ci=(m["kl_exact"]["ci_low"], m["kl_exact"]["ci_high"]),
                win_rate=m["win_rate"],
                beta=p.beta,
                epsilon=p.epsilon,
                step=p.step,
            )
        )
    return sorted(rows, key=_row_order)


def _row_order(r: dict) -> tuple:
    """SFT, best-of-n by n, the main run's checkpoints by step, DPO by beta, DP by epsilon."""
    return (KIND_ORDER[r["kind"]], r["step"] or 0, r["beta"] or 0, r["epsilon"] or 0, r["kl"])


def _row(
    name,
    kind,
    reward,
    positive,
    kl,
    *,
    kl_ci=None,
    win_rate=None,
    kl_is_bound=False,
    beta=None,
    epsilon=None,
    step=None,
):
    return {
        "model": name,
        "kind": kind,
        "reward": reward,
        "positive_rate": positive,
        "kl": kl,
        "kl_ci": kl_ci,
        "kl_is_bound": kl_is_bound,
        "win_rate": win_rate,
        "beta": beta,
        "epsilon": epsilon,
        "step": step,
    }


def _positive(result: dict, key: str) -> float:
    scores = [s[key] for s in result["samples"]]
    return sum(score > POSITIVE for score in scores) / len(scores)


KL_LIMIT = 5.0  # nats per completion: the DPO point that should match best-of-4 stays below
KEEP = 0.6  # the share of the non-private gain DP-DPO should keep at epsilon 8


def frontier_verdicts(table: list[dict], dpo_name: str, dp_name: str) -> list[dict]:
    """The two claims the demo makes, checked on its own table: (1) a DPO point at KL <=
    KL_LIMIT nats reaches best-of-4's reward; (2) the DP-DPO row `dp_name` (the headline
    epsilon) keeps at least KEEP of the reward the DPO row `dpo_name` (the same beta) gains
    over SFT. Each says whether it held, with the numbers."""
    rows = {r["model"]: r for r in table}
    sft = rows["SFT"]["reward"]["value"]
    bo4 = rows["best-of-4"]["reward"]["value"]
    dpo = [r for r in table if r["kind"] in ("dpo", "dpo-step") and r["kl"] <= KL_LIMIT]
    best = max(dpo, key=lambda r: r["reward"]["value"], default=None)
    if best is None:
        first = {
            "claim": "dpo_matches_best_of_4",
            "held": False,
            "text": f"No DPO point has an exact KL of at most {KL_LIMIT:g} nats; best-of-4"
            f" reaches {bo4:.3f} at KL <= {rows['best-of-4']['kl']:.2f}.",
        }
    else:
        r = best["reward"]["value"]
        first = {
            "claim": "dpo_matches_best_of_4",
            "held": r >= bo4,
            "model": best["model"],
            "text": f"{best['model']}: reward {r:.3f} at KL {best['kl']:.2f} nats (<= {KL_LIMIT:g})"
            f" {'reaches' if r >= bo4 else 'falls short of'} best-of-4's {bo4:.3f}"
            f" (KL <= {rows['best-of-4']['kl']:.2f}).",
        }
    dp, dpo_final = rows[dp_name], rows[dpo_name]
    gain = dpo_final["reward"]["value"] - sft
    kept = (dp["reward"]["value"] - sft) / gain if gain > 0 else float("nan")
    second = {
        "claim": "dp_keeps_the_gain",
        "held": bool(kept >= KEEP),
        "share": kept,
        "text": f"DP-DPO at epsilon {dp['epsilon']:.3g} keeps {kept:.0%} of DPO's reward gain"
        f" over SFT at beta {dpo_final['beta']:g} ({dp['reward']['value']:.3f} against {dpo_final['reward']['value']:.3f};"
        f" SFT {sft:.3f}; the aim is {KEEP:.0%}).",
    }
    return [first, second]


def format_table(rows: list[dict]) -> str:
    header = (
        f"{'model':<24} {'reward [95% CI]':>24} {'positive':>9} {'KL to SFT':>10}"
        f" {'win vs SFT':>11}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        w = r["reward"]
        reward = f"{w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
        win = f"{r['win_rate']['value']:.2f}" if r["win_rate"] else "-"
        kl = f"<= {r['kl']:.2f}" if r["kl_is_bound"] else f"{r['kl']:.2f}"
        lines.append(f"{r['model']:<24} {reward:>24} {r['positive_rate']:>9.0%} {kl:>10} {win:>11}")
    return "\n".join(lines)


def _frontier_figure(rows: list[dict]) -> Figure:
    series = {
        "sft": "SFT",
        "best-of-n": "best-of-n of SFT (KL bound)",
        "dpo-step": "DPO, main beta, along training",
        "dpo": "DPO, end of training",
        "dp": "DP-DPO (user level), by epsilon",
    }
    points = []
    for r in rows:
        label = r["model"]
        if r["kind"] == "dpo-step":  # the final step is the run's own point
            label = f"step {r['step']}"
        points.append(
            {
                "label": label,
                "kl": r["kl"],
                "kl_ci": r["kl_ci"],
                "reward": r["reward"],
                "series": series[r["kind"]],
                "kl_is_bound": r["kl_is_bound"],
            }
        )
    return reward_kl_figure(
        points,
        title="Reward vs KL to the SFT model (held-out prefixes)",
        reward_label="mean VADER reward",
    )


def _page(table: list[dict], verdicts, points: list[Point], statement: dict, root: Path) -> str:
    import html

    cells = []
    for r in table:
        w = r["reward"]
        cells.append(
            [
                r["model"],
                f"{w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]",
                f"{r['positive_rate']:.0%}",
                f"<= {r['kl']:.3f}" if r["kl_is_bound"] else f"{r['kl']:.3f}",
                f"{r['win_rate']['value']:.3f}" if r["win_rate"] else "-",
                f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "no DP",
            ]
        )
    runs = {"SFT": root / "sft", **{p.name: p.run_dir for p in points if p.kind != "dpo-step"}}
    links = "".join(
        f'<li><a href="{html.escape(str(p.relative_to(root)))}/report.html">'
        f"{html.escape(name)}</a></li>"
        for name, p in runs.items()
    )
    claims = "".join(
        f"<li>{'held' if v['held'] else 'not reached'}: {html.escape(v['text'])}</li>"
        for v in verdicts
    )
    header = [
        "model",
        "mean reward [95% CI]",
        "positive rate",
        "KL to SFT (nats)",
        "win rate vs SFT",
        "epsilon",
    ]
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>privdpo demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body>
<h1>privdpo demo: controlled sentiment generation, offline</h1>
<p>A tiny model trained from random initialization on generated reviews, then DPO on its
own samples judged by the VADER sentiment lexicon (positive preferred), with and without
user-level differential privacy. Rewards are VADER compound scores of one completion
sampled at temperature 1 for each held-out review prefix. KL is to the SFT model, in nats
per completion: the exact estimate (the next-token KL summed along the model's own
samples), or for best-of-n its bound log n - (n-1)/n. Win rates are against the SFT
model's samples.</p>
{html_table(header, cells)}
<h2>Reward vs KL</h2>
{figure_img("frontier", "mean reward against KL to the SFT model", _frontier_figure(table))}
<h2>What the run shows</h2><ul>{claims}</ul>
<h2>Privacy</h2>
<p>{html.escape(privacy_lines(statement))}</p>
<h2>Each run's report</h2><ul>{links}</ul>
</body></html>
"""


# ---- small pieces --------------------------------------------------------------------------


def _fresh_directory(root: Path) -> None:
    """Replace an earlier demo's directory, never anything else."""
    if root.exists():
        if not root.is_dir() or (any(root.iterdir()) and not (root / MARKER).is_file()):
            raise UserError(
                f"output.dir: {root} exists and is not a finished privdpo demo directory;"
                " choose another output.dir or remove it"
            )
        shutil.rmtree(root)


def _local(model_dir: Path):
    from privdpo.config import ModelConfig

    return ModelConfig(path=str(model_dir))


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _say(message: str) -> None:
    print(f"\n[demo] {message}", flush=True)
