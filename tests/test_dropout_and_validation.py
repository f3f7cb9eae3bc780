"""Issue 11, defects 1 and 2: losses are scored without dropout, and DistiLLM's schedule never reads the test set.

Defect 1: the trainer keeps the student in train mode; with dropout on, every scoring forward is
noisy, and MiniLLM's ratio q_θ/q_old (q_old recorded by the eval-mode sampler) is not 1 on fresh
rollouts. Defect 2: the adaptive schedule read the first evaluation examples (the reported test set)
in train mode with the method's own loss.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from opd.data.base import Example, Task, validation_split
from opd.errors import DataError
from opd.methods.common import policy_logprobs
from opd.models.dropout import active_dropout, disable_dropout
from opd.models.scoring import completion_logits
from opd.models.toy import build_char_tokenizer
from opd.sampling.tokenize import encode_targets
from opd.train import build_trainer

FAST = ("data.num_train=64", "data.num_eval=16", "trainer.batch_size=4", "sampler.max_new_tokens=10")


@pytest.fixture(scope="module")
def dropout_student(tmp_path_factory):
    """A tiny GPT-2 (dropout 0.1 everywhere, as GPT-2's own config) sharing the char tokenizer of the tiny teacher."""
    directory = tmp_path_factory.mktemp("gpt2_dropout")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=4,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_disable_dropout_zeroes_modules_and_attention_attributes():
    from transformers import LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=11, n_positions=16))
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=11, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, attention_dropout=0.1))
    for model in (gpt2, llama):
        assert active_dropout(model)  # GPT-2: nn.Dropout modules; Llama: the attention's own float attribute
        assert disable_dropout(model) > 0
        assert active_dropout(model) == []
    assert gpt2.config.resid_pdrop == 0.1 and llama.config.attention_dropout == 0.1  # checkpoints keep their config


def _two_scorings(trainer):
    batch = trainer.collect(trainer.task.train[:4])
    model = trainer.backend.train_model
    assert model.training  # scored as the trainer scores: in train mode
    with torch.no_grad():
        return batch, completion_logits(model, batch), completion_logits(model, batch)


def test_minillm_ratio_is_one_on_fresh_rollouts_with_a_dropout_student(compose_cfg, dropout_student):
    trainer = build_trainer(compose_cfg("method=minillm", f"student.name_or_path={dropout_student}", *FAST))
    assert active_dropout(trainer.student) == []
    batch, first, second = _two_scorings(trainer)
    assert torch.equal(first, second)  # two scorings of the same batch are identical
    logq, logq_old = policy_logprobs(batch, first)
    real = batch.completion_mask.bool()
    ratio = torch.exp(logq - logq_old)[real]
    # q_old comes from the KV-cached eval-mode decode, q_θ from one full forward: equal up to float rounding
    assert torch.allclose(ratio, torch.ones_like(ratio), atol=1e-4), (ratio - 1).abs().max()


def test_dropout_can_be_kept_and_then_scorings_differ(compose_cfg, dropout_student):
    """The switch is real: with trainer.disable_dropout=false the same batch scores differently twice, and the
    ratio leaves the PPO clip range for some tokens (what the default prevents)."""
    trainer = build_trainer(compose_cfg("method=minillm", f"student.name_or_path={dropout_student}",
                                        "trainer.disable_dropout=false", *FAST))
    assert active_dropout(trainer.student)
    batch, first, second = _two_scorings(trainer)
    assert not torch.equal(first, second)
    logq, logq_old = policy_logprobs(batch, first)
    ratio = torch.exp(logq - logq_old)[batch.completion_mask.bool()]
    assert (ratio - 1).abs().max() > 1e-2


# ---------------------------------------------------------------- defect 2: the validation split


class _Listed(Task):
    def __init__(self, train, eval_, validation=None):
        self.train, self.eval, self.validation = list(train), list(eval_), validation


def _examples(prefix: str, n: int) -> list[Example]:
    return [Example(f"{prefix}{i}=", f"#{i}", str(i)) for i in range(n)]


def test_validation_is_carved_from_train_with_a_fixed_seed_and_never_holds_eval_prompts():
    train, eval_ = _examples("a", 50), _examples("b", 10)
    train[3] = eval_[0]  # an evaluation prompt that also sits in train must never become validation
    task = _Listed(train, eval_)
    validation = validation_split(task, 8)
    assert len(validation) == 8 and len(task.train) == 42
    assert not {ex.prompt for ex in validation} & {ex.prompt for ex in task.eval}
    assert not {ex.prompt for ex in validation} & {ex.prompt for ex in task.train}  # moved out of training
    again = _Listed(train, eval_)
    assert validation_split(again, 8) == validation  # the same split every run
    own = _Listed(train, eval_, validation=_examples("c", 5))
    assert validation_split(own, 3) == own.validation[:3] and len(own.train) == 50  # a task's dev split is used as is
    with pytest.raises(DataError, match="validation_examples=60"):
        validation_split(_Listed(_examples("a", 5), eval_), 60)


def test_distillm_schedule_reads_only_validation_examples_in_eval_mode(compose_cfg, dropout_student, monkeypatch):
    trainer = build_trainer(compose_cfg("method=distillm", f"student.name_or_path={dropout_student}",
                                        "trainer.disable_dropout=false", "trainer.validation_examples=12",
                                        "trainer.eval_batch_size=5", *FAST))
    validation = trainer.validation_examples
    assert len(validation) == 12
    assert not {ex.prompt for ex in validation} & {ex.prompt for ex in trainer.eval_examples}
    assert not {ex.prompt for ex in validation} & {ex.prompt for ex in trainer.prompts.examples}

    read, modes = [], []
    real_encode = encode_targets

    def spy(tokenizer, examples, *args, **kwargs):
        read.extend(examples)
        modes.append(trainer.student.training)
        return real_encode(tokenizer, examples, *args, **kwargs)

    monkeypatch.setattr("opd.engine.evaluate.encode_targets", spy)
    loss = trainer.validation_loss()
    assert sorted(ex.prompt for ex in read) == sorted(ex.prompt for ex in validation)
    assert modes and not any(modes)  # eval mode (this student keeps dropout) ...
    assert trainer.student.training  # ... and train mode again afterwards
    assert trainer.validation_loss() == loss  # deterministic although dropout is on in training

    # the official quantity: the student's token-mean cross-entropy on the reference answers, computed independently
    trainer.student.eval()
    with torch.no_grad():
        batch = real_encode(trainer.tokenizer, validation, trainer.device)
        logits = trainer.student(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 position_ids=(batch.attention_mask.cumsum(1) - 1).clamp(min=0)).logits
        logits = logits[:, batch.prompt_ids.shape[1] - 1 : -1]
        per_token = F.cross_entropy(logits.transpose(1, 2), batch.completion_ids, reduction="none")
        expected = (per_token * batch.completion_mask).sum() / batch.completion_mask.sum()
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_methods_without_a_schedule_keep_the_whole_training_split(compose_cfg):
    trainer = build_trainer(compose_cfg("method=gkd", *FAST))
    assert trainer.validation_examples == [] and len(trainer.prompts.examples) == 64
