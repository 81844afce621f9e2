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
from privdpo.data.batching import pad_batch
from privdpo.data.sft import Example, load_sft_data
from privdpo.logprobs import token_logps
from privdpo.losses import sft_loss
from privdpo.metrics import MetricsLogger
from privdpo.models import add_lora, load_model_and_tokenizer
from privdpo.privacy.dpsgd import DPSGD, privacy_units
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


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def micro_batch_loss(model, batch: dict, num_tokens: int) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, mask = token_logps(logits, batch["labels"])
    return sft_loss(logps, mask, num_tokens)


def example_losses(model, batch: dict) -> torch.Tensor:
    """[B] each example's token-mean NLL: the per-unit loss under differential privacy
    (a unit's loss may depend on that unit only, so no batch-wide token count)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps, mask = token_logps(logits, batch["labels"])
    return -logps.sum(-1) / mask.sum(-1).clamp(min=1)


def count_label_tokens(examples: list[Example]) -> int:
    # Labels are shifted by one inside the loss: the first token is never a target.
    return sum(sum(1 for label in e.labels[1:] if label != -100) for e in examples)


@torch.no_grad()
def evaluate(model, examples: list[Example], cfg: SFTRunConfig, pad_id: int, device) -> dict:
    """Token-mean NLL over the held-out split (dropout off)."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, count_label_tokens(examples)
    for chunk in micro_batches(examples, cfg.train.micro_batch_size):
        batch = _to(pad_batch(chunk, pad_id), device)
        total_nll += micro_batch_loss(model, batch, 1).item()
    model.train(was_training)
    loss = total_nll / max(1, total_tokens)
    return {"eval/loss": loss, "eval/perplexity": float(torch.tensor(loss).exp())}


def run_sft(cfg: SFTRunConfig, resume: bool = False) -> dict[str, Path]:
    # ---- setup -----------------------------------------------------------------------
    # Everything that can fail on a user mistake runs before the run directory is written.
    check_run_dir(cfg, resume)
    if not cfg.output.progress_bar:
        hf_logging.disable_progress_bar()
    device = pick_device(cfg.train.device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    train, evals, summary = load_sft_data(
        cfg.data, tokenizer, cfg.sft.completion_only_loss, cfg.train.seed
    )
    # Steps are fixed before the user-level cap (a compute budget the same for every k).
    total_steps = planned_steps(len(train), cfg.train)
    # The private run's units; at user level each user's examples are capped at k here.
    train, groups, users = privacy_units(cfg, train, "example", total_steps)
    run_dir = create_run_dir(cfg, resume)
    summary.save(run_dir / "data_summary.json")
    print(summary.table())
    if cfg.model.lora.enabled:
        model = add_lora(model, cfg.model.lora)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, cfg.train)
    scheduler = make_scheduler(optimizer, cfg.train, total_steps)
    pad_id = tokenizer.pad_token_id

    dp = DPSGD.from_config(cfg, model, groups, total_steps, users)
    stopper = EarlyStopping(
        cfg.train.early_stopping_metric or "eval/loss",
        cfg.train.early_stopping_patience,
        cfg.train.early_stopping_min_delta,
    )

    step = 0
    if resume:
        step = resume_run(run_dir, model, optimizer, scheduler, stopper, dp, total_steps)
    logger = MetricsLogger(run_dir, resume_step=step if resume else None)
    bar = tqdm(total=total_steps, initial=step, disable=not cfg.output.progress_bar, desc="sft")
    stop_reason = None
    if evals and cfg.train.eval_at_start and step == 0:
        eval_metrics = evaluate(model, evals, cfg, pad_id, device)
        record_eval(0, eval_metrics, logger, stopper, run_dir, model)

    # ---- train -----------------------------------------------------------------------
    while step < total_steps and stop_reason is None:
        if dp is not None and dp.out_of_budget():
            stop_reason = dp.budget_message()
            break
        started = time.perf_counter()
        chunks, units = logical_batch(step, train, cfg.train, dp)
        examples = [item for chunk, _, _ in chunks for item in chunk]
        num_tokens = count_label_tokens(examples)
        loss_sum, seen_tokens = 0.0, 0
        for chunk, item_unit, weight in chunks:
            batch = _to(pad_batch(chunk, pad_id), device)
            if dp is None:
                loss = micro_batch_loss(model, batch, max(1, num_tokens))
                loss.backward()
            else:  # each item's loss weighted by 1 / (items of its unit): a unit's mean
                with dp.micro_batch(item_unit):
                    losses = example_losses(model, batch)
                    (losses * weight.to(losses.device)).sum().backward()
                loss = losses.sum() / max(1, len(examples))
            loss_sum += loss.item()  # a CPU-GPU sync per micro-batch; fine at this size
            seen_tokens += int(batch["attention_mask"].sum())
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

        if step % cfg.train.log_every == 0 or step == total_steps:
            private = {}
            if dp is not None:
                private = {
                    "privacy/epsilon": dp.ledger.epsilon(),
                    "privacy/batch_size": len(units),
                }
            logger.log(
                step,
                {
                    **private,
                    "loss": loss_sum,
                    "grad_norm": grad_norm.item(),
                    "learning_rate": lr,
                    "tokens_per_second": seen_tokens / seconds,
                    "epoch": step / steps_per_epoch(len(train), cfg.train.batch_size),
                },
            )
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{seen_tokens / seconds:.0f}")
        if evals and (
            (cfg.train.eval_every and step % cfg.train.eval_every == 0) or step == total_steps
        ):
            eval_metrics = evaluate(model, evals, cfg, pad_id, device)
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
