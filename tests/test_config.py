"""`load_config`: unknown keys with suggestions, type errors, all problems at once,
dotted overrides, cross-field checks, file errors, the YAML round trip and the docs."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from privdpo.config import SFTRunConfig, describe_config, dump_yaml, load_config
from privdpo.errors import ConfigError, UserError

# The smallest config that passes every check.
VALID = {
    "model": {"preset": "tiny"},
    "data": {"train": "train.jsonl"},
    "output": {"dir": "run"},
}


def merged(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, section by section."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def write_yaml(tmp_path: Path, data, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load(tmp_path: Path, extra: dict | None = None, *overrides: str) -> SFTRunConfig:
    return load_config(
        SFTRunConfig, write_yaml(tmp_path, merged(VALID, extra or {})), list(overrides)
    )


def problems_of(tmp_path: Path, extra: dict | None = None, *overrides: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra, *overrides)
    return info.value.problems


def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load(tmp_path)
    assert isinstance(cfg, SFTRunConfig)
    assert cfg.model.preset == "tiny" and cfg.model.path is None
    assert cfg.data.train == "train.jsonl"
    assert cfg.output.dir == "run"
    assert cfg.train.batch_size == 8 and cfg.train.lr == 1e-4
    assert cfg.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_list_defaults_are_not_shared_between_instances():
    a, b = SFTRunConfig(), SFTRunConfig()
    a.model.lora.target_modules.append("gate_proj")
    a.train.adam_betas[0] = 0.5
    assert b.model.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert b.train.adam_betas == [0.9, 0.999]


# ---------------------------------------------------------------------------------------
# Unknown keys
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (
            {"train": {"bach_size": 4}},
            "train.bach_size: unknown key; did you mean 'train.batch_size'?",
        ),
        (
            {"model": {"lora": {"rnk": 4}}},
            "model.lora.rnk: unknown key; did you mean 'model.lora.r'?",
        ),
        (
            {"data": {"max_lenght": 64}},
            "data.max_lenght: unknown key; did you mean 'data.max_length'?",
        ),
        ({"trian": {"lr": 1.0}}, "trian: unknown key; did you mean 'train'?"),
        (
            {"zzzz": {"lr": 1.0}},
            "zzzz: unknown key; valid keys: model, data, train, sft, privacy, scrub, output",
        ),
    ],
)
def test_unknown_key_names_the_closest_valid_key(tmp_path, extra, expected):
    assert problems_of(tmp_path, extra) == [expected]


def test_unknown_key_in_an_override_is_suggested_too(tmp_path):
    assert problems_of(tmp_path, None, "train.bach_size=4") == [
        "train.bach_size: unknown key; did you mean 'train.batch_size'?"
    ]


def test_non_string_key_is_a_config_problem_not_a_crash(tmp_path):
    # YAML reads `1:` (and `on:`, `yes:` ...) as non-string keys; a typo like this must be
    # reported like any other unknown key, not crash difflib with a TypeError.
    path = tmp_path / "config.yaml"
    path.write_text(
        "model: {preset: tiny}\ndata: {train: t.jsonl}\noutput: {dir: run}\ntrain:\n  1: 2\n",
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(SFTRunConfig, path, [])
    assert len(info.value.problems) == 1
    assert "train.1: unknown key" in info.value.problems[0]


# ---------------------------------------------------------------------------------------
# Types
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"train": {"lr": "fast"}}, "train.lr: expected a number, got 'fast'"),
        ({"train": {"lr": True}}, "train.lr: expected a number, got True"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size: expected an integer, got 2.5"),
        ({"train": {"epochs": True}}, "train.epochs: expected an integer, got True"),
        ({"train": {"max_steps": 1.5}}, "train.max_steps: expected an integer or null, got 1.5"),
        (
            {"model": {"dtype": "float16"}},
            "model.dtype: expected one of 'float32', 'bfloat16', got 'float16'",
        ),
        (
            {"train": {"schedule": "exp"}},
            "train.schedule: expected one of 'cosine', 'linear', 'constant', got 'exp'",
        ),
        ({"output": {"overwrite": "yes please"}}, "output.overwrite: expected true or false"),
        (
            {"model": {"path": 123, "preset": None}},
            "model.path: expected a string or null, got 123",
        ),
        ({"train": {"adam_betas": 0.9}}, "train.adam_betas: expected a list (a number each)"),
        (
            {"model": {"lora": {"target_modules": ["q_proj", 3]}}},
            "model.lora.target_modules: expected a list (a string each), got ['q_proj', 3]",
        ),
        ({"data": "train.jsonl"}, "data: expected a mapping of keys"),
    ],
)
def test_bad_type_names_the_key_and_the_expected_type(tmp_path, extra, expected):
    problems = problems_of(tmp_path, extra)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_numbers_are_coerced_to_float_where_floats_are_expected(tmp_path):
    # YAML reads `1e-4` (no dot) as a string; an int is fine where a float is expected.
    cfg = load(tmp_path, {"train": {"lr": "1e-4", "weight_decay": 1, "adam_betas": [1, 0.99]}})
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.weight_decay == 1.0 and isinstance(cfg.train.weight_decay, float)
    assert cfg.train.adam_betas == [1.0, 0.99]
    assert all(isinstance(b, float) for b in cfg.train.adam_betas)


def test_nan_learning_rate_is_rejected(tmp_path):
    # float("nan") parses, and `nan <= 0` is False, so "must be positive" has to catch it.
    problems = problems_of(tmp_path, {"train": {"lr": "nan"}})
    assert len(problems) == 1 and problems[0].startswith("train.lr"), problems


def test_every_problem_in_a_file_is_reported_at_once(tmp_path):
    extra = {
        "train": {"bach_size": 4, "lr": "fast", "schedule": "exp"},
        "model": {"lora": {"rnk": 4, "enabled": "maybe"}},
    }
    with pytest.raises(ConfigError) as info:
        load(tmp_path, extra)
    problems = info.value.problems
    assert len(problems) == 5, problems
    for key in ("train.bach_size", "train.lr", "train.schedule", "model.lora.rnk"):
        assert sum(p.startswith(f"{key}:") for p in problems) == 1, (key, problems)
    assert any(p.startswith("model.lora.enabled: expected true or false") for p in problems)
    message = str(info.value)
    assert message.startswith("config has 5 problem(s):")
    for p in problems:
        assert f"  - {p}" in message


# ---------------------------------------------------------------------------------------
# Overrides
# ---------------------------------------------------------------------------------------


def test_overrides_parse_yaml_values(tmp_path):
    cfg = load(
        tmp_path,
        {"data": {"eval": "eval.jsonl"}, "train": {"lr": 1.0}},
        "train.lr=3e-4",
        "train.max_steps=5",
        "model.lora.enabled=true",
        "data.eval=null",
        "model.lora.target_modules=[q_proj,v_proj]",
        "model.dtype=bfloat16",
        "train.adam_betas=[0.8, 0.9]",
    )
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 5 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.lora.enabled is True
    assert cfg.data.eval is None
    assert cfg.model.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.model.dtype == "bfloat16"
    assert cfg.train.adam_betas == [0.8, 0.9]


def test_overrides_alone_build_a_config_without_a_file():
    cfg = load_config(
        SFTRunConfig,
        None,
        [
            "model.preset=tiny",
            "data.train=t.jsonl",
            "output.dir=run",
            "sft.completion_only_loss=false",
        ],
    )
    assert cfg.model.preset == "tiny" and cfg.output.dir == "run"
    assert cfg.sft.completion_only_loss is False


def test_override_value_that_is_not_valid_yaml_is_kept_as_text(tmp_path):
    cfg = load(tmp_path, None, "data.user_id_column=a: b: c")
    assert cfg.data.user_id_column == "a: b: c"


@pytest.mark.parametrize("item", ["train.lr", "=5", "train.lr3e-4"])
def test_override_without_equals_is_a_problem(tmp_path, item):
    problems = problems_of(tmp_path, None, item, "train.batch_size=oops")
    assert len(problems) == 2, problems
    assert f"override {item!r}: write overrides as section.key=value" in problems
    assert any(p.startswith("train.batch_size: expected an integer") for p in problems)


def test_override_through_a_value_is_a_problem(tmp_path):
    problems = problems_of(tmp_path, {"train": {"lr": 1.0}}, "train.lr.x=1")
    assert problems == ["override 'train.lr.x=1': lr is a value, not a section"]


def test_override_into_an_empty_yaml_section(tmp_path):
    # `train:` with nothing under it is null; the file alone loads (null section = all
    # defaults), so an override into that section must work too.
    path = tmp_path / "config.yaml"
    path.write_text(
        "model:\n  preset: tiny\ndata:\n  train: t.jsonl\noutput:\n  dir: run\ntrain:\n",
        encoding="utf-8",
    )
    assert load_config(SFTRunConfig, path, []).train.lr == 1e-4
    cfg = load_config(SFTRunConfig, path, ["train.lr=3e-4"])
    assert cfg.train.lr == 3e-4


@pytest.mark.parametrize("key", ["data.train", "output.dir"])
def test_empty_override_for_a_required_path_is_a_problem(tmp_path, key):
    # `output.dir=$RUN` with RUN unset gives ''; Path('') is the current directory, which
    # output.overwrite=true would then delete. An empty required path must be refused.
    problems = problems_of(tmp_path, None, f"{key}=")
    assert len(problems) == 1 and problems[0].startswith(key), problems


# ---------------------------------------------------------------------------------------
# Cross-field checks
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({"model": {"path": "/models/x", "preset": "tiny"}}, "model: set exactly one of"),
        ({"model": {"preset": None}}, "model: set exactly one of"),
        (
            {"train": {"batch_size": 8, "micro_batch_size": 3}},
            "train.micro_batch_size: 3 does not divide train.batch_size 8",
        ),
        ({"data": {"train": None}}, "data.train: required"),
        ({"output": {"dir": None}}, "output.dir: required"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction: must be in [0, 1)"),
        ({"data": {"max_length": 1}}, "data.max_length: must be at least 2"),
        ({"train": {"lr": 0}}, "train.lr: must be positive"),
        ({"train": {"max_steps": 0}}, "train.max_steps: must be at least 1 or null"),
        ({"train": {"adam_betas": [0.9]}}, "train.adam_betas: needs two numbers"),
        ({"train": {"device": "gpu"}}, "train.device: must be auto, cpu, cuda or cuda:N"),
        ({"model": {"lora": {"enabled": True, "r": 0}}}, "model.lora.r: must be at least 1"),
        (
            {"train": {"fsdp_cpu_offload": True}},
            "train.fsdp_cpu_offload: offloads FSDP2 shards, but train.parallel is ddp",
        ),
    ],
)
def test_cross_field_checks(tmp_path, extra, expected):
    problems = problems_of(tmp_path, extra)
    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems


def test_missing_required_keys_are_reported_together(tmp_path):
    path = write_yaml(tmp_path, {"model": {"preset": "tiny"}})
    with pytest.raises(ConfigError) as info:
        load_config(SFTRunConfig, path, [])
    problems = info.value.problems
    assert len(problems) == 2, problems
    assert problems[0].startswith("data.train: required")
    assert problems[1].startswith("output.dir: required")


def test_empty_file_reports_every_required_key(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(SFTRunConfig, path, [])
    assert [p.split(":")[0] for p in info.value.problems] == ["model", "data.train", "output.dir"]


def test_valid_variants_pass_the_checks(tmp_path):
    cfg = load(
        tmp_path,
        {"model": {"path": "/models/x", "preset": None}},
        "train.batch_size=8",
        "train.micro_batch_size=4",
        "train.device=cuda:1",
        "data.eval_fraction=0",
    )
    assert cfg.model.path == "/models/x" and cfg.model.preset is None
    assert cfg.train.micro_batch_size == 4 and cfg.train.device == "cuda:1"


# ---------------------------------------------------------------------------------------
# The file itself
# ---------------------------------------------------------------------------------------


def test_missing_file_is_a_user_error_with_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(UserError) as info:
        load_config(SFTRunConfig, path, [])
    assert not isinstance(info.value, ConfigError)
    assert str(path) in str(info.value) and "not found" in str(info.value)


def test_directory_instead_of_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(SFTRunConfig, tmp_path, [])


def test_invalid_yaml_is_a_user_error_with_the_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {preset: tiny\ntrain: [\n", encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_config(SFTRunConfig, path, [])
    assert str(path) in str(info.value) and "not valid YAML" in str(info.value)


@pytest.mark.parametrize("text", ["- model\n- data\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping_is_a_user_error(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as info:
        load_config(SFTRunConfig, path, [])
    assert str(path) in str(info.value) and "must be a mapping" in str(info.value)


def test_non_utf8_file_is_a_user_error(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("data: {train: caf\xe9.jsonl}\n".encode("latin-1"))
    with pytest.raises(UserError) as info:
        load_config(SFTRunConfig, path, [])
    assert str(path) in str(info.value) and "UTF-8" in str(info.value)


# ---------------------------------------------------------------------------------------
# Saving and documenting
# ---------------------------------------------------------------------------------------


def test_dump_yaml_round_trips(tmp_path):
    cfg = load(
        tmp_path,
        None,
        "model.lora.enabled=true",
        "model.lora.target_modules=[q_proj,v_proj]",
        "model.dtype=bfloat16",
        "train.lr=3e-4",
        "train.adam_eps=1e-8",
        "train.max_steps=7",
        "train.max_grad_norm=null",
        "data.eval=held.jsonl",
        "data.format=messages",
        "output.merge_lora=true",
    )
    path = tmp_path / "saved.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    again = load_config(SFTRunConfig, path, [])
    assert again == cfg
    assert again.train.max_grad_norm is None and again.train.adam_eps == 1e-8


def test_dump_yaml_round_trips_the_defaults(tmp_path):
    cfg = load(tmp_path)
    path = tmp_path / "saved.yaml"
    path.write_text(dump_yaml(cfg), encoding="utf-8")
    assert load_config(SFTRunConfig, path, []) == cfg


def _all_keys(cls: type, prefix: str = ""):
    """(dotted key, help) for every leaf, and (section, docstring line) for every section."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield "section", f"{prefix}{f.name}", hint.__doc__.strip().splitlines()[0]
            yield from _all_keys(hint, f"{prefix}{f.name}.")
        else:
            yield "key", f"{prefix}{f.name}", f.metadata["help"]


