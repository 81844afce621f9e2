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
from privdpo.data.preference import PairExample, load_preference_data
from privdpo.logprobs import sequence_logps
from privdpo.losses import LossParams, PairLogps, preference_loss
from privdpo.metrics import MetricsLogger
from privdpo.models import add_lora, load_model_and_tokenizer
from privdpo.privacy.dpsgd import DPSGD, privacy_units
from privdpo.reference import build_reference, precompute
from privdpo.training import (
    EarlyStopping,
    check_run_dir,
    create_run_dir,
    finish_run,
    logical_batch,
    make_optimizer,
    make_scheduler,
    micro_batches,
    pick_device,
    planned_steps,
    record_eval,
    resume_run,
    run_state,
    steps_per_epoch,
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


def pair_forward(model, reference, pairs: list[PairExample], cfg, pad_id, device):
    """Per-pair losses [B] and the per-pair values behind the metrics (detached)."""
    batch = {k: v.to(device) for k, v in pair_batch(pairs, pad_id).items()}
    logps, num_tokens = sequence_logps(model, batch)  # chosen and rejected in one pass
    chosen, rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = num_tokens.chunk(2)
    ref_chosen = ref_rejected = None
    if reference.kind != "none":
        ref_chosen, ref_rejected = reference.logps(pairs, batch)
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
    return out.losses, values, int(batch["attention_mask"].sum())


def logical_step_metrics(sums: dict, n: int) -> dict:
    return {k: v / n for k, v in sums.items()}


@torch.no_grad()
def evaluate(model, reference, pairs, cfg, pad_id, device) -> dict:
    """Mean loss and pair metrics over the held-out pairs, with dropout off."""
    was_training = model.training
    model.eval()
    sums = {"loss": 0.0, **{k: 0.0 for k in PAIR_METRICS}}
    for chunk in micro_batches(pairs, cfg.train.micro_batch_size):
        losses, values, _ = pair_forward(model, reference, chunk, cfg, pad_id, device)
        sums["loss"] += losses.sum().item()
        for k in PAIR_METRICS:
            sums[k] += values[k].sum().item()
    model.train(was_training)
    return {f"eval/{k}": v / len(pairs) for k, v in sums.items()}


def _disable_dropout(model) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def run_dpo(cfg: DPORunConfig, resume: bool = False) -> dict[str, Path]:
    # ---- setup -----------------------------------------------------------------------
    # Everything that can fail on a user mistake runs before the run directory is written.
    check_run_dir(cfg, resume)
    if not cfg.output.progress_bar:
        hf_logging.disable_progress_bar()
    device = pick_device(cfg.train.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    train, evals, summary = load_preference_data(cfg.data, tokenizer, cfg.train.seed)
    # Steps are fixed before the user-level cap (a compute budget the same for every k).
    total_steps = planned_steps(len(train), cfg.train)
    # The private run's units; at user level each user's pairs are capped at k here.
    train, groups, users = privacy_units(cfg, train, "pair", total_steps)
    reference = build_reference(cfg, model, device)
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.model.lora)
    if reference.kind == "adapter_disabled":
        reference.policy = model
    if cfg.dpo.disable_dropout:
        _disable_dropout(model)
    model.to(device)
    model.train()
    pad_id = tokenizer.pad_token_id
    run_dir = create_run_dir(cfg, resume)
    summary.save(run_dir / "data_summary.json")
    print(summary.table())
    print(f"reference policy: {reference.kind}; loss: {cfg.dpo.loss}, beta={cfg.dpo.beta}")
    if cfg.dpo.precompute_reference and reference.kind != "none":
        path, reused = precompute(
            reference, cfg, train + evals, pad_id, device, cfg.train.micro_batch_size
        )
        print(f"reference log-probs {'reused from' if reused else 'computed and cached in'} {path}")

    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    dp = DPSGD.from_config(cfg, model, groups, total_steps, users)
    stopper = EarlyStopping(
        cfg.train.early_stopping_metric or "eval/rewards/accuracies",
        cfg.train.early_stopping_patience,
        cfg.train.early_stopping_min_delta,
    )

    step = 0
    if resume:
        step = resume_run(run_dir, model, optimizer, scheduler, stopper, dp, total_steps)
    logger = MetricsLogger(run_dir, resume_step=step if resume else None)
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.output.progress_bar, desc="dpo")
    stop_reason = None
    if evals and cfg.train.eval_at_start and step == 0:
        eval_metrics = evaluate(model, reference, evals, cfg, pad_id, device)
        record_eval(0, eval_metrics, logger, stopper, run_dir, model)

    # ---- train -----------------------------------------------------------------------
    while step < total_steps and stop_reason is None:
        if dp is not None and dp.out_of_budget():
            stop_reason = dp.budget_message()
            break
        started = time.perf_counter()
        chunks, units = logical_batch(step, train, cfg.train, dp)
        pairs = [item for chunk, _, _ in chunks for item in chunk]
        sums = {"loss": 0.0, **{k: 0.0 for k in PAIR_METRICS}}
        seen_tokens = 0
        for chunk, item_unit, weight in chunks:
            if dp is None:
                losses, values, tokens = pair_forward(model, reference, chunk, cfg, pad_id, device)
                (losses.sum() / len(pairs)).backward()
            else:  # rows i (chosen) and B + i (rejected) belong to pair i's unit
                with dp.micro_batch(item_unit, rows_per_item=2):
                    losses, values, tokens = pair_forward(
                        model, reference, chunk, cfg, pad_id, device
                    )
                    (losses * weight.to(losses.device)).sum().backward()
            sums["loss"] += losses.sum().item()  # a CPU-GPU sync per micro-batch
            for k in PAIR_METRICS:
                sums[k] += values[k].sum().item()
            seen_tokens += tokens
        trainable = [p for p in model.parameters() if p.requires_grad]
        if dp is None:
            max_norm = cfg.train.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                trainable, max_norm if max_norm is not None else float("inf")
            )
        else:  # per-unit clipping replaces global clipping
            dp.noise_and_scale(step)
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable])
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        seconds = time.perf_counter() - started
        if dp is not None and dp.out_of_budget() and step < total_steps:
            stop_reason = dp.budget_message()

        metrics = logical_step_metrics(sums, max(1, len(pairs)))
        if dp is not None:
            metrics["privacy/batch_size"] = len(units)
        if step % cfg.train.log_every == 0 or step == total_steps:
            if dp is not None:
                metrics["privacy/epsilon"] = dp.ledger.epsilon()
            logger.log(
                step,
                {
                    **metrics,
                    "grad_norm": grad_norm.item(),
                    "learning_rate": lr,
                    "tokens_per_second": seen_tokens / seconds,
                    "epoch": step / steps_per_epoch(len(train), cfg.train.batch_size),
                },
            )
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", acc=f"{metrics['rewards/accuracies']:.2f}")
        if evals and (
            (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total_steps
        ):
            eval_metrics = evaluate(model, reference, evals, cfg, pad_id, device)
            stopped = record_eval(step, eval_metrics, logger, stopper, run_dir, model)
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
            )
    bar.close()
    logger.close()
    return finish_run(cfg, run_dir, model, tokenizer, step, stopper, stop_reason, dp)
