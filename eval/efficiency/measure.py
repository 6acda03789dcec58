"""Measurement helpers every efficiency tool shares: timing one call, peak memory, summaries of repeated timings,
and a description of the machine.

Timing: CUDA events around the call, then synchronize, on a GPU; ``time.perf_counter`` on a CPU. Python's garbage
collector is paused during a timed call (as ``timeit`` does): a collection of a model's object graph would land in
one random measurement. Peak memory: on a GPU ``torch.cuda.max_memory_allocated`` after a reset; on a CPU the
process's peak resident set size (VmHWM) after ``malloc_trim`` and a reset of the kernel's counter
(/proc/self/clear_refs = 5), Linux only.
"""

from __future__ import annotations

import ctypes
import gc
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- timing -------------------------------------------------------------------------------------------------------
def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, Any]:
    """Seconds of one call of ``fn`` and its output; the garbage collector is paused during the call."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            out = fn()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3, out
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        if enabled:
            gc.enable()


def timer_name(device: torch.device) -> str:
    """How :func:`time_call` times on ``device`` (recorded with the results)."""
    return "CUDA events + synchronize" if device.type == "cuda" else "time.perf_counter"


# --- summaries of repeated measurements ---------------------------------------------------------------------------
def quartiles(values: list[float]) -> dict[str, float]:
    """Median, first and third quartile (inclusive method) and IQR; one value is all three."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "q1": q1, "q3": q3, "iqr": q3 - q1}


def summarize(values: list[float]) -> dict[str, float]:
    """:func:`quartiles`, mean, std (0 for one value), min, max, n."""
    ordered = sorted(values)
    return {**quartiles(ordered), "mean": statistics.fmean(ordered),
            "std": statistics.stdev(ordered) if len(ordered) >= 2 else 0.0,
            "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


# --- memory -------------------------------------------------------------------------------------------------------
def proc_status_kb(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM ...), or None where it cannot be read (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return proc_status_kb("VmHWM") is not None


def malloc_trim() -> None:
    """Hand glibc's free heap memory back to the OS, so that RSS follows live memory (no-op without glibc)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class MemoryProbe:
    """Peak memory of one call: ``start()``, the call, ``stop()`` -> peak bytes and the bytes added over what was
    held before. CUDA: max_memory_allocated after a reset. CPU: peak RSS (VmHWM) after a reset; where the counter
    cannot be reset, the process-wide peak since it started."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_memory_allocated" if device.type == "cuda" else "cpu_peak_rss"
        if device.type != "cuda" and not reset_peak_rss():
            self.kind = "cpu_ru_maxrss_since_start"
        self._before = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            return
        gc.collect()
        malloc_trim()
        if self.kind == "cpu_peak_rss":
            reset_peak_rss()
            self._before = proc_status_kb("VmRSS") * 1024
        else:
            self._before = 0

    def stop(self) -> dict[str, int]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.kind == "cpu_peak_rss":
            peak = proc_status_kb("VmHWM") * 1024
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"peak_bytes": peak, "added_bytes": peak - self._before}


# --- the machine --------------------------------------------------------------------------------------------------
def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name with its logical CPUs and torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    return f"{name} ({os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other processes competing for the cores show up as noise)."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def versions(distributions: tuple[str, ...] = ("torch", "transformers", "hiprune-harness", "hydra-core")) -> dict:
    """Python's version and each distribution's ("not installed" where absent)."""
    out = {"python": platform.python_version()}
    for dist in distributions:
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out
