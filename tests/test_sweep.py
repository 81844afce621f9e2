"""`privdpo sweep` through the real CLI on the tiny preset: a 2 x 2 grid of beta and epsilon
trains four runs and compares them in sweep.json and sweep.html (opened in headless
Chromium); an interrupted sweep run again reuses the finished point untouched, resumes the
interrupted one exactly, and runs the rest; grid and config mistakes stop it before any
run starts; the best point is the one with the best named metric."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import dp_accounting
import pytest

import privdpo.recipes.dpo
from conftest import REPO, Crash, crash_after_step, sft_rows, without_timing, write_jsonl
from privdpo.cli import main
from privdpo.metrics import read_metrics
from privdpo.privacy.ledger import PrivacyLedger, composed_epsilon
from privdpo.report import fmt_number
from privdpo.sweep import Point, parse_grid, plan_sweep, point_name, sweep_privacy
from test_dpo import marker_pairs
from test_report import check_report

GRID = ["dpo.beta=0.1,0.5", "privacy.target_epsilon=8,inf"]
NAMES = [
    "beta-0.1_target_epsilon-8",
    "beta-0.1_target_epsilon-inf",
    "beta-0.5_target_epsilon-8",
    "beta-0.5_target_epsilon-inf",
]


def write_config(root: Path) -> Path:
    """A dpo config of 3 steps, evaluated and checkpointed at every step."""
    pairs = write_jsonl(root / "pairs.jsonl", marker_pairs(24))
    config = root / "sweep.yaml"
    config.write_text(
        "model: {preset: tiny}\n"
        f"data: {{train: {pairs}, eval_fraction: 0.25}}\n"
        "train: {max_steps: 3, batch_size: 6, micro_batch_size: 6, lr: 2.0e-3,"
        " eval_every: 1, save_every: 1}\n"
        "dpo: {beta: 0.1}\n"
        "output: {progress_bar: false}\n"
    )
    return config


def sweep(config: Path, out: Path, *args: str) -> int:
    """`privdpo sweep CONFIG output.dir=OUT --grid ...` (any other args after the grid)."""
    return main(["sweep", str(config), f"output.dir={out}", "--grid", *GRID, *args])


def mtimes(directory: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> dict:
    """An uninterrupted 2 x 2 sweep, with sweep.json and sweep.html as it wrote them."""
    root = tmp_path_factory.mktemp("sweep")
    config = write_config(root)
    assert sweep(config, root / "whole") == 0
    out = root / "whole"
    return {
        "config": config,
        "dir": out,
        "json": json.loads((out / "sweep.json").read_text()),
        "html": (out / "sweep.html").read_text(),
    }


def test_a_sweep_trains_every_point_and_compares_them(whole, tmp_path):
    out, result = whole["dir"], whole["json"]
    points = result["points"]
    assert [p["name"] for p in points] == NAMES
    for p in points:
        assert (out / p["name"] / "model" / "model.safetensors").is_file()
        assert (out / p["name"] / "sweep_point.json").is_file()
        assert p["status"] == "ran" and p["steps"] == 3
    values = [(p["values"]["dpo.beta"], p["values"]["privacy.target_epsilon"]) for p in points]
    assert values == [(0.1, 8), (0.1, math.inf), (0.5, 8), (0.5, math.inf)]
    for p in points:
        if p["values"]["privacy.target_epsilon"] == math.inf:
            assert not p["private"] and p["epsilon"] == math.inf
            assert not (out / p["name"] / "privacy.json").exists()
        else:
            statement = json.loads((out / p["name"] / "privacy.json").read_text())
            assert p["private"] and 0 < p["epsilon"] == statement["epsilon"] <= 8
            assert p["unit"] == "pair" and p["delta"] == statement["delta"]
        # the metric is the last logged value of eval/rewards/accuracies
        logged = [r for r in read_metrics(out / p["name"]) if "eval/rewards/accuracies" in r]
        assert p["metric"] == logged[-1]["eval/rewards/accuracies"] and logged[-1]["step"] == 3
        assert p["final_metrics"]["eval/rewards/accuracies"] == p["metric"]

    # The sweep as a release: both private points compose on the same pairs; the non-private
    # ones void any guarantee for a choice that looks at them, and the page says both.
    cost = result["privacy"]
    (group,) = cost["composed"]
    private = [p for p in points if p["private"]]
    ledgers = [PrivacyLedger.from_dict(p["ledger"]) for p in private]
    assert group["points"] == [p["name"] for p in private] and group["unit"] == "pair"
    assert group["epsilon"] == pytest.approx(composed_epsilon(ledgers, group["delta"]), rel=1e-12)
    assert group["epsilon"] > max(p["epsilon"] for p in private)
    assert cost["non_private_points"] == 2 and "has no guarantee" in cost["statement"]
    assert "Privacy of the sweep" in whole["html"]

    # The page: self-contained, both curves decode in a real browser, every point is there.
    page = tmp_path / "sweep.html"
    page.write_text(whole["html"])
    check = check_report(page, tmp_path / "browser", {"privacy-utility", "beta"})
    text = check["text"]
    for name in NAMES:
        assert name in text
    assert "inf (no DP)" in text and "no DP" in text
    rows = re.findall(r"<tr[^>]*><td>.*?</tr>", whole["html"])
    for p in points:
        row = next(r for r in rows if f">{p['name']}<" in r)
        assert f'href="{p["name"]}/report.html"' in row  # each point's own report
        beta = p["values"]["dpo.beta"]
        epsilon = "inf (no DP)" if not p["private"] else "8"
        assert f"<td>{beta}</td><td>{epsilon}</td>" in row


def test_the_best_point_has_the_best_metric(whole, capsys):
    points = whole["json"]["points"]
    best = max(points, key=lambda p: p["metric"])  # the first on a tie, like the sweep
    assert whole["json"]["best"] == best["name"]
    assert [p["name"] for p in points if p["best"]] == [best["name"]]
    marked = re.findall(r'<tr class="best"><td><a href="([^/"]+)/', whole["html"])
    assert marked == [best["name"]]

    # Another metric: the finished points are reused, and loss is lower-is-better.
    out = whole["dir"]
    before = {name: mtimes(out / name) for name in NAMES}
    assert sweep(whole["config"], out, "--metric", "eval/loss") == 0
    result = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in result["points"]] == ["reused"] * 4
    assert {name: mtimes(out / name) for name in NAMES} == before
    losses = {p["name"]: p["final_metrics"]["eval/loss"] for p in result["points"]}
    assert result["best"] == min(losses, key=losses.get) and result["lower_is_better"]
    assert capsys.readouterr().out.count(": reused (finished earlier") == 4

    # A metric of eval.json, as `privdpo eval` writes it into a point's directory.
    for i, name in enumerate(NAMES):
        evaluation = {"metrics": {"win_rate": {"value": [0.4, 0.7, 0.5, 0.6][i]}}}
        (out / name / "eval.json").write_text(json.dumps(evaluation))
    assert sweep(whole["config"], out, "--metric", "win_rate") == 0
    result = json.loads((out / "sweep.json").read_text())
    assert result["best"] == NAMES[1]
    assert [p["metric"] for p in result["points"]] == [0.4, 0.7, 0.5, 0.6]

    # A metric no point has: the table is still written, and the error lists the choices.
    assert sweep(whole["config"], out, "--metric", "eval/nonsense") == 2
    err = capsys.readouterr().err
    assert "--metric eval/nonsense: no point has it" in err and "win_rate" in err
    assert json.loads((out / "sweep.json").read_text())["best"] is None


def test_an_interrupted_sweep_resumes(whole, tmp_path, monkeypatch, capsys):
    config, out = whole["config"], tmp_path / "killed"
    run_dpo = privdpo.recipes.dpo.run_dpo
    calls = []

    def dies_in_the_second_point(cfg, resume=False):
        calls.append(cfg.output.dir)
        if len(calls) != 2:
            return run_dpo(cfg, resume)
        with crash_after_step(2):  # after step 2's metrics; its checkpoint is step 1
            run_dpo(cfg, resume)
        raise Crash  # the sweep process dies with it

    monkeypatch.setattr(privdpo.recipes.dpo, "run_dpo", dies_in_the_second_point)
    with pytest.raises(Crash):
        sweep(config, out)
    result = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in result["points"]] == ["ran", "pending", "pending", "pending"]
    assert not (out / NAMES[1] / "sweep_point.json").exists()
    first = mtimes(out / NAMES[0])
    # The third point as an attempt that died before its first checkpoint leaves it.
    (out / NAMES[2]).mkdir()
    for name in ("config.yaml", "data_summary.json"):
        (out / NAMES[2] / name).write_bytes((out / NAMES[1] / name).read_bytes())
    capsys.readouterr()

    assert sweep(config, out) == 0  # the same command again
    lines = [line for line in capsys.readouterr().out.splitlines() if "sweep point" in line]
    assert lines[0].startswith(f"sweep point 1/4 {NAMES[0]}: reused")
    assert lines[1].startswith(f"sweep point 2/4 {NAMES[1]}: resuming")
    assert "step-000001" in lines[1]
    assert lines[2].startswith(f"sweep point 3/4 {NAMES[2]}: starting over")
    assert lines[3].startswith(f"sweep point 4/4 {NAMES[3]}: running in")
    result = json.loads((out / "sweep.json").read_text())
    statuses = [p["status"] for p in result["points"]]
    assert statuses == ["reused", "resumed", "restarted", "ran"]
    assert "beta: 0.5" in (out / NAMES[2] / "config.yaml").read_text()
    assert mtimes(out / NAMES[0]) == first  # not one file of the finished point rewritten
    # The resumed point trained exactly as in the uninterrupted sweep.
    resumed, uninterrupted = out / NAMES[1], whole["dir"] / NAMES[1]
    assert without_timing(read_metrics(resumed)) == without_timing(read_metrics(uninterrupted))
    assert (resumed / "model" / "model.safetensors").is_file()
    metrics = [p["metric"] for p in result["points"]]
    assert metrics == [p["metric"] for p in whole["json"]["points"]]


@pytest.mark.parametrize(
    "axis, says",
    [
        ("dpo.beta", "not an axis; write each axis as KEY=V1,V2,..."),
        ("dpo.beta=0.1", "no axis (a key with two or more comma-separated values)"),
        ("dpo.beta=0.1,,0.5", "an empty value"),
        ("dpo.beta=[0.1,0.5", "unbalanced brackets"),
        ("output.dir=a,b", "output.* cannot vary"),
    ],
)
def test_bad_grid_syntax_is_a_clear_error(tmp_path, capsys, axis, says):
    config = write_config(tmp_path)
    assert main(["sweep", str(config), f"output.dir={tmp_path / 's'}", "--grid", axis]) == 2
    err = capsys.readouterr().err
    assert "privdpo sweep: error: --grid " in err and axis in err and says in err
    assert not (tmp_path / "s").exists()


def test_config_problems_name_their_points_before_anything_runs(tmp_path, capsys):
    config = write_config(tmp_path)
    args = ["sweep", str(config), f"output.dir={tmp_path / 's'}", "train.max_stepz=3"]
    args += ["--grid", "dpo.beta=0.1,-1", "privacy.target_epsilon=8,inf"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "sweep: 4 of 4 points have config problems; nothing was run" in err
    # a problem of every point once, and each bad point's own problem
    assert err.count("train.max_stepz: unknown key") == 1
    assert "every point: train.max_stepz: unknown key; did you mean 'train.max_steps'?" in err
    for name in ("beta--1_target_epsilon-8", "beta--1_target_epsilon-inf"):
        assert f"point {name}: dpo.beta: must be positive, got -1.0" in err
    assert "point beta-0.1" not in err
    assert not (tmp_path / "s").exists()


def test_a_changed_config_does_not_reuse_earlier_points(whole, capsys):
    before = (whole["dir"] / "sweep.json").read_text()
    assert sweep(whole["config"], whole["dir"], "train.lr=5e-3") == 2
    err = capsys.readouterr().err
    assert "4 of 4 points have problems with earlier runs; nothing was run" in err
    assert "train.lr: 0.002 -> 0.005" in err and "delete" in err
    assert (whole["dir"] / "sweep.json").read_text() == before


def test_a_point_directory_that_is_not_a_run_stops_the_sweep(tmp_path, capsys):
    config = write_config(tmp_path)
    (tmp_path / "s" / NAMES[3]).mkdir(parents=True)
    (tmp_path / "s" / NAMES[3] / "notes.txt").write_text("mine")
    assert sweep(config, tmp_path / "s") == 2
    err = capsys.readouterr().err
    assert f"point {NAMES[3]}: {tmp_path / 's' / NAMES[3]} holds files but no privdpo run" in err
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [NAMES[3]]


def test_grid_values_and_point_names():
    axes, fixed = parse_grid(["train.adam_betas=[0.9,0.99],[0.8,0.9]", "train.seed=0,1"])
    assert axes[0].texts == ["[0.9,0.99]", "[0.8,0.9]"] and fixed == []
    texts = {"train.adam_betas": "[0.9,0.99]", "train.seed": "1"}
    assert point_name(axes, texts) == "adam_betas-0.9_0.99_seed-1"
    same_last, fixed = parse_grid(["train.seed=0,1", "eval.seed=2,3", "train.lr=[1]"])
    assert [a.label for a in same_last] == ["train-seed", "eval-seed"]
    assert fixed == ["train.lr=[1]"]  # one value: an override for every point
    # One epsilon for every point turns privacy on (or off) as an axis value does.
    assert parse_grid(["dpo.beta=0.1,0.5", "privacy.target_epsilon=8"])[1] == [
        "privacy.enabled=true",
        "privacy.target_epsilon=8",
    ]
    assert parse_grid(["dpo.beta=0.1,0.5", "privacy.target_epsilon=inf"])[1] == [
        "privacy.enabled=false",
        "privacy.target_epsilon=null",
    ]


def test_the_example_config_plans_the_readme_grid(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)  # example paths are relative to the repository root
    axes, fixed = parse_grid(GRID)
    overrides = [f"output.dir={tmp_path / 's'}", *fixed]
    sweep_dir, points = plan_sweep("examples/sweep_tiny.yaml", axes, overrides)
    assert [p.name for p in points] == NAMES and {p.action for p in points} == {"run"}
    assert [p.cfg.privacy.enabled for p in points] == [True, False, True, False]
    assert [p.cfg.privacy.target_epsilon for p in points] == [8, None, 8, None]
    assert [p.cfg.dpo.beta for p in points] == [0.1, 0.1, 0.5, 0.5]
    assert points[0].cfg.output.dir == str(sweep_dir / NAMES[0])


def test_sweep_help_explains_it(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["sweep", "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for words in ("--grid", "privacy.target_epsilon=inf", "reused", "resumes", "--metric"):
        assert words in out


USER_DP = [
    "privacy.enabled=true",
    "privacy.unit=user",
    "privacy.contribution_bound=2",
    "train.batch_size=4",
    "train.micro_batch_size=4",
    "train.max_steps=3",
    "train.lr=1e-3",
    "data.eval_fraction=0",
    "output.progress_bar=false",
]


def plain_pld_epsilon(segments: list, delta: float, interval: float) -> float:
    """[q, sigma, steps] segments, each a Poisson-subsampled Gaussian self-composed, composed
    by dp-accounting's PLD accountant: no privdpo code."""
    events = [
        dp_accounting.SelfComposedDpEvent(
            dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
        )
        for q, sigma, steps in segments
    ]
    accountant = dp_accounting.pld.PLDAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
        value_discretization_interval=interval,
    )
    return accountant.compose(dp_accounting.ComposedDpEvent(events)).get_epsilon(delta)


