"""The best constant answer on each candidate task's held-out problems (the ones candidates.json scores: the first
128 of the experiment's eval split), and the task's verifier applied to it: a model that always gives that answer
scores this much.

    .venv/bin/python experiments/2026-12-04_cross_tokenizer/constant_baseline.py > constant_baseline.json
"""
import json
import sys
from collections import Counter
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
from cross_tokenizer_candidates import CANDIDATES  # noqa: E402

from opd.config import register_configs  # noqa: E402
from opd.registry import DATASETS, load_builtin_components  # noqa: E402

register_configs()
load_builtin_components()
out = {}
for experiment, what in CANDIDATES.items():
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}"])
    task = DATASETS.build(cfg.data, "data")
    held_out = task.eval[:128]
    answer, _ = Counter(ex.answer for ex in held_out).most_common(1)[0]
    out[experiment] = {"task": what, "held_out": len(held_out), "most_frequent_answer": answer,
                       "constant_answer_accuracy": sum(task.is_correct(answer, ex) for ex in held_out) / len(held_out),
                       "distinct_answers": len({ex.answer for ex in held_out})}
print(json.dumps(out, indent=1))
