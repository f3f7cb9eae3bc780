"""The best constant answer on the study's held-out split (no model needed): the accuracy of always giving the answer
that is most frequent among the 256 held-out problems themselves (an upper bound for any constant guess).

    .venv/bin/python experiments/2026-12-03_real_opd_finetuned_teacher/trivial_baseline.py > trivial_baseline.json

The split is built as the study builds it (conf/experiment/real_opd_finetuned_teacher.yaml: 4000 training problems,
then 256 unseen ones).
"""
import json
from collections import Counter

from opd.data.gym import GymTask

CONFIG = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
task = GymTask("chain_sum", CONFIG, num_train=4000, num_eval=256, instruction="")
counts = Counter(example.answer for example in task.eval)
answer, hits = counts.most_common(1)[0]
print(json.dumps({"dataset": "chain_sum", "config": CONFIG, "num_train": len(task.train), "num_eval": len(task.eval),
                  "distinct_answers": len(counts), "most_frequent_answer": answer,
                  "constant_answer_accuracy": hits / len(task.eval)}, indent=2))
