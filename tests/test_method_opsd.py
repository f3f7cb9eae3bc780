"""OPSD: the frozen initial student, prompted with the reference solution, scores the student's own samples."""

from __future__ import annotations

import math

import pytest
import torch

from opd.data.base import Example
from opd.engine.scoring import completion_logits
from opd.errors import ConfigError
from opd.methods.opsd import OPSD
from opd.models.toy import TOY_ALPHABET
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=3")


def random_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (2, 6), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    prompt = torch.ones(2, 2, dtype=torch.long)
    batch = RolloutBatch(prompt, prompt, ids, mask, [], "student")
    return batch, 4 * torch.randn(2, 6, 10, generator=g), 4 * torch.randn(2, 6, 10, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 1.1])
def test_clipped_fkl_loss_and_teacher_entropy_match_float64_reference(temperature):
    batch, s, t = random_batch()
    out = OPSD(temperature=temperature).loss(batch, s, t, num_tokens=11)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    log_q = torch.log_softmax(s.double() / temperature, -1)
    m = batch.completion_mask.double()
    per_entry = log_p.exp() * (log_p - log_q)
    assert (per_entry > 0.05).any() and (per_entry < 0.05).any()  # the clip binds on some entries only
    expected = (per_entry.clamp(max=0.05).sum(-1) * m).sum().item() / 11
    entropy = (-(log_p.exp() * log_p).sum(-1) * m).sum().item() / 11
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics == {"loss/fkl_clip": pytest.approx(expected, rel=1e-5),
                           "opsd/teacher_entropy": pytest.approx(entropy, rel=1e-5)}


def test_jsd_loss_matches_float64_reference():
    batch, s, t = random_batch(seed=1)
    out = OPSD(divergence="jsd", jsd_beta=0.5, temperature=1.0).loss(batch, s, t, num_tokens=9)
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    mix = 0.5 * p + 0.5 * q
    jsd = 0.5 * (p * (p / mix).log()).sum(-1) + 0.5 * (q * (q / mix).log()).sum(-1)
    expected = (jsd * batch.completion_mask).sum().item() / 9
    assert out.loss.item() == pytest.approx(expected, rel=1e-5) and "loss/jsd" in out.metrics


@pytest.mark.parametrize(("template", "missing"), [("{prompt} only", "{solution}"), ("{solution} only", "{prompt}"),
                                                   ("{problem}{solution}", "{prompt}")])
def test_template_must_hold_both_placeholders(template, missing):
    with pytest.raises(ConfigError, match=f"template must contain the placeholder {missing}"):
        METHODS.build({"name": "opsd", "template": template})


def test_template_rendering_is_one_pass_and_keeps_other_braces():
    method = OPSD(template="Solve {prompt}\nReference: {solution}\n\\boxed{} {prompt}")
    text = method.render(Example(prompt="1+{solution}=", target="x {prompt} y", answer="0"))
    assert text == "Solve 1+{solution}=\nReference: x {prompt} y\n\\boxed{} 1+{solution}="
    default = OPSD()
    assert default.render(Example("12+7-30=", "12+7=19;19-30=-11;#-11", "-11")) == "12+7-30=12+7=19;19-30=-11;#-11 12+7-30="
    assert set(default.template.replace("{prompt}", "").replace("{solution}", "")) <= set(TOY_ALPHABET)


def test_teacher_logits_use_the_privileged_prompt_and_stay_aligned(compose_cfg):
    trainer = build_trainer(compose_cfg("method=opsd", *FAST))
    tok, teacher = trainer.tokenizer, trainer.teacher
    torch.manual_seed(0)
    batch = trainer.collect(trainer.task.train[:3])
    assert batch.source == "student"
    got = trainer.teacher_logits(batch)  # [B, T, V], privileged prompt, left-padded
    own_prompt = completion_logits(teacher, batch)
    lengths = batch.completion_mask.sum(1).tolist()
    assert len({len(trainer.method.render(ex)) for ex in batch.examples}) > 1  # ragged privileged prompts
    for i, (example, length) in enumerate(zip(batch.examples, lengths)):
        prompt = tok(trainer.method.render(example))["input_ids"]  # unpadded, BOS included
        sequence = torch.tensor([prompt + batch.completion_ids[i, :length].tolist()])
        with torch.no_grad():
            manual = teacher(input_ids=sequence).logits[0, len(prompt) - 1: len(prompt) - 1 + length]
        torch.testing.assert_close(got[i, :length], manual, rtol=1e-4, atol=1e-4)
        assert not torch.allclose(got[i, :length], own_prompt[i, :length], atol=1e-3)  # the solution changes the view


def test_teacher_is_the_frozen_initial_student_not_the_teacher_config(compose_cfg):
    trainer = build_trainer(compose_cfg("method=opsd", "trainer.lr=1e-2", "trainer.warmup_steps=0", *FAST))
    assert trainer.teacher is not trainer.student
    assert trainer.teacher.config.hidden_size == trainer.student.config.hidden_size == 32  # the tiny teacher has 48
    initial = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    for key, value in trainer.teacher.state_dict().items():
        assert torch.equal(value, initial[key])
    for _ in range(3):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and metrics["loss/fkl_clip"] >= 0
        assert metrics["opsd/teacher_entropy"] > 0 and metrics["rollout/mean_length"] > 0
    assert all(torch.equal(v, initial[k]) for k, v in trainer.teacher.state_dict().items())
    assert any(not torch.equal(v, initial[k]) for k, v in trainer.student.state_dict().items())
    assert not any(p.requires_grad for p in trainer.teacher.parameters())


def test_training_steps_with_jsd_and_no_teacher_config(compose_cfg, tiny_model_dirs):
    cfg = compose_cfg("method=opsd", "method.divergence=jsd", "~teacher",
                      f"student.name_or_path={tiny_model_dirs['student']}", *FAST, tiny_models=False)
    trainer = build_trainer(cfg)
    for _ in range(2):
        metrics = trainer.train_step()
        assert math.isfinite(metrics["train/loss"]) and {"loss/jsd", "opsd/teacher_entropy"} <= set(metrics)
