"""sampler=vllm against the HF sampler on the shipped toy student (run with ``pytest -m vllm``; needs the vllm extra).

vLLM's CPU attention kernels exist only for head sizes 32, 64, 80, ... (``CPUAttentionBackend.
get_supported_head_sizes``); the toy student's heads have 16 dimensions. The tests therefore use the
shipped toy student *widened* to 32-dimensional heads (:func:`opd.sampling.vllm.pad_attention_heads`): the extra dimensions are
zero, RoPE pairs keep their frequencies and the query is rescaled for the 1/sqrt(head_dim) factor, so
it is the same function (checked: its HF greedy completions equal the original's).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: E402

from opd.config import ASSETS  # noqa: E402
from opd.data.arithmetic import ChainArithmetic  # noqa: E402
from opd.engine.trainer import Trainer  # noqa: E402
from opd.registry import SAMPLERS  # noqa: E402
from opd.sampling.hf import HFSampler  # noqa: E402
from opd.sampling.tokenize import encode_targets  # noqa: E402
from opd.sampling.vllm import VLLMSampler, pad_attention_heads  # noqa: E402

pytestmark = pytest.mark.vllm

STUDENT, TEACHER = ASSETS / "toy" / "student", ASSETS / "toy" / "teacher"
MAX_NEW = 48


def load_student() -> LlamaForCausalLM:
    return pad_attention_heads(AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32))


def load_teacher() -> LlamaForCausalLM:
    """The shipped toy teacher (head size 24, hidden 96, 4 layers: another architecture) widened to 96-dim heads."""
    return pad_attention_heads(AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32), head_dim=96)


@pytest.fixture(scope="module")
def task():
    return ChainArithmetic(num_train=16, num_eval=8)


@pytest.fixture(scope="module")
def student():
    """One student object for the module: the engine is keyed by the model object, so the module builds it once;
    tests that change its weights restore them (and the engine's) at the end."""
    return load_student(), AutoTokenizer.from_pretrained(STUDENT)


@pytest.fixture(scope="module")
def engine_sampler():
    """One sampler for the module (building an engine costs seconds)."""
    sampler = VLLMSampler(max_new_tokens=MAX_NEW, seed=0)
    yield sampler
    sampler.close()


def rows(batch) -> list[list[int]]:
    """Each row's completion tokens up to and including EOS (what the loss sees)."""
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]


