"""``sampler=auto``: the HF sampler or vLLM for each model, chosen by its size (the rule measured in
``benchmarks/RESULTS.md``, "Rollouts")."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from opd.registry import SAMPLERS
from opd.sampling.hf import HFSampler
from opd.types import Example, RolloutBatch

#: from this many parameters a model samples through vLLM. Measured on the 2-core CPU machines (RESULTS.md, "Rollouts"):
#: vLLM took 1.5× HF's time for the toy models (0.1–0.6 M parameters: per-request scheduling dominates) and 0.3–0.45×
#: for SmolLM2's 64 M and 135 M (its kernels win); the crossover lies between, unmeasured, and 10 M sits in that gap
VLLM_MIN_PARAMETERS = 10_000_000


def parameter_count(model: torch.nn.Module) -> int:
    """Parameters of ``model``, whole ones under ZeRO-3 (``ds_numel``), adapters and frozen base alike."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def vllm_blocker(model: torch.nn.Module) -> str | None:
    """Why vLLM cannot sample ``model`` here (on the CPU: an attention head size without a kernel), or None."""
    if next(model.parameters()).device.type != "cpu":
        return None
    from opd.sampling.vllm import _check_cpu_head_dim

    try:
        _check_cpu_head_dim(getattr(model, "config", None))
    except ValueError as err:
        return str(err).split(";")[0].replace("sampler=vllm on CPU: ", "")
    return None


@SAMPLERS.register("auto")
class AutoSampler:
    """vLLM for a model of at least ``vllm_min_parameters`` parameters when vLLM is installed, else the HF sampler,
    chosen for each model on its first ``generate`` and said once.

    A model whose ``generation_config.suppress_tokens`` is set (a head padded past the vocabulary the pair shares, which
    vLLM would sample from) always gets the HF sampler, so this sampler honours suppressed tokens. Every other key is
    the vLLM sampler's (``conf/sampler/vllm.yaml``), used when vLLM is chosen.

    Args:
        vllm_min_parameters: the size from which vLLM is chosen (> 0).
        temperature, top_p, top_k, max_new_tokens, n: sampling, as both samplers take them.
        dtype ... lora_sync: the vLLM sampler's keys (:class:`opd.sampling.vllm.VLLMSampler`), used when it is chosen.
    """

    honours_suppress_tokens = True

    def __init__(self, vllm_min_parameters: int = VLLM_MIN_PARAMETERS, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, max_new_tokens: int = 64, n: int = 1, dtype: str = "float32", enforce_eager: bool = True,
                 gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False, seed: int = 0,
                 cpu_kvcache_space_gib: int = 1, cpu_omp_threads_bind: str = "nobind", max_model_len: int | None = None,
                 logprobs_mode: str = "processed_logprobs", weight_sync: str = "iterator", lora_sync: str = "auto") -> None:
        if vllm_min_parameters <= 0:
            raise ValueError(f"vllm_min_parameters must be > 0, got {vllm_min_parameters}")
        self.hf = HFSampler(temperature, top_p, top_k, max_new_tokens, n)
        self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.n = temperature, top_p, top_k, max_new_tokens, n
        self.vllm_min_parameters = vllm_min_parameters
        self._vllm_keys: dict[str, Any] = dict(
            dtype=dtype, enforce_eager=enforce_eager, gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode, seed=seed, cpu_kvcache_space_gib=cpu_kvcache_space_gib,
            cpu_omp_threads_bind=cpu_omp_threads_bind, max_model_len=max_model_len, logprobs_mode=logprobs_mode,
            weight_sync=weight_sync, lora_sync=lora_sync)
        self.vllm = None  # built on the first model that gets it
        self.choices: dict[int, str] = {}  # id(model) -> "hf" | "vllm"

    def choose(self, model: torch.nn.Module) -> str:
        """``model``'s sampler ("hf" or "vllm"), decided on first sight and printed once."""
        key = id(model)
        if key not in self.choices:
            size = parameter_count(model)
            suppressed = bool(getattr(getattr(model, "generation_config", None), "suppress_tokens", None))
            installed = importlib.util.find_spec("vllm") is not None
            unsupported = vllm_blocker(model) if installed and size >= self.vllm_min_parameters else None
            choice = "vllm" if installed and size >= self.vllm_min_parameters and not suppressed and not unsupported \
                else "hf"
            why = ("its head has suppressed ids" if suppressed else "vLLM is not installed" if not installed
                   else unsupported or f"{'>=' if size >= self.vllm_min_parameters else '<'} "
                                       f"{self.vllm_min_parameters / 1e6:g} M")
            print(f"opd-train: sampler=auto: {type(model).__name__} with {size / 1e6:.1f} M parameters samples with "
                  f"{choice} ({why})")
            self.choices[key] = choice
        return self.choices[key]

    def _for(self, model: torch.nn.Module):
        if self.choose(model) == "hf":
            return self.hf
        if self.vllm is None:
            from opd.sampling.vllm import VLLMSampler

            self.vllm = VLLMSampler(self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.n,
                                    **self._vllm_keys)
        return self.vllm

    def generate(self, model: torch.nn.Module, tokenizer, examples: list[Example], greedy: bool = False,
                 n: int | None = None, prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> RolloutBatch:
        return self._for(model).generate(model, tokenizer, examples, greedy=greedy, n=n, prompts=prompts)

    def sync_weights(self, model: torch.nn.Module) -> None:
        if self.choices.get(id(model)) == "vllm":
            self.vllm.sync_weights(model)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()

    def __getattr__(self, name: str):
        """The vLLM sampler's figures (``sync_bytes``, ``syncs``...) once it exists; AttributeError otherwise."""
        vllm = self.__dict__.get("vllm")
        if vllm is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(vllm, name)
