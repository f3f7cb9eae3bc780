"""The on-policy protocol's pieces (issue 21): two-stage runs, truncation accounting and overlong masking,
rejection-sampled SeqKD, and the teacher-agreement evaluation."""

from __future__ import annotations

import json
import random

import pytest
import torch
from omegaconf import OmegaConf

from opd.data.base import Example
from opd.engine.evaluate import evaluate_teacher_kl
from opd.errors import ConfigError
from opd.methods.seqkd import CorrectTeacherSamplePolicy
from opd.sampling.base import RolloutBatch, unfinished_rows
from opd.sampling.behaviour import RolloutContext
from opd.sampling.hf import HFSampler
from opd.train import build_trainer, run

EOS = 2


def batch_of(rows: list[list[int]], mask: list[list[int]]) -> RolloutBatch:
    ids = torch.tensor(rows)
    return RolloutBatch(torch.ones(len(rows), 2, dtype=torch.long), torch.ones(len(rows), 2, dtype=torch.long), ids,
                        torch.tensor(mask), [Example(f"p{i}", "t", "a") for i in range(len(rows))], "student")


def test_unfinished_rows_are_those_without_an_eos_inside_the_mask():
    batch = batch_of([[5, 6, EOS, 0], [5, 6, 7, 8], [EOS, 0, 0, 0], [5, 6, 7, EOS]],
                     [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]])
    assert unfinished_rows(batch, [EOS]).tolist() == [False, True, False, False]
    batch.completion_mask[3, 3] = 0  # an EOS the mask hides does not count
    assert unfinished_rows(batch, [EOS]).tolist() == [False, True, False, True]


def test_truncation_is_logged_and_overlong_masking_trains_on_nothing_when_every_rollout_is_cut(compose_cfg, tmp_path):
    # one new token: every sampled row is cut (an EOS as the very first token is possible but the random tiny
    # student puts ~1/40 of its mass on it; the run's own counts are compared, not a fixed share)
    cfg = compose_cfg("sampler.max_new_tokens=1", "trainer.max_steps=3", "trainer.overlong=mask", "method.lmbda=1.0")
    trainer = build_trainer(cfg)
    before = {name: p.detach().clone() for name, p in trainer.student.named_parameters()}
    summary = trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    shares = [row["rollout/truncated"] for row in rows if "rollout/truncated" in row]
    assert len(shares) == 3 and summary["rollout_truncated"] == pytest.approx(sum(shares) / 3)
    if summary["rollout_truncated"] == 1.0:  # all cut: no loss, no update
        assert summary["empty_steps"] == 3 and summary["tokens"] == 0
        assert all(torch.equal(before[name], p) for name, p in trainer.student.named_parameters())
    else:  # a finished row somewhere: only finished rows' tokens were trained on
        assert summary["tokens"] < 3 * cfg.trainer.batch_size


def test_overlong_keep_trains_on_cut_rows_and_counts_them(compose_cfg):
    summary = build_trainer(compose_cfg("sampler.max_new_tokens=2", "trainer.max_steps=2")).fit()
    assert summary["rollout_truncated"] > 0.5 and summary["tokens"] > 0 and "empty_steps" not in summary


def test_overlong_must_be_keep_or_mask(compose_cfg):
    with pytest.raises(ConfigError, match="trainer.overlong must be keep or mask"):
        build_trainer(compose_cfg("trainer.overlong=drop"))


class StubSampler:
    """Returns fixed completions, grouped by example, ``n`` per example."""

    def __init__(self, texts: dict[str, list[str]], tokenizer) -> None:
        self.texts, self.tokenizer = texts, tokenizer

    def generate(self, model, tokenizer, examples, greedy=False, n=None):
        rows = [self.texts[ex.prompt][i] for ex in examples for i in range(n)]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS] for text in rows]
        width = max(map(len, ids))
        completion = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
        return RolloutBatch(torch.ones(len(rows), 1, dtype=torch.long), torch.ones(len(rows), 1, dtype=torch.long),
                            completion, mask, [ex for ex in examples for _ in range(n)], "student")


