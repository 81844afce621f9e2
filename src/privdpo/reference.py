"""The reference policy of DPO: a frozen copy, the LoRA model with its adapters disabled,
a separate local model, or log-probs precomputed once and cached on disk.

The cache key covers everything that changes the numbers: the reference model's identity
(a preset's name, seed and dtype, or the hash of a directory's weight files), the tokenized
pairs (so data and tokenization settings are both covered), and the dtype. A changed input
gives a new key, so a stale cache is never read.
"""

from __future__ import annotations

import copy
import hashlib
import json
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from privdpo.config import DPORunConfig, ModelConfig
from privdpo.data.batching import pair_batch
from privdpo.logprobs import sequence_logps
from privdpo.losses import REFERENCE_FREE
from privdpo.models import compile_layers, load_model_and_tokenizer
from privdpo.training import micro_batches

# Version of the log-prob computation behind cached reference log-probs (2: chunked head
# on packed or padded batches).
LOGPS_VERSION = 2


def reference_kind(cfg: DPORunConfig) -> str:
    """`none`, `copy`, `adapter_disabled` or `path`, resolving `auto`."""
    if cfg.dpo.loss in REFERENCE_FREE:
        return "none"
    if cfg.dpo.reference != "auto":
        return cfg.dpo.reference
    return "adapter_disabled" if cfg.model.lora.enabled else "copy"


class Reference:
    """Gives reference log-probs for a batch of pairs, however the reference is held."""

    def __init__(self, kind: str, model=None, policy=None, compiled: bool = False):
        self.kind = kind
        self.model = model  # copy / path: a frozen model; adapter_disabled: None
        self.compiled = compiled  # copy / path: the frozen model's layers are compiled
        self.policy = policy  # adapter_disabled: the LoRA policy itself
        self.cache: dict[str, torch.Tensor] | None = None  # precomputed: where -> [2]
        self._adapter_layers: list | None = None  # adapter_disabled: found on first use
        self._needs_eval = True

    def logps(
        self, pairs, batch, attention: str = "auto", compiled: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(ref_chosen [B], ref_rejected [B]) for `pairs`, whose `TokenBatch` (on the
        device) is given. Computed under inference mode: no autograd bookkeeping at all.
        `compiled`: the adapter-disabled reference (the policy itself) compiles its head's
        tile work; a frozen model follows its own `compiled` (its layers and head)."""
        device = batch.input_ids.device
        if self.cache is not None:
            both = torch.stack([self.cache[p.where] for p in pairs]).to(device, non_blocking=True)
            return both[:, 0], both[:, 1]
        with torch.inference_mode():
            if self.kind == "adapter_disabled":
                with self._adapters_off():
                    logps, _ = sequence_logps(self.policy, batch, None, attention, compiled)
            else:
                logps, _ = sequence_logps(self.model, batch, None, attention, self.compiled)
        return logps.clone().chunk(2)  # a normal tensor again, usable in the loss's graph

    @contextmanager
    def _adapters_off(self):
        """The LoRA policy as its base model: each adapter layer switched off by its own
        `enable_adapters` (what peft's `disable_adapter()` does, without walking every
        module and checking the model's status on every call: on a step bound by the
        host, that walk was a cost of its own), and in eval mode only when some dropout
        is active. Switching the adapters back on sets them trainable; inside DP's
        per-unit backward they must stay as they were (a recomputed checkpoint would
        otherwise see other parameters than its forward), so their flags are restored."""
        if self._adapter_layers is None:
            from peft.tuners.tuners_utils import BaseTunerLayer

            modules = list(self.policy.modules())
            self._adapter_layers = [m for m in modules if isinstance(m, BaseTunerLayer)]
            attention_dropout = getattr(self.policy.config, "attention_dropout", 0.0) or 0.0
            self._needs_eval = attention_dropout > 0 or any(
                isinstance(m, torch.nn.Dropout) and m.p > 0 for m in modules
            )
        flags = [(p, p.requires_grad) for m in self._adapter_layers for p in m.parameters()]
        was_training = self.policy.training
        if self._needs_eval:
            self.policy.eval()  # the reference has no dropout
        for layer in self._adapter_layers:
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for layer in self._adapter_layers:
                layer.enable_adapters(True)
            for p, flag in flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
            if self._needs_eval:
                self.policy.train(was_training)


def _frozen(model):
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_reference(cfg: DPORunConfig, base_model, device, compiled: bool = False) -> Reference:
    """The reference for `cfg`, built from the initial (pre-LoRA) `base_model` when it is a
    copy. Call before LoRA wraps the model. `compiled`: compile a frozen model's layers
    (`training.use_compile`)."""
    kind = reference_kind(cfg)
    if kind == "copy":
        reference = _frozen(copy.deepcopy(base_model)).to(device)
        if compiled:
            compile_layers(reference)
        return Reference(kind, reference, compiled=compiled)
    if kind == "path":
        ref_cfg = ModelConfig(
            path=cfg.dpo.reference_path,
            dtype=cfg.model.dtype,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        model, _ = load_model_and_tokenizer(ref_cfg, cfg.train.seed)
        if compiled:
            compile_layers(model)
        return Reference(kind, _frozen(model).to(device), compiled=compiled)
    return Reference(kind)


def model_identity(model_cfg: ModelConfig, seed: int) -> str:
    """A string that changes whenever the model's initial weights would."""
    if model_cfg.preset:
        return f"preset={model_cfg.preset};seed={seed};dtype={model_cfg.dtype}"
    digest = hashlib.sha256()
    root = Path(model_cfg.path)
    for f in sorted(root.glob("*.safetensors")) + [root / "config.json"]:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 24), b""):
                digest.update(block)
    return f"weights={digest.hexdigest()};dtype={model_cfg.dtype}"


