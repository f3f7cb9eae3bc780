"""Every registered method trains for real on the tiny default: finite loss, its own metrics logged, a summary."""

from __future__ import annotations

import json
import math

import pytest

from opd.registry import METHODS, load_builtin_components
from opd.train import run

load_builtin_components()
GENERIC_KEYS = {"train/loss", "train/lr", "train/grad_norm", "train/tokens", "train/tokens_per_s", "train/skipped_steps",
                "time/rollout_s", "time/step_s", "rollout/mean_length"}


@pytest.mark.parametrize("name", list(METHODS))
def test_method_runs_end_to_end(compose_cfg, tmp_path, name):
    summary = run(compose_cfg(f"method={name}", "trainer.max_steps=2", "trainer.batch_size=4"))
    assert summary["method"] == name and summary["steps"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert len(train_rows) == 2 and all(math.isfinite(r["train/loss"]) for r in train_rows)
    own = set().union(*(r.keys() for r in train_rows)) - GENERIC_KEYS - {"step"}
    assert own, f"method {name} logs no metric of its own"
