"""Train a student by on-policy distillation.

Usage:
    opd-train                                   # default: GKD (λ=1) on the toy arithmetic task, CPU, offline
    opd-train method=sft trainer.max_steps=50   # any config value from the command line
    opd-train -m method=gkd,sft seed=1,2        # a sweep: one run directory per combination
    opd-train teacher=qwen3-8b student=qwen3-1.7b data=gsm8k trainer.device=cuda   # real models (hub + GPU)
    torchrun --nproc_per_node 8 -m opd.train deepspeed=zero3 ...   # DeepSpeed ZeRO over 8 processes
    python -m opd.train --help                  # config groups, methods and the composed config

Results land in ``logs/<name>/runs/<time>/`` (``summary.json``, ``metrics.jsonl``, ``samples.jsonl``,
``checkpoints/``, ``.hydra/``), or ``logs/<name>/multiruns/<time>/<overrides>/`` for sweeps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from opd import distributed as dist
from opd.config import check_cli_overrides, deepspeed_section, fixed_sections, flatten_config, register_configs, typed_sections
from opd.errors import ConfigError, OPDError, TrainingInterrupted
from opd.registry import DATASETS, METHODS, SAMPLERS, TEACHERS, load_builtin_components
from opd.teachers import build_teacher
from opd.teachers.router import build_router
from opd.tracking.loggers import NullLogger

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")

register_configs()
load_builtin_components()


def build_trainer(cfg: DictConfig, run_dir: str | Path | None = None):
    """Validate ``cfg`` and build every component into a ready :class:`~opd.engine.trainer.Trainer`.

    Everything that can be checked without loading a model is checked first, so config mistakes
    surface in a second, not after the teacher has loaded. Nothing is written into the run directory
    (``resolved_config.yaml``, ``metrics.jsonl``, W&B files) until every check has passed and the
    models have loaded, so a failed start leaves an earlier run's directory exactly as it was.

    Args:
        cfg: the composed run config.
        run_dir: where the run writes; ``cfg.output_dir`` or Hydra's run directory when None.

    Raises:
        ConfigError, ModelLoadError, DataError, TrainingError: a problem the user can fix, in one line.
    """
    from opd.engine.trainer import Trainer
    from opd.tracking.loggers import build_logger

    student_cfg, trainer_cfg, logger_cfg = fixed_sections(cfg)  # the teacher is resolved once, below
    ds_cfg = deepspeed_section(cfg)
    method = METHODS.build(cfg.method, "method")
    teacher = build_teacher(cfg.get("teacher"), method.teacher_kind)  # OPSD fixes its kind: the initial student
    if cfg.get("teachers"):  # several teachers, routed by the data's source
        if method.teacher_kind is not None:
            raise ConfigError(f"teachers: method {cfg.method.name!r} distils from its own teacher ({method.teacher_kind}); "
                              "drop teachers")
        if cfg.get("teacher") is not None:
            raise ConfigError("set either teacher or teachers, not both: add ~teacher (in an experiment: "
                              "`- override /teacher: null`)")
        teacher = build_router(cfg.teachers)
    sampler = SAMPLERS.build(cfg.sampler, "sampler")
    try:  # e.g. policy-gradient methods refuse top-p/top-k truncated sampling
        method.check_sampler(sampler.temperature, sampler.top_p, sampler.top_k)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    DATASETS.validate(cfg.data, "data")
    check_launch(ds_cfg, trainer_cfg.batch_size)
    if trainer_cfg.eval_teacher_kl and ds_cfg.enabled:
        raise ConfigError("trainer.eval_teacher_kl=true runs both whole models in one process; set it false under "
                          "deepspeed (or run the agreement check on the exported student)")
    if ds_cfg.enabled:
        from opd.engine.backends import import_deepspeed

        import_deepspeed()  # a missing install is a one-line error before any model loads
        dist.init_process_group(ds_cfg.backend, ds_cfg.timeout_minutes, single=True)

    hydra_dir = _hydra_output_dir()
    chosen = run_dir or cfg.output_dir or hydra_dir
    if chosen is None:
        raise ConfigError("output_dir: no run directory (outside `opd-train`, set output_dir=...)")
    # over N processes rank 0 decides: the ranks' clocks may have named different Hydra run directories
    run_dir, main_hydra_dir = (Path(p) if p else None for p in dist.broadcast_object((str(chosen), hydra_dir)))
    if hydra_dir and Path(hydra_dir) != main_hydra_dir:
        _remove_hydra_only_dir(Path(hydra_dir))
    resume_from = None
    if trainer_cfg.resume:
        run_dir, resume_from = resolve_resume(trainer_cfg.resume, run_dir)
    if resume_from is None:  # a fresh start, also for trainer.resume=auto without a checkpoint
        check_fresh_run_dir(run_dir, resume_auto=trainer_cfg.resume == "auto")
    task = DATASETS.build(cfg.data, "data")
    trainer = Trainer(method, sampler, task, teacher, student_cfg, trainer_cfg, None, run_dir, seed=cfg.seed,
                      logger_cfg=logger_cfg, deepspeed_cfg=ds_cfg)
    if resume_from is not None:
        trainer.restore(resume_from)

    # Every check passed: from here on the run directory is written (by rank 0 only).
    if not dist.is_main():
        trainer.attach_logger(NullLogger())
        return trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    flat_config = flatten_config(OmegaConf.to_container(cfg, resolve=True))
    trainer.attach_logger(build_logger(logger_cfg, run_dir, run_name=run_dir.name, group=cfg.name, config=flat_config))
    return trainer


def check_launch(ds_cfg, batch_size: int) -> None:
    """A multi-process launch needs DeepSpeed, and the global micro-batch must split evenly over the ranks.

    Raises:
        ConfigError: naming the launcher's world size and what to change.
    """
    from opd.engine.backends import per_rank_batch_size

    world = dist.env_world_size()
    if world > 1 and not ds_cfg.enabled:
        raise ConfigError(f"launched over {world} processes (WORLD_SIZE={world}) but deepspeed=none; add "
                          "deepspeed=zero2 or deepspeed=zero3, or launch a single process")
    per_rank_batch_size(batch_size, world)


def _hydra_output_dir() -> str | None:
    """Hydra's run directory of this job, or None outside ``@hydra.main`` (e.g. ``compose`` in tests)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get().runtime.output_dir if HydraConfig.initialized() else None


