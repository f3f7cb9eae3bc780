"""Rollouts and scoring: EOS truncation, left-padding invariance, logits aligned with completion tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.data.base import Example
from opd.errors import ConfigError
from opd.models.scoring import completion_logits, token_logprobs
from opd.registry import SAMPLERS
from opd.sampling.base import truncate_after_eos
from opd.sampling.hf import HFSampler
from opd.sampling.tokenize import encode_targets

EXAMPLES = [Example("1+2=", "1+2=3;#3", "3"), Example("12+34-56=", "12+34=46;46-56=-10;#-10", "-10")]


@pytest.fixture(scope="module")
def student(tiny_model_dirs):
    tok = AutoTokenizer.from_pretrained(tiny_model_dirs["student"])
    return AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"]).eval(), tok


def test_truncate_after_eos():
    ids = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8]])
    out, mask = truncate_after_eos(ids, eos_token_id=2, pad_token_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


def test_greedy_rollouts_have_consistent_masks(student):
    model, tok = student
    batch = HFSampler(max_new_tokens=12).generate(model, tok, EXAMPLES, greedy=True)
    assert batch.completion_ids.shape == batch.completion_mask.shape == (2, batch.completion_ids.shape[1])
    assert batch.completion_ids.shape[1] <= 12
    assert (batch.prompt_mask[0] == 0).any() and batch.prompt_mask[1].all()  # shorter prompt is left-padded
    # greedy decoding is deterministic
    again = HFSampler(max_new_tokens=12).generate(model, tok, EXAMPLES, greedy=True)
    assert torch.equal(batch.completion_ids, again.completion_ids)


def test_completion_logits_do_not_depend_on_left_padding(student):
    model, tok = student
    batch = encode_targets(tok, EXAMPLES)
    single = encode_targets(tok, EXAMPLES[:1])
    with torch.no_grad():
        padded = completion_logits(model, batch)[0, : single.completion_ids.shape[1]]
        alone = completion_logits(model, single)[0]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-4)


def test_completion_logits_predict_the_completion_tokens(student):
    model, tok = student
    batch = encode_targets(tok, EXAMPLES[:1])
    with torch.no_grad():
        full = model(input_ids=batch.input_ids).logits  # no padding: plain forward
        got = completion_logits(model, batch)
    prompt_len = batch.prompt_ids.shape[1]
    torch.testing.assert_close(got, full[:, prompt_len - 1 : -1])
    logp = token_logprobs(got, batch.completion_ids)
    assert logp.shape == batch.completion_ids.shape and (logp <= 0).all()


def test_bad_sampler_values_fail_at_build():
    with pytest.raises(ConfigError, match="max_new_tokens must be > 0"):
        SAMPLERS.build({"name": "hf", "max_new_tokens": 0})
    with pytest.raises(ConfigError, match="temperature"):
        SAMPLERS.build({"name": "hf", "temperature": 0.0})


def test_n_samples_per_prompt_are_rows_grouped_by_example(student):
    model, tok = student
    torch.manual_seed(0)
    batch = HFSampler(max_new_tokens=12, n=3).generate(model, tok, EXAMPLES)
    assert batch.completion_ids.shape[0] == 6 and batch.examples == [EXAMPLES[0]] * 3 + [EXAMPLES[1]] * 3
    assert torch.equal(batch.prompt_ids[:3], batch.prompt_ids[0].expand(3, -1))
    assert not torch.equal(batch.prompt_ids[2], batch.prompt_ids[3])
    rows = {tuple(ids[m.bool()].tolist()) for ids, m in zip(batch.completion_ids[:3], batch.completion_mask[:3])}
    assert len(rows) > 1  # three samples of one prompt, not one copied
    assert HFSampler(max_new_tokens=12, n=3).generate(model, tok, EXAMPLES, greedy=True).completion_ids.shape[0] == 2
    assert HFSampler(max_new_tokens=12, n=3).generate(model, tok, EXAMPLES, n=1).completion_ids.shape[0] == 2


def test_a_training_step_with_several_samples_per_prompt(compose_cfg):
    from opd.train import build_trainer

    trainer = build_trainer(compose_cfg("sampler.n=2", "trainer.batch_size=4"))
    batch = trainer.collect(trainer.eval_examples[:4])
    assert batch.completion_ids.shape[0] == 8
    metrics = trainer.train_step()
    assert metrics["train/tokens"] > 0 and torch.isfinite(torch.tensor(metrics["train/loss"]))
