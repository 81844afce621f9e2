"""Lineage and the end-to-end statement: a DPO run on a model privdpo trained reads that
model's stages; overlapping users of a non-private stage get no guarantee (warned, stated,
refused on request), disjoint users compose in parallel, private stages on the same users
compose in dp-accounting; `privdpo privacy verify` reproduces every epsilon; no user id
appears in clear in anything a run writes; the privacy package has no import cycle."""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import dp_accounting
import pytest
import yaml

import privdpo
from conftest import REPO, sft_rows, write_jsonl
from privdpo.cli import main
from privdpo.privacy.accounting import PLD_VALUE_DISCRETIZATION, dpsgd_event
from privdpo.privacy.verify import verify
from test_dpo import marker_pairs


def cli(tmp_path: Path, command: str, name: str, data: Path, *overrides: str) -> int:
    config = tmp_path / "empty.yaml"
    config.write_text("{}\n")
    base = [
        f"data.train={data}",
        f"output.dir={tmp_path / name}",
        "output.progress_bar=false",
        "train.lr=1e-3",
        f"data.user_salt_file={tmp_path / 'salt'}",
    ]
    if not any(o.startswith("model.path=") for o in overrides):
        base.append("model.preset=tiny")
    return main([command, str(config), *base, *overrides])


USER_DP = [
    "privacy.enabled=true",
    "privacy.unit=user",
    "privacy.contribution_bound=2",
    "privacy.noise_multiplier=1.0",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "train.max_steps=3",
    "data.eval_fraction=0",
]


def sft_then_dpo(tmp_path, sft_users: str, *sft_overrides, dpo_overrides=()):
    """SFT (users `sft_users`0..4) then user-level DP-DPO (users u0..u6) on its model."""
    rows = [dict(r, user_id=f"{sft_users}{i % 5}") for i, r in enumerate(sft_rows(30))]
    sft_data = write_jsonl(tmp_path / "sft.jsonl", rows)
    assert cli(tmp_path, "sft", "sft", sft_data, "train.max_steps=3", *sft_overrides) == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(28))
    code = cli(
        tmp_path,
        "dpo",
        "dpo",
        pairs,
        f"model.path={tmp_path / 'sft' / 'model'}",
        *USER_DP,
        *dpo_overrides,
    )
    return code


def statement_of(run: Path) -> dict:
    return json.loads((run / "privacy.json").read_text())


def test_a_non_private_parent_on_the_same_users_leaves_them_unprotected(tmp_path, capsys):
    assert sft_then_dpo(tmp_path, "u") == 0
    out = capsys.readouterr().out
    assert "warning: 5 of this run's users also contributed to the sft stage" in out
    s = statement_of(tmp_path / "dpo")
    (entry,) = s["end_to_end"]["no_guarantee"]
    assert entry["recipe"] == "sft" and entry["overlapping_users"] == 5
    assert "those users have no differential-privacy guarantee in this model" in s["summary"]
    # The headline bound is claimed only for the others.
    assert "other than those named below" in s["summary"]
    report = (tmp_path / "dpo" / "report.html").read_text()
    assert "those users have no differential-privacy guarantee in this model" in report
    assert "other than those named below" in report
    # The same statement sits beside the exported model, with its lineage.
    assert statement_of(tmp_path / "dpo" / "model") == s
    assert (tmp_path / "dpo" / "model" / "lineage.json").is_file()
    lineage = json.loads((tmp_path / "dpo" / "lineage.json").read_text())
    assert [st["recipe"] for st in lineage["stages"]] == ["sft", "dpo"]
    check_lineage_fields(lineage, tmp_path / "pairs.jsonl", 28, tmp_path / "sft")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weights_index_by_hand(model: Path) -> str:
    """The weight index as lineage.json documents it: per safetensors file its name, size
    and JSON header."""
    digest = hashlib.sha256()
    for f in sorted(model.glob("*.safetensors")):
        blob = f.read_bytes()
        size = int.from_bytes(blob[:8], "little")
        digest.update(f.name.encode() + b"\0" + str(len(blob)).encode() + blob[8 : 8 + size])
    return digest.hexdigest()


