"""``opd-report`` on real runs: grouping by the swept keys, mean ± std over seeds, markdown, JSON and plots."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from opd.report import (
    Group,
    Run,
    describe,
    format_stat,
    group_runs,
    label_keys,
    main,
    moving_average,
    series_styles,
    small_multiples_figure,
)
from opd.train import run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
METHODS, SEEDS = ("gkd", "sft"), (1, 2)
SHORT = ("trainer.max_steps=2", "trainer.eval_every=1")


@pytest.fixture(scope="module")
def four_runs_once(tiny_model_dirs, tmp_path_factory) -> Path:
    """runs/<method>/<seed>/: gkd and sft, seeds 1 and 2, two steps each, evaluated every step (trained once per module
    and worker: the tests that read them are one xdist group; each reads its own copy, :func:`four_runs`)."""
    from hydra import compose, initialize_config_dir

    from opd.train import CONF_DIR

    root = tmp_path_factory.mktemp("report") / "runs"
    models = [f"teacher.name_or_path={tiny_model_dirs['teacher']}", f"student.name_or_path={tiny_model_dirs['student']}"]
    for method in METHODS:
        for seed in SEEDS:
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):  # compose_cfg's config
                cfg = compose(config_name="train", overrides=[
                    "debug=tiny", "trainer.num_threads=1", *models, f"method={method}", f"seed={seed}",
                    f"output_dir={root / method / str(seed)}", *SHORT])
            run(cfg)
    return root


@pytest.fixture
def four_runs(four_runs_once, tmp_path) -> Path:
    """This test's own copy of :func:`four_runs_once` (a test may add runs to it)."""
    return Path(shutil.copytree(four_runs_once, tmp_path / "runs"))


def summaries_by_method(root: Path) -> dict[str, list[dict]]:
    """The runs' own summary.json files, per method, in seed order."""
    found: dict[str, list[dict]] = {}
    for path in sorted(root.rglob("summary.json")):
        summary = json.loads(path.read_text())
        found.setdefault(summary["method"], []).append(summary)
    return {method: sorted(rows, key=lambda s: s["seed"]) for method, rows in found.items()}


def expected_cell(values: list[float], percent: bool = True) -> str:
    """What the table should show, computed here independently: mean ± sample std in percent, or the mean and
    "all N seeds equal" when every value is the same."""
    mean, std = 100 * statistics.mean(values), 100 * statistics.stdev(values)
    if not percent:
        return f"{statistics.mean(values):,.0f}"
    return f"{mean:.1f} (all {len(values)} seeds equal)" if len(set(values)) == 1 else f"{mean:.1f} ± {std:.1f}"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5_000, (path, len(data))  # axes, lines, legend and text: not an empty canvas


@pytest.mark.xdist_group("report_four_runs")
def test_report_groups_by_method_and_averages_over_seeds(four_runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(four_runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "report.json").read_text())

    assert data["group_keys"] == ["method.name"] and "seed" not in data["differing_keys"]
    assert [g["label"] for g in data["groups"]] == ["method.name=gkd", "method.name=sft"]
    summaries = summaries_by_method(four_runs)
    markdown = (out / "report.md").read_text()
    for group, method in zip(data["groups"], METHODS):
        assert group["n"] == 2 and group["seeds"] == list(SEEDS)
        for key in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after", "tokens", "wall_time_s"):
            values = [s[key] for s in summaries[method]]
            assert group[key]["values"] == values
            assert group[key]["mean"] == pytest.approx(statistics.mean(values))
            assert group[key]["std"] == pytest.approx(statistics.stdev(values))
        cells = [expected_cell([s[k] for s in summaries[method]])
                 for k in ("teacher_accuracy", "student_accuracy_before", "student_accuracy_after")]
        tokens = expected_cell([s["tokens"] for s in summaries[method]], percent=False)
        label = f"method.name={method}" + (" (oracle: gold labels)" if method == "sft" else "")
        assert f"| {label} | 2 | {' | '.join(cells)} | {tokens} | " in markdown

    everyone = [s for rows in summaries.values() for s in rows]
    assert f"| teacher | 4 | {expected_cell([s['teacher_accuracy'] for s in everyone])} |" in markdown
    assert f"| initial student | 4 | – | {expected_cell([s['student_accuracy_before'] for s in everyone])} |" in markdown
    assert printed.strip() in markdown and printed.count("\n") == 6  # header, rule, 2 reference rows, 2 groups
    assert data["baseline"] is None and "beats" not in printed  # no SeqKD group: nothing to compare with
    for name in ("eval_accuracy.png", "eval_accuracy_small_multiples.png", "train_loss.png"):
        assert_png(out / name)
        assert f"]({name})" in markdown
    assert data["plots"] == ["eval_accuracy.png", "eval_accuracy_small_multiples.png", "train_loss.png"]


