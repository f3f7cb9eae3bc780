"""A LoRA student with ``sampler=vllm`` (issue 24): the engine follows each adapter update, by vLLM's LoRA support (the
adapter only) or by merged weights (run with ``pytest -m vllm``; needs the vllm extra).

The student is the shipped toy student widened to 32-dimensional heads (vLLM's CPU kernels; see
tests/test_vllm_sampler.py), with rank-8 adapters on every linear layer.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from opd.config import ASSETS, LoraConfig  # noqa: E402
from opd.data.arithmetic import ChainArithmetic  # noqa: E402
from opd.models.lora import adapter_tensors, apply_lora  # noqa: E402
from opd.sampling.hf import HFSampler  # noqa: E402
from opd.sampling.vllm import VLLMSampler, pad_attention_heads  # noqa: E402

pytestmark = pytest.mark.vllm

STUDENT = ASSETS / "toy" / "student"
MAX_NEW = 32


def lora_student():
    model = pad_attention_heads(AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32))
    apply_lora(model, LoraConfig(r=8), seed=0)
    return model, AutoTokenizer.from_pretrained(STUDENT)


@torch.no_grad()
def update_adapter(model, seed: int) -> None:
    """An adapter update large enough to change the greedy completions: B (zero at start) drawn at random."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))


def hf_logprobs(model, batch) -> torch.Tensor:
    """``[B, T]`` log-softmax of ``model``'s logits (T=1) at each completion token of ``batch``."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    p = batch.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, p - 1:-1].float(), dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


def rows(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]


@pytest.mark.parametrize("lora_sync", ["adapter", "merged"])
def test_the_engine_follows_adapter_updates(lora_sync):
    """After an update and ``sync_weights``, the engine's log-probs of its sampled tokens equal the HF LoRA student's on
    the same tokens (1e-3: vLLM's CPU kernels against HF's eager attention, float32, as for a full student), and its
    greedy completions are the HF student's; the adapter sync moves the adapter's bytes only."""
    model, tok = lora_student()
    examples = ChainArithmetic(num_train=16, num_eval=8).train[:16]
    sampler = VLLMSampler(max_new_tokens=MAX_NEW, seed=0, lora_sync=lora_sync)
    try:
        update_adapter(model, seed=1)
        sampler.generate(model, tok, examples, greedy=True)  # the engine, built from this adapter
        before = rows(HFSampler(max_new_tokens=MAX_NEW).generate(model, tok, examples[:8], greedy=True))
        update_adapter(model, seed=2)
        after = rows(HFSampler(max_new_tokens=MAX_NEW).generate(model, tok, examples[:8], greedy=True))
        assert after != before, "the update did not change the greedy completions; the test proves nothing"
        sampler.sync_weights(model)
        assert rows(sampler.generate(model, tok, examples[:8], greedy=True)) == after
        batch = sampler.generate(model, tok, examples, greedy=False)
        mask = batch.completion_mask.bool()
        assert mask.sum() > 50
        gap = (batch.sampler_logprobs - hf_logprobs(model, batch))[mask].abs().max()
        assert gap < 1e-3, gap
        adapter_bytes = sum(t.numel() * t.element_size() for _, t in adapter_tensors(model))
        model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        if lora_sync == "adapter":  # the adapter's tensors plus its small JSON config
            assert adapter_bytes <= sampler.sync_bytes < adapter_bytes + 10_000
        else:
            assert sampler.sync_bytes > adapter_bytes and sampler.sync_bytes > 0.5 * model_bytes
    finally:
        sampler.close()


# async is slow-marked (a second engine in the rollout worker, ~1 min): make test keeps the adapter-only ring
# (tests/test_lora.py) and the engine's adapter sync (above)
@pytest.mark.parametrize("staleness", [0, pytest.param(1, marks=pytest.mark.slow)], ids=["sync", "async"])
def test_short_lora_training_run_with_sampler_vllm(compose_cfg, tmp_path, staleness):
    """opd-train with a LoRA student and sampler=vllm: rollouts from the engine's adapter, a sync per step; with
    ``trainer.max_staleness=1`` the rollout worker's own engine gets the adapter from the shared ring."""
    from opd.train import run

    student_dir = tmp_path / "wide_student"
    pad_attention_heads(AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)).save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(STUDENT).save_pretrained(student_dir)
    summary = run(compose_cfg("sampler=vllm", "student.lora.r=8", "trainer.max_steps=3", "sampler.max_new_tokens=24",
                              f"student.name_or_path={student_dir}", f"trainer.max_staleness={staleness}",
                              tiny_models=False))
    assert summary["steps"] == 3 and summary["tokens"] > 0
    rows_ = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum("train/loss" in r for r in rows_) == 3


def test_auto_sync_is_merged_on_cpu_and_the_adapter_on_gpu(monkeypatch):
    """``lora_sync=auto`` follows the measurement (benchmarks/RESULTS.md, "LoRA students"): merged on CPU, where vLLM's
    LoRA kernels run uncompiled and the whole step was faster merged; the adapter on GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert VLLMSampler(lora_sync="auto").resolved_lora_sync() == "merged"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert VLLMSampler(lora_sync="auto").resolved_lora_sync() == "adapter"
    assert VLLMSampler(lora_sync="adapter").resolved_lora_sync() == "adapter"
    with pytest.raises(ValueError, match="lora_sync"):
        VLLMSampler(lora_sync="both")
