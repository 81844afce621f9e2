"""The README's promises: every command in its ```sh blocks runs and succeeds, and the
shipped example configs all train."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from privdpo.cli import main

README = REPO / "README.md"
BIN = Path(sys.executable).parent


def readme_commands() -> list[str]:
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def environment() -> dict[str, str]:
    # This checkout's code, whatever privdpo is installed (a relative PYTHONPATH=src would
    # not survive the change of directory).
    path = os.pathsep.join(p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": path}


def run(command: str, cwd: Path, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run(
        command,
        shell=True,
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_privdpo(commands: list[str], cwd: Path, timeout: int) -> list[subprocess.CompletedProcess]:
    """`privdpo ...` command lines, in order, each in its own process as the console
    script runs them, forked from one interpreter that imports privdpo once
    (tests/forked_cli.py); stops after the first that fails."""
    driver = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "forked_cli.py"), str(cwd), str(timeout)],
        input="\n".join(commands),
        cwd=cwd,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=timeout * len(commands),
    )
    assert driver.returncode == 0, driver.stderr[-3000:]
    results = [json.loads(line) for line in driver.stdout.splitlines()]
    return [
        subprocess.CompletedProcess(r["command"], r["returncode"], r["stdout"], r["stderr"])
        for r in results
    ]


def test_quickstart_is_exactly_make_demo_and_make_test():
    text = README.read_text(encoding="utf-8")
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", quickstart, re.S).group(1)
    assert block.split() == ["make", "demo", "make", "test"]


def test_make_test_is_what_ci_runs():
    # `make test` cannot run inside the suite it starts; CI runs it on every submission.
    assert "make test" in readme_commands()
    assert re.search(r"^make test$", (REPO / ".ci" / "run").read_text(), re.M)


@pytest.mark.slow  # about 10 minutes on 2 cores; tests/test_demo.py runs a reduced demo
def test_make_demo_runs_the_sentiment_experiment():
    """`make demo` at full size: DPO's reward interval lies above SFT's, the user-level
    private run lands between the two, and the README's sample output is this run's (the
    table, the two claims and the privacy lines, byte for byte)."""
    result = run("make demo", REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "demo finished. The report is runs/demo/demo.html" in result.stdout
    rewards = {}  # model -> (mean reward, CI low, CI high), read off the printed table
    for line in result.stdout.splitlines():
        row = re.match(r"^(SFT|DPO beta=1|DP-DPO eps=8)\s+(\S+) \[(\S+), (\S+)\]", line)
        if row:
            rewards[row.group(1)] = tuple(float(row.group(i).rstrip("]")) for i in (2, 3, 4))
    sft, dpo, private = rewards["SFT"], rewards["DPO beta=1"], rewards["DP-DPO eps=8"]
    assert dpo[1] > sft[2], rewards  # DPO's interval is above SFT's
    assert sft[0] < private[0] < dpo[0], rewards
    statement = json.loads((REPO / "runs/demo/dp-dpo/model/privacy.json").read_text())
    assert statement["level"] == "user-level" and statement["epsilon"] <= 8
    assert (REPO / "runs" / "demo" / "demo.html").is_file()
    sample = README.read_text(encoding="utf-8").split("## Quickstart", 1)[1]
    block = re.search(r"```text\n(.*?)```", sample, re.S).group(1)
    printed = result.stdout[result.stdout.index("[demo] 6/6") :]
    assert block.strip() == printed.strip()


def readme_audit_output() -> str:
    """The `audit:` table the README shows under its `privdpo audit` command."""
    section = README.read_text(encoding="utf-8").split("`privdpo audit`", 1)[1]
    return re.search(r"```text\n(audit:\n.*?)```", section, re.S).group(1)


def test_the_privdpo_commands_in_the_readme_run(tmp_path):
    commands = [c for c in readme_commands() if c.startswith("privdpo ")]
    assert len(commands) >= 5
    # Run them literally, in order, in a scratch directory holding the files they name.
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "src" / "privdpo" / "assets", tmp_path / "src" / "privdpo" / "assets")
    results = run_privdpo(commands, tmp_path, timeout=600)
    for result in results:
        command = result.args
        assert result.returncode == 0, f"{command}\n{result.stderr[-3000:]}"
        if command.startswith("privdpo audit"):  # the README shows its real output
            printed = result.stdout[result.stdout.rindex("\naudit:\n") + 1 :]
            assert printed == readme_audit_output(), printed
    assert [r.args for r in results] == commands
    assert (tmp_path / "runs" / "sft-tiny" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "sft-lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "runs" / "sft-lora" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "dpo-tiny" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "runs" / "dpo-lora" / "adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "runs" / ".reference-cache").glob("*.safetensors"))
    statement = (tmp_path / "runs" / "dpo-private" / "adapter" / "privacy.json").read_text()
    assert '"unit": "pair"' in statement
    statement = (tmp_path / "runs" / "dpo-user-private" / "adapter" / "privacy.json").read_text()
    assert '"level": "user-level"' in statement
    assert (tmp_path / "runs" / "dpo-tiny" / "eval.json").is_file()
    assert "eval.json" in str(list((tmp_path / "runs" / "dpo-tiny").iterdir()))
    assert (tmp_path / "runs" / "pairs-tiny" / "pairs.jsonl").is_file()
    assert (tmp_path / "runs" / "sweep-tiny" / "sweep.html").is_file()
    report = (tmp_path / "runs" / "dpo-tiny" / "report.html").read_text()
    assert "Evaluation" in report and "data:image/png;base64," in report


def test_the_scrub_and_inspect_output_in_the_readme_is_what_they_print(tmp_path):
    """The README's `privdpo scrub` and `privdpo inspect` commands, run literally: their
    stdout, and the first rows of the scrubbed file, are the ```text blocks shown."""
    blocks = re.findall(r"```text\n(.*?)```", README.read_text(encoding="utf-8"), re.S)

    def shown(first: str) -> str:
        found = [b for b in blocks if b.startswith(first)]
        assert len(found) == 1, f"one ```text block starting with {first!r}, not {len(found)}"
        return found[0]

    scrub = next(c for c in readme_commands() if c.startswith("privdpo scrub "))
    inspect = next(c for c in readme_commands() if c.startswith("privdpo inspect "))
    assert "=" not in scrub  # the first scrub command: placeholders, the default
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copytree(REPO / "src" / "privdpo" / "assets", tmp_path / "src" / "privdpo" / "assets")
    results = run_privdpo([scrub, inspect], tmp_path, timeout=300)
    assert [r.args for r in results] == [scrub, inspect]
    for result, first in zip(results, ("scrubbed ", "inspect "), strict=True):
        assert result.returncode == 0, f"{result.args}\n{result.stderr[-3000:]}"
        assert result.stdout == shown(first), result.args
    rows = shown('{"prompt"')
    output = tmp_path / scrub.split()[3]
    lines = output.read_text(encoding="utf-8").splitlines(keepends=True)
    assert "".join(lines[: rows.count("\n")]) == rows