class AnswerTask:
    def is_correct(self, completion: str, example: Example) -> bool:
        return completion.strip() == example.answer


def test_rejection_sampling_keeps_the_first_correct_sample_and_drops_prompts_without_one(tiny_model_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["student"])
    examples = [Example("a", "7", "7"), Example("b", "9", "9")]
    sampler = StubSampler({"a": ["1", "7", "7 "], "b": ["2", "3", "4"]}, tokenizer)
    ctx = RolloutContext(None, torch.nn.Identity(), tokenizer, sampler, torch.device("cpu"), random.Random(0),
                         task=AnswerTask())
    batch = CorrectTeacherSamplePolicy(candidates=3).collect(ctx, examples)
    texts = tokenizer.batch_decode(batch.completion_ids, skip_special_tokens=True)
    assert [ex.prompt for ex in batch.examples] == ["a", "b"]
    assert texts[0] == "7"  # the first correct of a's three candidates
    assert batch.extras["accepted"].tolist() == [1.0, 0.0]
    assert batch.completion_mask[0].sum() == 2 and batch.completion_mask[1].sum() == 0  # "7" + EOS; b: no loss
    assert batch.source == "teacher"


def test_rs_seqkd_trains_on_the_toy(compose_cfg):
    summary = build_trainer(compose_cfg("method=rs_seqkd", "trainer.max_steps=2")).fit()
    assert summary["method"] == "rs_seqkd" and summary["steps"] == 2


def test_teacher_kl_matches_torch_distributions_and_is_zero_against_itself(tiny_model_dirs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["student"])
    student = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["student"]).eval()
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["teacher"]).eval()
    examples = [Example(f"{i}+{i}=", "x", "x") for i in range(5)]
    sampler = HFSampler(max_new_tokens=6)
    vocab = student.get_output_embeddings().weight.shape[0]
    torch.manual_seed(3)
    result = evaluate_teacher_kl(student, teacher, tokenizer, examples, sampler, vocab, batch_size=2, progress=False)
    torch.manual_seed(3)  # the same samples, scored independently
    total, count = 0.0, 0.0
    from opd.models.scoring import completion_logits

    for start in range(0, 5, 2):
        rollout = sampler.generate(student, tokenizer, examples[start : start + 2])
        with torch.no_grad():
            q = torch.distributions.Categorical(logits=completion_logits(student, rollout).float())
            p = torch.distributions.Categorical(logits=completion_logits(teacher, rollout).float())
        kl = torch.distributions.kl_divergence(q, p)
        total += float((kl * rollout.completion_mask).sum())
        count += float(rollout.completion_mask.sum())
    # float32 log-softmax of the same logits, summed over ~60 tokens: agreement to ~1e-6 relative
    assert result["teacher_rkl"] == pytest.approx(total / count, rel=1e-5)
    assert result["teacher_rkl"] > 0
    torch.manual_seed(3)
    same = evaluate_teacher_kl(student, student, tokenizer, examples, sampler, vocab, batch_size=2, progress=False)
    assert same["teacher_rkl"] == pytest.approx(0.0, abs=1e-6)


