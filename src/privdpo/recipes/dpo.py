"""Preference optimization: `privdpo dpo CONFIG [key=value ...] [--resume]`.

The SFT loop's machinery (schedule, accumulation, clipping, checkpoints, exact resume,
export) around a different step: each micro-batch scores chosen and rejected in one
forward pass, the reference gives its log-probs, and a loss from `losses.py` turns the
four numbers per pair into a loss. Per-pair losses are summed and divided by the number of
pairs in the logical batch, so micro-batching does not change the step.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from privdpo.checkpoint import (
    save_checkpoint,
)
from privdpo.config import DPORunConfig
from privdpo.data.batching import pair_batch
from privdpo.data.loading import require_user_ids
from privdpo.data.preference import PairExample, load_preference_data
from privdpo.distributed import check_same, init_world
from privdpo.logprobs import sequence_logps
from privdpo.losses import LossParams, PairLogps, preference_loss
from privdpo.models import add_lora, load_model_and_tokenizer
from privdpo.prep.inspect import inspect_pairs, save_inspection
from privdpo.privacy.dpsgd import DPSGD
from privdpo.privacy.lineage import RunLineage
from privdpo.privacy.planning import privacy_units
from privdpo.profiling import StepProfiler
from privdpo.reference import build_reference, precompute
from privdpo.training import (
    EarlyStopping,
    batch_layout,
    check_run_dir,
    clip_gradients,
    configure_model,
    create_run_dir,
    finish_run,
    logical_batch,
    make_logger,
    make_optimizer,
    make_scheduler,
    micro_batches,
    pick_device,
    planned_steps,
    record_eval,
    reduce_gradients,
    reduce_metrics,
    resume_run,
    run_state,
    shard_model,
    steps_per_epoch,
    use_compile,
)

PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


def loss_params(cfg: DPORunConfig) -> LossParams:
    d = cfg.dpo
    return LossParams(
        beta=d.beta,
        label_smoothing=d.label_smoothing,
        rpo_alpha=d.rpo_alpha,
        simpo_gamma=d.simpo_gamma,
        orpo_lambda=d.orpo_lambda,
    )


def build_pair_batch(pairs: list[PairExample], cfg: DPORunConfig, pad_id: int, item_unit=None):
    """The host `TokenBatch` of `pairs` as the train config lays it out."""
    t = cfg.train
    return pair_batch(pairs, pad_id, batch_layout(t), t.share_prompt and t.packing, item_unit)


def pair_forward(
    model, reference, pairs: list[PairExample], batch, cfg, sink=None, compiled: bool = False
):
    """Per-pair losses [B] and the per-pair values behind the metrics (detached), for the
    `batch` of `pairs` (on the model's device); `compiled`: compile the head's tile work
    (`training.use_compile`), the policy's and an adapter-disabled reference's."""
    attention = cfg.train.attention
    logps, num_tokens = sequence_logps(model, batch, sink, attention, compiled)  # both responses
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = num_tokens.chunk(2)
    ref_chosen = ref_rejected = None
    if reference.kind != "none":
        ref_chosen, ref_rejected = reference.logps(pairs, batch, attention, compiled)
    out = preference_loss(
        cfg.dpo.loss,
        PairLogps(chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen, ref_rejected),
        loss_params(cfg),
    )
    values = {
        "rewards/chosen": out.chosen_rewards,
        "rewards/rejected": out.rejected_rewards,
        "rewards/accuracies": (out.chosen_rewards > out.rejected_rewards).float(),
        "rewards/margins": out.chosen_rewards - out.rejected_rewards,
        "logps/chosen": chosen.detach(),
        "logps/rejected": rejected.detach(),
    }
    return out.losses, values


def metric_sums(losses: torch.Tensor, values: dict) -> torch.Tensor:
    """[1 + len(PAIR_METRICS)] sums over the micro-batch's pairs, on the device (no sync)."""
    return torch.stack([losses.detach().sum(), *(values[k].sum() for k in PAIR_METRICS)])


@torch.no_grad()
def evaluate(model, reference, pairs, cfg, pad_id, device, compiled: bool = False) -> dict:
    """Mean loss and pair metrics over the held-out pairs, with dropout off."""
    was_training = model.training
    model.eval()
    sums = None
    for chunk in micro_batches(pairs, cfg.train.micro_batch_size):
        batch = build_pair_batch(chunk, cfg, pad_id).to(device)
        losses, values = pair_forward(model, reference, chunk, batch, cfg, None, compiled)
        part = metric_sums(losses, values)
        sums = part if sums is None else sums + part
    model.train(was_training)
    names = ["loss", *PAIR_METRICS]
    return {f"eval/{k}": v / len(pairs) for k, v in zip(names, sums.tolist(), strict=True)}


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_dpo(cfg: DPORunConfig, resume: bool = False, audit=None) -> dict[str, Path]:
    # ---- setup -----------------------------------------------------------------------
    # Everything that can fail on a user mistake runs before the run directory is written.
    check_run_dir(cfg, resume)
    world = init_world(cfg.train.device)  # one process, or this rank of torchrun's
    if not cfg.output.progress_bar or not world.is_main:
        hf_logging.disable_progress_bar()
    device = pick_device(cfg.train.device, world)
    compiled = use_compile(cfg, device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    train, evals, summary = load_preference_data(cfg.data, tokenizer, cfg.train.seed, cfg.scrub)
    require_user_ids(train, cfg)
    inspection = inspect_pairs(train, evals, summary, cfg.data.max_length)
    if audit is not None:  # `privdpo audit`: its canaries join the training data
        train = train + audit.training_items(train, tokenizer)
    # Steps are fixed before the user-level cap (a compute budget the same for every k).
    total_steps = planned_steps(len(train), cfg.train)
    # The private run's units; at user level each user's pairs are capped at k here.
    train, groups, users = privacy_units(cfg, train, "pair", total_steps)
    # Where this run stands in its lineage, said (or refused) before anything is written.
    unit = None if not cfg.privacy.enabled else ("user" if users is not None else "pair")
    lineage = RunLineage.begin(cfg, "dpo", train, evals, summary, unit)
    reference = build_reference(cfg, model, device, compiled)
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.model.lora)
    if reference.kind == "adapter_disabled":
        reference.policy = model
    if cfg.dpo.disable_dropout:
        _disable_dropout(model)
    configure_model(model, cfg.train, compiled, cfg.privacy.enabled)
    model.to(device)
    shard_model(model, cfg.train, world)
    model.train()
    pad_id = tokenizer.pad_token_id
    run_dir = create_run_dir(cfg, resume, world)
    if world.is_main:
        summary.save(run_dir / "data_summary.json")
        save_inspection(inspection, run_dir)
    print(summary.table())
    print(f"reference policy: {reference.kind}; loss: {cfg.dpo.loss}, beta={cfg.dpo.beta}")
    if cfg.dpo.precompute_reference and reference.kind != "none":
        path, reused = precompute(
            reference, cfg, train + evals, pad_id, device, cfg.train.micro_batch_size, world.is_main
        )
        print(f"reference log-probs {'reused from' if reused else 'computed and cached in'} {path}")

    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    dp = DPSGD.from_config(cfg, model, groups, total_steps, users, world)
    if audit is not None and dp is not None:
        audit.attach(dp, model)
    stopper = EarlyStopping(
        cfg.train.early_stopping_metric or "eval/rewards/accuracies",
        cfg.train.early_stopping_patience,
        cfg.train.early_stopping_min_delta,
    )

    step = 0
    if resume:
        step = resume_run(run_dir, model, optimizer, scheduler, stopper, dp, total_steps)
    logger = make_logger(run_dir, step if resume else None, world)
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not cfg.output.progress_bar or not world.is_main,
        desc="dpo",
    )
    stop_reason = None
    if evals and cfg.train.eval_at_start and step == 0:
        eval_metrics = evaluate(model, reference, evals, cfg, pad_id, device, compiled)
        record_eval(0, eval_metrics, logger, stopper, run_dir, model, world)

    # ---- train -----------------------------------------------------------------------
    # The step never waits for the GPU: metrics stay on the device and are read (one sync)
    # on logging steps only, where the wall time since the last one is also taken.
    log_steps = [s for s in range(step + 1, total_steps + 1) if s % cfg.train.log_every == 0]
    if dp is not None:
        dp.plan_logged_epsilons(log_steps + [total_steps])
    interval = {"started": time.perf_counter(), "tokens": 0, "steps": 0}
    share = cfg.train.share_prompt and cfg.train.packing
    profiler = StepProfiler(run_dir, cfg.train.profile and world.is_main, step, total_steps)
    while step < total_steps and stop_reason is None:
        if dp is not None and dp.out_of_budget():
            stop_reason = dp.budget_message()
            break
        profiler.before(step)
        chunks, every, units = logical_batch(step, train, cfg.train, dp, share, world)
        num_pairs = max(1, len(every))  # the whole logical batch's, on every rank
        sums = None
        for chunk, item_unit, weight in chunks:
            host = build_pair_batch(chunk, cfg, pad_id, item_unit)
            batch = host.to(device)
            if dp is None:
                losses, values = pair_forward(model, reference, chunk, batch, cfg, None, compiled)
                (losses.sum() / num_pairs).backward()
            else:  # the pair (or the user's pairs) is the unit; a user's loss is their mean
                with dp.micro_batch(host):
                    losses, values = pair_forward(
                        model, reference, chunk, batch, cfg, dp.head_sink, compiled
                    )
                    (losses * weight.to(device, non_blocking=True)).sum().backward()
            part = metric_sums(losses, values)
            sums = part if sums is None else sums + part
            interval["tokens"] += host.num_tokens
        trainable = [p for p in model.parameters() if p.requires_grad]
        logging = (step + 1) % cfg.train.log_every == 0 or step + 1 == total_steps
        if dp is None:
            reduce_gradients(world, trainable)
            grad_norm = clip_gradients(world, trainable, cfg.train.max_grad_norm)
        else:  # per-unit clipping replaces global clipping
            dp.noise_and_scale(step)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
            if logging:  # noise once for the world: every rank holds the same gradient
                check_same(world, [p.grad for p in trainable], "the noised gradients")
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        profiler.after(step)
        step += 1
        interval["steps"] += 1
        if dp is not None and dp.out_of_budget() and step < total_steps:
            stop_reason = dp.budget_message()

        if logging:
            names = ["loss", *PAIR_METRICS]
            local = sums.tolist() if sums is not None else [0.0] * len(names)  # none here
            *values, interval["tokens"] = reduce_metrics(world, [*local, interval["tokens"]])
            metrics = {k: v / num_pairs for k, v in zip(names, values, strict=True)}
            seconds = time.perf_counter() - interval["started"]  # after the sync above
            if dp is not None:
                metrics["privacy/batch_size"] = len(units)
                metrics["privacy/epsilon"] = dp.logged_epsilon()
            logger.log(
                step,
                {
                    **metrics,
                    "grad_norm": grad_norm.item(),
                    "learning_rate": lr,
                    "tokens_per_second": interval["tokens"] / seconds,
                    "step_seconds": seconds / interval["steps"],
                    "epoch": step / steps_per_epoch(len(train), cfg.train.batch_size),
                },
            )
            bar.set_postfix(
                loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}"
            )
            interval = {"started": time.perf_counter(), "tokens": 0, "steps": 0}
        bar.update(1)
        if evals and (
            (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total_steps
        ):
            eval_metrics = evaluate(model, reference, evals, cfg, pad_id, device, compiled)
            stopped = record_eval(step, eval_metrics, logger, stopper, run_dir, model, world)
            stop_reason = stop_reason or stopped
        if (
            (cfg.train.save_every and step % cfg.train.save_every == 0)
            or step == total_steps
            or stop_reason
        ):
            save_checkpoint(
                run_dir,
                step,
                model,
                optimizer,
                scheduler,
                run_state(stopper, dp),
                cfg.train.keep_checkpoints,
                world,
            )
            interval["started"] = time.perf_counter()  # saving is not training time
    bar.close()
    logger.close()
    if dp is not None:
        dp.stop_epsilons()
    return finish_run(
        cfg,
        run_dir,
        model,
        tokenizer,
        step,
        stopper,
        stop_reason,
        dp,
        lineage,
        world,
        audit_run=audit is not None,
    )
