"""`privdpo inspect`: each planted problem is found (duplicates, near-duplicates, train/eval
overlap, contradictions, length bias, identical, empty and truncated responses), a clean
file reports none, user ids never appear, and a training run writes inspect.json into its
run directory and its report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from conftest import write_jsonl
from privdpo.cli import main

WORDS = (
    "river mountain coffee window garden silver market winter doctor engine paper planet "
    "forest music yellow bridge castle orange summer letter island camera pocket thunder "
    "candle rocket violin desert meadow harbor lantern marble pepper saddle tunnel velvet"
).split()


def sentence(r: random.Random, n: int) -> str:
    return " ".join(r.choice(WORDS) for _ in range(n))


def clean_rows(n: int = 120, seed: int = 0) -> list[dict]:
    """Distinct random prompts; chosen and rejected of independent random lengths."""
    r = random.Random(seed)
    return [
        {
            "prompt": f"Question: {sentence(r, 14)}?",
            "chosen": " " + sentence(r, r.randint(3, 9)),
            "rejected": " " + sentence(r, r.randint(3, 9)),
            "user_id": f"person-{i % 7}",
        }
        for i in range(n)
    ]


def inspect(tmp_path: Path, capsys, data: Path, *overrides: str) -> tuple[dict, str]:
    out = tmp_path / "inspect.json"
    code = main(["inspect", str(data), f"inspect.output={out}", *overrides])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    return json.loads(out.read_text()), printed.out + out.read_text()


def test_a_clean_file_has_no_problem(tmp_path, capsys):
    data = write_jsonl(tmp_path / "clean.jsonl", clean_rows())
    report, text = inspect(tmp_path, capsys, data)
    assert report["problems"] == [], report["problems"]
    assert "problems: none found" in text
    assert report["prompts"]["exact"]["prompts_repeated"] == 0
    assert report["prompts"]["near"]["pairs"] == 0
    assert report["prompts"]["train_eval"]["shared_exact"] == 0
    assert report["contradictions"]["opposed_pairs"] == 0
    assert 0.4 < report["length_bias"]["chosen_longer_of_differing"] < 0.6


def test_each_planted_problem_is_found(tmp_path, capsys):
    rows = clean_rows()
    r = random.Random(1)
    train = rows[:100]
    train += [dict(rows[i], chosen=" " + sentence(r, 5)) for i in range(5)]  # 5 repeated prompts
    near = rows[10]["prompt"].replace("Question:", "Query:")  # one token differs
    train.append(dict(rows[10], prompt=near))
    a, b = " the first answer here", " a second answer"
    train += [  # A over B and B over A for one prompt
        {"prompt": "Which is right?", "chosen": a, "rejected": b, "user_id": "person-1"},
        {"prompt": "Which is right?", "chosen": b, "rejected": a, "user_id": "person-2"},
    ]
    train.append({"prompt": "Same?", "chosen": " yes", "rejected": " yes"})
    train.append({"prompt": "Empty?", "chosen": "", "rejected": " no"})
    train.append({"prompt": "Long?", "chosen": " " + sentence(r, 200), "rejected": " no"})
    evals = rows[100:] + [rows[0], rows[1], rows[2]]  # 3 eval prompts also in train
    data = write_jsonl(tmp_path / "train.jsonl", train)
    held = write_jsonl(tmp_path / "eval.jsonl", evals)
    report, text = inspect(tmp_path, capsys, data, f"data.eval={held}", "data.max_length=128")
    p = report["prompts"]
    # rows 0-4 twice in train (0-2 once more in eval), "Which is right?" twice
    assert p["exact"]["prompts_repeated"] == 6
    assert p["near"]["pairs"] == 1
    assert p["train_eval"]["shared_exact"] == 3
    assert report["contradictions"] == {"prompts": 1, "opposed_pairs": 1}
    assert report["chosen_equals_rejected"] == 1
    assert report["empty_responses"] == 1
    assert report["truncated"] == 1
    names = [problem.split(":")[0] for problem in report["problems"]]
    for name in (
        "duplicate prompts",
        "near-duplicate prompts",
        "train/eval overlap",
        "contradictory pairs",
        "chosen equals rejected",
        "empty responses",
        "truncated",
    ):
        assert name in names, (name, names)
    assert "length bias" not in names


def test_length_bias_is_found(tmp_path, capsys):
    r = random.Random(2)
    rows = [
        dict(row, chosen=" " + sentence(r, 12), rejected=" " + sentence(r, 4))
        for row in clean_rows()
    ]
    rows[0]["chosen"], rows[0]["rejected"] = rows[0]["rejected"], rows[0]["chosen"]
    report, _ = inspect(tmp_path, capsys, write_jsonl(tmp_path / "long.jsonl", rows))
    bias = report["length_bias"]
    assert bias["chosen_longer"] > 0.95 and bias["mean_difference_tokens"] > 5
    assert any(
        problem.startswith("length bias: chosen is longer") for problem in report["problems"]
    )


def test_users_are_counted_never_named(tmp_path, capsys):
    rows = clean_rows(20)
    rows[0]["user_id"] = ""  # no user: counted apart
    report, text = inspect(
        tmp_path, capsys, write_jsonl(tmp_path / "u.jsonl", rows), "data.eval_fraction=0"
    )
    users = report["users"]
    assert users["users"] == 7 and users["rows_without_user_id"] == 1
    # {rows per user: users}: 7 users holding the 19 rows that name one
    assert sum(users["histogram"].values()) == 7
    assert sum(int(rows) * n for rows, n in users["histogram"].items()) == 19
    assert "person-" not in text


def test_sft_data_and_a_run_config_can_be_inspected(tmp_path, capsys):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in clean_rows(30)]
    rows.append(rows[0])
    data = write_jsonl(tmp_path / "sft.jsonl", rows)
    config = tmp_path / "sft.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": {"train": str(data), "eval_fraction": 0.0},
                "output": {"dir": str(tmp_path / "run")},
            }
        )
    )
    report, _ = inspect(tmp_path, capsys, config)
    assert report["kind"] == "sft" and "length_bias" not in report
    assert report["prompts"]["exact"] == {"prompts_repeated": 1, "extra_rows": 1}


def test_a_training_run_writes_inspect_json_and_reports_it(tmp_path):
    rows = clean_rows(12)
    rows.append(rows[0])
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = tmp_path / "dpo.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"preset": "tiny"},
                "data": {"train": str(data), "eval_fraction": 0.0, "max_length": 64},
                "train": {"max_steps": 1, "batch_size": 4, "micro_batch_size": 4},
                "dpo": {"beta": 0.1},
                "output": {"dir": str(tmp_path / "run"), "progress_bar": False},
            }
        )
    )
    assert main(["dpo", str(config)]) == 0
    report = json.loads((tmp_path / "run" / "inspect.json").read_text())
    assert report["prompts"]["exact"]["prompts_repeated"] == 1
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Data inspection" in html and "duplicate prompts" in html
    assert "person-" not in html
