"""``opd.report.compare_arms`` and the per-arm intervals: checked against scipy's t-tests and t-table values, the three
verdicts on constructed cases, no zero-width interval when every seed is equal, and the detectable difference; then
opd-report's oracle label and its comparisons with the SeqKD baseline. No training: milliseconds each."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from scipy import stats

from opd.report import (
    Comparison,
    ReportError,
    Run,
    binomial_sd,
    build_report,
    compare_arms,
    describe,
    format_ci,
    format_stat,
    format_table,
    group_runs,
    mean_confidence_interval,
    rebuild_report,
)

# Student-t quantiles from a printed table (not from scipy): t_{0.975, df} and t_{0.80, df}
T975 = {2: 4.3027, 4: 2.7764}
T80 = {2: 1.0607, 4: 0.9410}


def test_welch_interval_matches_scipy_ttest_ind():
    a, b = [0.25, 0.22, 0.27, 0.24], [0.20, 0.23, 0.19]
    result = compare_arms(a, b)
    reference = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert result.difference == pytest.approx(sum(a) / 4 - sum(b) / 3)
    assert (result.ci_low, result.ci_high) == pytest.approx((reference.low, reference.high), rel=1e-10)
    assert (result.n_a, result.n_b, result.paired, result.note) == (4, 3, False, "")
    wider = compare_arms(a, b, alpha=0.01)
    assert wider.ci_low < result.ci_low and wider.ci_high > result.ci_high


def test_paired_interval_matches_scipy_ttest_rel():
    after, before = [0.31, 0.28, 0.35], [0.10, 0.12, 0.10]
    result = compare_arms(after, before, paired=True)
    reference = stats.ttest_rel(after, before).confidence_interval(0.95)
    assert (result.ci_low, result.ci_high) == pytest.approx((reference.low, reference.high), rel=1e-10)
    assert result.paired and result.verdict == "holds"


def test_minimum_detectable_difference_against_the_t_table():
    # two arms, s = 1 each, n = 3: Welch's df = 4, (t_.975 + t_.80)·s·sqrt(2/n)
    two = compare_arms([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert two.min_detectable_difference == pytest.approx((T975[4] + T80[4]) * math.sqrt(2 / 3), abs=2e-4)
    # paired, per-seed differences (1, 2, 3): s_d = 1, df = 2, (t_.975 + t_.80)·s_d/sqrt(n)
    paired = compare_arms([1.0, 2.0, 3.0], [0.0, 0.0, 0.0], paired=True)
    assert paired.min_detectable_difference == pytest.approx((T975[2] + T80[2]) / math.sqrt(3), abs=2e-4)
    assert paired.ci_high - paired.difference == pytest.approx(T975[2] / math.sqrt(3), abs=2e-4)


def test_the_three_verdicts():
    assert compare_arms([0.30, 0.32, 0.31], [0.20, 0.21, 0.19]).verdict == "holds"
    assert compare_arms([0.20, 0.21, 0.19], [0.30, 0.32, 0.31]).verdict == "reversed"
    unclear = compare_arms([0.25, 0.30, 0.20], [0.24, 0.29, 0.22])
    assert unclear.verdict == "not shown" and unclear.ci_low < 0 < unclear.ci_high
    assert unclear.verdict_text(100, " pp").startswith(
        f"not shown (smallest detectable difference {100 * unclear.min_detectable_difference:.1f} pp at 80 % power")
    assert compare_arms([0.30, 0.32, 0.31], [0.20, 0.21, 0.19]).verdict_text(100, " pp") == "holds"


def test_all_equal_seeds_get_the_binomial_floor_never_a_zero_width_interval():
    result = compare_arms([0.3, 0.3, 0.3], [0.3, 0.3, 0.3], eval_examples=100)
    sd = math.sqrt(0.3 * 0.7 / 100)  # the binomial SD of a 30 % accuracy on 100 problems
    half = T975[4] * sd * math.sqrt(2 / 3)
    assert (result.ci_low, result.ci_high) == pytest.approx((-half, half), abs=2e-4)
    assert result.verdict == "not shown" and result.min_detectable_difference > 0
    assert "all 3 seeds of both arms equal" in result.note and "binomial SD" in result.note
    assert "all 3 seeds of both arms equal" in result.verdict_text(100, " pp")
    with pytest.raises(ValueError, match="all 3 seeds of an arm equal"):
        compare_arms([0.3, 0.3, 0.3], [0.3, 0.3, 0.3])  # no floor given: refused, not a zero-width "tie"

    one = compare_arms([0.3, 0.3, 0.3], [0.2, 0.25, 0.3], eval_examples=100)
    assert "the first arm" in one.note and one.ci_high - one.ci_low > 0
    paired = compare_arms([0.006] * 3, [0.101] * 3, paired=True, eval_examples=158)
    assert "all 3 per-seed differences equal" in paired.note
    assert paired.ci_high - paired.ci_low == pytest.approx(
        2 * T975[2] * math.hypot(binomial_sd(0.006, 158), binomial_sd(0.101, 158)) / math.sqrt(3), abs=1e-4)
    steps = compare_arms([20.0, 20.0, 20.0], [20.0, 20.0, 20.0], resolution=20)
    assert steps.ci_high == pytest.approx(T975[4] * 20 / math.sqrt(12) * math.sqrt(2 / 3), abs=1e-2)
    assert binomial_sd(0.0, 100) == pytest.approx(math.sqrt(0.01 * 0.99 / 100))  # 0 % still has noise


def test_minimum_detectable_difference_shrinks_with_more_seeds():
    pattern_a, pattern_b = [0.25, 0.28, 0.22], [0.24, 0.27, 0.20]
    mdes = [compare_arms(pattern_a * k, pattern_b * k).min_detectable_difference for k in (1, 2, 4, 8)]
    assert all(later < earlier for earlier, later in zip(mdes, mdes[1:]))


def test_compare_arms_refuses_what_it_cannot_judge():
    with pytest.raises(ValueError, match="at least 2 values"):
        compare_arms([0.3], [0.2, 0.25])
    with pytest.raises(ValueError, match="same seeds"):
        compare_arms([0.3, 0.2], [0.2, 0.25, 0.1], paired=True)


def test_per_arm_interval_of_equal_seeds_is_floored_or_absent():
    assert mean_confidence_interval([0.3, 0.3]) is None  # no eval_examples: no interval, never [0.3, 0.3]
    low, high = mean_confidence_interval([0.3, 0.3, 0.3], eval_examples=158)
    assert high - 0.3 == pytest.approx(T975[2] * math.sqrt(0.3 * 0.7 / 158) / math.sqrt(3), abs=1e-4)
    assert low == pytest.approx(0.6 - high)
    assert mean_confidence_interval([0.006] * 3, eval_examples=158)[0] == 0.0  # an accuracy stays in [0, 1]
    stat = describe([0.3, 0.3, 0.3], eval_examples=158)
    assert stat["all_equal"] and format_stat(stat, "pct") == "30.0 (all 3 seeds equal)"
    assert format_ci(stat).endswith("(all 3 seeds equal; binomial SD on 158 problems)")
    assert format_ci(describe([0.3, 0.3])) == "n/a (all 2 seeds equal)"
    assert format_stat(describe([0.25, 0.35]), "pct") == "30.0 ± 7.1"


def _run(method: str, seed: int, after: float) -> Run:
    summary = {"method": method, "seed": seed, "teacher_accuracy": 0.9, "student_accuracy_before": 0.1,
               "student_accuracy_after": after, "tokens": 1000, "wall_time_s": 1.0, "eval_examples": 158}
    return Run(Path(f"/runs/{method}/{seed}"), summary, {"method.name": method, "seed": seed})


ACCURACY = {"seqkd": (0.28, 0.30, 0.27), "sft": (0.27, 0.27, 0.26), "gkd": (0.24, 0.23, 0.25), "kd": (0.29, 0.27, 0.26),
            "opsd": (0.006, 0.006, 0.006)}


def _report(baseline: str | None = None) -> dict:
    runs = [_run(method, seed, value) for method, values in ACCURACY.items() for seed, value in enumerate(values)]
    groups = group_runs(runs, ["method.name"])
    return build_report(runs, groups, ["method.name"], "seed", baseline)


def test_report_marks_sft_as_oracle_and_compares_with_seqkd_by_default():
    report = _report()
    assert report["baseline"] == "method.name=seqkd"
    rows = {row["method"]: row for row in report["groups"]}
    assert rows["sft"]["oracle"] and not rows["gkd"]["oracle"]
    assert rows["seqkd"]["vs_baseline"] is None
    expected = compare_arms(ACCURACY["gkd"], ACCURACY["seqkd"], eval_examples=158)
    assert Comparison(**rows["gkd"]["vs_baseline"]) == expected and expected.verdict == "reversed"
    assert "all 3 seeds of the first arm equal" in rows["opsd"]["vs_baseline"]["note"]
    table = format_table(report)
    assert "| method.name=sft (oracle: gold labels) | 3 |" in table
    assert "acc. after − seqkd (pp) [95 % CI] | beats seqkd? |" in table.splitlines()[0]
    assert "| (baseline) | – |" in table and "[+0.0, +0.0]" not in table and "± 0.0" not in table
    assert f"| {expected.interval_text(100)} | reversed |" in table
    kd = Comparison(**rows["kd"]["vs_baseline"])
    assert kd.verdict == "not shown" and kd.verdict_text(100, " pp") in table


def test_report_baseline_option():
    assert _report("kd")["baseline"] == "method.name=kd"
    none = _report("none")
    assert none["baseline"] is None and "beats" not in format_table(none)
    with pytest.raises(ReportError, match="names no group"):
        _report("minillm")


def test_rebuild_report_replaces_a_stored_zero_width_interval():
    stored = _report()
    row = next(r for r in stored["groups"] if r["method"] == "opsd")
    row["student_accuracy_after"]["ci95"] = [0.006, 0.006]  # as an older opd-report wrote it
    for r in stored["groups"]:  # older reports had none of these
        for key in ("method", "oracle", "eval_examples", "vs_baseline"):
            r.pop(key)
    rebuilt = rebuild_report(stored, eval_examples=158)
    opsd = next(r for r in rebuilt["groups"] if r["label"] == "method.name=opsd")
    low, high = opsd["student_accuracy_after"]["ci95"]
    assert high - low > 0.01 and rebuilt["baseline"] == "method.name=seqkd"
    assert next(r for r in rebuilt["groups"] if r["label"] == "method.name=sft")["oracle"]
