"""What every benchmark records beside its figures: the machine, and the JSON + PNG written together."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from typing import Callable

import torch

from patchdiffusion.process_memory import reset_peak_rss, status_kib


def machine_info(device: torch.device) -> dict:
    info = dict(platform=platform.platform(), python=platform.python_version(), processor=platform.processor(),
                cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), torch=torch.__version__,
                device=str(device))
    try:
        info["load_average_1min"] = os.getloadavg()[0]  # other programs on the cores make CPU numbers noisy
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_results(report: dict, out_dir: str, name: str, device: torch.device, plot: Callable[[dict, str], None]) -> str:
    """Write `name[.cuda].json` and its plot `name[.cuda].png` under out_dir; returns the path stem."""
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, name + ("" if device.type == "cpu" else f".{device.type}"))
    with open(stem + ".json", "w") as f:
        json.dump(report, f, indent=2)
    plot(report, stem + ".png")
    return stem


# -- process memory (Linux /proc), for working-memory benchmarks run in fresh subprocesses ---------


def proc_status_kib(*keys: str) -> dict[str, int]:
    """Fields of /proc/self/status in KiB, e.g. proc_status_kib("VmRSS", "VmHWM", "RssAnon")."""
    return {k: status_kib(k) for k in keys}


def run_in_fresh_process(module: str, spec: dict, threads: int) -> dict:
    """`python -m MODULE --worker JSON` in a new interpreter (nothing measured before can leak into its
    peak); the worker prints its result as JSON on its last line."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if proc.returncode != 0:
        raise RuntimeError(f"case {spec} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def start_working_memory(device) -> tuple[int, bool]:
    """Bytes held once the model is loaded (CUDA: allocated; CPU: RSS), and the peak counter reset
    to it; returns (bytes, whether the CPU high-water mark could be reset)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device), True
    reset = reset_peak_rss()
    return proc_status_kib("VmRSS")["VmRSS"] * 1024, reset


def peak_memory(device) -> int:
    """Peak bytes since `start_working_memory` (CUDA: max allocated; CPU: VmHWM)."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return proc_status_kib("VmHWM")["VmHWM"] * 1024


def bench_parser(name: str, doc: str) -> argparse.ArgumentParser:
    """The argument parser of `patchdiff bench NAME`, its module docstring as the help text."""
    return argparse.ArgumentParser(prog=f"patchdiff bench {name}", description=doc,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def save_figure(fig, path, dpi: int | None = None) -> None:
    """Lay out, write and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, **({"dpi": dpi} if dpi else {}))
    plt.close(fig)
