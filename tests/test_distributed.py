"""Several processes (torchrun, gloo, CPU) give the one-process run: SFT and DPO, DP-DPO at
pair and user level (same sampled units, noise once), FSDP2 (bf16, CPU offload); a 2-process
checkpoint resumes on 1 process; noise added on every rank is caught; a failure on one rank
stops all with that rank's error; one-process commands refuse torchrun; every process
leaves its process group."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

import privdpo.cli as cli
from conftest import REPO, sft_rows, write_jsonl
from privdpo.errors import UserError
from test_dpo import marker_pairs

TORCHRUN = Path(sys.executable).parent / "torchrun"
PAIRS = ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4", "dpo.beta=0.1"]
DP_PAIR = ["privacy.enabled=true", "privacy.noise_multiplier=1.0"]
DP_USER = [*DP_PAIR, "privacy.unit=user", "privacy.contribution_bound=3"]
# bf16 mixed precision (gradients reduce-scattered in float32) and shards in CPU memory; on
# 2 ranks the float32 sum of two bf16 gradients rounds once, as one process's does.
FSDP_BF16_OFFLOAD = ["model.dtype=bfloat16", "train.fsdp_cpu_offload=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    tmp_path: Path,
    procs: int,
    command: str,
    name: str,
    data: Path,
    *overrides,
    script=None,
    timeout: int = 600,
):
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    args = [
        command,
        str(config),
        "model.preset=tiny",
        f"data.train={data}",
        "data.eval_fraction=0",
        "train.lr=1e-3",
        "train.eval_at_start=false",
        f"data.user_salt_file={tmp_path / 'salt'}",
        f"dpo.reference_cache_dir={tmp_path / 'cache'}"
        if command == "dpo"
        else "sft.completion_only_loss=true",
        f"output.dir={tmp_path / name}",
        "output.progress_bar=false",
        *overrides,
    ]
    if procs == 1:
        assert script is None
        return in_this_process(tmp_path, args)
    target = [str(script)] if script else ["-m", "privdpo"]
    cmd = [
        str(TORCHRUN),
        "--nproc_per_node",
        str(procs),
        "--master_port",
        str(free_port()),
        *target,
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tmp_path
    )


def in_this_process(cwd: Path, args: list[str]) -> subprocess.CompletedProcess:
    """The one-process run, as `python -m privdpo` would make it (no torchrun, so no process
    group), in this interpreter: a fresh one spends most of a tiny run importing torch. One
    thread, as each torchrun rank has (`OMP_NUM_THREADS=1`)."""
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    torch.set_num_threads(1)
    try:
        with (
            contextlib.chdir(cwd),
            contextlib.redirect_stdout(out),
            contextlib.redirect_stderr(err),
        ):
            code = cli.main(args)
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["privdpo", *args], code, out.getvalue(), err.getvalue())


def weights(run: Path) -> dict:
    for sub in ("model/model.safetensors", "adapter/adapter_model.safetensors"):
        if (run / sub).is_file():
            return load_file(run / sub)
    raise AssertionError(f"no exported weights in {run}")


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and wa
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", marker_pairs(40))


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("dpo", []),
        ("dp-pair", DP_PAIR),
        ("dp-user", DP_USER),
        ("fsdp", ["train.parallel=fsdp"]),
        ("fsdp-bf16-offload", ["train.parallel=fsdp", *FSDP_BF16_OFFLOAD]),
    ],
)
def test_two_processes_give_the_one_process_dpo_run(tmp_path, pairs, name, overrides):
    one = launch(tmp_path, 1, "dpo", "one", pairs, *PAIRS, *overrides)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(tmp_path, 2, "dpo", "two", pairs, *PAIRS, *overrides)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "terminate called" not in two.stderr  # each rank left its process group
    assert_same_weights(tmp_path / "one", tmp_path / "two")
    # Rank 0 alone wrote the run: one metrics file, one report, one ledger.
    assert (tmp_path / "two" / "report.html").is_file()
    assert (tmp_path / "two" / "metrics.jsonl").read_text().count("\n") == 3
    if overrides and overrides[0].startswith("privacy"):
        s1 = json.loads((tmp_path / "one" / "privacy.json").read_text())
        s2 = json.loads((tmp_path / "two" / "privacy.json").read_text())
        assert s1["ledger"] == s2["ledger"] and s1["epsilon"] == s2["epsilon"]


def test_two_processes_give_the_one_process_sft_run(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(40))
    args = ["train.max_steps=3", "train.batch_size=8", "train.micro_batch_size=4"]
    assert launch(tmp_path, 1, "sft", "one", data, *args).returncode == 0
    two = launch(tmp_path, 2, "sft", "two", data, *args)
    assert two.returncode == 0, two.stderr[-3000:]
    assert_same_weights(tmp_path / "one", tmp_path / "two")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_on_one_process(tmp_path, pairs, parallel):
    args = [*PAIRS[1:], "train.max_steps=4", "train.save_every=2", f"train.parallel={parallel}"]
    assert launch(tmp_path, 1, "dpo", "whole", pairs, *args).returncode == 0
    two = launch(tmp_path, 2, "dpo", "killed", pairs, *args)
    assert two.returncode == 0, two.stderr[-3000:]
    # As if killed right after the step-2 checkpoint: later state gone.
    killed = tmp_path / "killed"
    shutil.rmtree(killed / "checkpoints" / "step-000004")
    for sub in ("model", "adapter", "privacy.json"):
        path = killed / sub
        if path.is_dir():
            shutil.rmtree(path)
    if parallel == "fsdp":
        assert (killed / "checkpoints" / "step-000002" / "dcp").is_dir()  # sharded
    resumed = launch(tmp_path, 1, "dpo", "killed", pairs, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "whole", killed)


NOISE_ON_EVERY_RANK = """
import sys
import torch
import torch.distributed as dist
from privdpo.privacy import dpsgd

