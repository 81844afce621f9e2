"""Loading local models and tokenizers, the built-in presets, and LoRA.

privdpo never downloads: a model is a local directory in Hugging Face format with
safetensors weights, or a preset built here from a config (random init) with a tokenizer
trained here on a small public text that ships with the package.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
)

from privdpo import attention
from privdpo.config import LoraConfig, ModelConfig
from privdpo.errors import UserError

# Presets are plain data: Qwen2 shapes (the architecture of the benchmark models) scaled
# down. `vocab_size` is the size the local tokenizer is trained to.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    ),
    "small": dict(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
}

# ChatML, the template of the Qwen family; turns end with <|im_end|>.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# What marks a model exported by `privdpo audit` (its data had canaries): the loader
# refuses such a directory, so an audit model is never trained on, evaluated or served.
AUDIT_MARKER = "AUDIT_RUN.txt"
AUDIT_MARKER_TEXT = (
    "This model was trained by `privdpo audit` with privacy-audit canaries in its data."
    " It is for measuring privacy only: do not ship it. privdpo refuses to load it.\n"
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def build_tiny_tokenizer(
    vocab_size: int, corpus_lines: list[str] | None = None
) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained on the packaged public corpus (deterministic), or
    on `corpus_lines` (the demo's generated reviews: text that is not anyone's data).

    Trained on a fixed public text rather than the user's data: a tokenizer fit to private
    rows would itself carry information about them outside any privacy guarantee. It is a
    `Qwen2Tokenizer` (the presets are Qwen2 models) trained with that class's own
    normalizer and pre-tokenizer: `AutoTokenizer` rebuilds a saved qwen2 tokenizer with
    them, so anything else would tokenize differently once exported and reloaded.
    """
    if corpus_lines is None:
        text = resources.files("privdpo").joinpath("assets/tiny_corpus.txt").read_text("utf-8")
        corpus_lines = text.splitlines()
    probe = Qwen2Tokenizer()  # only to borrow its normalizer and pre-tokenizer
    trainee = Tokenizer(models.BPE())
    trainee.normalizer = probe.backend_tokenizer.normalizer
    trainee.pre_tokenizer = probe.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    trainee.train_from_iterator(corpus_lines, trainer=trainer)
    merges = json.loads(trainee.to_str())["model"]["merges"]
    tokenizer = Qwen2Tokenizer(
        vocab=trainee.get_vocab(),
        merges=[tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges],
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|pad|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_preset(
    name: str, dtype: torch.dtype = torch.float32, tokenizer: PreTrainedTokenizerBase | None = None
):
    """Random-init model and local tokenizer for a preset (seed torch first); a given
    `tokenizer` (from `build_tiny_tokenizer`) replaces the preset's own."""
    if name not in PRESETS:
        raise UserError(f"model.preset: unknown preset {name!r}; choose one of {list(PRESETS)}")
    shape = PRESETS[name]
    tokenizer = tokenizer or build_tiny_tokenizer(shape["vocab_size"])
    config = Qwen2Config(
        **{**shape, "vocab_size": len(tokenizer)},
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.set_attn_implementation(attention.register())
    model.generation_config.eos_token_id = [
        tokenizer.eos_token_id,
        tokenizer.convert_tokens_to_ids("<|im_end|>"),
    ]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_local_model_dir(path_text: str) -> Path:
    """Fail clearly on a hub id, a missing path, or a directory without safetensors."""
    path = Path(path_text).expanduser()
    if not path.exists():
        if _HUB_ID.match(path_text):
            raise UserError(
                f"model.path: {path_text!r} is not a local directory; it looks like a Hugging"
                " Face Hub id. privdpo works offline and never downloads. On a connected"
                f" machine run `hf download {path_text} --local-dir DIR`, copy DIR here and"
                " set model.path=DIR (or use model.preset=tiny for a test model)."
            )
        raise UserError(
            f"model.path: {path_text} does not exist; set it to a local directory holding"
            " config.json, *.safetensors weights and the tokenizer files"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise UserError(
            f"model.path: {path} is not a Hugging Face model directory (no config.json);"
            " point it at the folder written by save_pretrained"
        )
    if not any(path.glob("*.safetensors")):
        found = sorted(p.name for p in path.glob("*.bin")) or ["no weights"]
        raise UserError(
            f"model.path: {path} has no .safetensors weights (found: {', '.join(found)});"
            " privdpo loads only safetensors, never pickle. Convert once with"
            " `model.save_pretrained(DIR, safe_serialization=True)` on a trusted machine."
        )
    return path


def mark_audit_model(directory: Path) -> None:
    """Mark `directory` (an audit run's exported model, or the run itself) as an audit's."""
    (directory / AUDIT_MARKER).write_text(AUDIT_MARKER_TEXT, encoding="utf-8")


def refuse_audit_model(path: Path, key: str = "model.path") -> None:
    """Fail clearly on a directory `privdpo audit` marked (see AUDIT_MARKER)."""
    if (path / AUDIT_MARKER).is_file():
        raise UserError(
            f"{key}: {path} is a model trained by `privdpo audit` (it carries {AUDIT_MARKER}):"
            " its training data held privacy-audit canaries, so it exists only to measure"
            " privacy and privdpo does not load it. Use the model of a normal run of the"
            " same config (`privdpo sft` or `privdpo dpo`)"
        )


# Files that hold a tokenizer's vocabulary (tokenizer_config.json alone holds none).
VOCABULARY_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer of `model.tokenizer_path`, else of `model.path`, loaded as saved.

    A `tokenizer.json` is loaded as it is (PreTrainedTokenizerFast): AutoTokenizer would
    rebuild the class named in the config (e.g. a Qwen2 tokenizer around a saved
    WordLevel vocabulary), which can tokenize differently from what was saved. A directory
    with no vocabulary file is refused, and so is a tokenizer that encodes text to nothing.
    """
    key = "model.tokenizer_path" if cfg.tokenizer_path else "model.path"
    if cfg.tokenizer_path:
        path = Path(cfg.tokenizer_path).expanduser()
        if not path.is_dir():
            raise UserError(f"model.tokenizer_path: {path} is not a directory")
    else:
        path = check_local_model_dir(cfg.path)
    present = [name for name in VOCABULARY_FILES if (path / name).is_file()]
    if not present:
        raise UserError(
            f"{key}: {path} has no tokenizer files (none of {', '.join(VOCABULARY_FILES)});"
            " a tokenizer must come with the model: save it there with"
            " tokenizer.save_pretrained(DIR), or set model.tokenizer_path to its directory"
        )
    try:
        if "tokenizer.json" in present and not cfg.trust_remote_code:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(
                path, local_files_only=True, trust_remote_code=cfg.trust_remote_code
            )
    except (OSError, ValueError) as e:
        raise UserError(f"{key}: could not load the tokenizer from {path}: {e}") from None
    if not tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]:
        raise UserError(
            f"{key}: the tokenizer in {path} encodes the text {PROBE_TEXT!r} to no tokens, so"
            " it would train on nothing; check its tokenizer.json (vocabulary, unk_token)"
        )
    return tokenizer


def check_vocabulary(tokenizer: PreTrainedTokenizerBase, model, cfg: ModelConfig) -> None:
    """Every id the tokenizer can produce must have a row in the model's embedding."""
    rows = model.get_input_embeddings().num_embeddings
    ids = [*tokenizer.get_vocab().values(), *tokenizer.all_special_ids]
    top = max(ids, default=-1)
    if top >= rows:
        where = "model.tokenizer_path" if cfg.tokenizer_path else "model.path"
        tokenizer_dir = Path(cfg.tokenizer_path or cfg.path).expanduser()
        raise UserError(
            f"{where}: the tokenizer in {tokenizer_dir} has ids up to {top}, but the"
            f" embedding of the model in {Path(cfg.path).expanduser()} has {rows} rows"
            f" (ids 0..{rows - 1}); they do not belong together: use the"
            " tokenizer saved with this model (model.tokenizer_path), or resize the"
            " model's embeddings to the tokenizer before training"
        )


def load_model_and_tokenizer(cfg: ModelConfig, seed: int = 0, audit_model_ok: bool = False):
    """The model (base, before LoRA) and tokenizer the config asks for. A model marked by
    `privdpo audit` is refused unless `audit_model_ok` (the audit scoring its own model)."""
    dtype = DTYPES[cfg.dtype]
    torch.manual_seed(seed)
    if cfg.preset is not None:
        model, tokenizer = build_preset(cfg.preset, dtype)
    else:
        path = Path(cfg.path).expanduser()
        if not audit_model_ok:
            refuse_audit_model(path)
        tokenizer = load_tokenizer(cfg)  # checks the directory first
        try:
            model = AutoModelForCausalLM.from_pretrained(
                path,
                dtype=dtype,
                local_files_only=True,
                use_safetensors=True,
                trust_remote_code=cfg.trust_remote_code,
            )
        except (OSError, ValueError) as e:
            hint = (
                " If you trust the code in that directory, set model.trust_remote_code=true."
                if "trust_remote_code" in str(e)
                else ""
            )
            raise UserError(
                f"model.path: could not load a causal LM from {path}: {e}{hint}"
            ) from None
        check_vocabulary(tokenizer, model, cfg)
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works.
        tokenizer.pad_token = tokenizer.eos_token
    if attention.packable(model):
        model.set_attn_implementation(attention.register())
    return model, tokenizer


def compile_layers(model, fresh: bool = False) -> None:
    """torch.compile each decoder layer (regional compilation): identical layers share one
    compiled graph, so compiling costs one layer's time; packed lengths vary from batch to
    batch, hence dynamic shapes. The packed attention is traced into the layer's graph too
    (`attention.PackedAttention.layout`).

    `fresh` (a private run's policy, which gets DP's per-unit gradient hooks): drop the
    graphs traced so far in this process first. Dynamo does not guard a module's hooks
    (`skip_nnmodule_hook_guards`), so a layer graph traced for an earlier model of the same
    class (a non-private run before a private one, in a sweep or a benchmark) would be
    reused without the hooks, and the layers' weights would get no gradient. Compiling is
    lazy, so this drops nothing of the run's own models (untraced until the first step)."""
    if fresh:
        torch._dynamo.reset()
    for layer in model.get_decoder().layers:
        layer.compile(dynamic=True)


def add_lora(model: PreTrainedModel, cfg: LoraConfig):
    """Wrap `model` with trainable LoRA adapters; every other weight is frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = cfg.target_modules
    peft_cfg = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, peft_cfg)
    except ValueError as e:
        linear = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if isinstance(m, torch.nn.Linear)
            }
        )
        raise UserError(
            f"model.lora.target_modules: {targets} do not match this model ({e});"
            f" its linear modules are {linear}"
        ) from None


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}