def check_lineage_fields(lineage: dict, data: Path, rows: int, parent_run: Path) -> None:
    """The inputs, code, starting model and parent-ledger fields of a DPO run's lineage
    that started from the model `parent_run` exported."""
    (record,) = lineage["inputs"]
    assert record == {"path": str(data), "split": "train", "sha256": sha256(data), "rows": rows}
    assert lineage["code"]["privdpo"] == privdpo.__version__
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    assert lineage["code"]["git_commit"] == (head or None)
    model = parent_run / "model"
    start = lineage["start_model"]
    assert start["kind"] == "path" and start["path"] == str(model)
    assert start["trained_by_privdpo"] is True and start["privdpo_run"] == str(parent_run)
    assert start["config_sha256"] == sha256(model / "config.json")
    assert start["weights_index_sha256"] == weights_index_by_hand(model)
    assert start["lineage_json"] == {
        "path": str(model / "lineage.json"),
        "sha256": sha256(model / "lineage.json"),
    }
    privacy = model / "privacy.json"
    assert start["privacy_json"] == (
        {"path": str(privacy), "sha256": sha256(privacy)} if privacy.is_file() else None
    )


def test_require_end_to_end_refuses_to_start(tmp_path, capsys):
    code = sft_then_dpo(tmp_path, "u", dpo_overrides=["privacy.require_end_to_end=true"])
    err = capsys.readouterr().err
    assert code == 2
    assert "privacy.require_end_to_end" in err and "without differential privacy" in err
    assert "Traceback" not in err
    assert not (tmp_path / "dpo").exists()  # refused before anything was written


def test_disjoint_users_compose_in_parallel(tmp_path):
    assert sft_then_dpo(tmp_path, "public-reviewer-") == 0
    s = statement_of(tmp_path / "dpo")
    end = s["end_to_end"]
    assert end["composition"] == "parallel" and end["no_guarantee"] == []
    assert end["parallel_stages"][0]["overlapping_users"] == 0
    assert end["epsilon"] == s["stage_epsilon"]
    assert "parallel composition" in s["summary"]


def test_private_stages_on_the_same_users_compose_in_dp_accounting(tmp_path):
    assert sft_then_dpo(tmp_path, "u", *USER_DP) == 0
    sft, dpo = statement_of(tmp_path / "sft"), statement_of(tmp_path / "dpo")
    assert dpo["end_to_end"]["composition"] == "sequential"
    # By hand: both stages' DP-SGD events, composed by dp-accounting's PLD accountant.
    events = [
        dpsgd_event(q, sigma, steps)
        for statement in (sft, dpo)
        for q, sigma, steps in statement["ledger"]["segments"]
    ]
    accountant = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=PLD_VALUE_DISCRETIZATION,
    )
    by_hand = accountant.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(dpo["delta"])
    assert dpo["epsilon"] == pytest.approx(by_hand, rel=1e-6)
    assert dpo["epsilon"] > dpo["stage_epsilon"]  # composing costs privacy
    lineage = json.loads((tmp_path / "dpo" / "lineage.json").read_text())
    check_lineage_fields(lineage, tmp_path / "pairs.jsonl", 28, tmp_path / "sft")
    assert lineage["start_model"]["privacy_json"] is not None  # the parent's ledger, hashed
    checks = verify(tmp_path / "dpo")
    assert [c["name"] for c in checks] == ["this run", "end to end"]
    assert all(c["matches"] and not c["below_default"] for c in checks)


