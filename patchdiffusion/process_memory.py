"""This process's resident memory from /proc (Linux): current, peak, and a new peak window.

The demo, `patchdiff compare`'s sampling probes and the memory benchmarks all measure "peak memory of
this piece of work" the same way: reset the kernel's high-water mark (VmHWM := VmRSS, by writing 5 to
/proc/self/clear_refs), do the work, read VmHWM.
"""

from __future__ import annotations

import sys

__all__ = ["status_kib", "reset_peak_rss", "peak_rss_bytes"]


def status_kib(key: str) -> int | None:
    """A field of /proc/self/status in KiB (VmRSS, VmHWM, RssAnon, ...); None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Start a new peak window (VmHWM := current RSS); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """VmHWM in bytes; elsewhere the process's lifetime peak (ru_maxrss: KiB on Linux, bytes on macOS)."""
    kib = status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
