"""Process-level CPU settings that every timed or trained path applies the same way.

glibc serves allocations above its mmap threshold with fresh mmap'd pages and returns them on
free, so every large activation or gradient buffer is page-faulted in again on each step.
On a 2-core CPU that makes element-wise ops 3-5x slower than memory bandwidth allows
(relu on 8192x1024 floats: 8.4 ms vs 2.1 ms measured here). Keeping freed memory in the heap
(what jemalloc/tcmalloc do, and what Intel's PyTorch CPU guides recommend) removes that cost for
dense and sparse models alike. Set MOE_BENCH_MALLOC_TUNING=0 to keep glibc's defaults.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_applied: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed heap memory for reuse (glibc mallopt). Returns whether it was applied."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("MOE_BENCH_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_MAX, 0)  # never serve allocations with mmap ...
        ok &= libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # ... and never give the heap back
        ok &= libc.mallopt(_M_TOP_PAD, 256 * 2**20)  # grow the heap in 256 MiB steps
        _applied = bool(ok)
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        _applied = False
    return _applied


def skip_uninitialized_fill() -> bool:
    """Keep torch.use_deterministic_algorithms (Lightning's ``deterministic="warn"``, which training
    and evaluation use) from also filling every new tensor's uninitialized memory with NaN.

    That fill only makes a read of uninitialized memory visible; it changes no result of code that
    writes before it reads, and it costs every step a pass over each fresh buffer (activations,
    gradients, the experts' dispatch buffers): measured here, translation ref, bf16, ~985 target
    tokens per step, dense 149 -> 163 ms and Switch 185 -> 209 ms (scripts/step_breakdown.py with
    the setting on and off). The test suite keeps the fill on (MOE_BENCH_FILL_UNINITIALIZED=1 in
    tests/conftest.py), so a read of uninitialized memory still shows there as NaN. Returns whether
    the fill is now off."""
    import torch

    if os.environ.get("MOE_BENCH_FILL_UNINITIALIZED", "0") == "1":
        return False
    torch.utils.deterministic.fill_uninitialized_memory = False
    return True


_denormals_flushed: bool | None = None


def flush_denormals() -> bool:
    """Treat float32 denormals (0 < |x| < 1.2e-38) as zero on the CPU (FTZ/DAZ), unless
    MOE_BENCH_FLUSH_DENORMALS=0. Returns whether they are flushed.

    Adam's moment estimates of rarely-updated parameters (experts that get few tokens, embedding
    rows of rare tokens) decay geometrically into the denormal range, and x86 CPUs compute on
    denormals through a slow microcode path, so sparse models slowed as they trained (measurements
    in docs/performance.md). Flushing changes only values below 1.2e-38, far under any update Adam
    makes (eps 1e-8): results change at the level of float rounding, not systematically.
    The setting is per thread and a thread copies it when it is created: call this before torch
    starts its intra-op thread pool (its first parallel op), as the CLI does first thing."""
    global _denormals_flushed
    import torch

    if os.environ.get("MOE_BENCH_FLUSH_DENORMALS", "1") == "0":
        torch.set_flush_denormal(False)
        _denormals_flushed = False
    else:
        _denormals_flushed = bool(torch.set_flush_denormal(True))  # False where the CPU lacks FTZ/DAZ
    return _denormals_flushed


def denormals_flushed() -> bool | None:
    """What the last ``flush_denormals()`` set (None: not called in this process)."""
    return _denormals_flushed


def apply_cpu_settings() -> None:
    """The process-level CPU settings of every trained or timed path: the heap kept for reuse and
    denormals flushed (so timings and training see the same arithmetic)."""
    tune_cpu_allocator()
    flush_denormals()


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def load_average() -> float | None:
    """The machine's 1-minute load average (runnable threads, all processes); None where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def machine_id() -> str | None:
    """This boot of this machine as 8 hex digits (a hash of Linux's boot id), or None where the OS
    has none. Runs with one id ran on one machine in one boot, so their timings compare; machines
    that look alike (same CPU name, same host name) have differed 1.6x in speed here."""
    import hashlib

    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as f:
            return hashlib.sha256(f.read().strip()).hexdigest()[:8]
    except OSError:
        return None


class CpuClock:
    """This process's CPU seconds (all its threads) and the thread-seconds it could have used
    (wall time x torch's threads) since it was made: their ratio, the CPU share, stays near 1 for
    a process alone on its cores and falls when other work of equal priority takes some."""

    def __init__(self):
        import time

        import torch

        self._time = time
        self.threads = torch.get_num_threads()
        self._cpu0, self._wall0 = time.process_time(), time.monotonic()

    def cpu_seconds(self) -> float:
        return self._time.process_time() - self._cpu0

    def thread_seconds(self) -> float:
        return (self._time.monotonic() - self._wall0) * self.threads

    def share(self) -> float | None:
        capacity = self.thread_seconds()
        return self.cpu_seconds() / capacity if capacity > 0 else None


def device_name(device) -> str:
    """What a record or benchmark says it ran on: the GPU's name, or the CPU and its threads."""
    import platform

    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def best_time_ms(fns: dict, repeats: int, device=None) -> dict[str, float]:
    """Best-of-``repeats`` wall time (ms) of each function, rounds interleaved so drift hits all;
    one warm-up call each first (allocator, kernel selection, lazy init). On a CUDA ``device``
    every call is timed between synchronisations."""
    import math
    import time

    import torch

    def sync() -> None:
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)

    for fn in fns.values():
        fn()
    sync()
    best = {name: math.inf for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best
