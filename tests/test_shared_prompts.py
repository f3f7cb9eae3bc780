"""trainer.share_prompts (issue 26): a prompt that several rows repeat is run once, and the completions against its
cached keys and values. The per-method loss and gradient check is in tests/test_pitfalls.py
(``test_shared_prompts_give_the_unshared_loss_and_gradient``); here the scoring functions themselves."""

from __future__ import annotations

import types

import pytest
import torch

from opd.models.scoring import (
    completion_hidden_states,
    completion_logits,
    prompt_groups,
    prompt_sharing_blocker,
    shared_prompt_forward,
)
from opd.types import Example, RolloutBatch


def grouped_batch(tokenizer, prompts: list[str], n: int, length: int = 5, seed: int = 0) -> RolloutBatch:
    """``n`` rows per prompt (left-padded, several lengths), random completions with ragged masks."""
    tokenizer.padding_side = "left"
    enc = tokenizer(prompts, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"].repeat_interleave(n, 0), enc["attention_mask"].repeat_interleave(n, 0)
    generator = torch.Generator().manual_seed(seed)
    completion = torch.randint(3, 20, (len(ids), length), generator=generator)
    completion_mask = (torch.arange(length)[None] < torch.randint(1, length + 1, (len(ids), 1), generator=generator)).long()
    return RolloutBatch(ids, mask, completion, completion_mask, [Example(p, "", "") for p in prompts for _ in range(n)],
                        "student")


@pytest.fixture
def toy(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"]).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dirs["student"])


def test_groups_are_runs_of_equal_prompts():
    ids = torch.tensor([[0, 5, 6], [0, 5, 6], [7, 8, 9], [0, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 1], [1, 1, 1], [0, 1, 1]])
    assert prompt_groups(ids, mask).tolist() == [0, 0, 1, 2]  # the last row repeats row 0 but not next to it
    assert prompt_groups(ids[1:], mask[1:]) is None  # nothing repeats next to itself
    assert prompt_groups(ids[:1], mask[:1]) is None


def test_shared_logits_and_hidden_states_equal_the_full_pass(toy):
    """float32 models: the same logits and hidden states to float rounding (the prompt pass has other shapes)."""
    model, tokenizer = toy
    batch = grouped_batch(tokenizer, ["12+3=", "7*8=", "1+1+1+1="], n=3)
    with torch.no_grad():
        full = completion_logits(model, batch)
        shared = completion_logits(model, batch, share_prompts=True)
        torch.testing.assert_close(shared, full, rtol=1e-5, atol=1e-5)
        hidden_full = completion_hidden_states(model, batch).hidden
        hidden_shared = completion_hidden_states(model, batch, share_prompts=True).hidden
        torch.testing.assert_close(hidden_shared, hidden_full, rtol=1e-5, atol=1e-5)
    first, rest = shared_prompt_forward(model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids,
                                        prompt_groups(batch.prompt_ids, batch.prompt_mask), hidden=False)
    assert first.shape == (9, full.shape[-1]) and rest.shape == (9, 5, full.shape[-1])


def test_the_prompt_runs_once(toy):
    """The prompt pass sees one row per group: the model is called on [3, P] and [9, T], never on [9, P + T]."""
    model, tokenizer = toy
    batch = grouped_batch(tokenizer, ["12+3=", "7*8=", "1+1+1+1="], n=3)
    shapes = []
    hook = model.model.embed_tokens.register_forward_hook(lambda module, args, out: shapes.append(tuple(args[0].shape)))
    with torch.no_grad():
        completion_logits(model, batch, share_prompts=True)
    hook.remove()
    assert shapes == [(3, batch.prompt_ids.shape[1]), (9, 5)]


def test_models_not_checked_with_a_cache_are_left_alone():
    def fake(model_type, **config):
        return types.SimpleNamespace(config=types.SimpleNamespace(model_type=model_type, _attn_implementation="sdpa",
                                                                  **config))

    assert prompt_sharing_blocker(fake("llama")) is None
    assert "gemma3" in prompt_sharing_blocker(fake("gemma3"))
    assert "sliding" in prompt_sharing_blocker(fake("llama", sliding_window=512))
    assert "flash" in prompt_sharing_blocker(types.SimpleNamespace(config=types.SimpleNamespace(
        model_type="llama", _attn_implementation="flash_attention_2")))


def test_grouped_rollouts_train_with_shared_prompts_from_the_rollout_worker(compose_cfg):
    """The rollout worker (trainer.max_staleness=1) writes grouped rows; the learner scores them with shared prompts:
    the run trains and each step's loss equals the loss of the same batch scored row by row."""
    import dataclasses

    from opd.train import build_trainer

    trainer = build_trainer(compose_cfg("method=gkd", "sampler.n=2", "trainer.max_staleness=1", "trainer.batch_size=4"))
    try:
        assert trainer.loss_path.share_prompts
        seen = []
        accumulate = trainer.accumulate_gradients

        def record(batches, num_tokens):
            seen.append((batches, num_tokens))
            return accumulate(batches, num_tokens)

        trainer.accumulate_gradients = record
        rows = [trainer.train_step() for _ in range(3)]
        assert all(torch.isfinite(torch.tensor(row["train/loss"])) for row in rows)
        batches, num_tokens = seen[-1]
        assert prompt_groups(batches[0].prompt_ids, batches[0].prompt_mask) is not None  # the worker's rows repeat
        trainer.loss_path = dataclasses.replace(trainer.loss_path, share_prompts=False)
        trainer.teacher_component.share_prompts = False
        trainer.student.zero_grad(set_to_none=True)
        unshared, _, _ = accumulate(batches, num_tokens)
        trainer.loss_path = dataclasses.replace(trainer.loss_path, share_prompts=True)
        trainer.teacher_component.share_prompts = True
        trainer.student.zero_grad(set_to_none=True)
        shared, _, _ = accumulate(batches, num_tokens)
        assert shared == pytest.approx(unshared, rel=1e-5)  # float32 models: rounding only
    finally:
        trainer.close()