def saved_preset(directory: Path) -> Path:
    """The tiny preset saved as a user's own model directory: no lineage.json."""
    from privdpo.models import build_preset

    model, tokenizer = build_preset("tiny")
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_model_privdpo_did_not_train_makes_the_statement_relative_to_it(tmp_path, capsys):
    model = saved_preset(tmp_path / "my-model")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(28))
    assert cli(tmp_path, "dpo", "dpo", pairs, f"model.path={model}", *USER_DP) == 0
    assert f"note: the starting model {model} was not trained by privdpo" in capsys.readouterr().out
    s = statement_of(tmp_path / "dpo")
    end = s["end_to_end"]
    assert end["relative_to_starting_model"] == str(model)
    assert end["composition"] == "single stage" and end["epsilon"] == s["stage_epsilon"]
    assert f"The guarantee is relative to the starting model {model}" in s["summary"]
    report = (tmp_path / "dpo" / "report.html").read_text()
    assert f"Relative to the starting model {model}" in report
    lineage = json.loads((tmp_path / "dpo" / "lineage.json").read_text())
    assert lineage["start_model"]["trained_by_privdpo"] is False
    assert lineage["start_model"]["lineage_json"] is None
    assert [st["recipe"] for st in lineage["stages"]] == ["dpo"]


@pytest.mark.parametrize("where", ["model", "tokenizer_path"])
def test_a_tokenizer_fit_on_the_same_users_leaves_them_unprotected(tmp_path, capsys, where):
    """The tokenizer's lineage (as the demo writes it) beside the model, or in a directory
    of its own named by model.tokenizer_path."""
    from privdpo.demo import tokenizer_lineage

    model = saved_preset(tmp_path / "init")
    pairs = marker_pairs(28)
    corpus = write_jsonl(tmp_path / "corpus.jsonl", [{"text": p["prompt"]} for p in pairs])
    users = sorted({p["user_id"] for p in pairs})
    extra = [f"model.path={model}"]
    if where == "model":
        tokenizer_lineage(model, corpus, users, str(tmp_path / "salt"))
    else:
        tokenizer = tmp_path / "tokenizer"
        shutil.copytree(model, tokenizer)
        tokenizer_lineage(tokenizer, corpus, users, str(tmp_path / "salt"))
        extra.append(f"model.tokenizer_path={tokenizer}")
    data = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    assert cli(tmp_path, "dpo", "dpo", data, *extra, *USER_DP) == 0
    out = capsys.readouterr().out
    assert f"warning: {len(users)} of this run's users also contributed to the tokenizer fit" in out
    s = statement_of(tmp_path / "dpo")
    (entry,) = s["end_to_end"]["no_guarantee"]
    assert entry["recipe"] == "tokenizer fit" and entry["overlapping_users"] == len(users)
    assert "tokenizer fit stage" in s["summary"]
    assert "those users have no differential-privacy guarantee in this model" in s["summary"]
    if where == "model":
        assert s["end_to_end"]["relative_to_starting_model"] is None  # its lineage is known
    else:
        lineage = json.loads((tmp_path / "dpo" / "lineage.json").read_text())
        assert lineage["tokenizer"]["path"] == str(tokenizer)
        assert lineage["tokenizer"]["lineage_json"]["path"] == str(tokenizer / "lineage.json")
        assert [st["recipe"] for st in lineage["stages"]] == ["tokenizer fit", "dpo"]


@pytest.mark.parametrize("private", [True, False])
def test_a_salt_file_inside_the_run_directory_is_refused(tmp_path, capsys, private):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(28))
    salt = tmp_path / "dpo" / "keys" / "salt"
    extra = USER_DP if private else ["train.max_steps=1"]
    code = cli(tmp_path, "dpo", "dpo", pairs, *extra, f"data.user_salt_file={salt}")
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert f"data.user_salt_file: {salt} is inside output.dir {tmp_path / 'dpo'}" in err
    assert not (tmp_path / "dpo").exists() and not salt.exists()


# Every shipped example with privacy on (and the ELS variant of the user-level one): the
# command that runs it and overrides. The sweep's private points are checked below.
EXAMPLES = {
    "audit_sft.yaml": ("audit", []),
    "dpo_private.yaml": ("dpo", []),
    "dpo_user_private.yaml": ("dpo", []),
    "dpo_user_private.yaml els": ("dpo", ["privacy.user_algorithm=els"]),
}


