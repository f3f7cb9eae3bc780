"""Helpers shared by the benchmarks: the machine description, resident-memory readings, fresh-process workers, tables."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
GIB = 1 << 30


def _proc_kib(path: str, key: str) -> int | None:
    """A ``key:  N kB`` field of a /proc file, in KiB (None where /proc is missing)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int:
    """This process's current resident set size (``VmRSS``)."""
    return (_proc_kib("/proc/self/status", "VmRSS") or 0) * 1024


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``VmHWM``; ``ru_maxrss`` where /proc is missing)."""
    kib = _proc_kib("/proc/self/status", "VmHWM")
    if kib is None:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib * 1024


def mem_available_bytes() -> int | None:
    kib = _proc_kib("/proc/meminfo", "MemAvailable")
    return None if kib is None else kib * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_description(threads: int | str | None = None) -> dict[str, str]:
    """What the numbers were measured on (printed at the top of every benchmark)."""
    import torch

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = _proc_kib("/proc/meminfo", "MemTotal")
    available = mem_available_bytes()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "memory": (f"{total / (1 << 20):.1f} GiB total, {available / GIB:.1f} GiB available at start"
                   if total and available else "unknown"),
        "load average (1/5/15 min)": " / ".join(f"{x:.2f}" for x in load),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (threads used by the benchmark: {threads or torch.get_num_threads()})",
        "platform": platform.platform(),
    }


def print_machine(threads: int | str | None = None) -> dict[str, str]:
    info = machine_description(threads)
    print("## Machine\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    print()
    return info


def run_worker(script: Path, payload: dict, threads: int, timeout: float = 900) -> dict:
    """Run ``script --worker <json>`` in a fresh interpreter and return the JSON dict it prints last.

    A fresh process per measurement makes its peak RSS that measurement's own. Threads are fixed
    through the environment as well as ``torch.set_num_threads`` in the worker.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(script), "--worker", json.dumps(payload)], capture_output=True,
                          text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"worker exited with {proc.returncode}: {' | '.join(tail)}"}
    return json.loads(lines[-1])


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)
