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
import dataclasses
import fcntl
import hashlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from opd.config import ModelConfig, TeacherFinetuneConfig, WarmStartConfig, teacher_config
from opd.errors import ConfigError
from opd.models.lora import is_adapter_directory

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
#: keys that name or place a run but do not change what it trains: left out of the warm start's hash
_UNHASHED = ("name", "output_dir")  # (the staging keys are not in a stage's config at all: _STAGE_KEYS)
#: the staging keys: a stage's own config has none of them (its teacher is already the fine-tuned one)
_STAGE_KEYS = ("warm_start", "teacher_finetune")
_UNHASHED_TRAINER = ("progress", "resume", "eval_batch_size")
#: trainer keys that say how a stage runs, not what it learns: in its hash (as they always were), but a finished stage
#: that differs from the one asked for only in these is found and reused (:func:`_stage_dir`)
_EXECUTION_TRAINER = ("num_threads", "rollout_num_threads")
#: keys added after stage directories existed, by config section -> whether a value means "off": a key that is off is
#: left out of the hash, so directories computed before it existed are found again (not trained twice)
_MODEL_KEYS_OFF = {"add_bos_token": lambda value: value is None, "lora": lambda value: not (value or {}).get("r")}
_OFF_WHEN_ABSENT = {"student": _MODEL_KEYS_OFF, "teacher": _MODEL_KEYS_OFF}
#: the same for keys added to one dataset's config later, by ``data.name`` (the other datasets had them all along)
_DATA_KEYS_OFF = {"gym": {"num_validation": lambda value: not value}}


def warm_start_section(cfg: DictConfig) -> WarmStartConfig | None:
    """The run's ``warm_start`` as a dataclass (range checks run), or None for a one-stage run."""
    node = cfg.get("warm_start")
    return None if node is None else WarmStartConfig(**OmegaConf.to_container(node, resolve=True))


def teacher_finetune_section(cfg: DictConfig) -> TeacherFinetuneConfig | None:
    """The run's ``teacher_finetune`` as a dataclass (range checks run), or None when the teacher is used as given."""
    node = cfg.get("teacher_finetune")
    return None if node is None else TeacherFinetuneConfig(**OmegaConf.to_container(node, resolve=True))


def _stage_config(cfg: DictConfig, section: WarmStartConfig, key: str) -> dict[str, Any]:
    """The run's config (resolved, as a dict) with ``section``'s method, trainer keys and seed, and no stages.

    Raises:
        ConfigError: no ``conf/method/<section.method>.yaml``, or a trainer key the schema lacks.
    """
    method_file = CONF_DIR / "method" / f"{section.method}.yaml"
    if not method_file.is_file():
        known = sorted(p.stem for p in (CONF_DIR / "method").glob("*.yaml"))
        raise ConfigError(f"{key}.method: no method {section.method!r}; known: {', '.join(known)}")
    stage = OmegaConf.to_container(cfg, resolve=True)
    for stage_key in _STAGE_KEYS:
        stage.pop(stage_key, None)
    # a stage trains the whole model: student.lora belongs to the run's own stage, so LoRA arms and full arms of a
    # sweep share one warm start (and, the key being absent, stage directories keep the hashes they had before LoRA)
    if isinstance(stage.get("student"), dict):
        stage["student"].pop("lora", None)
    stage["method"] = {**OmegaConf.to_container(OmegaConf.load(method_file)), **section.method_overrides}
    unknown = set(section.trainer) - set(stage["trainer"])
    if unknown:
        raise ConfigError(f"{key}.trainer: unknown trainer key(s) {sorted(unknown)}; "
                          f"valid: {', '.join(sorted(stage['trainer']))}")
    stage["trainer"].update(section.trainer, resume=None)
    stage["seed"] = section.seed
    return stage


def stage_one_config(cfg: DictConfig) -> DictConfig:
    """The stage-1 config of a two-stage run: the run's, with ``warm_start``'s method, trainer keys and seed.

    Raises:
        ConfigError: no ``conf/method/<warm_start.method>.yaml``, or a trainer key the schema lacks.
    """
    return OmegaConf.create(_stage_config(cfg, warm_start_section(cfg), "warm_start"))