def train_on_wrong_targets(model, tok, examples) -> None:
    """A few high-lr SFT steps on *wrong* targets (changes the model's greedy completions)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    wrong = encode_targets(tok, examples, targets=["7+7=14;#14"] * len(examples))
    model.train()
    for _ in range(5):
        logits = model(input_ids=wrong.input_ids, attention_mask=wrong.attention_mask).logits
        p = wrong.prompt_ids.shape[1]
        loss = torch.nn.functional.cross_entropy(logits[:, p - 1:-1].flatten(0, 1), wrong.completion_ids.flatten(),
                                                 reduction="none")
        loss = (loss * wrong.completion_mask.flatten()).sum() / wrong.completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_widened_student_is_the_shipped_student(student, task):
    model, tok = student
    original = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)
    sampler = HFSampler(max_new_tokens=MAX_NEW)
    assert rows(sampler.generate(model, tok, task.train[:16], greedy=True)) == \
        rows(sampler.generate(original, tok, task.train[:16], greedy=True))


def test_cpu_rejects_head_sizes_without_a_kernel(task):
    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    original = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32)
    with pytest.raises(ValueError, match="head size 16"):
        VLLMSampler().generate(original, AutoTokenizer.from_pretrained(STUDENT), task.train[:2])


def test_engine_leaves_torch_threading_alone(engine_sampler, student, task):
    model, tok = student
    engine_sampler.generate(model, tok, task.train[:2], greedy=True)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_registered_lazily_and_validates():
    assert SAMPLERS.get("vllm") is VLLMSampler
    with pytest.raises(ValueError, match="n \\(samples per prompt\\) must be >= 1"):
        VLLMSampler(n=0)
    with pytest.raises(ValueError, match="dtype"):
        VLLMSampler(dtype="fp8")
    with pytest.raises(ValueError, match="temperature"):
        VLLMSampler(temperature=0.0)


def test_greedy_rollouts_equal_hf_token_for_token(engine_sampler, student, task):
    model, tok = student
    examples = task.train[:16]
    hf = HFSampler(max_new_tokens=MAX_NEW).generate(model, tok, examples, greedy=True)
    vl = engine_sampler.generate(model, tok, examples, greedy=True)
    assert torch.equal(vl.prompt_ids, hf.prompt_ids) and torch.equal(vl.prompt_mask, hf.prompt_mask)
    assert rows(vl) == rows(hf)
    assert vl.completion_ids.shape == hf.completion_ids.shape
    assert torch.equal(vl.completion_ids, hf.completion_ids) and torch.equal(vl.completion_mask, hf.completion_mask)
    assert vl.source == "student" and vl.temperature == 1.0 and vl.sampler_logprobs.shape == vl.completion_ids.shape


def test_sync_weights_makes_the_engine_follow_the_updated_model(engine_sampler, student, task):
    model, tok = student
    examples = task.eval[:8]
    before = rows(engine_sampler.generate(model, tok, examples, greedy=True))
    train_on_wrong_targets(model, tok, examples)  # the greedy completions must change
    hf_after = rows(HFSampler(max_new_tokens=MAX_NEW).generate(model, tok, examples, greedy=True))
    assert hf_after != before, "the SFT steps did not change the model's greedy output; the test proves nothing"
    stale = rows(engine_sampler.generate(model, tok, examples, greedy=True))
    assert stale == before  # the engine has its own copy of the weights
    engine_sampler.sync_weights(model)
    assert rows(engine_sampler.generate(model, tok, examples, greedy=True)) == hf_after
    # back to the shipped weights (for the other tests sharing model and engine), through the disk fallback
    model.load_state_dict(load_student().state_dict())
    engine_sampler.weight_sync = "disk"
    try:
        engine_sampler.sync_weights(model)
    finally:
        engine_sampler.weight_sync = "iterator"
    assert rows(engine_sampler.generate(model, tok, examples, greedy=True)) == before


def test_n_samples_per_prompt_are_rows_grouped_by_example(engine_sampler, student, task):
    model, tok = student
    examples = task.eval[:3]
    batch = engine_sampler.generate(model, tok, examples, n=4)
    assert batch.completion_ids.shape[0] == 12 and batch.examples == [ex for ex in examples for _ in range(4)]
    assert torch.equal(batch.prompt_ids[0], batch.prompt_ids[3]) and not torch.equal(batch.prompt_ids[0], batch.prompt_ids[4])
    assert len({tuple(r) for r in rows(batch)[:4]}) > 1  # four samples of one prompt, not one copied
    assert engine_sampler.generate(model, tok, examples, greedy=True, n=4).completion_ids.shape[0] == 3


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_match_hf_log_softmax(engine_sampler, student, task, temperature):
    """At T=1 vLLM's raw and processed logprobs agree; at T=0.7 ``processed_logprobs`` is log_softmax(logits / T)."""
    model, tok = student
    engine_sampler.temperature = temperature
    try:
        batch = engine_sampler.generate(model, tok, task.train[:16], greedy=False)
    finally:
        engine_sampler.temperature = 1.0
    assert batch.temperature == temperature
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    p = batch.prompt_ids.shape[1]
    hf_lp = torch.log_softmax(logits[:, p - 1:-1].float() / temperature, dim=-1)
    hf_lp = hf_lp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    mask = batch.completion_mask.bool()
    assert mask.sum() > 50
    diff = (batch.sampler_logprobs - hf_lp)[mask].abs()
    assert diff.max() < 1e-3, diff.max()
    assert (batch.sampler_logprobs[~mask] == 0).all()


