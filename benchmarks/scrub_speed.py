"""Pattern-only scrubbing speed: `privdpo scrub` on a generated JSONL of ROWS rows of
CHARS characters (planted identifiers of every type, see pii_corpus.py), end to end
(read, scrub in parallel, write), timed on this machine's CPU cores.

    PYTHONPATH=src python benchmarks/scrub_speed.py                  # 100,000 x 500 chars
    PYTHONPATH=src python benchmarks/scrub_speed.py --rows 2000      # smoke test (in the suite)

The target (issue 14): 100,000 rows of 500 characters in under 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import pii_corpus  # noqa: E402

from privdpo.config import ScrubRunConfig, load_config  # noqa: E402
from privdpo.prep.scrub import run_scrub  # noqa: E402

TARGET_SECONDS = 120.0


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers)."""
    me, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--chars", type=int, default=500)
    parser.add_argument("--workers", type=int, default=None, help="default: every core")
    parser.add_argument("--out", default=None, help="also write the result as JSON here")
    parser.add_argument("--work", default=None, help="directory for the data files")
    args = parser.parse_args(argv)

    work = Path(args.work or tempfile.mkdtemp(prefix="scrub-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = pii_corpus.generate(args.rows, seed=0, chars=args.chars)
    source = work / "corpus.jsonl"
    with open(source, "w", encoding="utf-8") as f:
        for row in corpus.rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    generated = time.perf_counter() - started

    overrides = ["output.progress_bar=false", "output.overwrite=true"]
    if args.workers:
        overrides.append(f"scrub.workers={args.workers}")
    cfg = load_config(ScrubRunConfig, None, overrides)
    started, cpu_started = time.perf_counter(), cpu_seconds()
    run_scrub(str(source), str(work / "scrubbed.jsonl"), cfg)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_started
    workers = cfg.scrub.workers or len(os.sched_getaffinity(0))
    chars = sum(len(r["prompt"]) + len(r["chosen"]) + len(r["rejected"]) for r in corpus.rows)
    result = {
        "rows": args.rows,
        "mean_chars_per_row": chars / args.rows,
        "cores": len(os.sched_getaffinity(0)),
        "workers": workers,
        "seconds": round(seconds, 2),
        # CPU time of the run (all processes) over the cores it used: the wall time it
        # would take on cores of its own; on a shared machine the wall time is longer.
        "cpu_seconds": round(cpu, 2),
        "cpu_seconds_per_core": round(cpu / workers, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "rows_per_second": round(args.rows / seconds, 1),
        "generate_seconds": round(generated, 2),
        "projected_seconds_for_100k": round(seconds * 100_000 / args.rows, 1),
        "target_seconds_for_100k": TARGET_SECONDS,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