def stage_zero_config(cfg: DictConfig) -> DictConfig:
    """The teacher fine-tuning config: the run's, with the teacher's model (every layer) as the student and
    ``teacher_finetune``'s method, trainer keys and seed.

    Raises:
        ConfigError: the teacher is not a local Hugging Face model (``kind: hf``), or as :func:`stage_one_config`.
    """
    teacher = cfg.get("teacher")
    kind = None if teacher is None else (teacher.get("kind") or "hf")  # no kind: a local Hugging Face model
    if kind != "hf":
        raise ConfigError(f"teacher_finetune: needs a Hugging Face teacher (kind hf) to fine-tune, got "
                          f"{'no teacher' if teacher is None else f'kind {kind!r}'}")
    stage = _stage_config(cfg, teacher_finetune_section(cfg), "teacher_finetune")
    model = teacher_config(cfg.teacher)  # the teacher node as its ModelConfig, with the schema's defaults filled in
    model_keys = {field.name for field in dataclasses.fields(ModelConfig)} - {"lora"}  # the teacher trains in full
    stage["student"] = {**{k: v for k, v in dataclasses.asdict(model).items() if k in model_keys}, "keep_layers": None}
    return OmegaConf.create(stage)


def _stage_content(stage: DictConfig) -> dict[str, Any]:
    """What names a stage: its config without run names, paths and display keys, and without later keys that are off
    (:data:`_OFF_WHEN_ABSENT`)."""
    content = {k: v for k, v in OmegaConf.to_container(stage, resolve=True).items() if k not in _UNHASHED}
    content["trainer"] = {k: v for k, v in content["trainer"].items() if k not in _UNHASHED_TRAINER}
    data = content.get("data")
    sections = {**_OFF_WHEN_ABSENT, "data": _DATA_KEYS_OFF.get(data.get("name"), {}) if isinstance(data, dict) else {}}
    for section, keys in sections.items():  # keys added later, at their "off" value: the hash they had before
        node = content.get(section)
        if isinstance(node, dict):
            for key, is_off in keys.items():
                if key in node and is_off(node[key]):
                    del node[key]
    return content


def _what_it_learns(content: dict[str, Any]) -> dict[str, Any]:
    """``content`` without the trainer keys that say how a stage runs, not what it learns (:data:`_EXECUTION_TRAINER`)."""
    return {**content, "trainer": {k: v for k, v in content["trainer"].items() if k not in _EXECUTION_TRAINER}}


def _stage_dir(cfg: DictConfig, stage: DictConfig, section: WarmStartConfig, folder: str) -> Path:
    """``section.dir``, else ``logs/<name>/<folder>/<method>-<12 hex digits of the stage config's hash>``; when that
    directory does not exist, a finished stage in ``folder`` whose recorded config differs only in how it ran (CPU
    threads) is reused instead of training the same stage again."""
    if section.dir:
        return Path(section.dir).expanduser()
    content = _stage_content(stage)
    digest = hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()[:12]
    root = Path("logs") / str(cfg.name) / folder
    path = root / f"{section.method}-{digest}"
    if not path.exists() and root.is_dir():
        want = _what_it_learns(content)
        for candidate in sorted(root.glob(f"{section.method}-*")):
            recorded = candidate / "resolved_config.yaml"
            if (candidate / "summary.json").is_file() and recorded.is_file() \
                    and _what_it_learns(_stage_content(OmegaConf.load(recorded))) == want:
                print(f"opd-train: {folder}: {candidate} is this stage (run with other CPU threads); reusing it",
                      flush=True)
                return candidate
    return path


def stage_one_dir(cfg: DictConfig, stage: DictConfig) -> Path:
    """``warm_start.dir``, else ``logs/<name>/warm_starts/<method>-<12 hex digits of the stage-1 config's hash>``."""
    return _stage_dir(cfg, stage, warm_start_section(cfg), "warm_starts")


def stage_zero_dir(cfg: DictConfig, stage: DictConfig) -> Path:
    """``teacher_finetune.dir``, else ``logs/<name>/teachers/<method>-<12 hex digits of the stage-0 config's hash>``."""
    return _stage_dir(cfg, stage, teacher_finetune_section(cfg), "teachers")


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


