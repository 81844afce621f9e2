"""`privdpo demo`: the DPO paper's controlled sentiment experiment, offline and small.

Rafailov et al. 2023 ("Direct Preference Optimization", section 6.1) fine-tune a model on
movie reviews, prompt it with review prefixes, and use a sentiment classifier as the
ground-truth reward; DPO should raise the reward at a small KL to the reference. Here,
with nothing downloaded:

1. a review corpus from the project's own generator (`demo_corpus`), reviewers with a
   skewed number of reviews each, split into two disjoint groups of reviewers: *public*
   reviewers (a stand-in for a public corpus) and *private* ones (the users to protect);
2. a tokenizer fit on, and SFT of a preset model from random initialization on, the
   public reviews (it learns the grammar, positive and negative alike), without privacy;
3. prompts = 2-8-word prefixes of the private reviewers' reviews; `privdpo pairs`
   samples completions from the SFT model and the VADER lexicon judge prefers the more
   positive one;
4. DPO without privacy, and DPO with user-level DP (ULS, the private reviewers are the
   users). The lineage of the DP-DPO model shows that no earlier stage saw a private
   reviewer (parallel composition), so its epsilon is true end to end for them;
5. both evaluated against the SFT model on held-out prefixes: mean judge reward,
   positive-review rate, KL to the SFT model, win rate; more betas of non-private DPO
   give the reward-vs-KL frontier;
6. `demo.html`: the table, the frontier figure, the privacy statement, and links to each
   run's own report.

Every number is produced by the run. `DemoConfig` scales it up (a bigger preset, more
reviews, a GPU).
"""

from __future__ import annotations

import json
import random
import shutil
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
from privdpo.report import figure_img, html_table

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
    private_reviews, public_reviews = split_by_reviewer(reviews, d.pair_prompts, d.seed)
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
        " DPO pairs)"
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
    )
    del model
    pairs_file = write_pairs(data / "pairs.jsonl", rows)
    _say(f"    {summary}")

    # ---- 4. DPO and user-level DP-DPO ------------------------------------------------
    runs = {"DPO": _dpo(cfg, root / "dpo", sft_model, pairs_file, d.beta, private=False)}
    runs["DP-DPO"] = _dpo(cfg, root / "dp-dpo", sft_model, pairs_file, d.beta, private=True)
    for beta in d.frontier_betas:
        runs[f"DPO beta={beta:g}"] = _dpo(
            cfg, root / f"dpo-beta-{beta:g}", sft_model, pairs_file, beta, private=False
        )

    # ---- 5. evaluation against the SFT model -----------------------------------------
    _say("5/6 evaluation against the SFT model on the held-out prefixes")
    results = {
        name: _evaluate(cfg, run_dir, sft_model, data / "eval_prompts.jsonl")
        for name, run_dir in runs.items()
    }
    privacy = json.loads((runs["DP-DPO"] / "privacy.json").read_text(encoding="utf-8"))
    table = _table_rows(results, privacy)

    # ---- 6. the demo's page ------------------------------------------------------------
    page = root / "demo.html"
    page.write_text(_page(table, results, runs, privacy, root), encoding="utf-8")
    summary_json = {
        "table": table,
        "privacy": privacy,
        "runs": {k: str(v) for k, v in runs.items()},
    }
    (root / MARKER).write_text(json.dumps(summary_json, indent=2) + "\n", encoding="utf-8")
    _say("6/6 results (mean VADER reward of sampled completions, 95% bootstrap interval):")
    print(format_table(table))
    print("\n" + privacy_lines(privacy))
    print(f"\ndemo finished. The report is {page}")
    return summary_json


# ---- steps -------------------------------------------------------------------------------


def split_by_reviewer(reviews: list[dict], private_reviews: int, seed: int):
    """(private, public) reviews, no reviewer in both: reviewers in a seeded random order
    go to the private side until it holds at least `private_reviews` reviews."""
    users = sorted({r["user_id"] for r in reviews})
    random.Random(f"privdpo-demo-split-{seed}").shuffle(users)
    by_user: dict[str, list[dict]] = {}
    for r in reviews:
        by_user.setdefault(r["user_id"], []).append(r)
    private: list[dict] = []
    public: list[dict] = []
    for u in users:
        (private if len(private) < private_reviews else public).extend(by_user[u])
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


def _dpo(cfg: DemoRunConfig, run_dir: Path, sft_model: Path, pairs: Path, beta, private, extra=()):
    d = cfg.demo
    label = "DP-DPO (user level, ULS)" if private else f"DPO (beta={beta:g})"
    _say(f"4/6 {label}: LoRA on the SFT model, reference = the SFT model")
    overrides = [
        f"model.path={sft_model}",
        "model.lora.enabled=true",
        "model.lora.r=8",
        "model.lora.alpha=16",
        "model.lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
        f"data.train={pairs}",
        "data.eval_fraction=0.1",
        "data.max_length=128",
        f"train.seed={d.seed}",
        f"train.epochs={d.dpo_epochs}",
        "train.batch_size=64",
        "train.micro_batch_size=64",
        "train.lr=1e-2",
        "train.warmup_steps=5",
        "train.eval_at_start=false",
        f"dpo.beta={beta}",
        "dpo.reference=adapter_disabled",
        f"output.dir={run_dir}",
        f"train.device={d.device}",
        f"output.progress_bar={cfg.output.progress_bar}",
        f"data.user_salt_file={d.user_salt_file}",
    ]
    if private:
        overrides += [
            "privacy.enabled=true",
            "privacy.unit=user",
            "privacy.user_algorithm=uls",
            f"privacy.target_epsilon={d.target_epsilon}",
            "privacy.max_grad_norm=1.0",
        ]
    run_dpo(load_config(DPORunConfig, None, [*overrides, *extra]))
    return run_dir


