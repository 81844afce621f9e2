"""`train.profile`: where a training step's time goes, from torch's profiler.

A few steps after warm-up are profiled; `profile.json` in the run directory gives the wall
time of those steps, the time the GPU was busy running kernels (the union of kernel
intervals, so overlapping streams count once), their ratio, and the kernels that took
longest; `profile_trace.json` is the Chrome trace (open it in chrome://tracing or
Perfetto). The window is bracketed by device syncs; the steps outside it are untouched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

WARMUP_STEPS = 2
PROFILED_STEPS = 3


class StepProfiler:
    def __init__(self, run_dir: Path, enabled: bool, first_step: int, total_steps: int):
        self.run_dir = run_dir
        self.start = first_step + WARMUP_STEPS
        self.stop = min(self.start + PROFILED_STEPS, total_steps)
        self.enabled = enabled and self.start < self.stop
        self._prof = None
        self._started = 0.0

    def before(self, step: int) -> None:
        """Call before optimizer step `step` (0-based) begins."""
        if not self.enabled or step != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self._prof = torch.profiler.profile(activities=activities)
        self._prof.__enter__()
        self._started = time.perf_counter()

    def after(self, step: int) -> None:
        """Call after optimizer step `step` (0-based) ended."""
        if self._prof is None or step + 1 != self.stop:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self._started
        self._prof.__exit__(None, None, None)
        summary = summarize(self._prof, wall, self.stop - self.start)
        (self.run_dir / "profile.json").write_text(json.dumps(summary, indent=2) + "\n")
        self._prof.export_chrome_trace(str(self.run_dir / "profile_trace.json"))
        print(
            f"profile: {summary['steps']} steps, {summary['seconds_per_step']:.4f} s/step, GPU busy"
            f" {summary['gpu_busy_fraction']:.1%} (profile.json)"
        )
        self._prof = None


def summarize(prof, wall_seconds: float, steps: int) -> dict:
    """Wall time, GPU-busy time (union of kernel intervals) and the top kernels."""
    intervals, by_name = [], {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        start, end = event.time_range.start, event.time_range.end
        intervals.append((start, end))
        by_name[event.name] = by_name.get(event.name, 0.0) + (end - start)
    busy_us = 0.0
    last_end = None
    for start, end in sorted(intervals):
        if last_end is None or start > last_end:
            busy_us += end - start
            last_end = end
        elif end > last_end:
            busy_us += end - last_end
            last_end = end
    busy = busy_us / 1e6
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:15]
    host = sorted(
        (e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CPU),
        key=lambda e: -e.self_cpu_time_total,
    )[:15]
    return {
        "steps": steps,
        "wall_seconds": wall_seconds,
        "seconds_per_step": wall_seconds / max(1, steps),
        "gpu_busy_seconds": busy,
        "gpu_busy_fraction": busy / wall_seconds if wall_seconds > 0 else 0.0,
        "kernels": len(intervals),
        "top_kernels_seconds": {name[:160]: us / 1e6 for name, us in top},
        "top_host_ops_self_seconds": {e.key[:160]: e.self_cpu_time_total / 1e6 for e in host},
    }