reduce = dpsgd.all_reduce_sum


def reduce_then_noise_per_rank(world, tensors):
    # The bug: each rank adds its own noise to the summed clipped gradients.
    reduce(world, tensors)
    if world.active:
        gen = torch.Generator().manual_seed(1000 + dist.get_rank())
        for t in tensors:
            t.add_(torch.randn(t.shape, generator=gen))


dpsgd.all_reduce_sum = reduce_then_noise_per_rank
from privdpo.cli import main

sys.exit(main())
"""


def test_noise_added_on_every_rank_is_caught(tmp_path, pairs):
    script = tmp_path / "buggy.py"
    script.write_text(NOISE_ON_EVERY_RANK)
    result = launch(tmp_path, 2, "dpo", "buggy", pairs, *PAIRS, *DP_PAIR, script=script)
    assert result.returncode != 0
    assert "the noised gradients differ between ranks" in result.stderr


@pytest.mark.parametrize(("dtype", "offload"), [(torch.float32, False), (torch.bfloat16, True)])
def test_shard_model_passes_mixed_precision_and_cpu_offload_to_fully_shard(
    monkeypatch, dtype, offload
):
    import torch.distributed.fsdp as fsdp

    from privdpo.config import TrainConfig
    from privdpo.distributed import World
    from privdpo.models import build_preset
    from privdpo.training import shard_model

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, **options: calls.append(options))
    model, _ = build_preset("tiny", dtype)
    cfg = TrainConfig(parallel="fsdp", fsdp_cpu_offload=offload)
    shard_model(model, cfg, World(rank=0, size=2))
    assert len(calls) == len(model.get_decoder().layers)  # each decoder layer, alike
    options = calls[0]
    if dtype == torch.bfloat16:  # computes in bf16, sums the ranks' gradients in float32
        mp = options["mp_policy"]
        assert (mp.param_dtype, mp.reduce_dtype) == (torch.bfloat16, torch.float32)
    else:
        assert "mp_policy" not in options
    if offload:
        assert isinstance(options["offload_policy"], fsdp.CPUOffloadPolicy)
        assert not options["offload_policy"].pin_memory  # nothing to pin for on a CPU
    else:
        assert "offload_policy" not in options


RANK_ONE_FAILS = """
import os
import sys
from privdpo.errors import UserError
from privdpo.recipes import dpo

load = dpo.load_preference_data


def load_fails_on_rank_one(*args, **kwargs):
    # As if rank 1 alone could not read its data (a file missing on one server, say).
    if os.environ["RANK"] == "1":
        raise UserError("data.train: rank 1 cannot read its data")
    return load(*args, **kwargs)


