"""Metrics to `metrics.jsonl` and TensorBoard, consistent across resume.

On resume the JSONL keeps only records up to the checkpoint's step and TensorBoard purges
later events, so a killed-and-resumed run has the same metrics as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from torch.utils.tensorboard import SummaryWriter

METRICS_FILE = "metrics.jsonl"


class MetricsLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = run_dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash: it came after the checkpoint
                if record["step"] <= resume_step:
                    kept.append(line)
            self.path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a", encoding="utf-8")
        purge = None if resume_step is None else resume_step + 1
        self._tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge)

    def log(self, step: int, values: dict[str, float]) -> None:
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, int | float) and math.isfinite(value):
                self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        self._tb.close()


def _plain(value):
    if hasattr(value, "item"):
        return value.item()
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