def test_describe_config_mentions_every_key_of_every_section():
    text = describe_config(SFTRunConfig)
    entries = list(_all_keys(SFTRunConfig))
    assert sum(kind == "section" for kind, _, _ in entries) == 8  # seven + model.lora
    assert sum(kind == "key" for kind, _, _ in entries) > 40
    for kind, key, doc in entries:
        if kind == "section":
            assert f"\n{key}:  {doc}" in text, key
        else:
            assert f"  {key} = " in text, key
            assert doc in text, key


def test_describe_config_shows_defaults_and_types():
    text = describe_config(SFTRunConfig)
    assert "  train.batch_size = 8  (an integer)\n" in text
    assert "  model.path = null  (a string or null)\n" in text
    assert "  model.dtype = float32  (one of 'float32', 'bfloat16')\n" in text
    assert "  model.lora.target_modules = [q_proj, k_proj, v_proj, o_proj]" in text
    assert "...\n" not in text


@pytest.mark.parametrize(
    "setting, device, private, expected",
    [
        ("auto", "cuda", False, True),
        ("auto", "cpu", False, False),
        ("auto", "cuda", True, True),  # per-unit gradients inside the compiled layers
        ("auto", "cpu", True, False),
        (False, "cuda", False, False),
        (False, "cuda", True, False),
        (True, "cpu", False, True),
        (True, "cpu", True, True),
    ],
)
def test_train_compile_auto_is_decided_by_the_device(tmp_path, setting, device, private, expected):
    import torch

    from privdpo.training import use_compile

    extra = {"train": {"compile": setting}}
    if private:
        extra["privacy"] = {"enabled": True, "noise_multiplier": 1.0}
    cfg = load(tmp_path, extra)
    assert use_compile(cfg, torch.device(device)) is expected
    assert cfg.train.compile == setting  # the config keeps what the user wrote
