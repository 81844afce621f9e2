"""The machinery every recipe shares: run directory, device, optimizer, schedule, data order.

Recipes stay explicit loops; these are the small pieces they would otherwise copy.
"""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import torch
import yaml

from privdpo.attention import packable
from privdpo.checkpoint import (
    BEST,
    CHECKPOINTS,
    export_model,
    list_checkpoints,
    load_checkpoint,
    load_trainable,
    save_best,
)
from privdpo.config import TrainConfig, dump_yaml, to_dict
from privdpo.data.batching import token_count
from privdpo.distributed import (
    SINGLE,
    all_reduce_sum,
    barrier,
    collective_device,
    share,
    units_share,
)
from privdpo.errors import UserError
from privdpo.metrics import MetricsLogger
from privdpo.models import compile_layers, mark_audit_model
from privdpo.privacy.ledger import PrivacyLedger
from privdpo.report import write_report

# Keys that may differ between a run and its resume: they do not change the result.
RESUME_MAY_DIFFER = {"output.progress_bar"}


def check_run_dir(cfg, resume: bool) -> Path:
    """Check the run directory before anything is loaded or written: a fresh run needs a
    free (or overwritable) directory, a resumed one a run with a checkpoint and the same
    config."""
    run_dir = Path(cfg.output.dir)
    if resume:
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise UserError(
                f"--resume: {run_dir} holds no run (no config.yaml); drop --resume to start one"
            )
        if not list_checkpoints(run_dir):
            raise UserError(
                f"--resume: {run_dir} has no checkpoint yet; start again without --resume"
                " and output.overwrite=true"
            )
        before = _flatten(yaml.safe_load(saved.read_text(encoding="utf-8")))
        now = _flatten(to_dict(cfg))
        changed = sorted(
            k
            for k in before.keys() | now.keys()
            if before.get(k) != now.get(k) and k not in RESUME_MAY_DIFFER
        )
        if changed:
            diffs = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise UserError(
                f"--resume: the config differs from the run's saved config.yaml ({diffs});"
                " a resumed run must use the same settings to continue exactly"
            )
        return run_dir
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        if not cfg.output.overwrite:
            raise UserError(
                f"output.dir: {run_dir} already holds files; pass --resume to continue that"
                " run, choose another output.dir, or set output.overwrite=true to replace it"
            )
        if not (run_dir / "config.yaml").is_file() or run_dir.resolve() == Path.cwd():
            # Overwrite deletes a directory: only ever one that a privdpo run wrote.
            raise UserError(
                f"output.dir: {run_dir} is not a privdpo run directory (no config.yaml);"
                " output.overwrite only replaces earlier runs. Choose another output.dir"
            )
    return run_dir


def create_run_dir(cfg, resume: bool, world=SINGLE) -> Path:
    """Make the (checked) run directory, replacing an old run if asked, and save the
    resolved config (rank 0; the other ranks wait for it)."""
    run_dir = Path(cfg.output.dir)
    if resume or not world.is_main:
        barrier(world)
        return run_dir
    if run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg), encoding="utf-8")
    barrier(world)
    return run_dir


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def pick_device(name: str, world=SINGLE) -> torch.device:
    """The device of `train.device`; with several CUDA processes, this rank's GPU."""
    if world.active and name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", world.local_rank)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device: {name} asked for, but no CUDA GPU is visible")
    return torch.device(name)


def use_compile(cfg, device: torch.device) -> bool:
    """Whether this run compiles its decoder layers, its frozen reference's and the head's
    per-tile work (`train.compile`; auto: on CUDA, where a step is otherwise bound by kernel
    launches and Python; never on the CPU). A private run's layers compute their per-unit
    gradients inside their compiled graphs (`privacy.clipping`)."""
    if cfg.train.compile == "auto":
        return device.type == "cuda"
    return cfg.train.compile


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused (one-kernel) version on a GPU."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=tuple(cfg.adam_betas),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        fused=fused or None,
    )


