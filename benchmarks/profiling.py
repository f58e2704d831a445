"""The device side of a benchmark's profile: how busy the GPU was, and where its time went (shared by the
benchmarks; they run as scripts from this folder)."""

from __future__ import annotations

import torch


def start_device_profile() -> torch.profiler.profile:
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    prof = torch.profiler.profile(activities=activities)
    prof.__enter__()
    return prof


def device_profile_text(prof: torch.profiler.profile, wall: float, steps: int, rows: int = 30) -> str:
    """Kernel time against wall time over ``steps`` steps, then the top ``rows`` ops by device and by host time."""
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
    text = (
        f"\ntorch.profiler over {steps} steps: wall {wall:.3f} s, kernels {busy:.3f} s "
        f"({100 * busy / wall:.1f} % busy), {kernels} device events\n"
    )
    text += events.table(sort_by="self_device_time_total", row_limit=rows)
    return text + events.table(sort_by="self_cpu_time_total", row_limit=rows)
