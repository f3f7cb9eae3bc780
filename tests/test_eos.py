"""Generation stops, and the loss mask ends, at every EOS id a model declares (not only the tokenizer's).

Qwen3 instruct declares two (``generation_config.eos_token_id = [<|im_end|>, <|endoftext|>]``). Here the
shipped toy student (which writes ``4-1=3;3-7=-4;#-4</s>``) declares ``;`` as a second EOS: a greedy
rollout must then end at its first ``;``. The reference is independent of the code under test: greedy
decoding is prefix-deterministic, so the expected completion is the one-EOS greedy output cut at the first
``;`` (or ``</s>``).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.config import ASSETS
from opd.data.arithmetic import ChainArithmetic
from opd.engine.evaluate import evaluate_accuracy, evaluate_pass_at_k
from opd.sampling.base import eos_token_ids
from opd.sampling.behaviour import RolloutContext, TeacherMixedPolicy, joint_decode
from opd.sampling.hf import HFSampler
from opd.sampling.tokenize import encode_prompts

STUDENT, TEACHER = ASSETS / "toy" / "student", ASSETS / "toy" / "teacher"
MAX_NEW = 48


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(STUDENT)


@pytest.fixture(scope="module")
def semicolon(tok) -> int:
    return tok.convert_tokens_to_ids(";")


@pytest.fixture(scope="module")
def examples():
    return ChainArithmetic(num_train=8, num_eval=4).train[:8]


def load(path, extra_eos: list[int] | None = None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    if extra_eos:
        model.generation_config.eos_token_id = [model.generation_config.eos_token_id, *extra_eos]
    return model


def rows(batch) -> list[list[int]]:
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]


def cut_at(row: list[int], stops: set[int]) -> list[int]:
    """The row up to and including its first token in ``stops`` (the whole row when none)."""
    for i, token in enumerate(row):
        if token in stops:
            return row[: i + 1]
    return row


def test_eos_token_ids_collects_tokenizer_generation_config_and_config(tok, semicolon):
    model = load(STUDENT)
    assert eos_token_ids(tok, model) == [tok.eos_token_id]
    model.generation_config.eos_token_id = [semicolon, tok.eos_token_id]  # a list, tokenizer's id included
    assert eos_token_ids(tok, model) == [tok.eos_token_id, semicolon]
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = [tok.eos_token_id, 7]  # declared on the model config only
    assert eos_token_ids(tok, model) == [tok.eos_token_id, 7]
    teacher = load(TEACHER, [semicolon])
    assert eos_token_ids(tok, model, teacher) == [tok.eos_token_id, 7, semicolon]  # union for joint decoding


def test_hf_sampler_stops_and_masks_at_the_second_eos(tok, semicolon, examples):
    reference = rows(HFSampler(max_new_tokens=MAX_NEW).generate(load(STUDENT), tok, examples, greedy=True))
    assert sum(semicolon in r[:-1] for r in reference) >= 4, "the toy student should write ';' mid-completion"
    batch = HFSampler(max_new_tokens=MAX_NEW).generate(load(STUDENT, [semicolon]), tok, examples, greedy=True)
    got = rows(batch)
    assert got == [cut_at(r, {tok.eos_token_id, semicolon}) for r in reference]
    assert all(r[-1] == semicolon for r in got)
    # nothing after the stop: pad ids, mask 0
    lengths = batch.completion_mask.sum(1)
    for ids, n in zip(batch.completion_ids, lengths.tolist()):
        assert (ids[n:] == tok.pad_token_id).all()


def test_each_model_stops_at_its_own_eos_set(tok, semicolon, examples):
    """A teacher that declares only ``</s>`` writes to ``</s>``; the student that declares ``;`` stops there."""
    sampler = HFSampler(max_new_tokens=MAX_NEW)
    teacher_rows = rows(sampler.generate(load(TEACHER), tok, examples, greedy=True))
    student_rows = rows(sampler.generate(load(STUDENT, [semicolon]), tok, examples, greedy=True))
    assert all(r[-1] == tok.eos_token_id and semicolon in r for r in teacher_rows)
    assert all(r[-1] == semicolon and r.count(semicolon) == 1 for r in student_rows)


def test_joint_decode_stops_at_either_models_eos(tok, semicolon, examples):
    student, teacher = load(STUDENT, [semicolon]), load(TEACHER)  # only the student declares ';'
    eos = eos_token_ids(tok, student, teacher)
    prompt_ids, prompt_mask = encode_prompts(tok, [ex.prompt for ex in examples])
    torch.manual_seed(0)
    with torch.no_grad():
        tokens, student_lp, mix_lp = joint_decode(student, teacher, prompt_ids, prompt_mask, MAX_NEW, 0.2, 1.0, eos,
                                                  tok.pad_token_id)
    stops = {tok.eos_token_id, semicolon}
    for row in tokens.tolist():
        kept = cut_at(row, stops)
        assert kept[-1] in stops and all(t == tok.pad_token_id for t in row[len(kept):])
    assert tokens.shape[1] < MAX_NEW  # every row stopped, so decoding ended early
    # the policy: same stops, and the mask ends at them
    ctx = RolloutContext(student, teacher, tok, HFSampler(max_new_tokens=MAX_NEW), torch.device("cpu"), rng=None)
    torch.manual_seed(1)
    batch = TeacherMixedPolicy(alpha=0.2).collect(ctx, examples)
    got = rows(batch)
    assert all(r == cut_at(r, stops) and r[-1] in stops for r in got)
    assert sum(r[-1] == semicolon for r in got) >= 4
    assert torch.isfinite(batch.sampler_logprobs[batch.completion_mask.bool()]).all()


def test_evaluation_text_ends_at_the_second_eos(tok, semicolon, examples):
    task = ChainArithmetic(num_train=8, num_eval=4)
    reference = rows(HFSampler(max_new_tokens=MAX_NEW).generate(load(STUDENT), tok, examples, greedy=True))
    expected = [tok.decode(cut_at(r, {tok.eos_token_id, semicolon}), skip_special_tokens=True) for r in reference]
    result = evaluate_accuracy(load(STUDENT, [semicolon]), tok, task, examples, batch_size=4, max_new_tokens=MAX_NEW,
                               num_samples=len(examples), progress=False)
    assert [text for _, text, _ in result.samples] == expected
    assert all(text.endswith(";") and "#" not in text for text in expected)
    assert result.mean_length == sum(len(cut_at(r, {tok.eos_token_id, semicolon})) for r in reference) / len(examples)

    class Recording:  # pass@k reads only is_correct: keep every decoded text
        texts: list[str]

        def is_correct(self, text, example):
            self.texts.append(text)
            return False

    recording = Recording()
    recording.texts = []
    torch.manual_seed(0)
    evaluate_pass_at_k(load(STUDENT, [semicolon]), tok, recording, examples[:4], HFSampler(max_new_tokens=MAX_NEW),
                       num_samples=2, batch_size=8, progress=False)
    assert len(recording.texts) == 8 and all(";" not in text[:-1] for text in recording.texts)

