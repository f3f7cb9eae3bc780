"""Check that EOPD's and REOPOLD's ``clip_eps`` cannot change a run with one update per fresh rollout batch.

Their loss is the PPO form max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)) with ρ = q_θ(y)/q_old(y)
(``opd.losses.sampled.policy_gradient_loss``). With the HF sampler a batch carries no sampler log-probs, so q_old
is the student's own logits of this forward pass, detached (``opd.methods.common.behaviour_logprobs``): ρ is exactly 1,
clip(1, 1 − ε, 1 + ε) = 1 for every ε, and loss and gradient do not depend on ε. This script trains the toy student
a few steps of the miniature table's tuned EOPD and REOPOLD at several ε (and unclipped) from the same seed, and checks
that every step's loss and gradient norm, and the final weights, are bitwise equal. As a control that the check can
see a difference, one more run changes the learning rate by 0.2 % (the gap between tuning trials 4 and 5) instead.
The experiment record (experiments/2026-11-30_miniature_v2) cites it.

Usage::

    python scripts/check_clip_eps.py              # eopd and reopold, 3 steps, ε in {0.05, 0.5, null}
    python scripts/check_clip_eps.py --steps 5 --methods eopd
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.config import register_configs  # noqa: E402
from opd.train import build_trainer  # noqa: E402

CLIP_VALUES = ("0.05", "0.5", "null")


def trajectory(method: str, steps: int, *extra: str) -> tuple[list[tuple[float, float]], str]:
    """(per step: train/loss and train/grad_norm; a digest of the final student weights) of a short tuned run with
    the ``extra`` overrides."""
    overrides = ["experiment=miniature_v2", f"tuned/toy={method}", "seed=0", "trainer.progress=false",
                 "trainer.num_threads=1", *extra]
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"), tempfile.TemporaryDirectory() as tmp:
        trainer = build_trainer(compose("train", overrides=[*overrides, f"output_dir={tmp}"]), tmp)
        metrics = [trainer.train_step() for _ in range(steps)]
        digest = hashlib.sha256()
        for tensor in trainer.student.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return [(m["train/loss"], m["train/grad_norm"]) for m in metrics], digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["eopd", "reopold"])
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    register_configs()
    same = True
    for method in args.methods:
        runs = {f"clip_eps={clip}": trajectory(method, args.steps, f"method.clip_eps={clip}") for clip in CLIP_VALUES}
        lr = compose_lr(method) * 1.002
        control = trajectory(method, args.steps, f"trainer.lr={lr!r}")
        for name, (per_step, digest) in [*runs.items(), (f"control trainer.lr={lr:.6g}", control)]:
            losses = ", ".join(f"{loss!r}/{norm!r}" for loss, norm in per_step)
            print(f"{method} {name}: loss/grad_norm per step {losses}; weights {digest}")
        equal = len({repr(run) for run in runs.values()}) == 1
        seen = control[1] != next(iter(runs.values()))[1]
        same &= equal and seen
        print(f"{method}: {'bitwise identical' if equal else 'DIFFERENT'} across clip_eps {', '.join(CLIP_VALUES)}; "
              f"the 0.2 % learning-rate control {'changes the weights' if seen else 'does NOT change the weights'}")
    return 0 if same else 1


def compose_lr(method: str) -> float:
    """The tuned learning rate of ``method`` (``conf/tuned/toy/<method>.yaml``)."""
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return float(compose("train", overrides=["experiment=miniature_v2", f"tuned/toy={method}"]).trainer.lr)


if __name__ == "__main__":
    sys.exit(main())
