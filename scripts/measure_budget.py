"""How long are the teacher's answers on the study task? The completion budget (``sampler.max_new_tokens``) is set from it.

    python scripts/measure_budget.py [--experiment real_opd_protocol] [--num-prompts 256] [--cap 256] [--out budget.json]

The teacher (the fine-tuned checkpoint when the experiment sets ``teacher_finetune``; trained first if it is not
there yet) answers ``--num-prompts`` training prompts of the experiment's task through the chat template, greedily
and by sampling at the experiment's sampler temperature, with a cap far above any answer it finishes. The script
prints the length percentiles, the EOS rate and the accuracy of both, and the budget it recommends: the greedy
95th percentile rounded up to a multiple of 16 (a sampled completion that never stops has no percentile to meet;
the EOS rate says how many there are). The evaluation and the rollouts of a run then use that budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.config import register_configs  # noqa: E402
from opd.data.chat import apply_chat_template  # noqa: E402
from opd.models.loading import load_model, load_tokenizer  # noqa: E402
from opd.registry import DATASETS, load_builtin_components  # noqa: E402
from opd.sampling.base import eos_token_ids, unfinished_rows  # noqa: E402
from opd.sampling.hf import HFSampler  # noqa: E402
from opd.teachers import teacher_config  # noqa: E402


@torch.no_grad()
def completion_lengths(model, tokenizer, task, examples, max_new_tokens: int, greedy: bool, temperature: float,
                       batch_size: int = 32) -> dict:
    """Lengths (EOS included), EOS rate and accuracy of one completion per example."""
    sampler = HFSampler(max_new_tokens=max_new_tokens, temperature=temperature)
    eos = eos_token_ids(tokenizer, model)
    lengths, finished, correct = [], 0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        rollout = sampler.generate(model, tokenizer, chunk, greedy=greedy)
        texts = tokenizer.batch_decode(rollout.completion_ids, skip_special_tokens=True)
        lengths += [int(n) for n in rollout.completion_mask.sum(dim=1).tolist()]
        finished += int((~unfinished_rows(rollout, eos)).sum())
        correct += sum(task.is_correct(text, example) for text, example in zip(texts, chunk))
    return {"eos_rate": finished / len(examples), "accuracy": correct / len(examples),
            "mean_length": float(np.mean(lengths)),
            **{f"p{q}": float(np.percentile(lengths, q)) for q in (50, 90, 95, 99)}, "max": max(lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="real_opd_protocol", help="conf/experiment/<name>.yaml")
    parser.add_argument("--num-prompts", type=int, default=256, help="training prompts answered")
    parser.add_argument("--cap", type=int, default=256, help="length cap of the measurement (far above the answers)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the measurement as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    register_configs()
    load_builtin_components()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={args.experiment}"])
    if cfg.get("teacher_finetune") is not None:  # the teacher the runs use: the fine-tuned checkpoint (trained once)
        from opd import stages
        from opd.train import run

        tuned = stages.ensure_teacher_finetune(cfg, run)
        cfg = stages.with_finetuned_teacher(cfg, tuned)
    teacher_cfg = teacher_config(cfg.teacher)
    tokenizer = load_tokenizer(teacher_cfg, "teacher")
    teacher = load_model(teacher_cfg, "teacher", torch.device("cpu")).eval()
    task = DATASETS.build(cfg.data, "data")
    apply_chat_template(task, tokenizer)
    prompts = task.train[: args.num_prompts]
    result = {"experiment": args.experiment, "teacher": str(cfg.teacher.name_or_path), "num_prompts": len(prompts),
              "cap": args.cap,
              "greedy": completion_lengths(teacher, tokenizer, task, prompts, args.cap, True, 1.0),
              "sampled": completion_lengths(teacher, tokenizer, task, prompts, args.cap, False,
                                            float(cfg.sampler.temperature)),
              "sampler_temperature": float(cfg.sampler.temperature)}
    result["recommended_max_new_tokens"] = 16 * math.ceil(result["greedy"]["p95"] / 16)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