def test_every_private_example_is_verified():
    private = {
        p.name
        for p in (REPO / "examples").glob("*.yaml")
        if ((yaml.safe_load(p.read_text()) or {}).get("privacy") or {}).get("enabled")
    }
    assert private == {name.split()[0] for name in EXAMPLES}


def verify_example(tmp_path: Path, name: str, *overrides: str) -> None:
    """Run the example as shipped (plus `overrides`), then `privdpo privacy verify` it: every
    epsilon of its privacy.json reproduced by plain dp-accounting to 1e-9 relative."""
    command, extra = EXAMPLES[name]
    config = REPO / "examples" / name.split()[0]
    train = yaml.safe_load(config.read_text())["data"]["train"]
    run = tmp_path / "run"
    args = [command, str(config), f"output.dir={run}", "output.progress_bar=false"]
    args += [f"data.train={REPO / train}", f"data.user_salt_file={tmp_path / 'salt'}"]
    assert main([*args, *extra, *overrides]) == 0
    check_verified(run)


def check_verified(run: Path) -> list[dict]:
    statement = statement_of(run)
    checks = verify(run)
    expected = ["this run"]
    stated = [statement["stage_epsilon"]]
    if statement.get("user_algorithm") == "ELS":
        expected.append("group bound")  # the comparison bound is recomputed too
        stated.append(statement["group_privacy_epsilon"])
    if statement["end_to_end"]["composed_stages"]:
        expected.append("end to end")
        stated.append(statement["epsilon"])
    assert [c["name"] for c in checks] == expected
    assert [c["stated"] for c in checks] == stated
    for c in checks:
        assert c["matches"] and c["relative_difference"] <= 1e-9 and not c["below_default"], c
    return checks


@pytest.mark.parametrize("name", EXAMPLES)
def test_verify_reproduces_the_examples_epsilons_in_two_steps(tmp_path, name, capsys):
    verify_example(tmp_path, name, "train.max_steps=2")
    if "els" not in name:  # the command too (ELS's mixture PLD at the default is slow)
        capsys.readouterr()
        assert main(["privacy", "verify", str(tmp_path / "run")]) == 0
        out = capsys.readouterr().out
        assert "this run" in out and " ok" in out and "MISMATCH" not in out


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_verify_reproduces_the_shipped_examples_epsilons(tmp_path, name):
    verify_example(tmp_path, name)


def test_verify_reproduces_the_sweep_examples_private_points(tmp_path):
    """examples/sweep_tiny.yaml's private points (4 steps each) of the README's grid."""
    config = REPO / "examples" / "sweep_tiny.yaml"
    train = yaml.safe_load(config.read_text())["data"]["train"]
    args = ["sweep", str(config), f"output.dir={tmp_path / 'sweep'}"]
    args += [f"data.train={REPO / train}", f"data.user_salt_file={tmp_path / 'salt'}"]
    assert main([*args, "--grid", "dpo.beta=0.1,0.5", "privacy.target_epsilon=8"]) == 0
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["private"] for p in result["points"]] == [True, True]
    for p in result["points"]:
        check_verified(Path(p["dir"]))