@pytest.mark.xdist_group("report_four_runs")
def test_group_by_seed_key_and_unreadable_summary(four_runs, tmp_path, capsys):
    broken = four_runs / "broken"
    broken.mkdir()
    (broken / "summary.json").write_text("{not json")
    out = tmp_path / "by-seed"
    assert main([str(four_runs), "--out", str(out), "--group-by", "method.name", "seed", "--smooth", "1"]) == 0
    captured = capsys.readouterr()
    assert "warning: skipping run: unreadable summary.json" in captured.err and str(broken) in captured.err
    data = json.loads((out / "report.json").read_text())
    assert data["num_runs"] == 4 and [g["n"] for g in data["groups"]] == [1, 1, 1, 1]
    assert [g["label"] for g in data["groups"]][:2] == ["method.name=gkd seed=1", "method.name=gkd seed=2"]
    assert all(g["student_accuracy_after"]["std"] is None for g in data["groups"])  # one seed: the mean alone
    assert " ± " not in captured.out.splitlines()[-1]

    assert main([str(four_runs), "--out", str(out), "--group-by", "method.bta"]) == 2
    error = capsys.readouterr().err.splitlines()[-1]  # after the warning about the broken run
    assert error.startswith("opd-report: error: unknown --group-by key 'method.bta'") and "method.beta" in error


