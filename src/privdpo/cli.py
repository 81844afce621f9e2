"""The `privdpo` command: parse, load the config, call a recipe. Nothing else lives here.

User mistakes (`UserError`) are printed as one clear message with exit code 2 and no
traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

# Offline always: set before transformers, datasets or huggingface_hub are imported, so no
# code path can reach a hub even by accident.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ[_var] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

from privdpo.config import (  # noqa: E402
    DPORunConfig,
    EvalRunConfig,
    SFTRunConfig,
    describe_config,
    load_config,
)
from privdpo.errors import UserError  # noqa: E402

DEMO_DIR = "runs/demo"


def _sft(args: argparse.Namespace) -> None:
    from privdpo.recipes.sft import run_sft

    cfg = load_config(SFTRunConfig, args.config, args.overrides)
    run_sft(cfg, resume=args.resume)


def _dpo(args: argparse.Namespace) -> None:
    from privdpo.recipes.dpo import run_dpo

    cfg = load_config(DPORunConfig, args.config, args.overrides)
    run_dpo(cfg, resume=args.resume)


def _eval(args: argparse.Namespace) -> None:
    from privdpo.recipes.eval import run_eval

    run_eval(load_config(EvalRunConfig, args.config, args.overrides))


def _report(args: argparse.Namespace) -> None:
    from privdpo.report import main_report

    main_report(args.run_dir)


def _privacy_plan(args: argparse.Namespace) -> None:
    """The DP plan of a config (units, q, steps, sigma, C, epsilon, delta), no training;
    at user level also the table over contribution bounds k and ELS/ULS."""
    import yaml

    from privdpo.data.preference import load_preference_data
    from privdpo.data.sft import load_sft_data
    from privdpo.models import load_model_and_tokenizer
    from privdpo.privacy.dpsgd import plan_from_config, privacy_units
    from privdpo.privacy.user_level import format_plan, plan_user_level, units_per_user
    from privdpo.training import planned_steps

    is_dpo = "dpo" in (yaml.safe_load(open(args.config, encoding="utf-8")) or {})
    cfg = load_config(DPORunConfig if is_dpo else SFTRunConfig, args.config, args.overrides)
    if not cfg.privacy.enabled:
        raise UserError("privacy.enabled is false in this config: there is no privacy plan")
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    if is_dpo:
        items, _, _ = load_preference_data(cfg.data, tokenizer, cfg.train.seed)
    else:
        items, _, _ = load_sft_data(
            cfg.data, tokenizer, cfg.sft.completion_only_loss, cfg.train.seed
        )
    unit = "pair" if is_dpo else "example"
    steps = planned_steps(len(items), cfg.train)
    _, groups, users = privacy_units(cfg, items, unit, steps)
    plan = plan_from_config(cfg, groups, steps, users)
    algorithm = f"user-level DP-SGD, {users.algorithm.upper()}" if users else "DP-SGD"
    print(f"privacy plan for {args.config} ({'dpo' if is_dpo else 'sft'}, {algorithm}):")
    print(plan.table())
    if users is not None and cfg.privacy.target_epsilon is not None:
        counts = list(units_per_user([it.user_id for it in items]).values())
        rows = plan_user_level(
            counts,
            cfg.train.batch_size,
            steps,
            cfg.privacy.target_epsilon,
            plan.delta,
        )
        print(
            f"\ncontribution bounds k for target epsilon {cfg.privacy.target_epsilon}"
            f" (delta {plan.delta:.3g}), {len(counts)} users, {len(items)} {unit}s:"
        )
        print(format_plan(rows))


def _demo(args: argparse.Namespace) -> None:
    from privdpo.data.sft import sample_data_path
    from privdpo.recipes.sft import run_sft

    overrides = [
        "model.preset=tiny",
        f"data.train={sample_data_path()}",
        "data.eval_fraction=0.1",
        "data.max_length=128",
        f"output.dir={args.output}",
        "output.overwrite=true",
        "train.epochs=12",
        "train.batch_size=16",
        "train.micro_batch_size=16",
        "train.lr=3e-3",
        "train.warmup_steps=10",
        "train.eval_every=50",
        "train.save_every=100",
    ]
    cfg = load_config(SFTRunConfig, None, overrides + args.overrides)
    print("privdpo demo: SFT of the built-in tiny model on the bundled sample reviews (offline)")
    exported = run_sft(cfg)
    _show_samples(exported["model"])
    print(f"\ndemo finished. The trained model is in {exported['model']}")
    print(
        "Load it with: AutoModelForCausalLM.from_pretrained"
        f"('{exported['model']}') (plain transformers, no privdpo needed)"
    )


def _show_samples(model_dir) -> None:
    """Greedy completions of two sample prompts by the exported model, loaded back with
    plain transformers as a user would."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    print("\nsamples from the exported model (greedy):")
    for prompt in (
        "Write a short positive review of a movie.\n",
        "Write a short negative review of a phone.\n",
    ):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        out = model.generate(ids, max_new_tokens=40, do_sample=False)
        completion = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"  {prompt.strip()!r} -> {completion.strip()!r}")