def _evaluate(cfg: DemoRunConfig, run_dir: Path, sft_model: Path, prompts: Path) -> dict:
    d = cfg.demo
    overrides = [
        f"model.path={run_dir}",
        f"reference.path={sft_model}",
        f"data.prompts={prompts}",
        f"generation.num_prompts={d.eval_prompts}",
        f"generation.keep_samples={d.eval_prompts}",
        f"generation.max_new_tokens={d.max_new_tokens}",
        "generation.batch_size=64",
        f"generation.seed={d.seed}",
        "judge.kind=lexicon",
        "eval.temperatures=[1.0]",
        f"eval.device={d.device}",
    ]
    return run_eval(load_config(EvalRunConfig, None, overrides))


def _table_rows(results: dict, privacy: dict) -> list[dict]:
    """One row per model: the SFT model's numbers are the reference side of any eval
    (the same prompts and seed give the same SFT samples in every eval)."""
    first = next(iter(results.values()))
    rows = [
        {
            "model": "SFT",
            "reward": first["metrics"]["reference_reward"],
            "positive_rate": _positive_rate(first, "reference_score"),
            "kl": 0.0,
            "win_rate": None,
            "epsilon": None,
        }
    ]
    for name, result in results.items():
        m = result["metrics"]
        rows.append(
            {
                "model": name,
                "reward": m["policy_reward"],
                "positive_rate": _positive_rate(result, "policy_score"),
                "kl": m["kl_to_reference"]["value"],
                "win_rate": m["win_rate"],
                "epsilon": privacy["epsilon"] if name == "DP-DPO" else None,
            }
        )
    return rows


def _positive_rate(result: dict, key: str) -> float:
    scores = [s[key] for s in result["samples"]]
    return sum(score > POSITIVE for score in scores) / len(scores)


def format_table(rows: list[dict]) -> str:
    header = f"{'model':<16} {'reward [95% CI]':>24} {'positive':>9} {'KL to SFT':>10} {'win vs SFT':>11}"
    lines = [header, "-" * len(header)]
    for r in rows:
        w = r["reward"]
        reward = f"{w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]"
        win = f"{r['win_rate']['value']:.2f}" if r["win_rate"] else "-"
        name = r["model"] + (f" (eps={r['epsilon']:.2g})" if r["epsilon"] is not None else "")
        lines.append(
            f"{name:<16} {reward:>24} {r['positive_rate']:>9.0%} {r['kl']:>10.2f} {win:>11}"
        )
    return "\n".join(lines)


def _frontier_figure(rows: list[dict]) -> Figure:
    fig = Figure(figsize=(6, 4), dpi=100, facecolor="white")
    ax = fig.add_subplot()
    for r in rows:
        dp = r["epsilon"] is not None
        ax.scatter(
            r["kl"],
            r["reward"]["value"],
            marker="s" if dp else "o",
            s=50,
            zorder=3,
            color="tab:red" if dp else ("tab:gray" if r["model"] == "SFT" else "tab:blue"),
        )
        ax.annotate(
            r["model"],
            (r["kl"], r["reward"]["value"]),
            textcoords="offset points",
            xytext=(5, 5),
            fontsize=8,
        )
    ax.set_xlabel("KL(policy || SFT), nats per completion")
    ax.set_ylabel("mean VADER reward")
    ax.set_title("reward vs KL to the SFT model (held-out prefixes)")
    ax.grid(alpha=0.3)
    return fig


def _page(table: list[dict], results: dict, runs: dict, privacy: dict, root: Path) -> str:
    import html

    cells = []
    for r in table:
        w = r["reward"]
        cells.append(
            [
                r["model"],
                f"{w['value']:.3f} [{w['ci_low']:.3f}, {w['ci_high']:.3f}]",
                f"{r['positive_rate']:.0%}",
                f"{r['kl']:.3f}",
                f"{r['win_rate']['value']:.3f}" if r["win_rate"] else "-",
                f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "no DP",
            ]
        )
    links = "".join(
        f'<li><a href="{html.escape(str(p.relative_to(root)))}/report.html">'
        f"{html.escape(name)}</a></li>"
        for name, p in {"SFT": root / "sft", **runs}.items()
    )
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>privdpo demo</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}</style>
</head><body>
<h1>privdpo demo: controlled sentiment generation, offline</h1>
<p>A {html.escape("tiny")} model trained from random initialization on generated reviews,
then DPO on its own samples judged by the VADER sentiment lexicon (positive preferred),
with and without user-level differential privacy. Rewards are VADER compound scores of
completions sampled at temperature 1 for held-out review prefixes; KL and win rate are
against the SFT model.</p>
{html_table(["model", "mean reward [95% CI]", "positive rate", "KL to SFT", "win rate vs SFT", "epsilon"], cells)}
<h2>Reward vs KL</h2>
{figure_img("frontier", "mean reward against KL to the SFT model", _frontier_figure(table))}
<h2>Privacy</h2>
<p>{html.escape(privacy["summary"])}</p>
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