def test_errors_are_one_line_and_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert capsys.readouterr().err == f"opd-report: error: no run directories (with summary.json) under '{empty}'\n"
    assert main([str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    (empty / "run").mkdir()
    (empty / "run" / "summary.json").write_text("[1, 2]")
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err
    assert "not a JSON object" in err and err.endswith("has a readable summary.json\n")
    assert not (empty / "report.md").exists()


def test_sweep_directory_from_opd_train_multirun(tmp_path, tiny_model_dirs, capsys):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    args = ["-m", "method=gkd,sft", "seed=1,2", *SHORT, "debug=tiny", "trainer.num_threads=1", "name=report",
            f"teacher.name_or_path={tiny_model_dirs['teacher']}", f"student.name_or_path={tiny_model_dirs['student']}"]
    done = subprocess.run([sys.executable, "-m", "opd.train", *args], cwd=tmp_path, env=env, capture_output=True, check=False,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (sweep,) = (tmp_path / "logs" / "report" / "multiruns").iterdir()

    assert main([str(sweep)]) == 0  # --out defaults to the one path given
    data = json.loads((sweep / "report.json").read_text())
    assert data["group_keys"] == ["method.name"]
    assert [(g["label"], g["seeds"]) for g in data["groups"]] == [("method.name=gkd", [1, 2]), ("method.name=sft", [1, 2])]
    assert "| method.name=sft (oracle: gold labels) | 2 |" in capsys.readouterr().out
    for name in ("report.md", "eval_accuracy.png", "train_loss.png"):
        assert (sweep / name).is_file()


def _run(**config) -> Run:
    return Run(Path(f"/runs/{len(config)}"), {}, {"seed": 0, **config})


def test_label_keys_prefer_names_and_keep_only_what_splits_the_runs():
    runs = [_run(**{"method.name": "gkd", "method.beta": 0.5}), _run(**{"method.name": "gkd", "method.beta": 1.0}),
            _run(**{"method.name": "sft", "method.label_smoothing": 0.0})]
    keys = ["method.beta", "method.label_smoothing", "method.name"]
    assert label_keys(runs, keys) == ["method.name", "method.beta"]
    assert [g.label for g in group_runs(runs, label_keys(runs, keys))] == [
        "method.name=gkd method.beta=0.5", "method.name=gkd method.beta=1.0", "method.name=sft"]  # unset keys left out
    runs = [_run(**{"method.name": "gkd", "trainer.lr": lr, "sampler.temperature": t}) for lr, t in ((1, 0.5), (2, 1.0))]
    assert label_keys(runs, ["sampler.temperature", "trainer.lr"]) == ["sampler.temperature"]
    for r in runs:
        r.overrides = ["trainer.lr", "seed"]  # swept on the command line: preferred
    assert label_keys(runs, ["sampler.temperature", "trainer.lr"]) == ["trainer.lr"]


def test_statistics_and_formatting():
    stat = describe([0.5, 0.75, None])
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(0.625) and stat["std"] == pytest.approx(0.1767767)
    assert format_stat(stat, "pct") == "62.5 ± 17.7"
    assert format_stat(describe([0.25]), "pct") == "25.0" and format_stat(describe([None]), "pct") == "n/a"
    assert format_stat(describe([1000, 2001]), "int") == "1,500" and format_stat(describe([2.0, 3.0]), "float") == "2.5"
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2).tolist() == [1.0, 2.0, 4.0, 6.0]


def _srgb_distance(a: str, b: str) -> float:
    """Euclidean distance of two ``#rrggbb`` colours in [0, 1]^3 (computed here, not by matplotlib)."""
    rgb = [[int(c[i:i + 2], 16) / 255 for i in (1, 3, 5)] for c in (a, b)]
    return sum((x - y) ** 2 for x, y in zip(*rgb)) ** 0.5


def test_series_styles_distinct_for_20_series_and_stable():
    names = [f"method.name=m{i:02d}" for i in range(20)]
    styles = series_styles(names)
    colors = [styles[n]["color"] for n in names]
    assert len(set(colors)) == 20
    assert min(_srgb_distance(a, b) for i, a in enumerate(colors) for b in colors[i + 1:]) > 0.15  # not near-duplicates
    assert "#7f7f7f" not in colors  # grey is kept for the SFT reference line
    pairs = [(styles[n]["color"], str(styles[n]["linestyle"])) for n in names]
    assert len(set(pairs)) == 20
    dash_marker = {(str(styles[n]["linestyle"]), styles[n]["marker"]) for n in names}
    assert len(dash_marker) == 20  # told apart in greyscale too, without the colour
    assert series_styles(list(reversed(names))) == styles  # order-independent: sorted names
    assert series_styles(names[:14]) == series_styles(names[:14]) and series_styles(names[:14])[names[3]] == styles[names[3]]


def _curve_run(method: str, seed: int, values: list[float]) -> Run:
    metrics = {"eval/accuracy": {25 * i: v for i, v in enumerate(values)}}
    return Run(Path(f"/runs/{method}/{seed}"), {"seed": seed}, {"method.name": method, "seed": seed}, metrics)


def test_small_multiples_one_panel_per_group_with_sft_reference(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    methods = ["sft", "gkd", "kd", "distillm", "seqkd"]
    groups = group_runs([_curve_run(m, s, [0.1, 0.1 + 0.01 * (i + s), 0.2 + 0.02 * i])
                         for i, m in enumerate(methods) for s in (0, 1)], ["method.name"])
    fig = small_multiples_figure(groups, "eval/accuracy")
    axes = [ax for ax in fig.axes if ax.has_data()]
    assert len(fig.axes) == len(axes) == 5  # the unused sixth cell of the 4 x 2 grid is removed
    assert [ax.get_title() for ax in axes] == [f"{m} (n=2)" for m in sorted(methods)]
    sft = next(g for g in groups if g.values["method.name"] == "sft")
    sft_mean = [100 * statistics.mean(r.metrics["eval/accuracy"][step] for r in sft.runs) for step in (0, 25, 50)]
    for ax in axes:
        refs = [line for line in ax.get_lines() if line.get_label() == "reference"]
        if ax.get_title().startswith("sft"):
            assert refs == []
            continue
        (ref,) = refs
        assert matplotlib.colors.to_hex(ref.get_color()) == "#8c8c8c"
        assert ref.get_ydata().tolist() == pytest.approx(sft_mean)
    assert len({ax.get_ylim() for ax in axes}) == 1 and len({ax.get_xlim() for ax in axes}) == 1  # shared axes
    colors = {matplotlib.colors.to_hex(line.get_color()) for ax in axes for line in ax.get_lines()
              if line.get_label() != "reference"}
    assert len(colors) == 5

    no_sft = [g for g in groups if g is not sft]
    fig = small_multiples_figure(no_sft, "eval/accuracy")
    assert len(fig.axes) == 4 and not any(line.get_label() == "reference" for ax in fig.axes for line in ax.get_lines())
    assert small_multiples_figure([Group({"method.name": "x"}, [Run(Path("/r"), {}, {})])], "eval/accuracy") is None


def test_labels_shorten_absolute_paths_and_keep_other_values():
    from opd.report import Group

    group = Group({"method.name": "gkd", "teacher.name_or_path": "/work/repo/opd/assets/toy_multiplication/teacher",
                   "method.beta": 0.5, "data.path": "data/train.jsonl"}, runs=[])
    assert group.label == ("method.name=gkd teacher.name_or_path=…/toy_multiplication/teacher method.beta=0.5 "
                           "data.path=data/train.jsonl")
