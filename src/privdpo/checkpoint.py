"""Atomic checkpoints, exact resume, and the final export.

A checkpoint is a directory `checkpoints/step-000042/` holding:
- `trainable.safetensors`: the trainable parameters by name (LoRA: the adapters only);
- `optimizer.safetensors` + the optimizer's non-tensor state in `state.json`;
- `rng.safetensors`: torch CPU (and CUDA) generator states;
- `state.json`: step, scheduler state, Python `random` state, recipe extras.
No pickle anywhere, so a checkpoint from elsewhere cannot run code when loaded. The
directory is written under a temporary name and renamed into place, so a crash leaves
either the old checkpoints or a complete new one, never half of one.
"""

from __future__ import annotations

import copy
import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from privdpo.distributed import SINGLE, barrier
from privdpo.models import trainable_parameters

CHECKPOINTS = "checkpoints"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())


def _optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for flat, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(
    run_dir: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    extra: dict,
    keep: int,
    world=SINGLE,
) -> Path:
    """Call on every rank: a replicated model is written by rank 0; a sharded one (FSDP2)
    by every rank through torch.distributed.checkpoint (`dcp/`, reloadable on any number
    of ranks, one included)."""
    if _is_sharded(model):
        return _save_sharded(run_dir, step, model, optimizer, scheduler, extra, keep, world)
    if not world.is_main:
        return run_dir / CHECKPOINTS / f"step-{step:06d}"
    root = run_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    params = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model).items()}
    save_file(params, tmp / "trainable.safetensors")
    opt_tensors, opt_meta = _optimizer_to_flat(optimizer)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"torch_cuda_{i}"] = s
    save_file(rng, tmp / "rng.safetensors")
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    version, internal, gauss = random.getstate()
    _write_json(
        tmp / "state.json",
        {
            "step": step,
            "optimizer": opt_meta,
            "scheduler": sched,
            "python_random": [version, list(internal), gauss],
            "extra": extra,
        },
    )
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and p.is_dir())


def _is_sharded(model) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _save_sharded(run_dir, step, model, optimizer, scheduler, extra, keep, world) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    root = run_dir / CHECKPOINTS
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}"
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    barrier(world)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp / "dcp"))
    barrier(world)
    if world.is_main:
        sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
        version, internal, gauss = random.getstate()
        _write_json(
            tmp / "state.json",
            {
                "step": step,
                "format": "dcp",
                "scheduler": sched,
                "python_random": [version, list(internal), gauss],
                "extra": extra,
            },
        )
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old)
    barrier(world)
    return final


def _load_sharded(path: Path, model, optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(path / "dcp"))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler
) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the state (step, extra). A
    sharded checkpoint loads on any number of ranks (every rank calls this)."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    if state.get("format") == "dcp":
        _load_sharded(path, model, optimizer)
        scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
        version, internal, gauss = state["python_random"]
        random.setstate((version, tuple(internal), gauss))
        return state
    params = trainable_parameters(model)
    saved = load_file(path / "trainable.safetensors")
    if set(saved) != set(params):
        raise RuntimeError(
            f"checkpoint {path} does not match the model: {sorted(set(saved) ^ set(params))[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name])
    _optimizer_from_flat(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    scheduler.load_state_dict({**scheduler.state_dict(), **state["scheduler"]})
    rng = load_file(path / "rng.safetensors")
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
        if cuda:
            torch.cuda.set_rng_state_all(cuda)
    version, internal, gauss = state["python_random"]
    random.setstate((version, tuple(internal), gauss))
    return state


def load_trainable(path: Path, model: torch.nn.Module) -> None:
    """Load only the trainable weights of a checkpoint (e.g. the best one, for export)."""
    saved = load_file(path / "trainable.safetensors")
    with torch.no_grad():
        for name, p in trainable_parameters(model).items():
            p.copy_(saved[name])


BEST = "best"


def save_best(run_dir: Path, step: int, model: torch.nn.Module, metric: dict) -> Path:
    """Keep the trainable weights of the best evaluation so far in `checkpoints/best/`."""

    def write(d: Path) -> None:
        params = {n: p.detach().contiguous().cpu() for n, p in trainable_parameters(model).items()}
        save_file(params, d / "trainable.safetensors")
        _write_json(d / "best.json", {"step": step, **metric})

    target = run_dir / CHECKPOINTS / BEST
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_dir(target, write)
    return target


def _atomic_dir(target: Path, write) -> None:
    tmp = target.with_name(f".tmp-{target.name}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def export_model(model, tokenizer, run_dir: Path, merge_lora: bool) -> dict[str, Path]:
    """Write the final model in Hugging Face format; loads with plain transformers.

    Full fine-tuning: `model/`. LoRA: `adapter/` (peft format, pointing at a local base:
    the preset's initial weights are written to `base_model/` since they exist nowhere
    else), and `model/` with merged weights if `merge_lora`.
    """
    out: dict[str, Path] = {}
    is_lora = hasattr(model, "peft_config")
    if not is_lora:
        _atomic_dir(run_dir / "model", lambda d: _save_hf(model, tokenizer, d))
        out["model"] = run_dir / "model"
        return out
    peft_cfg = model.peft_config["default"]
    base_path = peft_cfg.base_model_name_or_path
    if base_path and Path(base_path).is_dir():
        peft_cfg.base_model_name_or_path = str(Path(base_path).resolve())
    else:
        # A preset's initial weights exist nowhere else; LoRA leaves them unchanged, so a
        # copy with the adapters unloaded is exactly the base the adapter applies to.
        base_dir = run_dir / "base_model"
        if not base_dir.exists():
            plain = copy.deepcopy(model).unload()
            _atomic_dir(base_dir, lambda d: _save_hf(plain, tokenizer, d))
        peft_cfg.base_model_name_or_path = str(base_dir.resolve())
    _atomic_dir(run_dir / "adapter", lambda d: _save_hf(model, tokenizer, d))
    out["adapter"] = run_dir / "adapter"
    if merge_lora:
        merged = copy.deepcopy(model).merge_and_unload()
        _atomic_dir(run_dir / "model", lambda d: _save_hf(merged, tokenizer, d))
        out["model"] = run_dir / "model"
    return out


def _save_hf(model, tokenizer, directory: Path) -> None:
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
