"""The real loop on tiny models: it trains, normalises over the whole step, checkpoints and reloads."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from opd.errors import ConfigError, ModelLoadError
from opd.losses.divergences import generalized_jsd, masked_reduce
from opd.models.scoring import completion_logits
from opd.sampling.tokenize import encode_targets
from opd.train import build_trainer, run


def held_out_jsd(trainer) -> float:
    """Token-mean JSD(0.5) between teacher and student on fixed reference completions."""
    batch = encode_targets(trainer.tokenizer, trainer.task.eval[:16])
    with torch.no_grad():
        s, t = completion_logits(trainer.student, batch), completion_logits(trainer.teacher, batch)
    return masked_reduce(generalized_jsd(s, t, beta=0.5), batch.completion_mask).item()


def test_on_policy_gkd_moves_the_student_towards_the_teacher(compose_cfg):
    cfg = compose_cfg("trainer.max_steps=15", "trainer.lr=1e-2", "trainer.warmup_steps=0", "trainer.lr_schedule=constant",
                      "data.num_train=64", "method.lmbda=1.0")
    trainer = build_trainer(cfg)
    before = held_out_jsd(trainer)
    losses = [trainer.train_step()["train/loss"] for _ in range(15)]
    after = held_out_jsd(trainer)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert after < 0.5 * before, (before, after)
    assert sum(losses[-3:]) < sum(losses[:3])


def test_full_run_writes_summary_metrics_and_a_reloadable_checkpoint(compose_cfg, tmp_path):
    cfg = compose_cfg("method=sft", "trainer.max_steps=20", "trainer.lr=2e-2", "data.num_train=4",
                      "trainer.batch_size=4", "trainer.warmup_steps=0", "trainer.lr_schedule=constant")
    summary = run(cfg)
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["steps"] == 20 and summary["tokens"] > 0 and summary["method"] == "sft"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 20 and losses[-1] < 0.7 * losses[0]  # same 4 examples every step: CE must fall
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(rows[-2])
    assert any("eval/accuracy" in r for r in rows) and any("eval/teacher_accuracy" in r for r in rows)
    # the checkpoint is a plain HF directory whose weights equal the trained student
    trainer_ckpt = summary["checkpoint"]
    reloaded = AutoModelForCausalLM.from_pretrained(trainer_ckpt)
    state = torch.load(f"{trainer_ckpt}/trainer_state.pt", weights_only=True)
    assert state["step"] == 20
    assert (run_dir / "resolved_config.yaml").exists()
    assert reloaded.config.vocab_size > 0


def test_loss_and_gradient_do_not_depend_on_gradient_accumulation(compose_cfg):
    """Two micro-batches of 2 normalised by the step's token count == one batch of 4."""
    common = ("method.lmbda=0.0", "method.beta=0.3", "trainer.max_grad_norm=0")
    one = build_trainer(compose_cfg(*common, "trainer.batch_size=4", "trainer.grad_accum=1")).train_step()
    two = build_trainer(compose_cfg(*common, "trainer.batch_size=2", "trainer.grad_accum=2")).train_step()
    assert one["train/tokens"] == two["train/tokens"]
    assert one["train/loss"] == pytest.approx(two["train/loss"], rel=1e-5)
    assert one["train/grad_norm"] == pytest.approx(two["train/grad_norm"], rel=1e-4)


def test_lambda_coin_mixes_student_and_dataset_batches(compose_cfg):
    trainer = build_trainer(compose_cfg("method.lmbda=0.5", "trainer.batch_size=2"))
    sources = [trainer.collect(next(trainer.prompts)).source for _ in range(200)]
    assert 70 < sources.count("student") < 130 and set(sources) == {"student", "dataset"}


def test_teacher_vocabulary_mismatch_is_refused(compose_cfg, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from opd.models.toy import build_char_tokenizer, tiny_llama_config

    tok = build_char_tokenizer(alphabet="0123456789+-=;#abc")
    LlamaForCausalLM(tiny_llama_config(tok, 32, 1, 4)).save_pretrained(tmp_path / "other")
    tok.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match="the teacher's tokenizer differs from the student's and method 'gkd' needs one "
                                          "shared vocabulary; distil across tokenizers with a cross-tokenizer method: alm, uld"):
        build_trainer(compose_cfg(f"teacher.name_or_path={tmp_path / 'other'}"))
    assert LlamaConfig and PreTrainedTokenizerFast  # imported for clarity of what is built above


@pytest.mark.parametrize(("override", "message"), [
    ("teacher.name_or_path=/no/such/dir", "teacher.name_or_path: no model directory at '/no/such/dir'"),
    ("+method.betta=0.1", "method.betta"),
    ("method.beta=2.0", "beta must be in [0, 1]"),
    ("trainer.batch_size=0", "trainer.batch_size must be >= 1"),
    ("sampler.max_new_tokens=-1", "max_new_tokens must be > 0"),
])
def test_bad_config_values_fail_before_training_with_a_clear_message(compose_cfg, override, message):
    with pytest.raises((ConfigError, ModelLoadError)) as info:
        build_trainer(compose_cfg(override))
    assert message in str(info.value)


def test_hub_model_offline_fails_with_a_clear_message(compose_cfg, monkeypatch, tiny_model_dirs):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match=r"student: could not load 'gpt2'.*network access"):
        build_trainer(compose_cfg("student=gpt2", f"teacher.name_or_path={tiny_model_dirs['teacher']}", tiny_models=False))


def test_wandb_logger_works_offline_and_groups_by_experiment(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    summary = run(compose_cfg("logger=wandb", "name=wandbtest", "trainer.max_steps=2"))
    run_files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1 and run_files[0].stat().st_size > 0
    assert summary["steps"] == 2
    assert (tmp_path / "run" / "metrics.jsonl").exists()  # the local file is written as well


def test_evaluate_scores_the_examples_it_is_given_and_the_split_cannot_be_swapped_silently(compose_cfg):
    """``Trainer.evaluate(model, desc, examples)`` decodes exactly ``examples`` (OPSD's precondition scores the teacher's
    view this way); assigning ``trainer.eval_examples`` is refused, since the evaluator would not see it."""
    import dataclasses

    trainer = build_trainer(compose_cfg("trainer.eval_examples=12", tiny_models=False))  # the shipped toy pair
    examples = trainer.eval_examples[:10]
    right = trainer.evaluate(trainer.teacher, "teacher", examples)
    wrong = trainer.evaluate(trainer.teacher, "teacher", [dataclasses.replace(ex, target="?", answer="?") for ex in examples])
    assert right.num_examples == wrong.num_examples == 10
    # the toy teacher solves some within debug=tiny's short budget; "?" is never an answer
    assert right.accuracy > 0 and wrong.accuracy == 0.0
    with pytest.raises(AttributeError):
        trainer.eval_examples = examples