@pytest.fixture(scope="module")
def local_model_dir(tmp_path_factory) -> Path:
    """A model directory as a user would have it: the tiny preset saved in HF format."""
    from privdpo.models import build_preset

    directory = tmp_path_factory.mktemp("local-model")
    model, tokenizer = build_preset("tiny")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


TRAINING_CONFIGS = sorted(
    p
    for p in (REPO / "examples").glob("*.yaml")
    if not p.name.startswith(("eval_", "sweep_", "pairs_", "audit_"))  # audit_: run by README
)


@pytest.mark.parametrize("config", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_example_config_trains(config, tmp_path, local_model_dir):
    overrides = [
        f"output.dir={tmp_path / 'run'}",
        "output.progress_bar=false",
        "train.max_steps=2",
        "train.eval_every=1",
        "train.save_every=1",
    ]
    loaded = yaml.safe_load(config.read_text())
    command = "dpo" if "dpo" in loaded else "sft"
    if command == "dpo":
        overrides.append(f"dpo.reference_cache_dir={tmp_path / 'cache'}")
    if loaded["model"].get("path"):  # the template for your own model
        overrides += [
            f"model.path={local_model_dir}",
            f"data.train={REPO / 'src/privdpo/assets/sample_sft.jsonl'}",
            "data.max_length=128",
        ]
    cwd = os.getcwd()
    os.chdir(REPO)  # example paths are relative to the repository root
    try:
        assert main([command, str(config), *overrides]) == 0
    finally:
        os.chdir(cwd)
    exported = [p for p in ("model", "adapter") if (tmp_path / "run" / p).is_dir()]
    assert exported


def test_the_config_shown_in_the_readme_loads(tmp_path):
    """The README's annotated config is a valid SFT config, and where it shows a training
    option that has an `auto` default (compilation, attention, device) it shows `auto`."""
    from privdpo.config import SFTRunConfig, load_config

    text = README.read_text(encoding="utf-8").split("### The config", 1)[1]
    block = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    (tmp_path / "config.yaml").write_text(block)
    cfg = load_config(SFTRunConfig, str(tmp_path / "config.yaml"), [])
    shown = yaml.safe_load(block)["train"]
    defaults = SFTRunConfig().train
    for key in ("compile", "attention", "device"):
        if key in shown:
            assert getattr(cfg.train, key) == getattr(defaults, key) == "auto", key
