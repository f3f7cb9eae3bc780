"""The second toy task (multiplication), the mixed dataset with per-source scoring, and the specialist teacher."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from transformers import AutoModelForCausalLM, AutoTokenizer

import opd.data  # noqa: F401  (registers every task)
from opd.config import register_configs
from opd.data.arithmetic import ChainArithmetic
from opd.data.base import Example
from opd.data.mixture import Mixture, interleave, merge_per_source, per_source_accuracy, tag
from opd.data.multiplication import Multiplication, worked_solution
from opd.engine.evaluate import evaluate_accuracy
from opd.errors import ConfigError
from opd.models.toy import TOY_ALPHABET, build_char_tokenizer
from opd.registry import DATASETS

ASSETS = Path(__file__).resolve().parents[1] / "opd" / "assets"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
_STEP = re.compile(r"(\d+)([*+])(\d+)=(\d+)")


def test_worked_solution_shape():
    assert worked_solution("15 * 43") == ("15*43=", "15*40=600;15*3=45;600+45=645;#645", "645")
    assert worked_solution("7 * 8") == ("7*8=", "7*8=56;#56", "56")
    with pytest.raises(ValueError, match="product"):
        worked_solution("3 + 4")


@pytest.mark.parametrize("config", [dict(min_digits=2, max_digits=2),  # the default task
                                    dict(min_terms=2, max_terms=3, min_digits=1, max_digits=3)])
def test_worked_solutions_agree_with_reasoning_gym_verifier(config):
    import reasoning_gym

    source = reasoning_gym.create_dataset("products", size=300, seed=5, **config)
    tokenizer = build_char_tokenizer()
    for entry in source:
        prompt, target, answer = worked_solution(entry["metadata"]["expression"])
        assert source.score_answer(answer, entry) == 1.0  # the library's own verifier
        steps = target.split(";")
        assert steps[-1] == f"#{answer}"
        for step in steps[:-1]:  # every step is true arithmetic
            a, op, b, c = _STEP.fullmatch(step).groups()
            assert int(c) == (int(a) * int(b) if op == "*" else int(a) + int(b))
        assert set(prompt + target) <= set(TOY_ALPHABET)  # the toy tokenizer covers it (no <unk>)
        assert tokenizer.unk_token_id not in tokenizer(prompt + target)["input_ids"]


def test_multiplication_splits_are_deterministic_and_disjoint():
    a, b = Multiplication(num_train=300, num_eval=100, num_validation=100), Multiplication(num_train=300, num_eval=100,
                                                                                          num_validation=100)
    assert (a.train, a.eval, a.validation) == (b.train, b.eval, b.validation)
    train, held = {e.prompt for e in a.train}, {e.prompt for e in a.eval}
    assert a.eval and a.validation and not train & held
    assert not {e.prompt for e in a.validation} & (train | held)
    assert a.train == Multiplication(num_train=300, num_eval=7).train  # more eval problems never move train
    assert all(a.is_correct(e.target, e) and not a.is_correct(e.target.replace("#", ""), e) for e in a.eval)
    with pytest.raises(ValueError, match="min_digits"):
        Multiplication(min_digits=3, max_digits=2)


def _small_mixture() -> Mixture:
    return DATASETS.build({"name": "mixture", "tasks": {
        "arithmetic": {"name": "arithmetic", "num_train": 60, "num_eval": 20},
        "products_gym": {"name": "gym", "dataset": "products", "num_train": 50, "num_eval": 20,
                         "config": {"min_digits": 1, "max_digits": 2}},
        "multiplication": {"name": "multiplication", "num_train": 40, "num_eval": 30}}}, "data")


def test_mixture_keeps_every_source_in_order():
    mix = _small_mixture()
    arith = ChainArithmetic(num_train=60, num_eval=20)
    mult = Multiplication(num_train=40, num_eval=30)
    gym = mix.sources["products_gym"]
    assert mix.train == tag(arith.train, "arithmetic") + tag(gym.train, "products_gym") + tag(mult.train, "multiplication")
    evals = [tag(arith.eval, "arithmetic"), tag(gym.eval, "products_gym"), tag(mult.eval, "multiplication")]
    assert sorted(mix.eval, key=repr) == sorted(sum(evals, []), key=repr) and len(mix.eval) == sum(map(len, evals))
    for k in range(1, min(map(len, evals)) + 1):  # round-robin: a prefix cap (trainer.eval_examples) keeps every source
        assert [e.source for e in mix.eval[: 3 * k]].count("multiplication") == k
        assert [e for e in mix.eval if e.source == "arithmetic"] == evals[0]  # each source keeps its own order
    assert [dict(prompt=e.prompt, target=e.target, answer=e.answer) for e in mix.train[:60]] == \
        [dict(prompt=e.prompt, target=e.target, answer=e.answer) for e in arith.train]
    assert mix.validation is None  # not every source has its own: validation is carved from the mixed train
    both = Mixture(tasks={"a": {"name": "arithmetic", "num_train": 60, "num_eval": 5, "num_validation": 9},
                          "m": {"name": "multiplication", "num_train": 60, "num_eval": 5, "num_validation": 3}})
    a_val = ChainArithmetic(num_train=60, num_eval=5, num_validation=9).validation
    m_val = Multiplication(num_train=60, num_eval=5, num_validation=3).validation
    assert both.validation == interleave([tag(a_val, "a"), tag(m_val, "m")]) and len(both.validation) == len(a_val) + len(m_val)
    capped = Mixture(tasks={"a": {"name": "arithmetic", "num_train": 60, "num_eval": 20}}, max_train_per_source=10)
    assert capped.train == tag(arith.train[:10], "a")


def test_mixture_routes_scoring_to_each_source():
    mix = _small_mixture()
    arith = next(e for e in mix.eval if e.source == "arithmetic")
    gym = next(e for e in mix.eval if e.source == "products_gym")
    # arithmetic needs '#answer'; the gym task takes the last number of a natural-language reply
    assert mix.is_correct(arith.target, arith) and not mix.is_correct(f"it is {arith.answer}", arith)
    assert mix.is_correct(f"it is {gym.answer}", gym) and mix.score(f"it is {gym.answer}", gym) == 1.0
    assert mix.extract_answer(f"x #1 then {gym.answer}", gym) == gym.answer
    assert mix.extract_answer(f"x #1 then {gym.answer}", arith) == "1"
    with pytest.raises(ValueError, match="pass the example"):
        mix.extract_answer("#3")
    with pytest.raises(ValueError, match="not one of this mixture's sources"):
        mix.is_correct("#3", Example("1+2=", "1+2=3;#3", "3", source="unknown"))


def test_mixture_config_errors_are_one_line():
    with pytest.raises(ConfigError, match="data.tasks is empty"):
        DATASETS.build({"name": "mixture", "tasks": {}}, "data")
    with pytest.raises(ConfigError, match="data.tasks.a"):
        DATASETS.build({"name": "mixture", "tasks": {"a": {"name": "arithmetic", "num_terms": 3}}}, "data")
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):  # as `opd-train data=mixture ...` does
        cfg = compose(config_name="train", overrides=["data=mixture", "data.tasks.arithmetic.num_train=30",
                                                      "data.tasks.multiplication.num_eval=9", "teacher=toy_multiplication",
                                                      "+data@data.tasks.gym=gym"])
    assert set(DATASETS.validate(cfg.data, "data")["tasks"]) == {"arithmetic", "multiplication", "gym"}
    assert Path(cfg.teacher.name_or_path) == ASSETS / "toy_multiplication" / "teacher"
    mix = DATASETS.build(cfg.data, "data")
    assert len([e for e in mix.train if e.source == "arithmetic"]) == 30
    assert [e for e in mix.eval if e.source == "multiplication"] == tag(Multiplication(num_eval=9).eval, "multiplication")


def test_per_source_helpers_match_a_direct_count():
    examples = tag([Example("p", "t", "1")] * 3, "a") + tag([Example("q", "t", "2")] * 2, "b") + [Example("r", "t", "3")]
    correct = [True, False, True, False, False, True]
    accuracy, counts = per_source_accuracy(examples, correct)
    assert accuracy == {"a": 2 / 3, "b": 0.0} and counts == {"a": 3, "b": 2}  # the untagged example is not a source
    halves = [per_source_accuracy(examples[:2], correct[:2]), per_source_accuracy(examples[2:], correct[2:])]
    assert merge_per_source(halves) == (accuracy, counts)
    assert interleave([[1, 2, 3], [4], [5, 6]]) == [1, 4, 5, 2, 6, 3]


def _load(path: Path):
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tokenizer


def test_per_source_accuracy_of_a_real_model_equals_an_independent_count():
    torch.manual_seed(0)
    mix = Mixture(tasks={"arithmetic": {"name": "arithmetic", "num_train": 200, "num_eval": 24},
                         "multiplication": {"name": "multiplication", "num_train": 200, "num_eval": 16}})
    model, tokenizer = _load(ASSETS / "toy" / "teacher")
    result = evaluate_accuracy(model, tokenizer, mix, mix.eval, batch_size=16, max_new_tokens=48, progress=False)
    hits = {"arithmetic": 0, "multiplication": 0}
    for ex in mix.eval:  # one unpadded prompt at a time with plain HF generate, scored by the source task itself
        ids = tokenizer(ex.prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=48, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        hits[ex.source] += mix.sources[ex.source].is_correct(text, ex)
    counts = {s: sum(e.source == s for e in mix.eval) for s in hits}
    assert result.source_counts == counts
    assert result.by_source == pytest.approx({s: hits[s] / counts[s] for s in hits})
    assert result.by_source["arithmetic"] > 0.8  # the arithmetic specialist, on its own task
    assert result.accuracy == pytest.approx(sum(hits.values()) / len(mix.eval))
    assert evaluate_accuracy(model, tokenizer, ChainArithmetic(num_train=50, num_eval=8), ChainArithmetic(
        num_train=50, num_eval=8).eval, progress=False).by_source == {}  # untagged data: no per-source entries


def test_multiplication_teacher_is_a_specialist():
    """The shipped toy_multiplication teacher beats the arithmetic teacher on products, and vice versa."""
    mult, arith = Multiplication(), ChainArithmetic()
    new, tokenizer = _load(ASSETS / "toy_multiplication" / "teacher")
    old, _ = _load(ASSETS / "toy" / "teacher")
    assert new.config.vocab_size == old.config.vocab_size and tokenizer.get_vocab() == build_char_tokenizer().get_vocab()

    def accuracy(model, task):
        return evaluate_accuracy(model, tokenizer, task, task.eval[:64], batch_size=64, progress=False).accuracy

    new_on_mult, old_on_mult = accuracy(new, mult), accuracy(old, mult)
    assert new_on_mult > 0.5 and new_on_mult > old_on_mult + 0.4
    assert accuracy(old, arith) > accuracy(new, arith) + 0.4