dpo.load_preference_data = load_fails_on_rank_one
from privdpo.cli import main

sys.exit(main())
"""


def test_a_failure_on_one_rank_stops_all_with_that_ranks_error(tmp_path, pairs):
    script = tmp_path / "rank_one_fails.py"
    script.write_text(RANK_ONE_FAILS)
    # Rank 0 goes on to wait for rank 1 in a collective; gloo would wait 30 minutes, so
    # finishing inside this timeout means torchrun stopped it.
    result = launch(tmp_path, 2, "dpo", "run", pairs, *PAIRS, script=script, timeout=240)
    assert result.returncode != 0
    assert "privdpo dpo [rank 1]: error: data.train: rank 1 cannot read its data" in result.stderr
    # Rank 0 either is stopped by torchrun or sees its peer gone first, and says so briefly.
    assert "[rank 0]: error" not in result.stderr and "[rank 0]: failed" not in result.stderr
    assert not re.search(r'File "[^"]*/privdpo/', result.stderr), result.stderr[-3000:]
    assert "terminate called" not in result.stderr


@pytest.mark.parametrize("outcome", ["success", "user-error", "bug"])
def test_main_leaves_the_process_group_on_every_way_out(tmp_path, monkeypatch, outcome):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )

    def recipe(args):
        if outcome == "user-error":
            raise UserError("a mistake")
        if outcome == "bug":
            raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_dpo", recipe)
    try:
        if outcome == "bug":
            with pytest.raises(RuntimeError, match="a bug"):
                cli.main(["dpo", "config.yaml"])
        else:
            assert cli.main(["dpo", "config.yaml"]) == (2 if outcome == "user-error" else 0)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_a_collective_that_lost_its_peer_blames_the_other_rank(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")

    def recipe(args):  # what gloo raises when the other rank's process has ended
        raise RuntimeError("[pair.cc:553] Connection closed by peer [127.0.0.1]:16281.")

    monkeypatch.setattr(cli, "_dpo", recipe)
    assert cli.main(["dpo", "config.yaml"]) == 1
    err = capsys.readouterr().err
    assert err == "privdpo dpo [rank 0]: stopped: another rank ended (its error is the cause)\n"


def test_an_unexpected_error_on_a_rank_names_the_rank(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")

    def recipe(args):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_dpo", recipe)
    with pytest.raises(RuntimeError, match="a bug"):  # a bug keeps its traceback
        cli.main(["dpo", "config.yaml"])
    assert "privdpo dpo [rank 1]: failed (traceback below)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["eval", "pairs", "audit"])
def test_one_process_commands_refuse_torchrun_early(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    # The config does not exist: the refusal comes before it is read.
    assert cli.main([command, str(tmp_path / "missing.yaml")]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(
        f"privdpo {command} [rank 1]: error: privdpo {command} runs as one process; run it"
        " without torchrun"
    )
    assert "missing.yaml" not in err and "Traceback" not in out + err


def test_eval_under_torchrun_stops_every_rank_with_a_clear_error(tmp_path):
    config = tmp_path / "eval.yaml"
    config.write_text("{}\n")
    cmd = [str(TORCHRUN), "--nproc_per_node", "2", "--master_port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*cmd, "-m", "privdpo", "eval", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode != 0
    # Each rank refuses on its own; torchrun ends the other as soon as the first exits, so
    # the first rank's error is certain to be printed, the other's only if it came first.
    assert re.search(
        r"privdpo eval \[rank [01]\]: error: privdpo eval runs as one process", result.stderr
    ), result.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.yaml"]  # nothing ran
    assert not re.search(r'File "[^"]*/privdpo/', result.stderr), result.stderr[-3000:]


def test_the_slurm_example_is_a_valid_script():
    script = REPO / "examples" / "slurm_dpo.sh"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    text = script.read_text()
    # One torchrun per node, joined by the c10d rendezvous on the first node, running privdpo.
    for flag in ("--nnodes", "--nproc_per_node", "--rdzv_id", "--rdzv_backend c10d"):
        assert flag in text, flag
    assert re.search(r'--rdzv_endpoint "?\$HEAD:\d+', text)
    assert re.search(r"srun torchrun\b", text) and "-m privdpo dpo" in text