def test_a_sweep_over_stage_two_shares_one_warm_start(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default warm-start directory is logs/<name>/warm_starts/... under the cwd
    warm = "warm_start={method: sft, trainer: {max_steps: 3, lr: 0.01}}"
    first = run(compose_cfg("method=gkd", "seed=0", warm, "trainer.max_steps=2"), tmp_path / "gkd0")
    stage_dirs = [d for d in (tmp_path / "logs" / "default" / "warm_starts").iterdir() if d.is_dir()]  # + a lock file
    assert len(stage_dirs) == 1
    stage_dir = stage_dirs[0]
    written = (stage_dir / "summary.json").stat().st_mtime_ns
    second = run(compose_cfg("method=tm_opd", "seed=1", warm, "trainer.max_steps=2"), tmp_path / "tm1")
    assert (stage_dir / "summary.json").stat().st_mtime_ns == written  # reused, not trained again
    assert len([d for d in (tmp_path / "logs" / "default" / "warm_starts").iterdir() if d.is_dir()]) == 1
    for summary in (first, second):
        assert summary["warm_start"]["method"] == "sft" and summary["warm_start"]["steps"] == 3
        # stage 2 starts from stage 1's final student: its step-0 accuracy is stage 1's final one
        assert summary["student_accuracy_before"] == summary["warm_start"]["student_accuracy_after"]
    resolved = OmegaConf.load(tmp_path / "gkd0" / "resolved_config.yaml")
    assert resolved.student.name_or_path == first["warm_start"]["checkpoint"]


def test_a_run_that_evaluates_elsewhere_does_not_take_the_warm_starts_evaluation(compose_cfg, tmp_path, monkeypatch,
                                                                                 capsys):
    """The step-0 evaluation is copied from stage 1 only when stage 1 evaluated the same way, by its recorded config: a
    tuning run given the stage by directory (its own settings would hash to another stage) evaluates on validation."""
    monkeypatch.chdir(tmp_path)
    warm = "warm_start={method: sft, trainer: {max_steps: 2, lr: 0.01}}"
    run(compose_cfg("method=gkd", warm, "trainer.max_steps=1"), tmp_path / "first")
    assert "step-0 evaluation taken from stage 1's final one" in capsys.readouterr().out
    stage_dir = next(d for d in (tmp_path / "logs" / "default" / "warm_starts").iterdir() if d.is_dir())
    tuning = run(compose_cfg("method=gkd", warm, f"++warm_start.dir={stage_dir}", "trainer.max_steps=1",
                             "trainer.evaluate_on=validation", "trainer.validation_examples=8"), tmp_path / "tuning")
    assert "step-0 evaluation taken" not in capsys.readouterr().out
    assert tuning["evaluated_on"] == "validation" and tuning["eval_examples"] == 8


def test_the_teacher_is_fine_tuned_once_and_then_teaches_the_warm_start_and_stage_two(compose_cfg, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    tune = "teacher_finetune={method: sft, trainer: {max_steps: 2, lr: 0.01}}"
    warm = "warm_start={method: seqkd, trainer: {max_steps: 2}}"
    first = run(compose_cfg("method=gkd", tune, warm, "trainer.max_steps=1"), tmp_path / "a")
    teachers = [d for d in (tmp_path / "logs" / "default" / "teachers").iterdir() if d.is_dir()]
    assert len(teachers) == 1 and teachers[0].name.startswith("sft-")
    tuned = first["teacher_finetune"]
    assert tuned["steps"] == 2 and tuned["checkpoint"].startswith(str(teachers[0]))
    # stage 0 trains the whole teacher model (lr 0.01 moves it), and both later stages load that checkpoint
    base = OmegaConf.load(tmp_path / "a" / "resolved_config.yaml")
    assert base.teacher.name_or_path == tuned["checkpoint"]
    warm_config = OmegaConf.load(f"{first['warm_start']['run_dir']}/resolved_config.yaml")
    assert warm_config.teacher.name_or_path == tuned["checkpoint"]
    stage_zero = OmegaConf.load(teachers[0] / "resolved_config.yaml")
    assert stage_zero.student.name_or_path == compose_cfg().teacher.name_or_path and stage_zero.student.keep_layers is None
    from safetensors.torch import load_file

    before = load_file(f"{stage_zero.student.name_or_path}/model.safetensors")
    after = load_file(f"{tuned['checkpoint']}/model.safetensors")
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    written = (teachers[0] / "summary.json").stat().st_mtime_ns
    second = run(compose_cfg("method=tm_opd", "seed=1", tune, warm, "trainer.max_steps=1"), tmp_path / "b")
    assert (teachers[0] / "summary.json").stat().st_mtime_ns == written  # reused, not trained again
    assert second["warm_start"]["run_dir"] == first["warm_start"]["run_dir"]
    # the teacher it reports is the fine-tuned one: stage 0's final accuracy is the warm start's teacher accuracy
    assert first["warm_start"]["teacher_accuracy"] == pytest.approx(tuned["student_accuracy_after"])


def test_teacher_finetune_refuses_a_teacher_it_cannot_train(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="teacher_finetune: needs a Hugging Face teacher"):
        run(compose_cfg("teacher=vllm_server", "teacher_finetune={method: sft}"), tmp_path / "served")
    with pytest.raises(ConfigError, match="teacher_finetune.method: no method 'sfft'"):
        run(compose_cfg("teacher_finetune={method: sfft}"), tmp_path / "typo")
    assert not (tmp_path / "logs").exists()


def test_a_typo_in_stage_two_fails_before_the_warm_start_trains(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="lmbdaa"):
        run(compose_cfg("method=gkd", "+method.lmbdaa=1", "warm_start={method: sft}"), tmp_path / "typo")
    assert not (tmp_path / "logs").exists()
    with pytest.raises(ConfigError, match="warm_start.method: no method 'sfft'"):
        run(compose_cfg("warm_start={method: sfft}"), tmp_path / "typo2")
    with pytest.raises(ConfigError, match="warm_start.trainer: unknown trainer key"):
        run(compose_cfg("warm_start={method: sft, trainer: {lrr: 1}}"), tmp_path / "typo3")


# ---------------------------------------------------------------------------------------------- the study's analysis
def load_study():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "real_opd_protocol.py"
    spec = importlib.util.spec_from_file_location("real_opd_protocol", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_opd_protocol"] = module
    spec.loader.exec_module(module)
    return module


def write_run(directory, accuracies: dict[int, float], step_seconds: float, final: float) -> None:
    """A finished run's metrics.jsonl (evaluations at the given steps, a training row per step) and summary.json."""
    directory.mkdir(parents=True)
    rows = []
    for step in range(0, max(accuracies) + 1):
        if step:
            rows.append({"step": step, "time/step_s": step_seconds})
        if step in accuracies:
            rows.append({"step": step, "eval/accuracy": accuracies[step]})
    (directory / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (directory / "summary.json").write_text(json.dumps({"student_accuracy_after": final, "eval_examples": 256,
                                                        "rollout_truncated": None}))


def test_the_study_runs_the_deciding_arms_first_and_compares_at_equal_training_seconds(tmp_path):
    study = load_study()
    order = [(arm, seed) for arm, seed, _, tag in study.plan(list(study.ARMS), [0, 1, 2], second_size=False)]
    deciding = [cell for cell in order if cell[0] in study.DECIDING]
    assert order[: len(deciding)] == deciding and len(deciding) == 9  # 3 arms x 3 seeds before any other arm
    with_size = study.plan(list(study.ARMS), [0, 1, 2], second_size=True)
    assert [tag for _, _, _, tag in with_size[9:15]] == ["_keep" + str(study.SECOND_SIZE["keep_layers"])] * 6
    # a slow arm (2 s per step) and a fast one (1 s): at the fast arm's 40 training seconds the slow arm has trained
    # 20 steps, so its accuracy there is the one at step 20, not its final one
    for seed in (0, 1):
        write_run(tmp_path / "slow" / f"seed{seed}", {0: 0.1, 20: 0.2, 40: 0.5}, 2.0, 0.5)
        write_run(tmp_path / "fast" / f"seed{seed}", {0: 0.1, 20: 0.3, 40: 0.4}, 1.0, 0.4)
    slow = study.read_run(tmp_path / "slow" / "seed0")
    assert slow["train_seconds"][40] == pytest.approx(80.0)
    assert study.accuracy_within(slow, 40.0) == 0.2
    assert study.accuracy_within(slow, 80.0) == 0.5
    assert study.accuracy_within(study.read_run(tmp_path / "fast" / "seed1"), 40.0) == 0.4


def test_the_extra_baseline_runs_last_and_opsd_runs_its_own_experiment_on_the_study(tmp_path):
    study = load_study()
    order = [arm for arm, _, _, _ in study.plan(list(study.ARMS), [0, 1, 2], second_size=False)]
    assert order[-3:] == ["rs_seqkd"] * 3 and "rs_seqkd" not in order[:-3]
    study.EXPERIMENT = "real_opd_finetuned_teacher"
    command = study.cell_command(study.ARMS["opsd"], 1, tmp_path)
    assert command[1] == "experiment=real_opsd" and sum(part.startswith("experiment=") for part in command) == 1
    assert study.cell_command(study.ARMS["seqkd"], 1, tmp_path)[1] == "experiment=real_opd_finetuned_teacher"


def test_opsd_is_judged_on_its_own_gain_paired_over_seeds(tmp_path):
    """OPSD's claim (it improves the student it starts from) is a paired after - before comparison per seed."""
    study = load_study()
    finals = {"seqkd": [0.50, 0.52, 0.51], "gkd_l1": [0.5, 0.5, 0.52], "gkd_l0": [0.5, 0.51, 0.5],
              "opsd": [0.60, 0.62, 0.64]}
    for arm, values in finals.items():
        for seed, final in enumerate(values):
            directory = tmp_path / arm / f"seed{seed}"
            write_run(directory, {0: 0.5, 40: final}, 1.0, final)
            summary = json.loads((directory / "summary.json").read_text())
            # every arm starts from one warm start, whose teacher (the fine-tuned one) scored 70 %; OPSD's own teacher
            # is its starting student (50 %): the warm-start line must report the former, whichever arm comes first
            warm = {"method": "seqkd", "steps": 100, "teacher_accuracy": 0.7, "student_accuracy_after": 0.5,
                    "student_eos_rate_after": 1.0, "student_mean_length_after": 3.0, "student_teacher_rkl_after": 0.3,
                    "wall_time_s": 10.0, "run_dir": "logs/warm"}
            (directory / "summary.json").write_text(json.dumps({
                **summary, "student_accuracy_before": 0.5, "student_eos_rate_after": 1.0,
                "student_mean_length_after": 3.0, "warm_start": warm,
                "teacher_accuracy": 0.5 if arm == "opsd" else 0.69}))  # (the arms: not what the line reads)
    claims = {c["claim"]: c for c in study.verdicts(study.analyse(tmp_path, [0, 1, 2]))}
    gain = claims["OPSD improves its starting student (after - before, paired)"]
    assert gain["difference"] == pytest.approx(0.12) and gain["verdict"] == "holds"
    assert claims["opsd beats SeqKD at equal steps"]["verdict"] == "holds"
    text = study.format_results(study.analyse(tmp_path, [0, 1, 2]), list(claims.values()))
    assert "| opsd | 3 |" in text and "its teacher 70.0 %" in text
    assert any("keep_layers=" in claim for claim in claims)  # the module default: a study with a second size
    study.SECOND_SIZE["keep_layers"] = None  # a study without one (real_opd_longer_stage2, the toy): no row for it
    assert not any("keep_layers" in c["claim"] for c in study.verdicts(study.analyse(tmp_path, [0, 1, 2])))


def test_the_record_archive_rebuilds_the_report_without_the_run_directories(tmp_path):
    """Run directories live in logs/, which a machine may lose; the record's runs/ archive must rebuild the same
    analysis, and an unfinished run (no summary.json) must not be archived as if it were a result."""
    study = load_study()
    runs, record = tmp_path / "logs", tmp_path / "record"
    for arm, finals in {"seqkd": [0.50, 0.53], "gkd_l1": [0.52, 0.55]}.items():
        for seed, final in enumerate(finals):
            write_run(runs / arm / f"seed{seed}", {0: 0.5, 40: final}, 1.0, final)
    (runs / "tm_opd" / "seed0").mkdir(parents=True)  # interrupted: a checkpoint, no summary
    (runs / "tm_opd" / "seed0" / "metrics.jsonl").write_text('{"step": 1}\n')
    study.archive_runs(runs, record)
    assert sorted(p.relative_to(record).as_posix() for p in record.rglob("*") if p.is_file()) == sorted(
        f"runs/{arm}/seed{seed}/{name}" for arm in ("seqkd", "gkd_l1") for seed in (0, 1)
        for name in study.ARCHIVED_FILES)
    from_logs, from_record = study.analyse(runs, [0, 1]), study.analyse(record / "runs", [0, 1])
    assert from_record["table"] == from_logs["table"]
    assert study.verdicts(from_record) == study.verdicts(from_logs)
    study.archive_run(record / "runs" / "seqkd" / "seed0", record / "runs" / "seqkd" / "seed0")  # onto itself: no-op
    assert (record / "runs" / "seqkd" / "seed0" / "summary.json").exists()


def test_a_finished_stage_run_with_other_cpu_threads_is_reused(compose_cfg, tmp_path, monkeypatch):
    """trainer.num_threads says how a stage runs, not what it learns: a finished warm start recorded with 1 thread
    serves a run asking for 2 (its hash differs), while a stage that learns something else is not taken for it."""
    from omegaconf import OmegaConf

    from opd import stages

    monkeypatch.chdir(tmp_path)
    warm = "+warm_start={method: sft, trainer: {max_steps: 3}}"
    cfg = compose_cfg(warm)  # trainer.num_threads=1
    stage = stages.stage_one_config(cfg)
    finished = stages.stage_one_dir(cfg, stage)
    finished.mkdir(parents=True)
    (finished / "resolved_config.yaml").write_text(OmegaConf.to_yaml(stage, resolve=True))
    (finished / "summary.json").write_text("{}")
    other_threads = compose_cfg(warm, "trainer.num_threads=2")
    assert stages.stage_one_dir(other_threads, stages.stage_one_config(other_threads)) == finished
    other_lr = compose_cfg(warm, "trainer.lr=0.5")  # the stage inherits the run's lr: it learns something else
    assert stages.stage_one_dir(other_lr, stages.stage_one_config(other_lr)) != finished
    (finished / "summary.json").unlink()  # an unfinished run is not reused either
    assert stages.stage_one_dir(other_threads, stages.stage_one_config(other_threads)) != finished


def test_reevaluation_rescores_a_studys_final_students_on_more_held_out_problems(compose_cfg, tmp_path):
    """scripts/reevaluate_study.py: a finished run's student, re-scored on 3x its held-out problems, scores exactly its
    recorded accuracy on the first ones (the split grows at its end, still disjoint from training), each problem's
    verdict is kept, and the report judges the claims at both sizes."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "reevaluate_study.py"
    spec = importlib.util.spec_from_file_location("reevaluate_study", path)
    reevaluate = importlib.util.module_from_spec(spec)
    sys.modules["reevaluate_study"] = reevaluate
    spec.loader.exec_module(reevaluate)

    study = tmp_path / "study"
    for arm, method in (("seqkd", "seqkd"), ("gkd_l1", "gkd")):
        for seed in (0, 1):
            run(compose_cfg(f"method={method}", f"seed={seed}", "trainer.max_steps=2", "data.num_eval=8",
                            f"output_dir={study / arm / f'seed{seed}'}"))
    out = tmp_path / "reevaluation.json"
    results = reevaluate.rescore(study, out, num_eval=24, arms=None, seeds=None)
    assert results["split"] == {"num_train": results["split"]["num_train"], "num_eval": 24, "train_eval_overlap": 0,
                                "recorded_num_eval": 8}
    assert set(results["runs"]) == {"seqkd/seed0", "seqkd/seed1", "gkd_l1/seed0", "gkd_l1/seed1"}
    for row in results["runs"].values():
        assert len(row["correct"]) == 24 and row["accuracy"] == row["correct"].count("1") / 24
        assert row["accuracy_first_8"] == row["recorded_accuracy"]  # greedy decoding of the same 8 problems
    assert results["warm_start"]["accuracy_first_8"] == results["warm_start"]["recorded_accuracy"]
    assert json.loads(out.read_text())["runs"].keys() == results["runs"].keys()
    text, claims = reevaluate.report(results)
    assert {(c["claim"], c["evaluation"]) for c in claims} == {
        ("gkd_l1 beats SeqKD at equal steps", label) for label in ("recorded (8)", "first 8 here", "24")}
    assert all(c["verdict"] in ("holds", "reversed", "not shown") for c in claims) and "| seqkd | 2 |" in text
