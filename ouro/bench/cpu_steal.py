"""How much CPU the hypervisor took from this machine while a benchmark ran.

On a shared VM, "steal" is time a virtual CPU was ready to run but the host ran someone else.
llama.cpp's threads wait for each other at every step of a graph, so a stolen moment on one
core stalls both, and figures swing from run to run. Benchmarks print the share next to their
ratios so a reader can tell a slow design from a busy host. Linux only; elsewhere: None.
"""

from __future__ import annotations

from pathlib import Path

STAT = Path("/proc/stat")


def snapshot() -> tuple[int, int] | None:
    """(steal, total) jiffies since boot, or None where /proc/stat is not there."""
    try:
        fields = STAT.read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None
    if fields[0] != "cpu" or len(fields) < 9:
        return None
    values = [int(v) for v in fields[1:9]]   # user nice system idle iowait irq softirq steal
    return values[7], sum(values)


def share(start: tuple[int, int] | None, end: tuple[int, int] | None) -> float | None:
    """Stolen share of all CPU time between two snapshots (0-1)."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    return round((end[0] - start[0]) / (end[1] - start[1]), 3)
