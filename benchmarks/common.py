"""Helpers shared by the benchmarks: the machine description, resident-memory readings, fresh-process workers,
interleaved timing of variants, tables."""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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


def use_fresh_inductor_cache() -> None:
    """Point torch.compile's cache at a new temporary directory (removed at exit), so compile times are cold ones.

    Does nothing when ``TORCHINDUCTOR_CACHE_DIR`` is already set (then that cache is used as it is).
    """
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        return
    path = tempfile.mkdtemp(prefix="opd-bench-inductor-")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclasses.dataclass
class Timings:
    """Repeated measurements of one variant: wall seconds, tokens counted and decode steps of each call."""

    seconds: list[float] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    steps: list[int] = dataclasses.field(default_factory=list)

    def tokens_per_s(self) -> float:
        """Median over calls of tokens counted / seconds."""
        return median([n / s for n, s in zip(self.tokens, self.seconds)])

    def positions_per_s(self, batch_size: int) -> float:
        """Median over calls of batch x decode steps / seconds (speed per decode step, however early rows stopped)."""
        return median([batch_size * k / s for k, s in zip(self.steps, self.seconds)])

    def median_tokens(self) -> float:
        return median([float(n) for n in self.tokens])


def time_variants(variants: dict[str, Callable[..., tuple[int, int]]], call_args: tuple = (), reps: int = 3,
                  threads: Sequence[int] = (1,)) -> dict[tuple[str, int], Timings]:
    """Time every variant ``reps`` times at every torch thread count, interleaved in this one process.

    Each repetition runs every (thread count, variant) pair once; the order of the thread counts and of
    the variants is reversed on every other repetition, so a slow spell of a shared machine falls on
    all of them alike. Before each call the torch RNG is seeded with the repetition number, so sampled
    variants start from the same random state.

    Args:
        variants: name -> function of ``*call_args`` returning (tokens counted, decode steps).
        call_args: the arguments every variant is called with (model, tokenizer, prompts, ...).
        reps: repetitions per (variant, thread count); report medians.
        threads: torch thread counts (``torch.set_num_threads``); the last one stays set afterwards.

    Returns:
        (name, threads) -> the :class:`Timings` of its calls.
    """
    import torch

    results = {(name, t): Timings() for name in variants for t in threads}
    for rep in range(reps):
        thread_order = list(threads) if rep % 2 == 0 else list(reversed(threads))
        names = list(variants) if rep % 2 == 0 else list(reversed(list(variants)))
        for t in thread_order:
            torch.set_num_threads(t)
            for name in names:
                torch.manual_seed(rep)
                started = time.perf_counter()
                tokens, steps = variants[name](*call_args)
                record = results[(name, t)]
                record.seconds.append(time.perf_counter() - started)
                record.tokens.append(tokens)
                record.steps.append(steps)
    torch.set_num_threads(threads[-1])
    return results


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    def cell(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- real models (issue 12, `--real`)
REAL_EXPERIMENT = "real_smollm2"  # conf/experiment/real_smollm2.yaml: SmolLM2-135M-Instruct teacher, 10-layer student
REAL_KEEP_LAYERS = 10  # the pruned student of that experiment (student.keep_layers)


def fill_defaults(args: Any, defaults: dict[str, Any], quick: dict[str, Any] | None = None) -> None:
    """Set every option of ``args`` left unset (None) to its value in ``defaults``; with ``--quick``, ``quick``'s
    values over both (set or not)."""
    quick = quick if getattr(args, "quick", False) else {}
    for key, value in {**defaults, **quick}.items():
        if getattr(args, key) is None or key in quick:
            setattr(args, key, value)


def compose_train_config(overrides: Sequence[str]):
    """``conf/train.yaml`` composed with Hydra and ``overrides``, as ``opd-train`` would (no run directory)."""
    from hydra import compose, initialize_config_dir

    from opd.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def load_real_models(keep_layers: int | None = REAL_KEEP_LAYERS):
    """SmolLM2-135M-Instruct and its depth-pruned copy, loaded through opd's own path (GGUF -> cached HF checkpoint).

    Returns:
        (tokenizer, {"teacher": 30-layer model, "student": ``keep_layers``-layer model}, composed config); float32, eval mode.
    """
    import torch

    from opd.config import typed_sections
    from opd.models.loading import load_model, load_tokenizer

    cfg = compose_train_config([f"experiment={REAL_EXPERIMENT}", f"student.keep_layers={keep_layers}"])
    teacher_cfg, student_cfg, _, _ = typed_sections(cfg)
    cpu = torch.device("cpu")
    tokenizer = load_tokenizer(student_cfg, "student")
    models = {role: load_model(spec, role, cpu).eval() for role, spec in (("teacher", teacher_cfg), ("student", student_cfg))}
    return tokenizer, models, cfg


def real_examples(cfg, tokenizer, count: int):
    """The first ``count`` training examples of the real experiment's task, prompts through the chat template."""
    from opd.data.chat import apply_chat_template
    from opd.registry import DATASETS, load_builtin_components

    load_builtin_components()
    task = DATASETS.build(cfg.data, "data")
    apply_chat_template(task, tokenizer)  # as the trainer does with student.chat_template=true
    if len(task.train) < count:
        raise SystemExit(f"the task has {len(task.train)} training prompts, fewer than the {count} asked for")
    return task.train[:count]


def matmul_peak_flops(threads: int, size: int = 2048, seconds: float = 5.0) -> dict[str, float]:
    """This machine's float32 matrix-product rate: ``torch.matmul`` of two ``[size, size]`` matrices in a loop.

    Each call is 2·size³ FLOPs (a multiply-add counted as 2). Runs at ``threads`` torch threads for about
    ``seconds`` after one warm-up call; restores the previous thread count.

    Returns:
        {"peak_flops": the fastest call's rate, "median_flops": the median call's rate, "calls": n, "size": size}.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        g = torch.Generator().manual_seed(0)
        a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
        out = torch.empty(size, size)
        torch.matmul(a, b, out=out)  # warm-up: thread pool, pages of out
        rates, started = [], time.perf_counter()
        while time.perf_counter() - started < seconds or len(rates) < 3:
            t0 = time.perf_counter()
            torch.matmul(a, b, out=out)
            rates.append(2 * size**3 / (time.perf_counter() - t0))
    finally:
        torch.set_num_threads(previous)
    return {"peak_flops": max(rates), "median_flops": median(rates), "calls": len(rates), "size": size}


def matmul_parameters(model) -> tuple[int, int]:
    """(body, head): weights of the ``nn.Linear`` layers of ``model`` that multiply every token's activations, split
    into the decoder body and the output head ``[V, H]`` (counted once even when tied to the input embedding).

    The input embedding is a lookup, not a product, so it is not counted (Kaplan et al. 2020, §2.1: N excludes
    embeddings; the unembedding is a product and is counted here only at the positions whose logits are formed).
    """
    import torch

    head = model.get_output_embeddings()
    body = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    return body, head.weight.numel()


def add_site_packages(venv: Path) -> str | None:
    """Append ``venv``'s site-packages to ``sys.path`` (after this interpreter's own), e.g. to import ``trl`` from the
    separate ``.venv-trl`` while torch, transformers and vLLM stay the project venv's. Returns the path, or None."""
    matches = sorted(Path(venv).glob("lib/python*/site-packages"))
    if not matches:
        return None
    path = str(matches[-1].resolve())
    if path not in sys.path:
        sys.path.append(path)
    return path
