"""The accuracy of always giving the most frequent answer, on each candidate task's held-out split (no model needed).

    .venv/bin/python experiments/2026-12-03_real_opd_protocol/trivial_baselines.py

A teacher is only competent on a task if it beats this constant guess; the held-out splits are built as the study builds
them (num_train training problems first, then unseen ones), so the numbers compare with heldout_teacher_output.jsonl.
"""
import json
from collections import Counter

from opd.data.gym import GymTask

CANDIDATES = [
    ("letter_counting", {"min_words": 3, "max_words": 5}, 2000, 256),
    ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 30}, 500, 64),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, 1000, 64),
    ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}, 1000, 64),
    ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, 1000, 64),
    ("products", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}, 1000, 64),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ("+", "-")},
     1000, 64),
]
for dataset, config, num_train, num_eval in CANDIDATES:
    task = GymTask(dataset, config, num_train=num_train, num_eval=num_eval, instruction="")
    counts = Counter(example.answer for example in task.eval)
    answer, hits = counts.most_common(1)[0]
    print(json.dumps({"dataset": dataset, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
                      "num_train": num_train, "num_eval": len(task.eval), "most_frequent_answer": answer,
                      "constant_answer_accuracy": hits / len(task.eval)}))
