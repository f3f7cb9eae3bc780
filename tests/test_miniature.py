"""Issue 13: the miniature table v2 — tuning on a validation split, tuned settings per method, claims with intervals.

The tuning runs must never read the evaluation split; every registered method must have tuned settings that the
table applies; and the claim statistics (steps to a fixed score, differences with Student-t intervals, the verdicts
holds, reversed, not shown) are checked against textbook values, hand-made learning curves and the stored record.
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
from scipy import stats

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
    waiting = load_script("miniature_v2").NOT_YET_TABULATED
    if method in waiting:
        pytest.skip(f"{method}: {waiting[method]}")
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
    table = load_script("miniature_v2")
    assert set(table.TABLE_METHODS) | set(table.NOT_YET_TABULATED) == set(METHODS)
    assert not set(table.TABLE_METHODS) & set(table.NOT_YET_TABULATED)
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
    assert mean_confidence_interval([0.3, 0.3]) is None  # every seed equal and no floor: no interval, not [0.3, 0.3]


def test_difference_interval_is_compare_arms():
    claims = load_script("miniature_v2")
    a, b = [1.0, 2.0, 3.0], [0.0, 0.5, 0.0]
    stat = claims.difference_interval(a, b)
    welch = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert stat["diff"] == pytest.approx(2.0 - 0.5 / 3) and stat["ci95"] == pytest.approx([welch.low, welch.high])
    paired = claims.difference_interval([1.5, 2.5, 3.5], [0.5, 0.5, 0.5], paired=True)
    half = T_975_DF2 / math.sqrt(3)
    assert paired["ci95"] == pytest.approx([2 - half, 2 + half])
    # every seed of both arms equal (scripts/async_accuracy.py's toy arms can be): the binomial floor of the eval set
    # gives an interval, instead of the ValueError compare_arms raises without a denominator
    with pytest.raises(ValueError, match="all 3 seeds"):
        claims.difference_interval([0.5] * 3, [0.4] * 3)
    floored = claims.difference_interval([0.5] * 3, [0.4] * 3, eval_examples=200)
    assert floored["diff"] == pytest.approx(0.1) and floored["ci95"][0] < 0.1 < floored["ci95"][1]


def _run(method: str, seed: int, curve: dict[int, float], eval_every: int = 20) -> Run:
    steps = max(curve)
    summary = {"method": method, "seed": seed, "student_accuracy_after": curve[steps],
               "student_accuracy_before": curve[0], "steps": steps, "eval_examples": 158}
    return Run(Path(f"/runs/{method}/{seed}"), summary,
               {"method.name": method, "seed": seed, "trainer.eval_every": eval_every},
               {"eval/accuracy": {step: value for step, value in curve.items()}})


def _records(claims, **arms):
    return {name: claims.arm_record(runs) for name, runs in arms.items()}


def test_arm_record_keeps_what_the_claims_need():
    claims = load_script("miniature_v2")
    record = claims.arm_record([_run("kd", s, {0: 0.1, 20: 0.2, 40: 0.3 + 0.01 * s}) for s in (1, 0)])
    assert record["seeds"] == [0, 1] and record["accuracy_after"] == [0.3, 0.31]
    assert (record["eval_examples"], record["eval_every"], record["max_steps"]) == (158, 20, 40)
    assert record["curves"][0] == [[0, 0.1], [20, 0.2], [40, 0.3]]
    assert claims.steps_to_reach(record["curves"][0], 0.25, 40) == (40, True)
    assert claims.steps_to_reach(record["curves"][0], 0.5, 40) == (41, False)


def test_arm_record_from_run_directories(tmp_path):
    claims = load_script("miniature_v2")
    for seed in range(2):
        run_dir = tmp_path / "kd" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        (run_dir / "summary.json").write_text(json.dumps(
            {"method": "kd", "seed": seed, "student_accuracy_before": 0.1, "student_accuracy_after": 0.3,
             "eval_examples": 158, "steps": 40}))
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": step, "eval/accuracy": value}) + "\n"
                                                       for step, value in ((0, 0.1), (20, 0.2), (40, 0.3))))
    record = claims.arm_record(claims.finished_runs(tmp_path / "kd"))  # no resolved_config.yaml: a warning
    assert record["eval_every"] == 20 and record["curves"][1] == [[0, 0.1], [20, 0.2], [40, 0.3]]


def test_steps_claim_at_a_fixed_threshold_on_hand_made_curves():
    claims = load_script("miniature_v2")
    fast = [_run("tm_opd", s, {0: 0.1, 20: (0.28, 0.29, 0.2)[s], 40: 0.3, 60: 0.3}) for s in range(3)]
    slow = [_run("seqkd", s, {0: 0.1, 20: 0.15, 40: 0.2 + 0.01 * s, 60: 0.3}) for s in range(3)]
    claim = next(c for c in claims.CLAIMS if c.key == "opd_speed_tm")
    result = claims.evaluate_claim(claim, _records(claims, tm_opd=fast, seqkd=slow), speed_threshold=0.27)
    assert result["threshold"] == 0.27 and result["threshold_rule"].startswith("fixed before the run")
    assert result["arms"]["tm_opd"]["steps_to_threshold"] == [20, 20, 40]
    assert result["arms"]["seqkd"]["steps_to_threshold"] == [60, 60, 60]
    # seqkd's steps are all equal: its spread is floored at eval_every/√12, Welch's df from both spreads
    var_fast, var_slow = (20 / math.sqrt(3)) ** 2 / 3, (20 / math.sqrt(12)) ** 2 / 3
    df = (var_fast + var_slow) ** 2 / (var_fast ** 2 / 2 + var_slow ** 2 / 2)
    half = stats.t.ppf(0.975, df) * math.sqrt(var_fast + var_slow)
    assert result["difference"] == pytest.approx(60 - 80 / 3)
    assert result["ci95"] == pytest.approx([60 - 80 / 3 - half, 60 - 80 / 3 + half])
    assert result["verdict"] == "holds" and "all 3 seeds of the first arm equal" in result["note"]
    default = claims.evaluate_claim(claim, _records(claims, tm_opd=fast, seqkd=slow))
    assert default["threshold"] == claims.SPEED_THRESHOLD == 0.2


def test_steps_claim_that_the_design_cannot_time_is_not_shown():
    claims = load_script("miniature_v2")
    claim = next(c for c in claims.CLAIMS if c.key == "opd_speed_tm")
    early = _records(claims, tm_opd=[_run("tm_opd", s, {0: 0.1, 20: 0.25, 40: 0.3}) for s in range(3)],
                     seqkd=[_run("seqkd", s, {0: 0.1, 20: 0.3 + 0.01 * s, 40: 0.3}) for s in range(3)])
    result = claims.evaluate_claim(claim, early, speed_threshold=0.2)
    assert result["verdict"] == "not shown" and result["ci95"] is None
    assert result["verdict_text"] == ("not shown: threshold reached at the first evaluation by every seed; "
                                      "the design cannot time it")
    never = claims.evaluate_claim(claim, early, speed_threshold=0.9)
    assert never["verdict_text"].startswith("not shown: no seed of either arm reached the threshold")


def test_final_and_gain_claims_on_hand_made_runs():
    claims = load_script("miniature_v2")
    minillm = [_run("minillm", s, {0: 0.1, 200: 0.30 + 0.01 * s}) for s in range(3)]
    kd = [_run("kd", s, {0: 0.1, 200: 0.31 + 0.01 * s}) for s in range(3)]
    claim = next(c for c in claims.CLAIMS if c.key == "minillm_vs_kd")
    result = claims.evaluate_claim(claim, _records(claims, minillm=minillm, kd=kd))
    assert result["difference"] == pytest.approx(-1.0)  # percentage points
    assert result["verdict"] == "not shown" and result["min_detectable_difference"] > 1.0
    assert result["verdict_text"].startswith("not shown (smallest detectable difference")
    opsd = [_run("real_opsd", s, {0: 0.5, 60: 0.5 + 0.1 + 0.01 * s}) for s in range(3)]
    gain = claims.evaluate_claim(next(c for c in claims.CLAIMS if c.key == "opsd_real"),
                                 _records(claims, real_opsd=opsd))
    assert gain["difference"] == pytest.approx(11.0) and gain["verdict"] == "holds"
    assert claims.evaluate_claim(claim, _records(claims, minillm=minillm)) is None  # an arm without runs: no verdict


def test_opsd_claim_cannot_be_tested_when_the_privileged_view_knows_no_more():
    claims = load_script("miniature_v2")
    claim = next(c for c in claims.CLAIMS if c.key == "opsd_toy")
    runs = [_run("opsd", s, {0: 0.10, 200: 0.0}) for s in range(3)]
    result = claims.evaluate_claim(claim, _records(claims, opsd=runs))
    assert result["verdict"] == "reversed"  # 10 % -> 0 % on every seed; the equal differences are floored
    assert result["ci95"][1] - result["ci95"][0] > 1.0 and "per-seed differences equal" in result["note"]
    claims.apply_precondition(claim, result, {"toy": {"plain": 0.101, "privileged": 0.095, "examples": 158}})
    assert result["verdict"] == "not shown" and "cannot be tested at this scale" in result["verdict_text"]
    real = next(c for c in claims.CLAIMS if c.key == "opsd_real")
    gained = claims.evaluate_claim(real, _records(claims, real_opsd=[_run("real_opsd", s, {0: 0.47, 30: 0.6 + 0.01 * s})
                                                                      for s in range(3)]))
    claims.apply_precondition(real, gained, {"real": {"plain": 0.47, "privileged": 0.89, "examples": 64}})
    assert gained["verdict"] == "holds" and gained["precondition"]["privileged"] == 0.89


def test_from_record_rejudges_the_stored_claims_without_runs(tmp_path, capsys):
    claims = load_script("miniature_v2")
    record = Path(__file__).resolve().parent.parent / "experiments" / "2026-11-30_miniature_v2"
    stored = json.loads((record / "claims.json").read_text())
    for result in stored["claims"].values():  # as the record was first written: no design, old verdicts
        result["verdict"] = "does not hold (a tie)"
        for arm in result["arms"].values():
            for key in ("eval_examples", "eval_every", "max_steps"):
                arm.pop(key, None)
    (tmp_path / "claims.json").write_text(json.dumps(stored))
    (tmp_path / "report.json").write_text((record / "report.json").read_text())
    claims.main(["--from-record", str(tmp_path)])
    printed = capsys.readouterr().out
    rebuilt = json.loads((tmp_path / "claims.json").read_text())["claims"]
    assert {r["verdict"] for r in rebuilt.values()} <= {"holds", "reversed", "not shown"}
    assert rebuilt["opd_speed_tm"]["verdict_text"].endswith("threshold reached at the first evaluation by every seed; "
                                                            "the design cannot time it")
    assert rebuilt["distillm_speed"]["threshold_rule"].startswith("set after the run")
    assert all(r["ci95"] is None or r["ci95"][1] > r["ci95"][0] for r in rebuilt.values())  # no zero-width interval
    assert rebuilt["opsd_toy"]["arms"]["opsd"]["eval_examples"] == 158
    assert "opd_speed_tm: –: not shown: threshold reached" in printed and "| sft (oracle: gold labels) |" in printed
    assert "[+0.0, +0.0]" not in (tmp_path / "claims.md").read_text() + (tmp_path / "report.md").read_text()
    first = (tmp_path / "claims.md").read_text()
    claims.main(["--from-record", str(tmp_path)])
    assert (tmp_path / "claims.md").read_text() == first  # re-judging a rebuilt record changes nothing


def test_tuning_record_renders_the_edge_check_from_tuning_json(tmp_path, capsys):
    tuning_record = load_script("tuning_record")
    record = Path(__file__).resolve().parent.parent / "experiments" / "2026-11-30_miniature_v2"
    tuning = json.loads((record / "tuning.json").read_text())
    tuning["edge_check"]["methods"]["eopd"]["trials"][1]["validation_accuracy"] = 0.2  # above eopd's chosen 16.4 %
    (tmp_path / "tuning.json").write_text(json.dumps(tuning))
    head = "# Per-method tuning\n\n| method | chosen |\n"
    (tmp_path / "tuning.md").write_text(head + "\n## Edge check\n\nhand-typed, to be replaced\n")
    tuning_record.main([str(tmp_path)])
    text = (tmp_path / "tuning.md").read_text()
    assert text.startswith(head) and "hand-typed" not in text and text.count("## Edge check") == 1
    assert "| eopd (clip_eps=0.076) | 12.7 | 20.0 | 16.4 (lr=0.00011) |" in text
    assert "Lower rates that score at least as well as the chosen one: eopd at lr 3e-5." in text
    assert "| 4 | 0.0001098 | 0.494 | 13.9 |" in text  # eopd's trials in learning-rate order, with their clip ε
    tuning_record.main([str(tmp_path)])
    assert (tmp_path / "tuning.md").read_text() == text
