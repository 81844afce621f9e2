"""The real `privdpo` command: user mistakes exit 2 with one clear message (no traceback),
`--help` documents the config, and a tiny SFT run writes its run directory."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from conftest import REPO, sft_rows, write_jsonl
from privdpo.cli import main
from privdpo.config import SFTRunConfig, load_config

# Keep every run tiny.
TINY = [
    "train.max_steps=2",
    "train.batch_size=2",
    "train.micro_batch_size=2",
    "output.progress_bar=false",
]


def write_config(directory: Path, data: dict, name: str = "config.yaml") -> Path:
    path = directory / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def tiny_setup(directory: Path, **sections) -> tuple[Path, Path]:
    """A config for the tiny preset on 8 rows of local data; returns (config, run dir)."""
    data = write_jsonl(directory / "train.jsonl", sft_rows(8))
    run_dir = directory / "run"
    cfg = {
        "model": {"preset": "tiny"},
        "data": {"train": str(data)},
        "output": {"dir": str(run_dir)},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value}
    return write_config(directory, cfg), run_dir


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli_subprocess(cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "privdpo.cli", *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def assert_user_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 2, (out, err)
    assert err.startswith("privdpo sft: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


# ---------------------------------------------------------------------------------------
# Config errors and help
# ---------------------------------------------------------------------------------------


def test_config_errors_exit_2_listing_every_problem(tmp_path, capsys):
    cfg, run_dir = tiny_setup(tmp_path, train={"bach_size": 4, "lr": "fast"})
    code, out, err = cli(capsys, "sft", cfg, "model.dtype=float16")
    assert_user_error(
        code,
        out,
        err,
        "config has 3 problem(s)",
        "train.bach_size: unknown key; did you mean 'train.batch_size'?",
        "train.lr: expected a number, got 'fast'",
        "model.dtype: expected one of 'float32', 'bfloat16', got 'float16'",
    )
    assert not run_dir.exists()


def test_config_error_in_a_subprocess_has_no_traceback(tmp_path):
    cfg, _ = tiny_setup(tmp_path, model={"lora": {"rnk": 4}}, train={"micro_batch_size": 2.5})
    proc = cli_subprocess(tmp_path, "sft", cfg, "train.bach_size=2")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "config has 3 problem(s)" in proc.stderr
    assert "model.lora.rnk: unknown key; did you mean 'model.lora.r'?" in proc.stderr
    assert "train.micro_batch_size: expected an integer, got 2.5" in proc.stderr
    assert "did you mean 'train.batch_size'?" in proc.stderr
    assert proc.stdout == ""


def test_missing_config_file_exits_2(tmp_path, capsys):
    code, out, err = cli(capsys, "sft", tmp_path / "nope.yaml")
    assert_user_error(code, out, err, str(tmp_path / "nope.yaml"), "not found")


def _leaf_keys(cls: type, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f.metadata["help"]


def test_sft_help_lists_sections_and_keys_with_docs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["sft", "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: privdpo sft" in out and "--resume" in out
    for section in ("model", "model.lora", "data", "train", "sft", "output"):
        assert f"\n{section}:  " in out, section
    keys = list(_leaf_keys(SFTRunConfig))
    assert len(keys) > 40
    for key, doc in keys:
        assert f"  {key} = " in out, key
        assert doc in out, key


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2
    assert "usage: privdpo" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# Models, data and the run directory
# ---------------------------------------------------------------------------------------


def test_hub_id_as_model_path_says_privdpo_is_offline(tmp_path):
    cfg, _ = tiny_setup(tmp_path, model={"preset": None, "path": "Qwen/Qwen2.5-0.5B"})
    proc = cli_subprocess(tmp_path, "sft", cfg, *TINY)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr
    assert "'Qwen/Qwen2.5-0.5B'" in err and "Hugging Face Hub id" in err
    assert "privdpo works offline and never downloads" in err
    assert "hf download Qwen/Qwen2.5-0.5B --local-dir DIR" in err
    assert "model.path=DIR" in err and "model.preset=tiny" in err


def test_missing_local_model_path(tmp_path, capsys):
    missing = tmp_path / "models" / "nope"
    cfg, _ = tiny_setup(tmp_path, model={"preset": None, "path": str(missing)})
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert_user_error(code, out, err, f"model.path: {missing} does not exist", "config.json")


def test_directory_without_config_json(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"")
    cfg, _ = tiny_setup(tmp_path, model={"preset": None, "path": str(model_dir)})
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert_user_error(code, out, err, str(model_dir), "no config.json", "save_pretrained")


def test_pickle_only_model_dir_says_safetensors_only(tmp_path, capsys):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "qwen2"}), encoding="utf-8")
    (model_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    cfg, _ = tiny_setup(tmp_path, model={"preset": None, "path": str(model_dir)})
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert_user_error(
        code,
        out,
        err,
        "no .safetensors weights (found: pytorch_model.bin)",
        "only safetensors, never pickle",
        "safe_serialization=True",
    )


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "missing.jsonl"
    cfg, _ = tiny_setup(tmp_path, data={"train": str(missing)})
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert_user_error(code, out, err, f"{missing}: no such file or directory", "local files")


def test_failed_start_does_not_block_the_corrected_rerun(tmp_path, capsys):
    # A run that fails before training (here: the data file is missing) must not leave
    # output.dir behind so that the same command, once the data is there, is refused
    # with "already holds files".
    missing = tmp_path / "later.jsonl"
    cfg, run_dir = tiny_setup(tmp_path, data={"train": str(missing)})
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert_user_error(code, out, err, "no such file or directory")
    write_jsonl(missing, sft_rows(8))
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert code == 0, err
    assert (run_dir / "model").is_dir()


def test_non_empty_output_dir_without_resume_or_overwrite(tmp_path, capsys):
    cfg, run_dir = tiny_setup(tmp_path)
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me", encoding="utf-8")
    code, out, err = cli(capsys, "sft", cfg, *TINY)
    assert_user_error(
        code,
        out,
        err,
        f"output.dir: {run_dir} already holds files",
        "--resume",
        "output.overwrite=true",
    )
    assert (run_dir / "notes.txt").read_text(encoding="utf-8") == "keep me"
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("state", ["nonexistent", "empty"])
def test_resume_without_a_run_fails_clearly(tmp_path, capsys, state):
    cfg, run_dir = tiny_setup(tmp_path)
    if state == "empty":
        run_dir.mkdir()
    code, out, err = cli(capsys, "sft", cfg, *TINY, "--resume")
    assert_user_error(code, out, err, f"--resume: {run_dir} holds no run", "drop --resume")
    assert not (run_dir / "config.yaml").exists()


def test_resume_without_a_checkpoint_fails_clearly(tmp_path, capsys):
    cfg, run_dir = tiny_setup(tmp_path)
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n", encoding="utf-8")
    code, out, err = cli(capsys, "sft", cfg, *TINY, "--resume")
    assert_user_error(code, out, err, "has no checkpoint yet", "without --resume")


def test_resume_flag_may_come_before_the_overrides(tmp_path, capsys):
    # `privdpo sft CONFIG --resume key=value` is a natural order; argparse must not turn
    # it into "unrecognized arguments" (parse_intermixed_args accepts it).
    cfg, run_dir = tiny_setup(tmp_path)
    code, out, err = cli(capsys, "sft", cfg, "--resume", *TINY)
    assert_user_error(code, out, err, f"--resume: {run_dir} holds no run")


# ---------------------------------------------------------------------------------------
# A real tiny run, then resumes of it
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_run")
    cfg, run_dir = tiny_setup(directory)
    code = main(["sft", str(cfg), *TINY])
    return code, cfg, run_dir


def test_tiny_run_writes_the_run_directory(finished_run):
    code, cfg, run_dir = finished_run
    assert code == 0
    saved = load_config(SFTRunConfig, run_dir / "config.yaml", [])
    assert saved == load_config(SFTRunConfig, cfg, TINY)
    summary = json.loads((run_dir / "data_summary.json").read_text(encoding="utf-8"))
    assert summary
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r["step"] for r in records if "loss" in r]
    assert train_steps == [1, 2]
    assert all(r["loss"] > 0 for r in records if "loss" in r)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-000002"]
    assert (run_dir / "checkpoints" / "step-000002" / "trainable.safetensors").is_file()
    assert (run_dir / "model" / "config.json").is_file()
    assert (run_dir / "model" / "model.safetensors").is_file()
    assert not list((run_dir / "model").glob("*.bin"))


def test_resume_with_a_changed_key_fails_naming_it(finished_run, capsys):
    code, cfg, run_dir = finished_run
    assert code == 0
    before = sorted(p.name for p in run_dir.rglob("*"))
    code, out, err = cli(capsys, "sft", cfg, *TINY, "train.lr=1e-3", "--resume")
    assert_user_error(
        code, out, err, "--resume: the config differs", "train.lr: 0.0001 -> 0.001", "config.yaml"
    )
    assert "train.batch_size" not in err
    assert sorted(p.name for p in run_dir.rglob("*")) == before

    # Only keys that do not change the result may differ: the progress bar is one.
    code, out, err = cli(capsys, "sft", cfg, *TINY, "output.progress_bar=true", "--resume")
    assert code == 0, err
    assert "resuming from" in out and "step 2 of 2" in out


def test_the_console_script_is_installed():
    script = REPO / ".venv" / "bin" / "privdpo"
    assert script.is_file(), script
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "sft" in proc.stdout and "demo" in proc.stdout