def test_a_sweep_from_a_dp_sft_parent_composes_the_parent_once(tmp_path, capsys):
    """User-level DP-SFT (users u0..u4), then a sweep of two user-level DP-DPO points from
    its model on users u0..u6: the sweep's total composes the SFT stage (once) with both
    points, and is at least every point's own end-to-end epsilon."""
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    salt = f"data.user_salt_file={tmp_path / 'salt'}"
    sft_data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(30))
    sft = ["sft", str(empty), "model.preset=tiny", f"data.train={sft_data}", salt]
    sft += [f"output.dir={tmp_path / 'sft'}", "privacy.noise_multiplier=1.0", *USER_DP]
    assert main(sft) == 0
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(28))
    args = ["sweep", str(empty), f"output.dir={tmp_path / 'sweep'}", "dpo.beta=0.1", salt]
    args += [f"model.path={tmp_path / 'sft' / 'model'}", f"data.train={pairs}", *USER_DP]
    args += ["--grid", "privacy.noise_multiplier=1.0,2.0", "--metric", "loss"]
    assert main(args) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    points = result["points"]
    cost = result["privacy"]
    (group,) = cost["composed"]
    assert group["points"] == [p["name"] for p in points] and group["unit"] == "user"
    assert [s["recipe"] for s in group["earlier_stages"]] == ["sft"]
    assert group["stages_composed"] == 3  # the SFT stage once, and each point
    assert group["same_users"] == "the same 7 users in every point, by salted hash of the user ids"

    # By hand: the SFT stage's and both points' steps, composed by dp-accounting.
    sft_statement = json.loads((tmp_path / "sft" / "privacy.json").read_text())
    interval = sft_statement["accountant_settings"]["value_discretization_interval"]
    own = [seg for p in points for seg in p["ledger"]["segments"]]
    parent = sft_statement["ledger"]["segments"]
    by_hand = plain_pld_epsilon([*parent, *own], group["delta"], interval)
    assert group["epsilon"] == pytest.approx(by_hand, rel=1e-6)
    assert cost["epsilon"] == {"user": group["epsilon"]}
    for p in points:
        statement = json.loads((Path(p["dir"]) / "privacy.json").read_text())
        assert p["epsilon"] == statement["epsilon"] > statement["stage_epsilon"]
        assert p["earlier_stages"][0]["ledger"] == sft_statement["ledger"]
        assert group["epsilon"] >= p["epsilon"]
    # The shared parent counts once, not once per point; without it the total is smaller.
    twice = plain_pld_epsilon([*parent, *parent, *own], group["delta"], interval)
    assert group["epsilon"] < twice
    assert group["epsilon"] > plain_pld_epsilon(own, group["delta"], interval)

    html = (tmp_path / "sweep" / "sweep.html").read_text()
    section = html[html.index('<section id="privacy">') :]
    section = section[: section.index("</section>")]
    assert f"<td>{fmt_number(by_hand)}</td>" in section
    assert "the sft stage" in section and "counted once each" in section
    assert "the same 7 users" in section
    assert f"epsilon = {fmt_number(group['epsilon'])}" in out