def test_an_infinite_group_bound_is_stated_as_none_and_verify_agrees(tmp_path):
    """An ELS run so weakly private that group privacy gives no finite epsilon: privacy.json
    (strict JSON) says None, verify's own search finds no finite bound, and the two match."""
    from privdpo.privacy.ledger import PrivacyLedger
    from privdpo.privacy.planning import PrivacyPlan, UserBound
    from privdpo.privacy.statement import statement, write_statement
    from privdpo.privacy.verify import _compare, plain_group_epsilon

    q, sigma, steps, k = 0.5, 0.4, 3, 2
    ledger = PrivacyLedger("user", 1e-6, "pld", [[q, sigma, steps]], els_bound=k)
    users = UserBound("els", k, "privacy.contribution_bound", 10, 20, 0, {k: 10})
    plan = PrivacyPlan("user", 20, q, steps, sigma, 1.0, 1e-6, "pld", ledger.epsilon(), None, users)
    write_statement(statement(plan, ledger, False, None), tmp_path)
    s = statement_of(tmp_path)
    assert s["group_privacy_epsilon"] is None and 50 < s["stage_epsilon"] < 100
    unit_level = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
    ]
    settings = s["accountant_settings"]
    assert plain_group_epsilon(unit_level, k, 1e-6, settings) == float("inf")
    assert _compare(None, float("inf")) == (True, 0.0)
    assert _compare(None, 3.0)[0] is False and _compare(3.0, float("inf"))[0] is False


def test_verify_catches_a_tampered_statement(tmp_path, capsys):
    assert sft_then_dpo(tmp_path, "u", *USER_DP) == 0
    path = tmp_path / "dpo" / "privacy.json"
    s = json.loads(path.read_text())
    s["stage_epsilon"] *= 0.9  # a statement claiming less than its ledger proves
    path.write_text(json.dumps(s))
    assert main(["privacy", "verify", str(tmp_path / "dpo")]) == 2
    captured = capsys.readouterr()
    assert "MISMATCH" in captured.out and "did not reproduce" in captured.err


def test_no_user_id_in_clear_in_anything_a_user_level_run_writes(tmp_path):
    rows = marker_pairs(28)
    secret_ids = [f"patient-{i:04d}-kim" for i in range(7)]
    for r in rows:
        r["user_id"] = secret_ids[int(r["user_id"][1:])]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    assert cli(tmp_path, "dpo", "run", data, *USER_DP, "data.eval_fraction=0.1") == 0
    # The report shows the per-user histogram of pairs and how many were used.
    s = statement_of(tmp_path / "run")
    histogram = {int(c): n for c, n in s["units_per_user_histogram"].items()}
    total = sum(c * n for c, n in histogram.items())
    assert sum(histogram.values()) == s["users"] == 7
    assert total == s["units_kept"] + s["units_dropped"] == 25  # 3 of 28 pairs held out
    assert s["units_kept"] == sum(min(c, 2) * n for c, n in histogram.items())  # k = 2
    report = (tmp_path / "run" / "report.html").read_text()
    assert 'data-figure="contributions"' in report
    assert f"7 users; {s['units_kept']} of 25 pairs used for training" in report
    written = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert any(p.name == "users.json" for p in written)
    for path in written:
        blob = path.read_bytes()
        for uid in secret_ids:
            assert uid.encode() not in blob, (path, uid)


def test_the_privacy_package_has_no_import_cycle():
    package = REPO / "src" / "privdpo" / "privacy"
    modules = sorted(p.stem for p in package.glob("*.py") if p.stem != "__init__")
    # Each imports alone: in one fresh interpreter, with every privdpo module dropped
    # before the next one's import (torch and the other libraries stay, imported once).
    script = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] == 'privdpo']:\n"
        "        del sys.modules[m]\n"
        "    print(name, flush=True)\n"
        "    importlib.import_module('privdpo.privacy.' + name)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, (result.stdout.split()[-1:], result.stderr[-2000:])
    assert result.stdout.split() == modules
    graph = {}
    for name in modules:
        tree = ast.parse((package / f"{name}.py").read_text())
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module.startswith("privdpo.privacy."):
                    deps.add(node.module.rsplit(".", 1)[1])
                elif node.module == "privdpo.privacy":
                    deps.update(a.name for a in node.names)
        graph[name] = deps & set(modules)
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for dep in graph[node]:
            assert state.get(dep) != 1, f"import cycle: {' -> '.join([*path, node, dep])}"
            if dep not in state:
                visit(dep, [*path, node])
        state[node] = 2

    for name in modules:
        if name not in state:
            visit(name, [])
