"""Supervised fine-tuning: `privdpo sft CONFIG [key=value ...] [--resume]`.

One explicit loop: setup, then for each optimizer step the logical batch is split into
micro-batches whose losses are accumulated, the gradient norm is clipped, the optimizer
and schedule step, and metrics, evaluation and checkpoints follow on their intervals.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

from privdpo.checkpoint import save_checkpoint
from privdpo.config import SFTRunConfig
from privdpo.data.batching import example_batch
from privdpo.data.loading import require_user_ids
from privdpo.data.sft import Example, load_sft_data
from privdpo.distributed import check_same, init_world
from privdpo.logprobs import sequence_logps, token_logps
from privdpo.losses import sft_loss
from privdpo.models import add_lora, load_model_and_tokenizer
from privdpo.prep.inspect import inspect_examples, save_inspection
from privdpo.privacy.dpsgd import DPSGD
from privdpo.privacy.lineage import RunLineage
from privdpo.privacy.planning import privacy_units
from privdpo.profiling import StepProfiler
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


def build_example_batch(examples: list[Example], cfg: SFTRunConfig, pad_id: int, item_unit=None):
    """The host `TokenBatch` of `examples` as the train config lays it out."""
    return example_batch(examples, pad_id, batch_layout(cfg.train), item_unit)


def example_losses(model, batch, cfg: SFTRunConfig, sink=None, compiled=False) -> torch.Tensor:
    """[B] each example's token-mean NLL: the per-unit loss under differential privacy
    (a unit's loss may depend on that unit only, so no batch-wide token count).
    `compiled`: the head's tile work is compiled (`training.use_compile`)."""
    logps, num_tokens = sequence_logps(model, batch, sink, cfg.train.attention, compiled)
    return -logps / num_tokens.clamp(min=1)


def count_label_tokens(examples: list[Example]) -> int:
    # Labels are shifted by one inside the loss: the first token is never a target.
    return sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)


@torch.no_grad()
def evaluate(
    model, examples: list[Example], cfg: SFTRunConfig, pad_id: int, device, compiled=False
) -> dict:
    """Token-mean NLL over the held-out split (dropout off)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = None, count_label_tokens(examples)
    for chunk in micro_batches(examples, cfg.train.micro_batch_size):
        batch = build_example_batch(chunk, cfg, pad_id).to(device)
        part = sft_loss(token_logps(model, batch, None, cfg.train.attention, compiled), 1)
        total_nll = part if total_nll is None else total_nll + part
    model.train(was_training)
    loss = total_nll.item() / max(1, total_tokens)
    return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp())}


def run_sft(cfg: SFTRunConfig, resume: bool = False, audit=None) -> dict[str, Path]:
    # ---- setup -----------------------------------------------------------------------
    # Everything that can fail on a user mistake runs before the run directory is written.
    check_run_dir(cfg, resume)
    world = init_world(cfg.train.device)  # one process, or this rank of torchrun's
    if not cfg.output.progress_bar or not world.is_main:
        hf_logging.disable_progress_bar()
    device = pick_device(cfg.train.device, world)
    compiled = use_compile(cfg, device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    train, evals, summary = load_sft_data(
        cfg.data, tokenizer, cfg.sft.completion_only_loss, cfg.train.seed, cfg.scrub
    )
    require_user_ids(train, cfg)
    inspection = inspect_examples(train, evals, summary, cfg.data.max_length)
    if audit is not None:  # `privdpo audit`: its canaries join the training data
        train = train + audit.training_items(train, tokenizer)
    # Steps are fixed before the user-level cap (a compute budget the same for every k).
    total_steps = planned_steps(len(train), cfg.train)
    # The private run's units; at user level each user's examples are capped at k here.
    train, groups, users = privacy_units(cfg, train, "example", total_steps)
    # Where this run stands in its lineage, said (or refused) before anything is written.
    unit = None if not cfg.privacy.enabled else ("user" if users is not None else "example")
    lineage = RunLineage.begin(cfg, "sft", train, evals, summary, unit)
    run_dir = create_run_dir(cfg, resume, world)
    if world.is_main:
        summary.save(run_dir / "data_summary.json")
        save_inspection(inspection, run_dir)
    print(summary.table())
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.model.lora)
    configure_model(model, cfg.train, compiled, cfg.privacy.enabled)
    model.to(device)
    shard_model(model, cfg.train, world)
    model.train()
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    pad_id = tokenizer.pad_token_id

    dp = DPSGD.from_config(cfg, model, groups, total_steps, users, world)
    if audit is not None and dp is not None:
        audit.attach(dp, model)
    stopper = EarlyStopping(
        cfg.train.early_stopping_metric or "eval/loss",
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
        desc="sft",
    )
    stop_reason = None
    if evals and cfg.train.eval_at_start and step == 0:
        eval_metrics = evaluate(model, evals, cfg, pad_id, device, compiled)
        record_eval(0, eval_metrics, logger, stopper, run_dir, model, world)

    # ---- train -----------------------------------------------------------------------
    # The step never waits for the GPU: the loss stays on the device and is read (one
    # sync) on logging steps only, where the wall time since the last one is also taken.
    log_steps = [s for s in range(step + 1, total_steps + 1) if s % cfg.train.log_every == 0]
    if dp is not None:
        dp.plan_logged_epsilons(log_steps + [total_steps])
    interval = {"started": time.perf_counter(), "tokens": 0, "steps": 0}
    attention = cfg.train.attention
    profiler = StepProfiler(run_dir, cfg.train.profile and world.is_main, step, total_steps)
    while step < total_steps and stop_reason is None:
        if dp is not None and dp.out_of_budget():
            stop_reason = dp.budget_message()
            break
        profiler.before(step)
        chunks, examples, units = logical_batch(step, train, cfg.train, dp, world=world)
        num_tokens = max(1, count_label_tokens(examples))  # the whole logical batch's
        loss_sum = None
        for chunk, item_unit, weight in chunks:
            host = build_example_batch(chunk, cfg, pad_id, item_unit)
            batch = host.to(device)
            if dp is None:
                loss = sft_loss(token_logps(model, batch, None, attention, compiled), num_tokens)
                loss.backward()
            else:  # each item's loss weighted by 1 / (items of its unit): a unit's mean
                with dp.micro_batch(host):
                    losses = example_losses(model, batch, cfg, dp.head_sink, compiled)
                    (losses * weight.to(device, non_blocking=True)).sum().backward()
                loss = losses.sum() / max(1, len(examples))
            loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
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
            local = loss_sum.item() if loss_sum is not None else 0.0  # nothing here this step
            loss_value, interval["tokens"] = reduce_metrics(world, [local, interval["tokens"]])
            seconds = time.perf_counter() - interval["started"]  # after the sync above
            private = {}
            if dp is not None:
                private = {
                    "privacy/epsilon": dp.logged_epsilon(),
                    "privacy/batch_size": len(units),
                }
            logger.log(
                step,
                {
                    **private,
                    "loss": loss_value,
                    "grad_norm": grad_norm.item(),
                    "learning_rate": lr,
                    "tokens_per_second": interval["tokens"] / seconds,
                    "step_seconds": seconds / interval["steps"],
                    "epoch": step / steps_per_epoch(len(train), cfg.train.batch_size),
                },
            )
            bar.set_postfix(loss=f"{loss_value:.4f}")
            interval = {"started": time.perf_counter(), "tokens": 0, "steps": 0}
        bar.update(1)
        if evals and (
            (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total_steps
        ):
            eval_metrics = evaluate(model, evals, cfg, pad_id, device, compiled)
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