def _remove_hydra_only_dir(path: Path) -> None:
    """Drop a directory that holds only Hydra's own files (``.hydra/`` and a job log): one Hydra made
    for a non-zero rank whose clock named another run directory, or one of a run that failed its
    start-up. Parents left empty are dropped too, up to the working directory (never above it)."""
    import shutil

    path, cwd = path.resolve(), Path.cwd().resolve()
    if path == cwd or cwd.is_relative_to(path) or not (path / ".hydra").is_dir():
        return
    if all(p.name == ".hydra" or p.suffix == ".log" for p in path.iterdir()):
        shutil.rmtree(path, ignore_errors=True)
        parent = path.parent
        while parent != cwd and parent.is_relative_to(cwd):
            try:  # another rank may be removing it too
                parent.rmdir()  # only an empty directory
            except OSError:
                break
            parent = parent.parent


def check_fresh_run_dir(run_dir: Path, resume_auto: bool = False) -> None:
    """A fresh run must not write into an earlier run's directory.

    Args:
        run_dir: the directory the new run would write into.
        resume_auto: the fresh start comes from ``trainer.resume=auto`` finding no readable checkpoint.

    Raises:
        ConfigError: if ``run_dir`` is a file, or holds a ``summary.json`` or a non-empty
            ``checkpoints/`` (a finished or checkpointed run), suggesting ``trainer.resume=auto``.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"output_dir: {str(run_dir)!r} is a file, not a directory; choose another output_dir")
    found = [name for name in ("summary.json",) if (run_dir / name).exists()]
    checkpoints = run_dir / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    if found and resume_auto:
        raise ConfigError(f"trainer.resume=auto: {str(run_dir)!r} holds a run ({' and '.join(found)}) but no complete, "
                          "readable checkpoint to continue from; a fresh run there would overwrite its results. "
                          "Choose another output_dir.")
    if found:
        raise ConfigError(f"output_dir: {str(run_dir)!r} already holds a run ({' and '.join(found)}); a fresh run "
                          "there would overwrite its results. Continue it with trainer.resume=auto, or choose another "
                          "output_dir.")


def resolve_resume(resume: str, run_dir: Path) -> tuple[Path, Path | None]:
    """(run directory to write into, checkpoint to restore or None) for ``trainer.resume``.

    "auto" looks in ``run_dir`` (a fixed ``output_dir`` makes a relaunch find it) and starts fresh
    when there is no checkpoint; a path may be a run directory or one of its checkpoints.

    Args:
        resume: ``trainer.resume``: "auto", a run directory or a checkpoint directory.
        run_dir: the run directory the config names (used by "auto").

    Raises:
        ConfigError: if a given path is neither a run nor a checkpoint, or holds no readable checkpoint.
    """
    from opd.engine.checkpoint import COMPLETE_MARKER, latest_valid_checkpoint

    if resume == "auto":
        return run_dir, latest_valid_checkpoint(run_dir)
    path = Path(resume).expanduser()
    if (path / COMPLETE_MARKER).exists():  # a checkpoint directory: .../checkpoints/step_N
        return path.parent.parent, path
    if not path.is_dir():
        raise ConfigError(f"trainer.resume: no run directory or checkpoint at {str(path)!r}")
    checkpoint = latest_valid_checkpoint(path)
    if checkpoint is None:
        raise ConfigError(f"trainer.resume: {str(path)!r} has no complete, readable checkpoint to resume from")
    return path, checkpoint


def run(cfg: DictConfig, run_dir: str | Path | None = None) -> dict[str, Any]:
    """Build the trainer, train, and write ``summary.json`` into the run directory; return the summary. With
    ``teacher_finetune`` or ``warm_start`` set, those stages are trained (or reused) first and this run starts from
    them (:mod:`opd.stages`). A process group of one that the run formed (DeepSpeed without a launcher) is left
    afterwards, also when the run fails."""
    try:
        cfg, stages = with_stages(cfg)
        trainer = build_trainer(cfg, run_dir)
        if "warm_start" in stages:
            from opd.stages import reuse_final_evaluation

            reuse_final_evaluation(trainer, cfg, stages["warm_start"])
        return _fit(trainer, stages)
    finally:
        dist.leave_own_process_group()


def with_stages(cfg: DictConfig) -> tuple[DictConfig, dict[str, dict[str, Any]]]:
    """(the config the final stage runs, {stage key: that stage's summary}) of a staged run; ``(cfg, {})`` without
    ``teacher_finetune`` and ``warm_start``. The teacher is fine-tuned first (stage 0), then the warm start (stage 1)
    distils from it.

    The final stage's own method, sections and data are checked before any stage trains, so a typo costs a second,
    not a warm start.
    """
    from opd import stages

    if cfg.get("warm_start") is None and cfg.get("teacher_finetune") is None:
        return cfg, {}
    stages.warm_start_section(cfg)
    stages.teacher_finetune_section(cfg)
    typed_sections(cfg)
    METHODS.build(cfg.method, "method")
    DATASETS.validate(cfg.data, "data")
    summaries: dict[str, dict[str, Any]] = {}
    if cfg.get("teacher_finetune") is not None:
        stages.stage_zero_config(cfg)  # a teacher it cannot fine-tune fails here, before anything trains
        if cfg.get("warm_start") is not None:
            stages.stage_one_config(cfg)
        summaries["teacher_finetune"] = stages.ensure_teacher_finetune(cfg, run)
        cfg = stages.with_finetuned_teacher(cfg, summaries["teacher_finetune"])
    if cfg.get("warm_start") is not None:
        summaries["warm_start"] = stages.ensure_warm_start(cfg, run)
        cfg = stages.stage_two_config(cfg, summaries["warm_start"])
    return cfg, summaries


def _fit(trainer, stages: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Train a built trainer and write ``summary.json`` into its run directory (with each earlier stage's summary
    under its key, ``teacher_finetune`` / ``warm_start``, in a staged run); return the summary."""
    summary = trainer.fit()
    summary["run_dir"] = str(trainer.run_dir)
    summary["world_size"] = dist.world_size()
    summary.update(stages or {})
    if dist.is_main():
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    trainer.logger.finish(summary)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """A short console table of the run's outcome."""
    def pct(value: float | None) -> str:
        return "n/a" if value is None else f"{100 * value:.1f}%"

    rows = [
        ("method", summary["method"]),
        ("teacher accuracy", pct(summary["teacher_accuracy"])),
        ("student accuracy before", pct(summary["student_accuracy_before"])),
        ("student accuracy after", pct(summary["student_accuracy_after"])),
        ("eval examples", summary["eval_examples"]),
        ("steps", summary["steps"]),
        *([("parameters trained", f"{summary['trainable_parameters']:,} of {summary['parameters']:,} (LoRA)")]
          if summary.get("trainable_parameters") not in (None, summary.get("parameters")) else []),
        ("completion tokens trained", summary["tokens"]),
        ("wall time", f"{summary['wall_time_s']:.1f} s"),
        ("run directory", summary["run_dir"]),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(str(v)) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        try:
            cfg, stages = with_stages(cfg)  # earlier stages first, in a staged run (each in its own directory)
            trainer = build_trainer(cfg)
            if "warm_start" in stages:  # every rank: none evaluates at step 0
                from opd.stages import reuse_final_evaluation

                reuse_final_evaluation(trainer, cfg, stages["warm_start"])
        except OPDError:  # a failed start leaves no run directory (Hydra made one before the checks ran)
            if hydra_dir := _hydra_output_dir():
                _remove_hydra_only_dir(Path(hydra_dir))
            raise
        summary = _fit(trainer, stages)  # past start-up: the run keeps its directories, also if it fails
        if dist.is_main():  # while the group still tells the ranks apart
            print(format_summary(summary))
    except TrainingInterrupted as err:
        print(f"opd-train: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except OPDError as err:
        print(f"opd-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:  # on success and on every failure: the process exits cleanly, a sweep's next job forms its own group
        dist.leave_own_process_group()
    return summary["student_accuracy_after"]


def describe_registries() -> str:
    """One line per registered method, sampler, dataset and teacher kind (``make methods``, ``opd-train --help``)."""
    lines = []
    for registry in (METHODS, SAMPLERS, DATASETS, TEACHERS):
        lines.append(f"{registry.kind}:")
        width = max(len(name) for name in registry)
        lines += [f"  {name:<{width}}  {doc}" for name, doc in registry.describe()]
    return "\n".join(lines)


def main() -> None:
    """Console entry point ``opd-train``: our registry listing before Hydra's own ``--help``."""
    if "--help" in sys.argv[1:] or "-h" in sys.argv[1:]:
        print(__doc__.strip() + "\n\n" + describe_registries() + "\n")
    if "--methods" in sys.argv[1:]:
        print(describe_registries())
        return
    # the `deepspeed` launcher appends --local_rank=N unless given --no_local_rank; Hydra would reject it
    for arg in [a for a in sys.argv[1:] if a.startswith("--local_rank")]:
        sys.argv.remove(arg)
    try:  # a typo in a group option or a key: one line, before Hydra makes a run directory
        check_cli_overrides(sys.argv[1:], CONF_DIR)
    except ConfigError as err:
        print(f"opd-train: error: {err}", file=sys.stderr)
        sys.exit(2)
    _hydra_main()


if __name__ == "__main__":
    main()