#: trains one run config into a directory and returns its summary (``opd.train.run``; passed in, so that this module,
#: which ``opd.train`` calls, does not import it back)
RunFn = Callable[[DictConfig, Path], dict[str, Any]]


def _train_once(stage: DictConfig, run_dir: Path, key: str, what: str, run: RunFn) -> dict[str, Any]:
    """The summary of the stage run in ``run_dir``, trained now by ``run`` (resuming an interrupted attempt) unless it
    finished.

    Raises:
        ConfigError: the run finished but its final checkpoint was deleted.
    """
    run_dir = run_dir.resolve()  # absolute: later stages may be launched from elsewhere
    with _locked(run_dir.parent / f".{run_dir.name}.lock"):
        summary_file = run_dir / "summary.json"
        if not summary_file.exists():
            print(f"opd-train: {key}: training {what} ({stage.method.name}, {stage.trainer.max_steps} steps) "
                  f"in {run_dir}", flush=True)
            stage.trainer.resume = "auto"
            stage.output_dir = str(run_dir)
            run(stage, run_dir)
        summary = json.loads(summary_file.read_text())
    if not (Path(summary["checkpoint"]) / "config.json").is_file() and not is_adapter_directory(summary["checkpoint"]):
        raise ConfigError(f"{key}: {str(run_dir)!r} finished but its final checkpoint {summary['checkpoint']!r} "
                          f"is gone; delete that directory to train {what} again")
    return summary


def ensure_warm_start(cfg: DictConfig, run: RunFn) -> dict[str, Any]:
    """Stage 1's summary (with ``run_dir`` and the final ``checkpoint``), trained now unless a finished one exists.

    A stage-1 directory with checkpoints but no ``summary.json`` (an interrupted attempt) is resumed from its newest
    valid checkpoint (``trainer.resume=auto``); one whose checkpoint was deleted is refused.
    """
    stage = stage_one_config(cfg)
    summary = _train_once(stage, stage_one_dir(cfg, stage), "warm start", "stage 1", run)
    print(f"opd-train: warm start: stage 2 starts from {summary['checkpoint']} "
          f"(stage-1 accuracy {summary['student_accuracy_after']:.3f})", flush=True)
    return summary


def ensure_teacher_finetune(cfg: DictConfig, run: RunFn) -> dict[str, Any]:
    """The teacher fine-tuning's summary (with its final ``checkpoint``), trained now unless a finished one exists;
    resumed and reused as :func:`ensure_warm_start`."""
    stage = stage_zero_config(cfg)
    summary = _train_once(stage, stage_zero_dir(cfg, stage), "teacher_finetune", "the teacher", run)
    print(f"opd-train: teacher_finetune: the teacher is {summary['checkpoint']} (accuracy "
          f"{summary['student_accuracy_before']:.3f} before fine-tuning, {summary['student_accuracy_after']:.3f} after)",
          flush=True)
    return summary


def with_finetuned_teacher(cfg: DictConfig, teacher_finetune: dict[str, Any]) -> DictConfig:
    """The run's config with the teacher loaded from the fine-tuned checkpoint (and no ``teacher_finetune`` left)."""
    stage = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    stage.teacher.name_or_path = teacher_finetune["checkpoint"]
    stage.teacher_finetune = None
    return stage


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
    Nothing is reused when an evaluation setting, the data or the sampler differs from what stage 1 ran with (its
    recorded ``resolved_config.yaml``: a stage passed by ``warm_start.dir`` may have run with other settings than this
    run's stage config), when stage 1 evaluated no teacher, or on a resumed run.

    Returns:
        whether the evaluation was reused.
    """
    recorded = Path(warm_start.get("run_dir", "")) / "resolved_config.yaml"
    stage = OmegaConf.load(recorded) if warm_start.get("run_dir") and recorded.is_file() else stage_one_config(cfg)
    same = all(stage.trainer.get(key) == cfg.trainer.get(key) for key in _EVALUATION_KEYS) and all(
        OmegaConf.to_container(stage[node], resolve=True) == OmegaConf.to_container(cfg[node], resolve=True)
        for node in ("data", "sampler"))
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
