"""Two-stage runs: a warm start (stage 1, e.g. SeqKD) and then the configured method from its final student (stage 2).

GKD (Agarwal et al. 2024, Sec. 4: students are supervised fine-tuned first), Qwen3's and the Thinking Machines'
on-policy distillation all start from a student that already writes the task's format; a pruned or base student
starts off the teacher's support, where on-policy samples teach little. ``warm_start`` in the run config makes that
one command:

    opd-train experiment=real_opd_protocol method=gkd seed=1   # stage 1 once (or reused), then GKD from it

Stage 1 is the run's config with ``method``, ``trainer`` keys and ``seed`` taken from ``warm_start``; everything
else (teacher, student, data, sampler) is the run's own. Its directory is named by a hash of that config, so every
job of a sweep over stage 2 finds the same one: the first job trains it (resuming a checkpoint left by an interrupted
attempt), the others wait on a file lock and reuse its summary and final checkpoint. Stage 2 then loads the student
from that checkpoint (already pruned, so ``student.keep_layers`` is cleared) and reports stage 1's summary under
``warm_start`` in its own ``summary.json``.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opd.config import WarmStartConfig
from opd.errors import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: keys that name or place a run but do not change what it trains: left out of the warm start's hash
_UNHASHED = ("name", "output_dir", "warm_start")
_UNHASHED_TRAINER = ("progress", "resume", "eval_batch_size")


def warm_start_section(cfg: DictConfig) -> WarmStartConfig | None:
    """The run's ``warm_start`` as a dataclass (range checks run), or None for a one-stage run."""
    node = cfg.get("warm_start")
    return None if node is None else WarmStartConfig(**OmegaConf.to_container(node, resolve=True))


def stage_one_config(cfg: DictConfig) -> DictConfig:
    """The stage-1 config of a two-stage run: the run's, with ``warm_start``'s method, trainer keys and seed.

    Raises:
        ConfigError: no ``conf/method/<warm_start.method>.yaml``, or a trainer key the schema lacks.
    """
    section = warm_start_section(cfg)
    method_file = CONF_DIR / "method" / f"{section.method}.yaml"
    if not method_file.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
        raise ConfigError(f"warm_start.method: no method {section.method!r}; known: {', '.join(known)}")
    stage = OmegaConf.to_container(cfg, resolve=True)
    stage.pop("warm_start")
    stage["method"] = {**OmegaConf.to_container(OmegaConf.load(method_file)), **section.method_overrides}
    unknown = set(section.trainer) - set(stage["trainer"])
    if unknown:
        raise ConfigError(f"warm_start.trainer: unknown trainer key(s) {sorted(unknown)}; "
                          f"valid: {', '.join(sorted(stage['trainer']))}")
    stage["trainer"].update(section.trainer, resume=None)
    stage["seed"] = section.seed
    return OmegaConf.create(stage)


def stage_one_dir(cfg: DictConfig, stage: DictConfig) -> Path:
    """``warm_start.dir``, else ``logs/<name>/warm_starts/<method>-<12 hex digits of the stage-1 config's hash>``."""
    section = warm_start_section(cfg)
    if section.dir:
        return Path(section.dir).expanduser()
    content = {k: v for k, v in OmegaConf.to_container(stage, resolve=True).items() if k not in _UNHASHED}
    content["trainer"] = {k: v for k, v in content["trainer"].items() if k not in _UNHASHED_TRAINER}
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return Path("logs") / str(cfg.name) / "warm_starts" / f"{section.method}-{digest}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` (created): parallel sweep jobs train one warm start, the others wait."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_warm_start(cfg: DictConfig) -> dict[str, Any]:
    """Stage 1's summary (with ``run_dir`` and the final ``checkpoint``), trained now unless a finished one exists.

    A stage-1 directory with checkpoints but no ``summary.json`` (an interrupted attempt) is resumed from its newest
    valid checkpoint (``trainer.resume=auto``); one whose checkpoint was deleted is refused.
    """
    from opd.train import run

    stage = stage_one_config(cfg)
    run_dir = stage_one_dir(cfg, stage).resolve()  # absolute: stage 2 may be launched from elsewhere later
    with _locked(run_dir.parent / f".{run_dir.name}.lock"):
        summary_file = run_dir / "summary.json"
        if not summary_file.exists():
            print(f"opd-train: warm start: training stage 1 ({stage.method.name}, {stage.trainer.max_steps} steps) "
                  f"in {run_dir}", flush=True)
            stage.trainer.resume = "auto"
            stage.output_dir = str(run_dir)
            run(stage, run_dir)
        summary = json.loads(summary_file.read_text())
    if not (Path(summary["checkpoint"]) / "config.json").is_file():
        raise ConfigError(f"warm_start: {str(run_dir)!r} finished but its final checkpoint {summary['checkpoint']!r} "
                          "is gone; delete that directory to train the warm start again")
    print(f"opd-train: warm start: stage 2 starts from {summary['checkpoint']} "
          f"(stage-1 accuracy {summary['student_accuracy_after']:.3f})", flush=True)
    return summary


def stage_two_config(cfg: DictConfig, warm_start: dict[str, Any]) -> DictConfig:
    """The run's config with the student loaded from stage 1's final checkpoint (already pruned: no ``keep_layers``)."""
    stage = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    stage.student.name_or_path = warm_start["checkpoint"]
    stage.student.keep_layers = None
    return stage


#: trainer keys that decide what an evaluation measures: stage 2 reuses stage 1's final evaluation only when they agree
_EVALUATION_KEYS = ("eval_examples", "evaluate_on", "eval_samples", "eval_pass_k", "eval_teacher_kl", "validation_examples")


def reuse_final_evaluation(trainer, cfg: DictConfig, warm_start: dict[str, Any]) -> bool:
    """Give a fresh stage-2 ``trainer`` stage 1's final evaluation as its step-0 one, instead of evaluating again.

    Stage 2 starts from exactly the weights stage 1 evaluated last (its final checkpoint), with the same task, eval
    split, sampler and evaluation settings, so greedy decoding gives the same completions: the teacher's and the
    student's accuracy (and the teacher agreement) are copied, saving three passes over the eval split per sweep job.
    Nothing is reused when an evaluation setting differs, when stage 1 evaluated no teacher, or on a resumed run.

    Returns:
        whether the evaluation was reused.
    """
    stage = stage_one_config(cfg)
    same = all(stage.trainer.get(key) == cfg.trainer.get(key) for key in _EVALUATION_KEYS)
    if (not same or trainer.initial_results or warm_start.get("teacher_accuracy") is None
            or warm_start.get("student_accuracy_after_by_source")):
        return False
    trainer.initial_results = {"teacher_accuracy": warm_start["teacher_accuracy"],
                               "student_accuracy_before": warm_start["student_accuracy_after"]}
    row = {"eval/accuracy": warm_start["student_accuracy_after"],
           "eval/mean_length": warm_start.get("student_mean_length_after"),
           "eval/eos_rate": warm_start.get("student_eos_rate_after"),
           **{f"eval/{key[len('student_'):-len('_after')]}": value for key, value in warm_start.items()
              if key.startswith(("student_teacher_rkl", "student_sampled_", "student_pass@")) and key.endswith("_after")}}
    trainer.logger.log({"eval/teacher_accuracy": warm_start["teacher_accuracy"]}, 0)
    trainer.logger.log({key: value for key, value in row.items() if value is not None}, 0)
    print("opd-train: warm start: step-0 evaluation taken from stage 1's final one (same weights and settings)", flush=True)
    return True
