"""Metric sinks: ``metrics.jsonl`` in the run directory always, Weights & Biases when asked for."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from opd.config import LoggerConfig


class JsonlLogger:
    """Appends one JSON object per logging call (``{"step": ..., "train/loss": ...}``) to ``metrics.jsonl``.

    The file is flushed after every line, so a killed run keeps everything logged before the kill.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def truncate_after(self, step: int) -> None:
        """Drop rows logged after ``step`` (a resumed run trains those steps again)."""
        self._file.close()
        for path in (self.path, self.path.with_name("samples.jsonl")):
            if path.exists():
                rows = path.read_text(encoding="utf-8").splitlines(keepends=True)
                kept = [r for r in rows if r.strip() and _row_step(r) <= step]
                tmp = path.with_suffix(".tmp")
                tmp.write_text("".join(kept), encoding="utf-8")
                tmp.replace(path)
        self._file = self.path.open("a", encoding="utf-8")

    def log_samples(self, samples: list[tuple[str, str, bool]], step: int) -> None:
        path = self.path.with_name("samples.jsonl")
        with path.open("a", encoding="utf-8") as f:
            for prompt, completion, correct in samples:
                f.write(json.dumps({"step": step, "prompt": prompt, "completion": completion, "correct": correct}) + "\n")

    def finish(self, summary: dict[str, Any]) -> None:
        self._file.close()


class NullLogger:
    """What ranks other than 0 log to in a multi-process run: nothing (rank 0 writes every file)."""

    def log(self, metrics: dict[str, Any], step: int) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def log_samples(self, samples: list[tuple[str, str, bool]], step: int) -> None:
        pass

    def finish(self, summary: dict[str, Any]) -> None:
        pass


class WandbLogger(JsonlLogger):
    """Also logs to W&B. Offline mode when no API key is configured; ``WANDB_MODE`` wins if set.

    Runs are grouped by ``logger.group`` (the experiment name by default) so a Hydra sweep's runs
    land in one W&B group, and the run config holds the resolved config (flattened keys such as
    ``method.beta``) so the same comparison can be made in the W&B dashboard.
    """

    def __init__(self, run_dir: Path, cfg: LoggerConfig, run_name: str, group: str, config: dict[str, Any]) -> None:
        super().__init__(run_dir)
        import wandb

        mode = os.environ.get("WANDB_MODE") or cfg.mode or ("online" if _has_wandb_key() else "offline")
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, entity=cfg.entity, group=cfg.group or group, name=run_name,
                              tags=list(cfg.tags), config=config, dir=str(run_dir), mode=mode, reinit="finish_previous")

    def log(self, metrics: dict[str, Any], step: int) -> None:
        super().log(metrics, step)
        self.run.log(metrics, step=step)

    def log_samples(self, samples: list[tuple[str, str, bool]], step: int) -> None:
        super().log_samples(samples, step)
        table = self._wandb.Table(columns=["step", "prompt", "completion", "correct"],
                                  data=[[step, p, c, ok] for p, c, ok in samples])
        self.run.log({"eval/completions": table}, step=step)

    def finish(self, summary: dict[str, Any]) -> None:
        super().finish(summary)
        self.run.summary.update({k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
        self.run.finish()


def _row_step(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (ValueError, AttributeError):
        return 1 << 62  # a half-written last line from a killed run: dropped


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def build_logger(cfg: LoggerConfig, run_dir: Path, run_name: str, group: str, config: dict[str, Any]) -> JsonlLogger:
    """The logger chosen by ``logger.name``."""
    if cfg.name == "wandb":
        return WandbLogger(run_dir, cfg, run_name, group, config)
    return JsonlLogger(run_dir)