def _add_recipe(commands, name: str, config_cls, func, help: str, description: str) -> None:
    """A training command: CONFIG, key=value overrides, --resume, and every key in --help."""
    recipe = commands.add_parser(
        name,
        help=help,
        description=description,
        epilog="config keys (YAML sections; override any as section.key=value):\n"
        + describe_config(config_cls),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipe.add_argument("config", help="YAML config file")
    recipe.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    recipe.add_argument("--resume", action="store_true", help="continue the run in output.dir")
    recipe.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="privdpo",
        description="On-premises SFT and DPO with differential privacy. Everything runs offline.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    _add_recipe(
        commands,
        "sft",
        SFTRunConfig,
        _sft,
        "supervised fine-tuning",
        "Supervised fine-tuning of a local model on local data.",
    )
    _add_recipe(
        commands,
        "dpo",
        DPORunConfig,
        _dpo,
        "preference optimization (DPO, IPO, cDPO, robust, hinge, RPO, SimPO, ORPO)",
        "Preference optimization of a local model on local preference pairs.",
    )

    evaluate = commands.add_parser(
        "eval",
        help="evaluate a model against its reference: margins, KL, win rate, samples",
        description="Evaluate a model (a run directory or a model directory) against its"
        " reference on local held-out pairs and prompts with a local judge; writes eval.json.",
        epilog="config keys (YAML sections; override any as section.key=value):\n"
        + describe_config(EvalRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("config", help="YAML config file")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    evaluate.set_defaults(func=_eval)

    report = commands.add_parser(
        "report",
        help="write the HTML report of a run directory",
        description="Write RUN_DIR/report.html: one self-contained file (config, data summary,"
        " curves, privacy statement, evaluation, samples). Every run also writes it at its end.",
    )
    report.add_argument("run_dir", help="a run directory (the output.dir of a run)")
    report.set_defaults(func=_report)

    privacy = commands.add_parser(
        "privacy", help="differential privacy tools", description="Differential privacy tools."
    )
    privacy_commands = privacy.add_subparsers(dest="privacy_command", required=True)
    plan = privacy_commands.add_parser(
        "plan",
        help="print the noise, epsilon and sampling plan of a config, without training",
        description="Print the DP-SGD plan of a config (units, sampling rate, steps, noise"
        " multiplier, clipping norm, epsilon, delta, accountant) without training.",
    )
    plan.add_argument("config", help="YAML config file (an sft or a dpo config)")
    plan.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    plan.set_defaults(func=_privacy_plan)

    demo = commands.add_parser(
        "demo",
        help="the offline end-to-end example",
        description="Train the built-in tiny model on bundled sample data, offline.",
    )
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    demo.add_argument("--output", default=DEMO_DIR, help=f"run directory (default {DEMO_DIR})")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may also follow a flag (`sft CONFIG --resume key=value`); argparse leaves
    # those over. Anything else left over is a real error.
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    try:
        args.func(args)
    except UserError as e:
        print(f"privdpo {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"privdpo {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