def configure_model(model, cfg: TrainConfig, compiled: bool, private: bool) -> None:
    """The training-step options that act on the model: packing's precondition, gradient
    checkpointing, torch.compile of each decoder layer (`private`: in graphs of its own, for
    the per-unit gradient hooks). Call on the policy only (after LoRA, after a reference
    copy was taken)."""
    if cfg.packing and not packable(model):
        raise UserError(
            "train.packing: this model has sliding-window attention layers, which packed"
            " batches would ignore; set train.packing=false"
        )
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if compiled:
        compile_layers(model, fresh=private)


def batch_layout(cfg: TrainConfig) -> str:
    return "packed" if cfg.packing else "padded"


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at `step` (0-based): linear warmup, then decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(optimizer, cfg: TrainConfig, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps, cfg.schedule)
    )


def steps_per_epoch(num_units: int, batch_size: int) -> int:
    return math.ceil(num_units / batch_size)


def planned_steps(num_units: int, cfg: TrainConfig) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.epochs * steps_per_epoch(num_units, cfg.batch_size)


def batch_indices(step: int, num_units: int, cfg: TrainConfig) -> list[int]:
    """The units of optimizer step `step`: a seeded shuffle per epoch (or the data's own
    order with `train.shuffle=false`), cut in batches.

    A pure function of (seed, step), so a resumed run reads exactly the same batches. The
    last batch of an epoch may be smaller; no unit is skipped.
    """
    per_epoch = steps_per_epoch(num_units, cfg.batch_size)
    epoch, index = divmod(step, per_epoch)
    order = list(range(num_units))
    if cfg.shuffle:
        random.Random(f"privdpo-data-order-{cfg.seed}-{epoch}").shuffle(order)
    return order[index * cfg.batch_size : (index + 1) * cfg.batch_size]


def micro_batches(
    items: list, size: int, max_tokens: int | None = None, tokens_of=None
) -> list[list]:
    """Consecutive runs of `items`, each of at most `size` items and (when `max_tokens` is
    set) at most `max_tokens` tokens by `tokens_of(item)`; an item over the token cap alone."""
    out: list[list] = []
    tokens = 0
    for item in items:
        n = tokens_of(item) if max_tokens is not None else 0
        if not out or len(out[-1]) >= size or (max_tokens is not None and tokens + n > max_tokens):
            out.append([])
            tokens = 0
        out[-1].append(item)
        tokens += n
    return out


def logical_batch(
    step: int, train: list, cfg: TrainConfig, dp, share_prompt: bool = False, world=SINGLE
) -> tuple[list, list, list[int] | None]:
    """This rank's micro-batches of optimizer step `step`, as (items, item_unit, weight)
    triples; every item of the logical batch (all ranks: what losses are divided by); and
    the units DP sampled (None without DP).

    Without DP: a seeded shuffle cut in batches (`batch_indices`); this rank's contiguous
    share of it, in micro-batches of at most `micro_batch_size` items and
    `micro_batch_tokens` tokens; item_unit and weight are None. With DP: a Poisson sample
    of units (the batch size varies), this rank's every world-size-th unit, each unit's
    items in one micro-batch, with their unit and loss weight (`DPSGD.micro_batches`).
    Both are functions of the seed and the step only, whatever the number of ranks."""

    def tokens_of(item) -> int:
        return token_count(item, share_prompt)

    size, max_tokens = cfg.micro_batch_size, cfg.micro_batch_tokens
    if dp is None:
        items = [train[i] for i in batch_indices(step, len(train), cfg)]
        mine = share(world, items)
        return (
            [(c, None, None) for c in micro_batches(mine, size, max_tokens, tokens_of)],
            items,
            None,
        )
    units = dp.sample(step)
    chunks = [
        ([train[i] for i in items], item_unit, weight)
        for items, item_unit, weight in dp.micro_batches(
            units_share(world, units), size, max_tokens, lambda i: tokens_of(train[i])
        )
    ]
    every = [train[i] for u in units for i in dp.groups[u]]
    return chunks, every, units


