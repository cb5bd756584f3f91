"""Peak memory of a stretch of work: resident RAM, and GPU memory when torch has CUDA.

getrusage's ru_maxrss only ever grows within a process, so it cannot say what a later, smaller
stage peaked at. Linux keeps the same high-water mark as VmHWM in /proc/self/status and resets it
when "5" is written to /proc/self/clear_refs (proc(5)); each stage resets it on entry and reads
it on exit. Elsewhere the figure falls back to ru_maxrss (the process's peak so far). GPU:
torch.cuda.max_memory_allocated with reset_peak_memory_stats, read only when torch is already
imported (asking must not load torch into a stage that never used it).
"""

from __future__ import annotations

import resource
import sys


def peak_rss_mb() -> float:
    """Peak resident memory of this process since start (or since reset_peak_rss)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    """Start a new peak (Linux: writing 5 to clear_refs resets VmHWM); elsewhere a no-op."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
    except OSError:
        pass


def _cuda():
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() else None


def peak_gpu_mb() -> float | None:
    """Peak GPU memory torch allocated since the last reset_peaks; None without CUDA."""
    cuda = _cuda()
    if cuda is None:
        return None
    return round(cuda.max_memory_allocated() / 2**20, 1)  # pragma: no cover - needs CUDA


def reset_peaks() -> None:
    reset_peak_rss()
    cuda = _cuda()
    if cuda is not None:  # pragma: no cover - needs CUDA
        cuda.reset_peak_memory_stats()