def hf_logprobs(model, batch) -> torch.Tensor:
    """``[B, T]`` log-softmax of ``model``'s logits (T=1) at each completion token of ``batch``."""
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    p = batch.prompt_ids.shape[1]
    return torch.log_softmax(logits[:, p - 1:-1].float(), dim=-1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


def test_teacher_and_student_sample_from_their_own_engines(task):
    """One sampler, two models (different architectures): teacher-sampled batches are the teacher's (greedy rows
    equal HF teacher greedy; sampled rows carry the teacher's log-probs), student-sampled ones the student's,
    and after the student's weights change and are synced, still each their own (the teacher's engine is never
    re-synced)."""
    import random

    from opd.methods.seqkd import TeacherDecodePolicy
    from opd.sampling.behaviour import RolloutContext, StudentPolicy, TeacherPolicy

    tok = AutoTokenizer.from_pretrained(STUDENT)
    student, teacher = load_student(), load_teacher()
    examples = task.eval[:8]
    hf = HFSampler(max_new_tokens=MAX_NEW)
    hf_student, hf_teacher = (rows(hf.generate(m, tok, examples, greedy=True)) for m in (student, teacher))
    assert hf_student != hf_teacher, "the toy models agree on these prompts; the test proves nothing"
    sampler = VLLMSampler(max_new_tokens=MAX_NEW, seed=0)
    try:
        ctx = RolloutContext(student, teacher, tok, sampler, torch.device("cpu"), rng=random.Random(0))
        assert rows(StudentPolicy().collect(ctx, examples[:1])) != []  # the student's engine is built first
        assert rows(sampler.generate(student, tok, examples, greedy=True)) == hf_student
        seqkd = TeacherDecodePolicy(greedy=True).collect(ctx, examples)
        assert seqkd.source == "teacher" and rows(seqkd) == hf_teacher
        assert sampler.num_engines == 2
        sampled = sampler.generate(teacher, tok, examples)  # sampled at T=1: its log-probs are the teacher's
        mask = sampled.completion_mask.bool()
        assert (sampled.sampler_logprobs - hf_logprobs(teacher, sampled))[mask].abs().max() < 1e-3
        assert (sampled.sampler_logprobs - hf_logprobs(student, sampled))[mask].abs().max() > 0.1
        labelled = TeacherPolicy().collect(ctx, examples)
        assert labelled.source == "teacher" and labelled.sampler_logprobs is None  # not the student's q_old

        train_on_wrong_targets(student, tok, examples)
        hf_after = rows(hf.generate(student, tok, examples, greedy=True))
        assert hf_after != hf_student, "the SFT steps did not change the student; the test proves nothing"
        sampler.sync_weights(student)  # what the trainer does after every optimizer step
        assert rows(sampler.generate(student, tok, examples, greedy=True)) == hf_after
        assert rows(sampler.generate(teacher, tok, examples, greedy=True)) == hf_teacher
        assert sampler.syncs == 1
    finally:
        sampler.close()
    assert sampler.num_engines == 0


def test_seqkd_trainer_with_sampler_vllm_trains_on_teacher_samples(compose_cfg, tmp_path):
    """The real trainer (method=seqkd, greedy teacher, sampler=vllm): batches labelled "teacher" are the HF
    teacher's greedy output, before and after optimizer steps (each ending with the student's weight sync)."""
    from opd.train import build_trainer

    dirs = {}
    for name, model in (("student", load_student()), ("teacher", load_teacher())):
        dirs[name] = tmp_path / f"wide_{name}"
        model.save_pretrained(dirs[name])
        AutoTokenizer.from_pretrained(STUDENT).save_pretrained(dirs[name])
    cfg = compose_cfg("method=seqkd", "method.greedy=true", "sampler=vllm", "sampler.max_new_tokens=32",
                      "trainer.lr=0.05", "trainer.warmup_steps=0", f"student.name_or_path={dirs['student']}",
                      f"teacher.name_or_path={dirs['teacher']}", tiny_models=False)
    trainer = build_trainer(cfg)
    try:
        examples, tok = trainer.eval_examples[:8], trainer.tokenizer
        hf = HFSampler(max_new_tokens=32)
        hf_teacher = rows(hf.generate(trainer.teacher, tok, examples, greedy=True))
        assert hf_teacher != rows(hf.generate(trainer.student, tok, examples, greedy=True))
        trainer.sampler.generate(trainer.student, tok, examples[:1], greedy=True)  # a student engine, synced per step
        batch = trainer.collect(examples)
        assert batch.source == "teacher" and rows(batch) == hf_teacher
        for _ in range(2):
            trainer.train_step()
        assert trainer.sampler.syncs == 2 and trainer.sampler.num_engines == 2
        assert rows(trainer.collect(examples)) == hf_teacher
        assert rows(trainer.sampler.generate(trainer.student, tok, examples, greedy=True)) == \
            rows(hf.generate(trainer.student, tok, examples, greedy=True))
    finally:
        trainer.sampler.close()


def test_an_engine_that_cannot_fit_fails_in_one_line_before_vllm_starts(student, task, monkeypatch):
    """Every sampled model reserves its own KV cache: when the memory is not there, a ConfigError says what to lower."""
    import collections

    import psutil

    from opd.errors import ConfigError

    if torch.cuda.is_available():
        pytest.skip("CPU-only check")
    model, tok = student
    memory = collections.namedtuple("memory", "available")
    monkeypatch.setattr(psutil, "virtual_memory", lambda: memory(available=2**29))  # 0.5 GiB free
    sampler = VLLMSampler(max_new_tokens=8)
    with pytest.raises(ConfigError, match="cpu_kvcache_space_gib"):
        sampler.generate(model, tok, task.train[:1])
    assert sampler.num_engines == 0


@pytest.mark.parametrize("where", ["generation_config", "config"])
def test_vllm_stops_and_masks_at_every_declared_eos(student, task, where):
    """A model that declares ';' as a second EOS (in its generation config, or its model config only) stops
    there in the engine, as under HF."""
    model, tok = student
    semicolon = tok.convert_tokens_to_ids(";")
    examples = task.eval[:8]
    before = rows(HFSampler(max_new_tokens=MAX_NEW).generate(model, tok, examples, greedy=True))
    assert all(r[-1] == tok.eos_token_id for r in before) and sum(semicolon in r for r in before) >= 4
    declaring = load_student()
    getattr(declaring, where).eos_token_id = [tok.eos_token_id, semicolon]
    sampler = VLLMSampler(max_new_tokens=MAX_NEW, seed=0)
    try:
        batch = sampler.generate(declaring, tok, examples, greedy=True)
    finally:
        sampler.close()
    expected = [r[: r.index(semicolon) + 1] if semicolon in r else r for r in before]
    assert rows(batch) == expected
    assert rows(batch) == rows(HFSampler(max_new_tokens=MAX_NEW).generate(declaring, tok, examples, greedy=True))
    assert (batch.sampler_logprobs[~batch.completion_mask.bool()] == 0).all()


def test_short_training_run_with_sampler_vllm(compose_cfg, tmp_path, monkeypatch):
    import inspect

    from opd.train import run

    if "sync_weights" not in inspect.getsource(Trainer.train_step):
        pytest.xfail("needs the trainer's sync_weights hook")
    syncs = []
    original = VLLMSampler.sync_weights
    monkeypatch.setattr(VLLMSampler, "sync_weights", lambda self, model: (syncs.append(1), original(self, model)))
    student_dir = tmp_path / "wide_student"
    load_student().save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(STUDENT).save_pretrained(student_dir)
    cfg = compose_cfg("sampler=vllm", "trainer.max_steps=3", "sampler.max_new_tokens=24", f"student.name_or_path={student_dir}",
                      tiny_models=False)
    summary = run(cfg)
    assert summary["steps"] == 3 and summary["tokens"] > 0
    assert len(syncs) == 3
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in r for r in lines)