def made_point(name: str, unit: str, users, earlier=(), no_guarantee=()) -> Point:
    """A finished private point as sweep_privacy sees it: its record and hashed users."""
    sigma = {"a": 1.0, "b": 1.5, "c": 2.0, "d": 3.0}[name]
    point = Point(name, {}, [])
    point.record = {
        "private": True,
        "unit": unit,
        "delta": 1e-5,
        "epsilon": None,
        "ledger": {
            "unit": unit,
            "delta": 1e-5,
            "accountant": "pld",
            "segments": [[0.1, sigma, 20]],
        },
        "stage_id": f"stage-{name}",
        "earlier_stages": list(earlier),
        "no_guarantee": list(no_guarantee),
        "relative_to": None,
    }
    point.users = ("salt", frozenset(users)) if users is not None else None
    return point


def test_sweep_privacy_groups_points_by_their_users():
    parent_ledger = {
        "unit": "user",
        "delta": 1e-5,
        "accountant": "pld",
        "segments": [[0.2, 1.2, 10]],
    }
    parent = {"id": "sft-1", "recipe": "sft", "run_dir": "runs/sft", "ledger": parent_ledger}
    tokenizer = {
        "id": "tok-1",
        "recipe": "tokenizer fit",
        "run_dir": "runs/init",
        "reason": "2 of this run's users also contributed to the tokenizer fit stage",
    }
    a = made_point("a", "user", {"h1", "h2"}, [parent], [tokenizer])
    b = made_point("b", "user", {"h2", "h3"}, [parent], [tokenizer])
    c = made_point("c", "user", {"h9"})  # disjoint from a and b: parallel composition
    d = made_point("d", "pair", None)  # no user ids: its own unit
    cost = sweep_privacy([a, b, c, d])
    ab, c_group, d_group = cost["composed"]
    assert ab["points"] == ["a", "b"] and c_group["points"] == ["c"] and d_group["points"] == ["d"]
    ledgers = [
        PrivacyLedger.from_dict(x) for x in (parent_ledger, a.record["ledger"], b.record["ledger"])
    ]
    assert ab["epsilon"] == pytest.approx(composed_epsilon(ledgers, 1e-5), rel=1e-12)
    assert ab["stages_composed"] == 3 and ab["same_users"].startswith("3 users, overlapping")
    alone = PrivacyLedger.from_dict(c.record["ledger"]).epsilon()
    assert c_group["epsilon"] == pytest.approx(alone, rel=1e-12)
    assert cost["epsilon"] == {"user": max(ab["epsilon"], alone), "pair": d_group["epsilon"]}
    assert d_group["same_users"].startswith("assumed the same")
    text = cost["statement"]
    assert "compose in parallel" in text
    assert text.count("also contributed to the tokenizer fit stage") == 1  # carried, once
    assert cost["no_guarantee"] == [tokenizer]

    # Users that cannot be compared (another salt) are the same users: one group.
    c.users = ("another salt", frozenset({"h9"}))
    (abc, _) = sweep_privacy([a, b, c, d])["composed"]
    assert abc["points"] == ["a", "b", "c"]
