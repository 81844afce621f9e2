"""The `privdpo` command: parse, load the config, call a recipe. Nothing else lives here.

User mistakes (`UserError`) are printed as one clear message with exit code 2 and no
traceback; anything else is a bug and keeps its traceback. Under torchrun each message
names its rank, and every process leaves the process group on its way out.
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
# Packed batches change shape every step; expandable segments keep the CUDA caching
# allocator from fragmenting (and reserving far more than it uses). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from privdpo.config import (  # noqa: E402
    AuditSection,
    DemoRunConfig,
    DPORunConfig,
    EvalRunConfig,
    InspectRunConfig,
    PairsRunConfig,
    ScrubRunConfig,
    SFTRunConfig,
    describe_config,
    load_config,
    read_yaml,
)
from privdpo.errors import UserError  # noqa: E402


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


def _pairs(args: argparse.Namespace) -> None:
    from privdpo.pairs import run_pairs

    run_pairs(load_config(PairsRunConfig, args.config, args.overrides))


def _report(args: argparse.Namespace) -> None:
    from privdpo.report import main_report

    main_report(args.run_dir)


def _sweep(args: argparse.Namespace) -> None:
    from privdpo.sweep import run_sweep

    run_sweep(args.config, args.grid, args.overrides, args.metric)


def _scrub(args: argparse.Namespace) -> None:
    from privdpo.prep.scrub import run_scrub

    run_scrub(args.input, args.output, load_config(ScrubRunConfig, None, args.overrides))


def _inspect(args: argparse.Namespace) -> None:
    from privdpo.prep.inspect import run_inspect

    run_inspect(args.data, args.overrides)


def _privacy_plan(args: argparse.Namespace) -> None:
    """The DP plan of a config (units, q, steps, sigma, C, epsilon, delta), no training;
    at user level also the table over contribution bounds k and ELS/ULS."""
    from privdpo.data.loading import require_user_ids
    from privdpo.data.preference import load_preference_data
    from privdpo.data.sft import load_sft_data
    from privdpo.models import load_model_and_tokenizer
    from privdpo.privacy.contributions import units_per_user
    from privdpo.privacy.planning import (
        format_plan,
        plan_from_config,
        plan_user_level,
        privacy_units,
    )
    from privdpo.training import planned_steps

    is_dpo = "dpo" in read_yaml(args.config)
    cfg = load_config(DPORunConfig if is_dpo else SFTRunConfig, args.config, args.overrides)
    if not cfg.privacy.enabled:
        raise UserError("privacy.enabled is false in this config: there is no privacy plan")
    _, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    if is_dpo:
        items, _, _ = load_preference_data(cfg.data, tokenizer, cfg.train.seed, cfg.scrub)
    else:
        items, _, _ = load_sft_data(
            cfg.data, tokenizer, cfg.sft.completion_only_loss, cfg.train.seed, cfg.scrub
        )
    require_user_ids(items, cfg)
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


def _privacy_verify(args: argparse.Namespace) -> None:
    """Recompute every epsilon of a run from its ledger with plain dp-accounting."""
    from privdpo.privacy.verify import report, verify

    checks = verify(args.run_dir)
    print(report(checks))
    bad = [c["name"] for c in checks if not c["matches"] or c["below_default"]]
    if bad:
        raise UserError(f"privacy verify: {', '.join(bad)} did not reproduce (see the table above)")


def _audit(args: argparse.Namespace) -> None:
    from privdpo.recipes.audit import run_audit

    run_audit(args.config, list(args.overrides))


def _demo(args: argparse.Namespace) -> None:
    from privdpo.demo import run_demo

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config:  # no config file: the first override
        config, overrides = None, [config, *overrides]
    if args.output:
        overrides.append(f"output.dir={args.output}")
    run_demo(load_config(DemoRunConfig, config, overrides))


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

    pairs = commands.add_parser(
        "pairs",
        help="on-policy preference pairs: sample, judge, keep best vs worst (DPO data)",
        description="Sample several completions per prompt from a model (a run directory or a"
        " model directory), score them with a local judge, and write the best against the"
        " worst of each prompt as a JSONL preference file for privdpo dpo.",
        epilog="config keys (YAML sections; override any as section.key=value):\n"
        + describe_config(PairsRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    pairs.add_argument("config", help="YAML config file")
    pairs.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    pairs.set_defaults(func=_pairs)

    report = commands.add_parser(
        "report",
        help="write the HTML report of a run directory",
        description="Write RUN_DIR/report.html: one self-contained file (config, data summary,"
        " curves, privacy statement, evaluation, samples). Every run also writes it at its end.",
    )
    report.add_argument("run_dir", help="a run directory (the output.dir of a run)")
    report.set_defaults(func=_report)

    sweep = commands.add_parser(
        "sweep",
        help="train one run per point of a grid (e.g. beta x epsilon) and compare them",
        description="Train one sft or dpo run per point of a grid of config values, one after"
        " another, each in OUTPUT_DIR/<point> (output.dir of CONFIG is the sweep directory),"
        " and write OUTPUT_DIR/sweep.json and sweep.html: every point's values, metric, epsilon"
        " and status, the privacy-utility curve (metric vs epsilon), the beta curve (metric vs"
        " dpo.beta) and the best point by --metric, marked.",
        epilog="""grid: each KEY=V1,V2,... after --grid is an axis (values read like overrides;
  a comma inside [...] stays in its value); points are every combination, named like
  beta-0.1_target_epsilon-8. privacy.target_epsilon=inf is a non-private point
  (privacy.enabled=false); any other epsilon turns privacy on. Every point's config is
  checked before anything runs. A key=value of one value (before or after --grid) is an
  override, the same for every point.