def cache_key(cfg: DPORunConfig, kind: str, pairs) -> str:
    if kind == "path":
        ref_cfg = ModelConfig(path=cfg.dpo.reference_path, dtype=cfg.model.dtype)
        identity = model_identity(ref_cfg, cfg.train.seed)
    else:
        identity = model_identity(cfg.model, cfg.train.seed)
    # The layout and the log-prob computation are part of the key: their rounding differs.
    t = cfg.train
    layout = f"logps={LOGPS_VERSION};packing={t.packing};share_prompt={t.share_prompt}"
    digest = hashlib.sha256(f"{identity};{layout}".encode())
    for p in pairs:
        digest.update(json.dumps([p.where, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return digest.hexdigest()[:32]


def precompute(
    reference: Reference,
    cfg: DPORunConfig,
    pairs,
    pad_id: int,
    device,
    batch_size: int,
    write: bool = True,
) -> tuple[Path, bool]:
    """Fill `reference.cache` for `pairs`, from disk if this exact input was computed
    before. Returns (cache file, whether it was reused). Frees a held reference model."""
    key = cache_key(cfg, reference.kind, pairs)
    root = Path(cfg.dpo.reference_cache_dir).expanduser()
    path = root / f"{key}.safetensors"
    if path.is_file():
        stored = load_file(path)
        reference.cache = dict(zip(json.loads(_read_index(path)), stored["logps"], strict=True))
        reused = True
    else:
        wheres, rows = [], []
        t = cfg.train
        layout = "packed" if t.packing else "padded"
        for chunk in micro_batches(pairs, batch_size):
            batch = pair_batch(chunk, pad_id, layout, t.share_prompt and t.packing).to(device)
            chosen, rejected = reference.logps(chunk, batch, t.attention)
            rows.append(torch.stack([chosen, rejected], dim=1).float().cpu())
            wheres += [p.where for p in chunk]
        logps = torch.cat(rows)
        if write:  # several ranks compute the same numbers; rank 0 writes them
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"logps": logps}, tmp, metadata={"index": json.dumps(wheres)})
            tmp.replace(path)
        reference.cache = dict(zip(wheres, logps, strict=True))
        reused = False
    reference.model = None  # the frozen copy is no longer needed: free its memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return path, reused


def _read_index(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata()["index"]