def shard_model(model, cfg: TrainConfig, world) -> None:
    """train.parallel=fsdp on several ranks: FSDP2 `fully_shard` on each decoder layer (its
    parameters, gradients and optimizer state sharded over the ranks, gathered layer by
    layer in the forward and backward passes); the embeddings, final norm and head stay
    replicated. A bf16 model computes in bf16 and reduce-scatters its gradients in float32
    (`MixedPrecisionPolicy`), so the sum over ranks is not rounded to bf16 at each step of
    the reduction; `train.fsdp_cpu_offload` keeps the shards and the optimizer state in CPU
    memory (`CPUOffloadPolicy`). Call after the model is on its device, before the
    optimizer."""
    if cfg.parallel != "fsdp" or not world.active:
        return
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    first = next(model.parameters())
    options = {}
    if first.dtype == torch.bfloat16:
        options["mp_policy"] = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32
        )
    if cfg.fsdp_cpu_offload:  # pinned memory for fast copies to a GPU (none to pin on a CPU)
        options["offload_policy"] = CPUOffloadPolicy(pin_memory=first.device.type == "cuda")
    for layer in model.get_decoder().layers:
        fully_shard(layer, **options)


def _sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def reduce_gradients(world, params: list) -> None:
    """Sum the ranks' gradients (the one-process gradient: losses are divided by global
    counts); a rank with nothing to do this step contributes zeros. FSDP2 has already
    reduce-scattered a sharded parameter's gradient as a mean over ranks: times the world
    size, that is the sum."""
    if not world.active:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    all_reduce_sum(world, [p.grad for p in params if not _sharded(p)])
    for p in params:
        if _sharded(p):
            p.grad.mul_(world.size)


