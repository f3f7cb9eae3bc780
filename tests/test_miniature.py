"""Issue 13: the miniature table v2 — tuning on a validation split, tuned settings per method, claims with intervals.

The tuning runs must never read the evaluation split; every registered method must have tuned settings that the
table applies; and the claim statistics (steps to a score, differences with Student-t intervals, verdicts) are
checked against textbook values and hand-made learning curves.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from opd.data.arithmetic import ChainArithmetic
from opd.errors import ConfigError
from opd.registry import METHODS
from opd.report import Run, mean_confidence_interval
from opd.train import CONF_DIR, build_trainer, run

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
FAST = ("data.num_train=64", "data.num_eval=16", "trainer.batch_size=4", "sampler.max_new_tokens=10")
T_975_DF2 = 4.302652729911275  # Student-t 97.5 % quantile, 2 degrees of freedom (statistical tables)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------- validation split


def test_arithmetic_validation_split_is_fresh_and_leaves_train_and_eval_unchanged():
    plain = ChainArithmetic(num_train=300, num_eval=40)
    with_dev = ChainArithmetic(num_train=300, num_eval=40, num_validation=60)
    assert plain.validation is None or plain.validation == []
    assert with_dev.train == plain.train and with_dev.eval == plain.eval  # the shipped checkpoints' split never moves
    dev = {ex.prompt for ex in with_dev.validation}
    assert 0 < len(dev) <= 60
    assert not dev & {ex.prompt for ex in with_dev.train} and not dev & {ex.prompt for ex in with_dev.eval}


def test_tuning_run_scores_on_validation_and_never_reads_eval(compose_cfg):
    cfg = compose_cfg("method=sft", "trainer.evaluate_on=validation", "trainer.validation_examples=8",
                      "data.num_validation=12", *FAST)
    trainer = build_trainer(cfg)
    eval_prompts = {ex.prompt for ex in trainer.task.eval}
    scored = {ex.prompt for ex in trainer.eval_examples}
    assert scored and not scored & eval_prompts
    assert scored <= {ex.prompt for ex in trainer.task.validation}
    trainer.task.eval = None  # reading the eval split now would fail loudly
    summary = trainer.fit()
    assert summary["evaluated_on"] == "validation" and summary["eval_examples"] == len(scored)


def test_default_run_still_scores_on_eval(compose_cfg):
    summary = run(compose_cfg("method=sft", *FAST))
    assert summary["evaluated_on"] == "eval" and summary["eval_examples"] == 16


def test_evaluate_on_rejects_unknown_split(compose_cfg):
    with pytest.raises(ConfigError, match="trainer.evaluate_on"):
        build_trainer(compose_cfg("trainer.evaluate_on=test", *FAST))


# ---------------------------------------------------------------------------------------------- tuned settings


def compose_table_cell(method: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["experiment=miniature_v2", f"tuned/toy={method}"])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_registered_method_has_tuned_settings_that_the_table_applies(method):
    path = Path(CONF_DIR) / "tuned" / "toy" / f"{method}.yaml"
    assert path.exists(), f"no tuned settings for {method}: run `make tune` (scripts/tune_toy.py)"
    tuned = yaml.safe_load(path.read_text())
    cfg = compose_table_cell(method)
    assert cfg.method.name == method
    assert math.isclose(cfg.trainer.lr, tuned["trainer"]["lr"])
    for key, value in tuned.get("method", {}).items():
        assert cfg.method[key] == value
    assert cfg.trainer.evaluate_on == "eval"  # the table reports on the eval split


def test_table_and_search_cover_every_registered_method():
    assert set(load_script("miniature_v2").TABLE_METHODS) == set(METHODS)
    assert set(load_script("tune_toy").SEARCH_SPACES) == set(METHODS)


def test_tune_toy_collect_picks_the_best_trial_and_writes_a_composable_config(tmp_path):
    tune = load_script("tune_toy")
    study = tmp_path / "studies" / "gkd"
    for trial, (lr, beta, accuracy) in enumerate([(1e-3, 0.2, 0.30), (3.3e-3, 0.71, 0.41), (2e-4, 0.9, 0.12)]):
        trial_dir = study / f"{trial}_method=gkd"
        (trial_dir / ".hydra").mkdir(parents=True)
        (trial_dir / ".hydra" / "overrides.yaml").write_text(
            yaml.safe_dump([f"trainer.lr={lr}", f"method.beta={beta}", "experiment=toy_tune", "method=gkd"]))
        (trial_dir / "summary.json").write_text(json.dumps({"student_accuracy_after": accuracy, "wall_time_s": 20.0,
                                                            "evaluated_on": "validation"}))
    tune.collect(tmp_path / "studies", ["gkd"], tmp_path / "record", tmp_path / "tuned")
    written = yaml.safe_load((tmp_path / "tuned" / "gkd.yaml").read_text())
    assert written["trainer"]["lr"] == 0.0033 and written["method"]["beta"] == 0.71
    assert written["defaults"] == [{"override /method": "gkd"}]
    assert "| gkd | lr=0.0033, beta=0.71 | 41.0 |" in (tmp_path / "record" / "tuning.md").read_text()


# ---------------------------------------------------------------------------------------------- statistics and claims


def test_mean_confidence_interval_matches_the_t_table():
    low, high = mean_confidence_interval([1.0, 2.0, 3.0])
    half = T_975_DF2 * 1.0 / math.sqrt(3)  # s = 1, n = 3
    assert low == pytest.approx(2 - half, rel=1e-9) and high == pytest.approx(2 + half, rel=1e-9)
    assert mean_confidence_interval([0.4]) is None
    assert mean_confidence_interval([0.3, 0.3]) == [0.3, 0.3]


def test_difference_interval_welch_and_paired():
    claims = load_script("miniature_v2")
    # b has no spread: Welch's df is n_a − 1 = 2, the interval that of a's mean shifted by b's
    stat = claims.difference_interval([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])
    half = T_975_DF2 / math.sqrt(3)
    assert stat["diff"] == pytest.approx(2.0) and stat["ci95"] == pytest.approx([2 - half, 2 + half])
    paired = claims.difference_interval([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], paired=True)
    assert paired["ci95"] == pytest.approx([2 - half, 2 + half])


def test_verdicts():
    claims = load_script("miniature_v2")
    assert claims.verdict([0.5, 3.0]) == "holds"
    assert claims.verdict([-3.0, -0.1]).startswith("does not hold (reversed)")
    assert "within seed noise" in claims.verdict([-1.0, 2.0])
    assert claims.verdict([0.0, 0.0]).startswith("does not hold (a tie")


def _run(method: str, seed: int, curve: dict[int, float]) -> Run:
    steps = max(curve)
    summary = {"method": method, "seed": seed, "student_accuracy_after": curve[steps],
               "student_accuracy_before": curve[0], "steps": steps}
    return Run(Path(f"/runs/{method}/{seed}"), summary, {"method.name": method, "seed": seed},
               {"eval/accuracy": {step: value for step, value in curve.items()}})


def test_steps_claim_on_hand_made_curves():
    claims = load_script("miniature_v2")
    fast = [_run("tm_opd", s, {0: 0.1, 20: (0.28, 0.29, 0.2)[s], 40: 0.3, 60: 0.3}) for s in range(3)]
    slow = [_run("seqkd", s, {0: 0.1, 20: 0.15, 40: 0.2 + 0.01 * s, 60: 0.3}) for s in range(3)]
    never = _run("seqkd", 9, {0: 0.1, 20: 0.1, 40: 0.1, 60: 0.1})
    assert claims.steps_to_reach(fast[0], 0.25, 60) == (20, True)
    assert claims.steps_to_reach(never, 0.25, 60) == (61, False)
    claim = next(c for c in claims.CLAIMS if c.key == "opd_speed_tm")
    result = claims.evaluate_claim(claim, {"tm_opd": fast, "seqkd": slow})
    assert result["threshold"] == pytest.approx(0.27)  # 90 % of the weaker arm's final accuracy (0.3)
    assert result["arms"]["tm_opd"]["steps_to_threshold"] == [20, 20, 40]
    assert result["arms"]["seqkd"]["steps_to_threshold"] == [60, 60, 60]
    half = T_975_DF2 * 20 / math.sqrt(3) / math.sqrt(3)  # sd of (20, 20, 40) is 20/√3; seqkd has none
    assert result["difference"] == pytest.approx(60 - 80 / 3)
    assert result["ci95"] == pytest.approx([60 - 80 / 3 - half, 60 - 80 / 3 + half])
    assert result["verdict"] == "holds"


def test_final_and_gain_claims_on_hand_made_runs():
    claims = load_script("miniature_v2")
    minillm = [_run("minillm", s, {0: 0.1, 200: 0.30 + 0.01 * s}) for s in range(3)]
    kd = [_run("kd", s, {0: 0.1, 200: 0.31 + 0.01 * s}) for s in range(3)]
    claim = next(c for c in claims.CLAIMS if c.key == "minillm_vs_kd")
    result = claims.evaluate_claim(claim, {"minillm": minillm, "kd": kd})
    assert result["difference"] == pytest.approx(-1.0)  # percentage points
    assert "within seed noise" in result["verdict"]
    opsd = [_run("real_opsd", s, {0: 0.5, 60: 0.5 + 0.1 + 0.01 * s}) for s in range(3)]
    gain = claims.evaluate_claim(next(c for c in claims.CLAIMS if c.key == "opsd_real"), {"real_opsd": opsd})
    assert gain["difference"] == pytest.approx(11.0) and gain["verdict"] == "holds"
    assert claims.evaluate_claim(claim, {"minillm": minillm}) is None  # an arm without runs: no verdict


def test_opsd_claim_cannot_be_tested_when_the_privileged_view_knows_no_more():
    claims = load_script("miniature_v2")
    claim = next(c for c in claims.CLAIMS if c.key == "opsd_toy")
    runs = [_run("opsd", s, {0: 0.10, 200: 0.0}) for s in range(3)]
    result = claims.evaluate_claim(claim, {"opsd": runs})
    assert result["verdict"] == "does not hold (reversed)"  # 10 % -> 0 % on every seed
    claims.apply_precondition(claim, result, {"toy": {"plain": 0.101, "privileged": 0.095, "examples": 158}})
    assert result["verdict"].startswith("cannot be tested at this scale")
    real = next(c for c in claims.CLAIMS if c.key == "opsd_real")
    gained = claims.evaluate_claim(real, {"real_opsd": [_run("real_opsd", s, {0: 0.47, 30: 0.6 + 0.01 * s})
                                                         for s in range(3)]})
    claims.apply_precondition(real, gained, {"real": {"plain": 0.47, "privileged": 0.89, "examples": 64}})
    assert gained["verdict"] == "holds" and gained["precondition"]["privileged"] == 0.89