resume: run the same command again. A finished point is reused, an interrupted one resumes
  from its last checkpoint, one with no checkpoint starts over; one line says which.
metric: the last logged value of a metrics.jsonl metric, or a metric of the point's
  eval.json (e.g. win_rate, once you ran privdpo eval on each point); lower is better
  when the name has loss or perplexity in it, else higher.

example:
  privdpo sweep examples/sweep_tiny.yaml --grid dpo.beta=0.1,0.5 privacy.target_epsilon=8,inf""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument("config", help="YAML config of an sft or dpo run (a dpo section: dpo)")
    sweep.add_argument(
        "overrides", nargs="*", metavar="key=value", help="dotted overrides for every point"
    )
    sweep.add_argument(
        "--grid",
        nargs="+",
        action="extend",
        required=True,
        metavar="KEY=V1,V2",
        help="axes of the grid, e.g. dpo.beta=0.05,0.1,0.5 privacy.target_epsilon=1,4,8,inf",
    )
    sweep.add_argument(
        "--metric",
        help="metric that picks the best point (default: eval/rewards/accuracies for dpo,"
        " eval/loss for sft)",
    )
    sweep.set_defaults(func=_sweep)

    scrub = commands.add_parser(
        "scrub",
        help="replace personal identifiers in a data file (Presidio, Korean patterns)",
        description="Find e-mail addresses, phone numbers (Korean and international), credit"
        " cards, IBANs, IP addresses, URLs, US SSNs and Korean resident and business"
        " registration numbers in the text fields of INPUT (and, with a local spaCy pipeline,"
        " names and places), and write OUTPUT with each replaced by a typed placeholder"
        " (<EMAIL>) or a salted pseudonym. Every row and every other field is kept. Writes"
        " scrub_summary.json beside OUTPUT: counts per entity type and field, never a value.",
        epilog="config keys (override any as section.key=value):\n"
        + describe_config(ScrubRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    scrub.add_argument("input", help="data file (.jsonl .json .csv .parquet)")
    scrub.add_argument("output", help="scrubbed file to write, in INPUT's format")
    scrub.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    scrub.set_defaults(func=_scrub)

    inspect = commands.add_parser(
        "inspect",
        help="what is in preference (or SFT) data: length bias, duplicates, overlap, ...",
        description="Inspect DATA, a data file or the YAML config of an sft/dpo run: length"
        " bias (share of pairs whose chosen is longer, mean length difference in tokens),"
        " exact and near-duplicate prompts, prompts shared by train and eval, contradictory"
        " pairs, chosen equal to rejected, empty or truncated responses at data.max_length,"
        " and pairs per user (counts only, never an id). Prints a table and writes"
        " inspect.json.",
        epilog="config keys (override any as section.key=value):\n"
        + describe_config(InspectRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inspect.add_argument("data", help="data file, or the YAML config of a run")
    inspect.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    inspect.set_defaults(func=_inspect)

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
    check = privacy_commands.add_parser(
        "verify",
        help="recompute every epsilon of a run from its ledger with plain dp-accounting",
        description="Recompute every epsilon in RUN_DIR/privacy.json (this run's and the"
        " end-to-end one) from the ledger with plain dp-accounting calls, and print both.",
    )
    check.add_argument("run_dir", metavar="RUN_DIR")
    check.set_defaults(func=_privacy_verify)

    audit = commands.add_parser(
        "audit",
        help="canaries in the configured run and an empirical lower bound on epsilon",
        description="Run the configured SFT or DPO training (same model, data, unit and privacy"
        " settings) with privacy-audit canaries, and report the one-run empirical lower bound"
        " on epsilon (Steinke, Nasr and Jagielski 2023) next to the proven epsilon. Exits"
        " non-zero when the bound is above the proven epsilon (a bug).",
        epilog="audit keys (an `audit` section of the config, or audit.key=value):\n"
        + describe_config(AuditSection),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    audit.add_argument("config", help="the SFT or DPO YAML config to audit")
    audit.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    audit.set_defaults(func=_audit)

    demo = commands.add_parser(
        "demo",
        help="the offline end-to-end example: SFT, on-policy pairs, DPO and user-level DP-DPO",
        description="The DPO paper's controlled sentiment experiment, offline and small: a"
        " generated review corpus, SFT from random init, pairs judged by a sentiment lexicon,"
        " DPO with and without user-level DP, evaluation and demo.html.",
        epilog="config keys (YAML sections; override any as section.key=value):\n"
        + describe_config(DemoRunConfig),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("config", nargs="?", help="optional YAML config (a demo section)")
    demo.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides")
    demo.add_argument("--output", default=None, help="the demo directory (output.dir)")
    demo.set_defaults(func=_demo)
    return parser


# The commands that spread over torchrun's processes; the others run as one process.
TORCHRUN_COMMANDS = ("sft", "dpo")


def _torchrun_rank() -> str | None:
    """This process's rank when torchrun started several (WORLD_SIZE > 1), else None."""
    return os.environ.get("RANK", "?") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may also follow a flag (`sft CONFIG --resume key=value`); argparse leaves
    # those over. Anything else left over is a real error.
    unknown = [a for a in rest if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*getattr(args, "overrides", []), *rest]
    rank = _torchrun_rank()
    where = f" [rank {rank}]" if rank is not None else ""  # torchrun: which rank speaks
    if rank is not None and args.command not in TORCHRUN_COMMANDS:
        print(
            f"privdpo {args.command}{where}: error: privdpo {args.command} runs as one process;"
            f" run it without torchrun (only {' and '.join(TORCHRUN_COMMANDS)} spread over"
            " several processes)",
            file=sys.stderr,
        )
        return 2
    try:
        args.func(args)
        if rank is not None:  # every rank finished: leave the group together
            from privdpo.distributed import close_world

            close_world(wait_for_peers=True)
    except UserError as e:
        print(f"privdpo {args.command}{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"privdpo {args.command}{where}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if rank is not None:
            from privdpo.distributed import lost_a_peer

            if lost_a_peer(e):  # not this rank's fault: the rank that ended says why
                print(
                    f"privdpo {args.command}{where}: stopped: another rank ended (its error"
                    " is the cause)",
                    file=sys.stderr,
                )
                return 1
            # A bug: its traceback follows, and says nothing of the rank.
            print(f"privdpo {args.command}{where}: failed (traceback below)", file=sys.stderr)
        raise
    finally:
        # Leave the process group, also when this rank failed, so the process exits cleanly.
        # Only a process that loaded torch can have joined one; the others skip its import.
        if "torch" in sys.modules:
            from privdpo.distributed import close_world

            close_world()
    return 0


if __name__ == "__main__":
    sys.exit(main())