def clip_gradients(world, params: list, max_norm: float | None) -> torch.Tensor:
    """Clip the total gradient norm to `max_norm` (None: no clipping); return the norm.
    With sharded parameters the norm sums every rank's shards."""
    limit = max_norm if max_norm is not None else float("inf")
    if not any(_sharded(p) for p in params):
        return torch.nn.utils.clip_grad_norm_(params, limit)
    # With CPU offload the shards' gradients are in CPU memory: their norm goes to the
    # device the collectives run on (NCCL: this rank's GPU), and the factor comes back.
    device = collective_device()
    sharded = [p.grad.to_local().double().pow(2).sum() for p in params if _sharded(p)]
    local = torch.stack(sharded).sum().to(device)
    all_reduce_sum(world, [local])
    plain = [p.grad.double().pow(2).sum().to(device) for p in params if not _sharded(p)]
    total = (local + (torch.stack(plain).sum() if plain else 0.0)).sqrt()
    coef = (limit / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        p.grad.mul_(coef.to(p.grad.device, p.grad.dtype))
    return total.float()


def full_model(model, cfg, world):
    """The model with every parameter whole, for export: `model` itself unless sharded;
    then every rank joins the gather and rank 0 gets an unsharded copy (others None)."""
    if not any(_sharded(p) for p in model.parameters()):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from privdpo.models import add_lora, load_model_and_tokenizer

    full = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not world.is_main:
        return None
    plain, _ = load_model_and_tokenizer(cfg.model, cfg.train.seed)
    if cfg.model.lora.enabled:
        plain = add_lora(plain, cfg.model.lora)
    plain.load_state_dict(full)
    return plain


class EarlyStopping:
    """Stop when an eval metric has not improved by more than `min_delta` for `patience`
    evaluations. Higher is better unless the metric's name says loss or perplexity."""

    def __init__(self, metric: str, patience: int | None, min_delta: float):
        self.metric = metric
        self.patience = patience
        self.min_delta = min_delta
        self.lower_is_better = "loss" in metric or "perplexity" in metric
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def update(self, step: int, metrics: dict) -> bool:
        """Record an evaluation; True when it is the best so far."""
        if self.metric not in metrics:
            raise UserError(
                f"train.early_stopping_metric: {self.metric!r} is not an eval metric; choose"
                f" one of {sorted(k for k in metrics if k.startswith('eval/'))}"
            )
        value = metrics[self.metric]
        if self.best is None:
            improved = True
        else:
            gain = self.best - value if self.lower_is_better else value - self.best
            improved = gain > self.min_delta
        if improved:
            self.best, self.best_step, self.bad_evals = value, step, 0
            return True
        self.bad_evals += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad_evals >= self.patience

    def reason(self) -> str:
        return (
            f"early stopping: {self.metric} did not improve by more than"
            f" {self.min_delta} for {self.bad_evals} evaluations; best {self.best:.6g}"
            f" at step {self.best_step}"
        )

    def state(self) -> dict:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load(self, state: dict) -> None:
        self.best, self.best_step, self.bad_evals = (
            state["best"],
            state["best_step"],
            state["bad_evals"],
        )


def record_eval(
    step: int, metrics: dict, logger, stopper: EarlyStopping, run_dir, model, world=SINGLE
):
    """Log an evaluation and do the early-stopping bookkeeping: keep the best weights
    (only when early stopping is on; rank 0 writes them) and return the reason to stop,
    or None. Every rank evaluates the same model, so every rank decides the same."""
    logger.log(step, metrics)
    if stopper.update(step, metrics) and stopper.patience is not None and world.is_main:
        save_best(run_dir, step, model, {stopper.metric: stopper.best})
    return stopper.reason() if stopper.should_stop else None


def restore_best(stopper: EarlyStopping, step: int, run_dir: Path, model) -> None:
    """With early stopping on, the model to export is the best evaluation's, not the last."""
    if stopper.patience is not None and stopper.best_step not in (None, step):
        load_trainable(run_dir / CHECKPOINTS / BEST, model)
        print(
            f"exporting the best checkpoint: step {stopper.best_step},"
            f" {stopper.metric}={stopper.best:.6g}"
        )


def finish_run(
    cfg,
    run_dir: Path,
    model,
    tokenizer,
    step: int,
    stopper,
    stop_reason,
    dp,
    lineage,
    world=SINGLE,
    audit_run: bool = False,
):
    """Say why training stopped early (if it did), export the best or last weights, and
    write the lineage (and the privacy statement) beside every exported model: rank 0,
    the others wait for it. An audit run's exports (and the run) are marked as soon as
    they exist, so that one cut short after export is marked too; its report is the
    audit's to write."""
    model = full_model(model, cfg, world)  # every rank joins when sharded
    if not world.is_main:
        barrier(world)
        return {}
    if stop_reason:
        print(stop_reason)
        (run_dir / "stopped_early.txt").write_text(stop_reason + "\n", encoding="utf-8")
    restore_best(stopper, step, run_dir, model)
    exported = export_model(model, tokenizer, run_dir, cfg.output.merge_lora)
    if audit_run:
        for directory in [run_dir, *exported.values()]:
            mark_audit_model(directory)
    for kind, path in exported.items():
        print(f"exported {kind}: {path}")
    statement = lineage.finish(run_dir, list(exported.values()), dp)
    if statement is not None:
        print(statement["summary"])
    if not audit_run:  # an audit writes the report once, with its own section
        print(f"report: {write_report(run_dir)}")
    barrier(world)
    return exported


class NullLogger:
    """The metrics logger of ranks other than 0: rank 0 writes the run's metrics."""

    def log(self, step: int, values: dict) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(run_dir: Path, resume_step: int | None, world=SINGLE):
    return MetricsLogger(run_dir, resume_step) if world.is_main else NullLogger()


def reduce_metrics(world, values: list[torch.Tensor | float]) -> list[float]:
    """Sum per-rank metric sums (logging steps only: one collective) and read them."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    all_reduce_sum(world, [t])
    return t.tolist()


def run_state(stopper: EarlyStopping, dp) -> dict:
    """What a checkpoint keeps besides weights and optimizer: early stopping, the ledger."""
    state = {"early_stopping": stopper.state()}
    if dp is not None:
        state["privacy_ledger"] = dp.ledger.to_dict()
    return state


def resume_run(run_dir: Path, model, optimizer, scheduler, stopper, dp, total_steps: int) -> int:
    """Restore the newest checkpoint (with `run_state`'s parts); return its step."""
    last = list_checkpoints(run_dir)[-1]
    state = load_checkpoint(last, model, optimizer, scheduler)
    stopper.load(state["extra"]["early_stopping"])
    if dp is not None:
        dp.ledger = PrivacyLedger.from_dict(state["extra"]["privacy_ledger"])
    print(f"resuming from {last} (step {state['step']} of {total_steps})")
    return state["step"]