ZERO3_SYNC_CHECK = '''
import sys

from hydra import compose, initialize_config_dir

from opd.sampling.hf import HFSampler
from opd.train import CONF_DIR, build_trainer

student_dir, out = sys.argv[1:]
with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
    cfg = compose(config_name="train", overrides=[
        "debug=tiny", "sampler=vllm", "sampler.max_new_tokens=24", "deepspeed=zero3",
        "deepspeed.param_persistence_threshold=0", f"student.name_or_path={student_dir}", f"output_dir={out}",
        "trainer.lr=0.05", "trainer.warmup_steps=0", "trainer.num_threads=1"])
trainer = build_trainer(cfg)
student, tok = trainer.student, trainer.tokenizer
assert all(p.numel() == 0 for p in student.parameters()), "ZeRO-3 should leave no parameter whole outside a forward"
examples = trainer.eval_examples[:8]


def rows(batch):
    return [ids[mask.bool()].tolist() for ids, mask in zip(batch.completion_ids, batch.completion_mask)]


before = rows(trainer.sampler.generate(student, tok, examples, greedy=True))  # builds the engine from gathered weights
assert before == rows(HFSampler(max_new_tokens=24).generate(student, tok, examples, greedy=True))
for _ in range(3):
    trainer.train_step()  # each step ends with sync_weights: gathered parameter by parameter into the engine
hf_after = rows(HFSampler(max_new_tokens=24).generate(student, tok, examples, greedy=True))
assert hf_after != before, "the steps did not change the student's greedy output; the check proves nothing"
assert rows(trainer.sampler.generate(student, tok, examples, greedy=True)) == hf_after
print("ZERO3_SYNC_OK", trainer.sampler.syncs)
'''


def test_zero3_student_is_gathered_into_the_engine(tmp_path):
    """deepspeed=zero3 with every parameter partitioned (one process): the engine is built from the gathered
    student, and after optimizer steps its greedy output equals the updated student's."""
    import os
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    student_dir = tmp_path / "wide_student"
    load_student().save_pretrained(student_dir)
    AutoTokenizer.from_pretrained(STUDENT).save_pretrained(student_dir)
    script = tmp_path / "check.py"
    script.write_text(ZERO3_SYNC_CHECK)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(student_dir), str(tmp_path / "run")], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-5000:]
    assert "ZERO3_SYNC_OK 3" in proc.stdout
