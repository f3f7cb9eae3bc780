"""sampler=auto (issue 26): the HF sampler or vLLM per model by its size, said once; suppressed ids keep HF."""

from __future__ import annotations

import importlib.util

import pytest
from hydra import compose, initialize_config_dir

from opd.sampling.auto import VLLM_MIN_PARAMETERS, AutoSampler, parameter_count
from opd.train import CONF_DIR, build_trainer

#: the experiments whose runs are recorded under experiments/: they pin the sampler their records ran with (hf), so a
#: change of the default sampler moves none of their results or stage directories (real_opd_longer_stage2, real_opsd,
#: real_sdft and real_sdpo inherit real_opd_finetuned_teacher's pin)
RECORDED = ("miniature_v2", "real_opd_finetuned_teacher", "real_opd_longer_stage2", "real_opd_protocol", "real_opsd",
            "real_sdft", "real_sdpo", "real_smollm2", "toy_opd_protocol", "toy_table", "toy_tune", "two_teachers")


def _sampler_name(*overrides: str) -> str:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides)).sampler.name


def test_auto_is_the_default_sampler():
    assert _sampler_name() == "auto"


@pytest.mark.parametrize("name", RECORDED)
def test_recorded_experiments_pin_the_hf_sampler(name):
    assert _sampler_name(f"experiment={name}") == "hf"


def test_small_models_sample_with_hf_and_say_so_once(compose_cfg, capsys):
    trainer = build_trainer(compose_cfg("sampler=auto"))
    sampler = trainer.sampler
    assert isinstance(sampler, AutoSampler) and parameter_count(trainer.student) < VLLM_MIN_PARAMETERS
    batch = trainer.collect(next(trainer.prompts))
    trainer.collect(next(trainer.prompts))
    assert batch.num_tokens > 0 and sampler.choose(trainer.student) == "hf" and sampler.vllm is None
    assert capsys.readouterr().out.count("sampler=auto") == 1


def test_the_rule_follows_size_installation_and_suppressed_ids(tiny_model_dirs):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"])
    size = parameter_count(model)
    installed = importlib.util.find_spec("vllm") is not None
    assert AutoSampler(vllm_min_parameters=size + 1).choose(model) == "hf"
    # the tiny model's attention heads (size 8) have no vLLM CPU kernel: HF even over the threshold
    assert AutoSampler(vllm_min_parameters=size).choose(model) == "hf"
    if installed:
        from opd.sampling.vllm import pad_attention_heads

        wide = pad_attention_heads(model, 32)  # the same function with heads zero-padded to a kernel's size
        assert AutoSampler(vllm_min_parameters=1).choose(wide) == "vllm"
    model.generation_config.suppress_tokens = [5]  # a padded head: vLLM would sample the suppressed ids
    assert AutoSampler(vllm_min_parameters=1).choose(model) == "hf"
    with pytest.raises(ValueError, match="vllm_min_parameters"):
        AutoSampler(vllm_min_parameters=0)


@pytest.mark.vllm
def test_a_model_over_the_threshold_samples_with_vllm(compose_cfg):
    """The toy student with its heads zero-padded to 32 (a size vLLM's CPU kernels have), over a threshold of 1."""
    pytest.importorskip("vllm")
    from opd.sampling.vllm import pad_attention_heads

    trainer = build_trainer(compose_cfg(tiny_models=False))
    wide = pad_attention_heads(trainer.student, 32)
    sampler = AutoSampler(vllm_min_parameters=1, max_new_tokens=8, n=2)
    batch = sampler.generate(wide, trainer.tokenizer, next(trainer.prompts)[:2])
    assert sampler.choose(wide) == "vllm" and sampler.num_engines == 1
    assert batch.completion_ids.shape[0] == 4 and batch.sampler_logprobs is not None
    sampler.close()
