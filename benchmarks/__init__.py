"""Speed of polyinr against baselines measured in the same run: `python -m benchmarks`.

Each module `benchmarks/<topic>.py` with a `run(quick: bool) -> list[dict]` joins the table;
its rows come from `row()` below. The helpers here are shared by those modules.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROW_KEYS = ("benchmark", "case", "ours", "baseline", "unit", "ratio")


def row(
    benchmark: str,
    case: str,
    ours: float,
    baseline: float,
    unit: str,
    note: str = "",
    lower_is_better: bool = False,
) -> dict:
    """One line of the table; ratio > 1 means ours is better than the baseline.

    ratio = ours / baseline for throughputs (images/s, GFLOP/s); for costs (seconds, MB)
    pass lower_is_better=True and it is baseline / ours.
    """
    ratio = baseline / ours if lower_is_better else ours / baseline
    return {
        "benchmark": benchmark,
        "case": case,
        "ours": ours,
        "baseline": baseline,
        "unit": unit,
        "ratio": ratio,
        "note": note,
    }


def device() -> torch.device:
    """The accelerator when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def interleaved(fns: dict[str, Callable[[], object]], reps: int, dev: torch.device) -> dict:
    """Time each fn `reps` times, round-robin, after one untimed call each.

    Round-robin spreads the load of other processes over all contenders alike (these
    machines are shared); each gets its fastest time. Returns {name: (seconds, output)}.
    """
    out = {}
    for name, fn in fns.items():
        out[name] = (float("inf"), fn())
    sync(dev)
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            sync(dev)
            seconds = time.perf_counter() - start
            out[name] = (min(out[name][0], seconds), result)
    return out


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return set()
    for line in path.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def fast_bf16(dev: torch.device) -> str | None:
    """What runs bf16 matmuls natively here (a GPU, AMX or AVX512-BF16), or None."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev) if torch.cuda.is_bf16_supported() else None
    flags = cpu_flags()
    for flag in ("amx_bf16", "avx512_bf16"):
        if flag in flags:
            return flag
    return None


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
