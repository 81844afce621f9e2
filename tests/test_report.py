"""The HTML report of real runs (DPO, private DPO, SFT; a few steps each), opened in a real
headless Chromium: every figure must decode in the browser and the key numbers must be in
the text the browser shows. A small script injected into a copy of the report records, after
load, whether each <img> decoded; the same check fails on a corrupted figure and on a
missing one. Chromium is required: without it these tests fail, saying how to install it.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from conftest import sft_rows, write_jsonl
from privdpo.config import DPORunConfig, SFTRunConfig, load_config
from privdpo.errors import UserError
from privdpo.metrics import read_metrics
from privdpo.recipes.dpo import run_dpo
from privdpo.recipes.sft import run_sft
from privdpo.report import main_report, reward_kl_points, write_report
from test_dpo import marker_pairs

INSTALL = "apt-get install -y chromium"

DPO_FIGURES = {
    "loss",
    "rewards-accuracies",
    "rewards-margins",
    "rewards",
    "logps",
    "grad-norm",
    "learning-rate",
    "eval",
}


# ---- the browser check -------------------------------------------------------------------
def find_chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(
        "the report tests open report.html in a real headless Chromium, and `chromium` is"
        f" not on PATH: install it (Debian/Ubuntu: `{INSTALL}`)"
    )


# Runs after every image has loaded or failed. An image counts as rendered when the browser
# decoded it (`complete`, `naturalWidth > 0`) and every pixel it draws on a canvas is
# opaque: the report's figures have an opaque background, and a truncated PNG still has a
# width but leaves its missing rows transparent. It also records the text the page shows
# and whether any script from the report's own content ran.
CHECK_SCRIPT = """<script>
window.addEventListener("load", () => {
  const images = [];
  for (const img of Array.from(document.images)) {
    const decoded = img.complete && img.naturalWidth > 0;
    let opaque = false;
    if (decoded) {
      const canvas = document.createElement("canvas");
      canvas.width = img.naturalWidth;
      canvas.height = img.naturalHeight;
      const context = canvas.getContext("2d");
      context.drawImage(img, 0, 0);
      const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
      opaque = true;
      for (let i = 3; i < pixels.length; i += 4) {
        if (pixels[i] !== 255) { opaque = false; break; }
      }
    }
    const rendered = decoded && opaque;
    img.setAttribute("data-rendered", String(rendered));
    images.push({figure: img.getAttribute("data-figure"), alt: img.alt, rendered: rendered,
                 decoded: decoded, width: img.naturalWidth});
  }
  const check = {images: images, text: document.body.innerText,
                 injected: window.__injected === true};
  const out = document.createElement("pre");
  out.id = "render-check";
  out.textContent = JSON.stringify(check);
  document.body.appendChild(out);
});
</script>"""


class _CheckParser(HTMLParser):
    def __init__(self):
        super().__init__()
        self.inside = False
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "pre" and ("id", "render-check") in attrs:
            self.inside = True

    def handle_endtag(self, tag):
        if tag == "pre":
            self.inside = False

    def handle_data(self, data):
        if self.inside:
            self.text.append(data)


def open_in_chromium(html: str, work: Path) -> dict:
    """Load `html` (as a file:// page) in headless Chromium; return what the check saw."""
    work.mkdir(parents=True, exist_ok=True)
    page = work / "checked.html"
    page.write_text(html.replace("</body>", CHECK_SCRIPT + "</body>"), encoding="utf-8")
    command = [
        find_chromium(),
        "--headless",
        "--no-sandbox",  # tests may run as root (containers, CI)
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={work / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    parser = _CheckParser()
    parser.feed(done.stdout)
    if not parser.text:
        raise AssertionError(
            f"Chromium gave no render check (exit {done.returncode}); stderr:\n"
            + done.stderr[-2000:]
        )
    return json.loads("".join(parser.text))


def assert_figures_rendered(check: dict, expected: set[str]) -> None:
    """Every expected figure is an <img> the browser decoded, and so is every other <img>."""
    by_name = {img["figure"]: img for img in check["images"]}
    missing = sorted(expected - by_name.keys())
    broken = sorted(str(img["figure"]) for img in check["images"] if not img["rendered"])
    unnamed = [img["alt"] for img in check["images"] if not img["figure"] or not img["alt"]]
    assert not missing, f"figures missing from the report: {missing}"
    assert not broken, f"figures the browser could not decode: {broken}"
    assert not unnamed, f"images without data-figure or alt: {unnamed}"


def check_report(report: Path, work: Path, expected: set[str]) -> dict:
    html = report.read_text(encoding="utf-8")
    self_contained(html)
    check = open_in_chromium(html, work)
    assert_figures_rendered(check, expected)
    assert not check["injected"]
    return check


def self_contained(html: str) -> None:
    """Nothing to fetch, nothing to run: no URL, no script, images only as data URIs."""
    assert "<script" not in html.lower()
    sources = re.findall(r'src="([^"]*)"', html)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    text = re.sub(r'src="data:[^"]*"', "", html)
    assert not re.search(r"https?:|//[a-z0-9]|url\(", text, re.IGNORECASE), "an external URL"


# ---- real runs ---------------------------------------------------------------------------
def bad_rows() -> list[dict]:
    return [
        {"prompt": "Review x: the movie was", "chosen": " fine."},  # no rejected
        {"prompt": "Review y: the movie was", "chosen": " same.", "rejected": " same."},
    ]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    pairs = write_jsonl(root / "pairs.jsonl", marker_pairs(28) + bad_rows())
    common = [
        "model.preset=tiny",
        f"data.train={pairs}",
        "data.eval_fraction=0.2",
        "data.on_bad_row=drop",
        "output.progress_bar=false",
        "train.batch_size=8",
        "train.micro_batch_size=8",
        "train.lr=2e-3",
        f"dpo.reference_cache_dir={root / 'cache'}",
    ]
    # Early stopping that cannot see an improvement: it stops at the second evaluation
    # (step 3), and the best checkpoint is the evaluation before training.
    stopping = ["train.max_steps=6", "train.eval_every=3", "train.early_stopping_patience=1"]
    stopping += ["train.early_stopping_min_delta=10"]
    run_dpo(load_config(DPORunConfig, None, [*common, *stopping, f"output.dir={root / 'dpo'}"]))
    private = ["train.max_steps=3", "privacy.enabled=true", "privacy.target_epsilon=8"]
    private += ["privacy.delta=1e-3", f"output.dir={root / 'private'}"]
    run_dpo(load_config(DPORunConfig, None, [*common, *private]))
    rows = write_jsonl(root / "sft.jsonl", sft_rows(20))
    sft = ["model.preset=tiny", f"data.train={rows}", "data.eval_fraction=0.2"]
    sft += ["train.max_steps=3", "train.batch_size=8", "output.progress_bar=false"]
    run_sft(load_config(SFTRunConfig, None, [*sft, f"output.dir={root / 'sft'}"]))
    return {"dpo": root / "dpo", "private": root / "private", "sft": root / "sft"}


def copy_run(run: Path, target: Path) -> Path:
    """The files the report reads, without the weights."""
    target.mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "data_summary.json", "privacy.json"):
        if (run / name).exists():
            shutil.copy(run / name, target / name)
    return target


def final(run: Path, key: str) -> float:
    return [r[key] for r in read_metrics(run) if key in r][-1]


# ---- tests -------------------------------------------------------------------------------
def test_dpo_report_renders_every_figure_and_states_the_numbers(runs, tmp_path):
    run = runs["dpo"]
    report = write_report(run)
    assert report == run / "report.html"
    check = check_report(report, tmp_path, DPO_FIGURES)
    figures = {img["figure"] for img in check["images"]}
    assert "privacy-epsilon" not in figures  # only metrics that were logged
    text = check["text"]
    assert "privdpo DPO run" in text
    assert "trained without differential privacy" in text
    assert f"last loss = {final(run, 'loss'):.4g} at step 3" in text
    summary = json.loads((run / "data_summary.json").read_text())
    kept = summary["kept"]["train"] + summary["kept"]["eval"]
    assert "Rows read: 30. Kept: 28. Dropped: 2." in text and kept == 28
    assert "pairs.jsonl:29" in text and "pairs.jsonl:30" in text  # file:line of the bad rows
    # where early stopping kept the best weights, and why and where it stopped
    assert "best evaluation (kept in checkpoints/best and exported) was at step 0" in text
    assert "Training stopped early at step 3. Reason: early stopping" in text
    assert "dpo:" in text and "beta: 0.1" in text  # the resolved config


def test_private_report_states_the_guarantee_first(runs, tmp_path):
    run = runs["private"]
    statement = json.loads((run / "privacy.json").read_text())
    check = check_report(write_report(run), tmp_path, DPO_FIGURES | {"privacy-epsilon"})
    text = check["text"]
    eps = f"{statement['epsilon']:.4g}"
    sentence = (
        f"Each preference pair's data influences this model by at most epsilon = {eps},"
        " delta = 0.001 (pair-level DP-SGD, dp-accounting PLD)."
    )
    assert sentence in text
    assert text.index(sentence) < text.index("Training curves")  # the guarantee comes first
    assert repr(statement["noise_multiplier"]) in text  # the exact numbers table
    assert f"last privacy/epsilon = {final(run, 'privacy/epsilon'):.4g}" in text


def test_sft_report(runs, tmp_path):
    run = runs["sft"]
    check = check_report(
        write_report(run), tmp_path, {"loss", "grad-norm", "learning-rate", "eval"}
    )
    figures = {img["figure"] for img in check["images"]}
    assert not figures & {"rewards", "rewards-accuracies", "logps"}
    assert "privdpo SFT run" in check["text"]
    assert f"eval/perplexity = {final(run, 'eval/perplexity'):.4g}" in check["text"]


def test_user_level_statement(runs, tmp_path):
    run = copy_run(runs["private"], tmp_path / "run")
    statement = json.loads((run / "privacy.json").read_text())
    statement.update(
        unit="user",
        level="user-level",
        user_algorithm="ULS",
        contribution_bound=4,
        users=7,
        units_kept=26,
        units_dropped=2,
        units_per_user_histogram={"2": 1, "4": 5, "6": 1},  # JSON keys: strings
        epsilon=7.98,
        delta=1e-5,
    )
    (run / "privacy.json").write_text(json.dumps(statement))
    figures = DPO_FIGURES | {"contributions"}
    text = check_report(write_report(run), tmp_path / "browser", figures)["text"]
    # The histogram of pairs per user and how many were used: 2 + 20 + 6 = 28 pairs, of
    # which min(n, 4) per user = 2 + 20 + 4 = 26 used.
    assert "Contributions per user" in text
    assert "7 users; 26 of 28 pairs used for training (at most k = 4 per user), 2 left out." in text
    assert "pairs per user\tusers\n2\t1\n4\t5\n6\t1" in text
    assert (
        "Each user's data influences this model by at most epsilon = 7.98, delta = 1e-5,"
        " under ULS with k = 4 (user-level DP-SGD, dp-accounting PLD)."
    ) in text
    assert "contribution bound k (most examples or pairs per user)\t4" in text
    assert "users\t7" in text
    assert "Each user contributed at most k = 4 of their rows" in text
    assert "the other 2 rows were left out" in text

    statement.update(user_algorithm="ELS", group_privacy_epsilon=31.9)
    (run / "privacy.json").write_text(json.dumps(statement))
    html = write_report(run).read_text()
    assert "under ELS with k = 4" in html
    assert "loose group-privacy bound would give epsilon = 31.9" in html


def test_eval_results_samples_and_escaping(runs, tmp_path):
    run = copy_run(runs["dpo"], tmp_path / "run")
    attack = "<script>window.__injected = true</script>"
    with open(run / "config.yaml", "a") as f:
        f.write(f"# note {attack}\n")
    evaluation = {
        "model": str(run / "model"),
        "reference": "the initial model",
        "metrics": {
            "win_rate": {"value": 0.65, "ci_low": 0.55, "ci_high": 0.75},
            "kl_to_reference": {"value": 0.0123, "ci_low": None, "ci_high": None},
        },
        "temperature_sweep": [
            {"temperature": t, "win_rate": w, "reward": r}
            for t, w, r in [(0.0, 0.6, 0.3), (0.7, 0.65, 0.35), (1.0, 0.55, 0.2)]
        ],
        "samples": [
            {
                "prompt": f"Write {attack} & more",
                "policy": "a <b>bold</b> answer",
                "reference": "a plain answer",
                "policy_score": 0.91,
                "reference_score": None,
            }
        ],
        "forgetting": {"before": 2.5, "after": 2.75},
    }
    (run / "eval.json").write_text(json.dumps(evaluation))
    report = write_report(run)
    html = report.read_text()
    assert "&lt;script&gt;window.__injected = true&lt;/script&gt;" in html
    check = check_report(report, tmp_path / "browser", DPO_FIGURES | {"temperature-sweep"})
    text = check["text"]
    assert f"Write {attack} & more" in text  # shown as text, not run (check_report)
    assert f"# note {attack}" in text
    assert "a <b>bold</b> answer" in text
    assert "win_rate\t0.65\t[0.55, 0.75]" in text
    assert "temperature\twin_rate\treward\n0\t0.6\t0.3\n0.7\t0.65\t0.35\n1\t0.55\t0.2" in text
    assert "kl_to_reference\t0.0123\t—" in text
    assert "policy (trained) — score 0.91" in text
    assert "before\t2.5" in text and "after\t2.75" in text


def est(value, low=None, high=None) -> dict:
    return {"value": value, "ci_low": low, "ci_high": high}


def class_metrics(positive_precision: dict | None) -> dict:
    return {
        "accuracy": est(0.75, 0.25, 1.0),
        "macro_f1": est(0.5, 0.2, 1.0),
        "per_class": [
            {
                "class": " positive",
                "precision": positive_precision,
                "recall": est(0.875, 0.5, 1.0),
                "f1": est(0.6875, 0.4, 1.0),
                "support": 3,
                "predicted": 3,
            },
            {
                "class": " negative",
                "precision": est(0.25),
                "recall": est(0.375),
                "f1": est(0.3125),
                "support": 1,
                "predicted": 1,
            },
        ],
    }


EVAL_WITH_BASELINES = {
    "model": "m",
    "reference": "sft",
    "metrics": {
        "kl_to_reference": est(2.5, -0.5, 5.0),
        "kl_exact": est(2.25, 2.0, 2.5),
        "kl_exact_per_token": est(0.125, 0.1, 0.15),
        "policy_reward": est(0.5, 0.4, 0.6),
        "reference_reward": est(0.125, 0.05, 0.2),
    },
    "temperature_sweep": [],
    "best_of_n": [
        {
            "n": n,
            "model": model,
            "reward": est(reward, reward - 0.05, reward + 0.05),
            "win_rate": est(0.5 + reward / 2, 0.5, 0.9),
            "tie_rate": est(0.0, 0.0, 0.0),
            "kl_bound": bound,
            "scores": [reward],
        }
        for model, n, reward, bound in [
            ("reference", 2, 0.375, 0.1931),
            ("reference", 4, 0.625, 0.6363),
            ("policy", 4, 0.75, 0.6363),
        ]
    ],
    "samples": [],
    "forgetting": {
        "policy_accuracy": 0.75,
        "reference_accuracy": 0.5,
        "tasks": 4,
        "classification": [
            {
                "classes": [" positive", " negative"],
                "tasks": 4,
                "policy": class_metrics(est(0.625, 0.5, 1.0)),
                "reference": class_metrics(None),  # never predicted positive
            }
        ],
    },
}


def test_reward_kl_points_of_an_eval():
    points = reward_kl_points(EVAL_WITH_BASELINES, label="DPO")
    assert [(p["label"], p["kl"], p["reward"]["value"]) for p in points] == [
        ("DPO", 2.25, 0.5),  # the exact estimate, not the one-sample 2.5
        ("reference", 0.0, 0.125),
        ("best-of-2", 0.1931, 0.375),
        ("best-of-4", 0.6363, 0.625),  # the policy's best-of-4 is not to the reference
    ]
    assert points[0]["kl_ci"] == (2.0, 2.5)
    assert all(p.get("kl_is_bound") for p in points[2:])
    without = {**EVAL_WITH_BASELINES, "metrics": {"kl_to_reference": est(1.0)}}
    assert reward_kl_points(without) == []  # no rewards, nothing to plot
    one_sample = dict(EVAL_WITH_BASELINES["metrics"])
    del one_sample["kl_exact"]
    points = reward_kl_points({**EVAL_WITH_BASELINES, "metrics": one_sample})
    assert points[0]["kl"] == 2.5


def test_best_of_n_exact_kl_and_classes_in_the_report(runs, tmp_path):
    run = copy_run(runs["dpo"], tmp_path / "run")
    (run / "eval.json").write_text(json.dumps(EVAL_WITH_BASELINES))
    text = check_report(write_report(run), tmp_path / "browser", DPO_FIGURES | {"reward-kl"})[
        "text"
    ]
    assert "kl_exact\t2.25\t[2, 2.5]" in text
    assert "kl_exact_per_token\t0.125\t[0.1, 0.15]" in text
    assert "the exact next-token KL summed along each sample" in text
    assert "reference\t2\t0.375 [0.325, 0.425]\t0.6875 [0.5, 0.9]\t0.1931" in text
    assert "policy\t4\t0.75 [0.7, 0.8]\t0.875 [0.5, 0.9]\t0.6363" in text
    assert "Classification over ' positive', ' negative' (4 tasks)" in text
    # class, precision after/before, recall after/before, F1 after/before, support
    assert (
        "\npositive\t0.625 [0.5, 1]\t—\t0.875 [0.5, 1]\t0.875 [0.5, 1]\t0.6875 [0.4, 1]"
        "\t0.6875 [0.4, 1]\t3"
    ) in text
    assert "\nnegative\t0.25\t0.25\t0.375\t0.375\t0.3125\t0.3125\t1" in text
    assert "macro F1\t0.5 [0.2, 1]\t0.5 [0.2, 1]" in text
    assert "policy_accuracy\t0.75" in text and "tasks\t4" in text


def test_corrupted_and_truncated_figures_are_caught(runs, tmp_path):
    html = write_report(runs["dpo"]).read_text()

    def replace_png(html: str, figure: str, change) -> str:
        pattern = rf'(data-figure="{figure}"[^>]*src="data:image/png;base64,)([^"]+)'
        new, n = re.subn(
            pattern,
            lambda m: m.group(1) + base64.b64encode(change(base64.b64decode(m.group(2)))).decode(),
            html,
        )
        assert n == 1
        return new

    broken = replace_png(html, "loss", lambda png: png[:8] + b"but not really a PNG")
    # A cut-short PNG keeps its header, so it has a width, but its lower rows are missing.
    broken = replace_png(broken, "grad-norm", lambda png: png[: len(png) // 2])
    check = open_in_chromium(broken, tmp_path)
    rendered = {img["figure"]: img["rendered"] for img in check["images"]}
    assert rendered.pop("loss") is False and rendered.pop("grad-norm") is False
    assert rendered and all(rendered.values())  # the others still render
    truncated = next(img for img in check["images"] if img["figure"] == "grad-norm")
    assert truncated["width"] > 0  # a width alone would not have caught it
    with pytest.raises(AssertionError, match=r"could not decode: \['grad-norm', 'loss'\]"):
        assert_figures_rendered(check, DPO_FIGURES)


def test_a_missing_figure_is_caught(runs, tmp_path):
    html = write_report(runs["dpo"]).read_text()
    without, n = re.subn(r'<figure[^>]*><img data-figure="logps".*?</figure>', "", html)
    assert n == 1
    check = open_in_chromium(without, tmp_path)
    with pytest.raises(AssertionError, match=r"missing from the report: \['logps'\]"):
        assert_figures_rendered(check, DPO_FIGURES)


def test_without_chromium_the_browser_tests_fail_saying_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        find_chromium()


def test_a_run_with_little_in_it_still_gets_a_report(tmp_path):
    """A run killed before its first step: an empty metrics file, no data summary, and a
    privacy.json with only some keys still give a report that says what is missing."""
    (tmp_path / "config.yaml").write_text("sft: {}\nprivacy: {enabled: true}\n")
    (tmp_path / "metrics.jsonl").write_text("")
    html = write_report(tmp_path).read_text()
    assert "privdpo SFT run" in html and "No metrics were logged yet." in html
    assert "No data_summary.json in this run." in html
    assert "privacy.json is missing: the run did not finish" in html
    (tmp_path / "privacy.json").write_text(json.dumps({"unit": "example", "epsilon": 3.0}))
    html = write_report(tmp_path).read_text()
    assert "Each training example&#x27;s data influences this model by at most epsilon = 3," in html
    (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": float("inf")}))  # older runs
    assert "NO formal privacy guarantee: epsilon is infinite" in write_report(tmp_path).read_text()
    (tmp_path / "privacy.json").write_text(json.dumps({"epsilon": None, "private": False}))
    assert "NO formal privacy guarantee: epsilon is infinite" in write_report(tmp_path).read_text()


def test_main_report_refuses_what_is_not_a_run_dir(runs, tmp_path):
    with pytest.raises(UserError, match="is not a directory"):
        main_report(str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"not a privdpo run directory \(no config.yaml or"):
        main_report(str(tmp_path))
    (tmp_path / "config.yaml").write_text("train: {}\n")
    with pytest.raises(UserError, match=r"\(no metrics.jsonl\)"):
        main_report(str(tmp_path))
    assert main_report(str(runs["sft"])) == runs["sft"] / "report.html"
