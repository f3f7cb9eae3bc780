"""Self-distillation's precondition on the study's warm student: does each teacher view answer better than the plain
view? A self-teacher can only teach what its own view knows (the OPSD record's lesson: its official message put the
warm student off its format, 19.5 % against 53.5 %). Greedy accuracy, EOS rate, mean length and the first completions
on the 256 held-out problems, in four views; writes precondition.json next to this file.

- plain: the student's own prompt;
- opsd: OPSD's official teacher message (conf/experiment/real_opsd.yaml);
- sdft: SDFT's demonstration view (conf/experiment/real_sdft.yaml);
- sdpo: SDPO's reprompt after the student's own greedy attempt (conf/experiment/real_sdpo.yaml): a right attempt
  becomes the "Correct solution" of the template, a wrong one gets the checker's feedback (with the expected answer),
  as a group whose other sample succeeded or failed would show it.

    python experiments/2026-12-05_self_distillation/precondition.py
"""

import dataclasses
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402

from opd.config import register_configs  # noqa: E402
from opd.methods.common import privileged_prompt  # noqa: E402
from opd.train import build_trainer, with_stages  # noqa: E402


def trainer_for(experiment: str, tmp: str):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={experiment}", "trainer.progress=false", f"output_dir={tmp}"])
    cfg, _ = with_stages(cfg)
    return build_trainer(cfg, tmp)


def described(result) -> dict:
    return {"accuracy": result.accuracy, "eos_rate": result.eos_rate, "mean_length": result.mean_length,
            "completions": [completion for _, completion, _ in result.samples]}


def sdpo_view(method, task, tokenizer, example, attempt: str):
    """The reprompt SDPO's teacher reads after ``attempt`` (a successful sibling's text, or feedback on a failure)."""
    correct = task.score(attempt, example) >= method.success_threshold
    solution = method.solution_template.replace("{attempt}", attempt) if correct else ""
    feedback = "" if correct else method.feedback_template.replace("{feedback}", task.feedback(attempt, example))
    return privileged_prompt(method.reprompt_template, example, {"solution": solution, "feedback": feedback}, tokenizer,
                             method.chat_turn)


if __name__ == "__main__":
    register_configs()
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trainer_for("real_sdpo", tmp)
        examples = trainer.eval_examples
        plain = trainer.evaluate(trainer.student, "plain", examples)
        out["plain"] = described(plain)
        attempts = [completion for _, completion, _ in plain.samples] if len(plain.samples) == len(examples) else None
        if attempts is None:  # the evaluator logs a few samples only: decode the attempts again, greedily
            batch = trainer.sampler.generate(trainer.student, trainer.tokenizer, examples, greedy=True)
            attempts = [trainer.tokenizer.decode(ids[mask.bool()].tolist(), skip_special_tokens=True)
                        for ids, mask in zip(batch.completion_ids, batch.completion_mask)]
        method = trainer.method
        views = [dataclasses.replace(ex, prompt=sdpo_view(method, trainer.task, trainer.tokenizer, ex, attempt))
                 for ex, attempt in zip(examples, attempts)]
        out["sdpo"] = described(trainer.evaluate(trainer.student, "sdpo view", views))
        out["sdpo"]["attempts_correct"] = sum(trainer.task.score(a, ex) >= 1 for a, ex in zip(attempts, examples))
        for name in ("sdft", "opsd"):
            other = trainer_for(f"real_{name}", tmp + name)
            views = [dataclasses.replace(ex, prompt=other.method.render(ex, other.tokenizer)) for ex in examples]
            out[name] = described(other.evaluate(other.student, f"{name} view", views))
            del other
    out["examples"] = len(examples)
    (HERE / "precondition.json").write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v["accuracy"] if isinstance(v, dict) else v for k, v in out.items()}, indent=2))
