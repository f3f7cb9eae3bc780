"""Estimator variance of tm_opd's sampled-token reverse-KL gradient, measured (issue 21, item 4).

A diagnostic, not a training cost. For one fixed batch of P training prompts and the student as it is (the shipped toy
student by default), it draws K = 1, 2, 4, 8, 16 completions per prompt, R times each, and compares on every draw

* tm_opd's gradient (``method=tm_opd``, discount 0): (1/N) Σ_t (log q(y_t) − log p_T(y_t)) ∇log q(y_t), with
* the exact per-token reverse-KL gradient on the *same* sampled prefixes: (1/N) Σ_t ∇ Σ_v q(v|s_t)(log q(v|s_t) −
  log p_T(v|s_t)), the loss of ``method=gkd method.beta=1`` (full vocabulary, token mean over the N completion tokens).

Given the prefix s_t, the tm_opd term's expectation over y_t ~ q(·|s_t) is exactly the exact term's gradient
(Σ_v q ∇log q (log q − log p_T) = Σ_v ∇q (log q − log p_T); the "+1" of ∇ Σ_v q log q sums to ∇ Σ_v q = 0): the two
differ only by the estimator's noise, which is the apples-to-apples check for a discount-0 estimator. The sequence-level
reverse KL, KL(q(y|x)‖p_T(y|x)) = E_y Σ_t KL_t(s_t), has a second gradient term, E Σ_t ∇log q(y_t|s_t)·Σ_{t'>t}
KL_{t'}(s_{t'}) (the future return through the states the student visits), which tm_opd at discount 0 and GKD both
drop; the script measures its size too (future-return column: the exact KLs of later positions as the return).

Per K it reports the mean over the R draws of: the cosine of tm_opd's gradient to the exact one on the same prefixes,
their norm ratio, the cosines of both to the population per-token gradient (E over prefixes, estimated from separate
reference draws), and the share of Σ|A| carried by tokens with advantage A < −5. Deterministic under ``--seed``.

Usage::

    python scripts/estimator_variance.py diagnose --out experiments/2026-12-03_estimator_variance   # ~2 min, 1 thread
    python scripts/estimator_variance.py diagnose --override student.name_or_path=<run>/checkpoints/step_000400
    python scripts/estimator_variance.py train --k 4 --out experiments/2026-12-03_estimator_variance   # 4 arms x 3 seeds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from opd.losses.divergences import masked_reduce, reverse_kl  # noqa: E402
from opd.losses.sampled import discounted_returns, sampled_log_ratio  # noqa: E402
from opd.methods.common import policy_logprobs, teacher_token_logprobs  # noqa: E402
from opd.models.scoring import completion_logits, trim_vocabulary  # noqa: E402
from opd.registry import METHODS  # noqa: E402

KS = (1, 2, 4, 8, 16)
#: advantages below this are the heavy tail the toy audit found (12 % of tokens, 96 % of Σ|A|)
TAIL = -5.0
SEEDS = (0, 1, 2)
#: the exact-distribution reference arm: GKD at β = 1 is the full-vocabulary reverse KL on student samples (λ = 1)
EXACT_ARM = ["method=gkd", "method.beta=1.0"]


# ---------------------------------------------------------------------------------------------- one draw


@dataclasses.dataclass
class Draw:
    """The gradients of one draw of K completions per prompt, flattened over the student's parameters (float64).

    Attributes:
        estimate: tm_opd's gradient.
        exact: the exact per-token reverse-KL gradient on the same prefixes (gkd, β = 1).
        future: the future-return term of the sequence-level reverse-KL gradient on the same prefixes.
        advantages: ``[N]`` tm_opd's per-token advantages A_t = −(log q(y_t) − log p_T(y_t)) on the completion tokens.
    """

    estimate: torch.Tensor
    exact: torch.Tensor
    future: torch.Tensor
    advantages: torch.Tensor


def flat_grad(loss: torch.Tensor, params: Sequence[torch.nn.Parameter]) -> torch.Tensor:
    """``[D]`` float64 gradient of ``loss`` over ``params`` (zeros for a parameter it does not reach)."""
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).double() for g, p in zip(grads, params)])


def draw_gradients(trainer, examples, k: int, seed: int, exact_method) -> Draw:
    """Sample ``k`` completions per example from the trainer's student (``torch.manual_seed(seed)`` first) and return
    the gradients of tm_opd (the trainer's method), of the exact per-token reverse KL and of the future-return term.

    All three are token means over the draw's N completion tokens, as one training step of ``k`` samples per prompt
    would normalise them (``num_tokens`` = N).
    """
    model = trainer.backend.train_model
    torch.manual_seed(seed)
    batch = trainer.sampler.generate(trainer.student, trainer.tokenizer, examples, n=k)
    num_tokens = batch.num_tokens
    student_logits = trim_vocabulary(completion_logits(model, batch), trainer.vocab_size)
    with torch.no_grad():
        teacher_logits = trainer.teacher_logits(batch)
    params = [p for p in model.parameters() if p.requires_grad]
    mask = batch.completion_mask
    estimate = flat_grad(trainer.method.loss(batch, student_logits, teacher_logits, num_tokens).loss, params)
    exact = flat_grad(exact_method.loss(batch, student_logits, teacher_logits, num_tokens).loss, params)
    # sequence-level term: Σ_t ∇log q(y_t|s_t)·Σ_{t'>t} KL_{t'}, the later positions' exact KLs as the return
    logq, logq_old = policy_logprobs(batch, student_logits)
    kl = reverse_kl(student_logits.detach(), teacher_logits)
    returns = discounted_returns(kl, mask, gamma=1.0, include_current=False)
    future = flat_grad(masked_reduce(logq * returns, mask, num_tokens), params)
    logp = teacher_token_logprobs(teacher_logits, batch.completion_ids)
    advantages = -sampled_log_ratio(logq_old, logp)[mask.bool()].double()
    return Draw(estimate, exact, future, advantages)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def tail_share(advantages: torch.Tensor, threshold: float = TAIL) -> tuple[float, float]:
    """(share of Σ|A| carried by tokens with A < ``threshold``, share of tokens with A < ``threshold``)."""
    tail = advantages < threshold
    return float(advantages[tail].abs().sum() / advantages.abs().sum().clamp(min=1e-30)), float(tail.double().mean())


# ---------------------------------------------------------------------------------------------- the measurement


def draw_seed(seed: int, k: int, r: int, reference: bool = False) -> int:
    """A distinct sampling seed per (seed, K, draw); reference draws get their own range."""
    return seed * 1_000_003 + (500_000 if reference else 0) + 1000 * k + r


def measure(trainer, examples, ks: Sequence[int] = KS, draws: int = 8, reference_draws: int = 8,
            reference_k: int = 16, seed: int = 0) -> dict:
    """The table's numbers: per K, means (and sample SDs) over ``draws`` draws; see the module docstring.

    The population per-token gradient ḡ = E_prefixes[exact] (and ḡ_seq = ḡ + E[future]) is the mean over
    ``reference_draws`` separate draws of ``reference_k`` completions per prompt; its reliability is the cosine
    between the means of the two halves of those draws.

    Returns:
        ``{"rows": [{"k": K, ...}, ...], "reference": {...}}``.
    """
    exact_method = METHODS.build({"name": "gkd", "beta": 1.0, "lmbda": 1.0}, "method")
    ref = [draw_gradients(trainer, examples, reference_k, draw_seed(seed, reference_k, r, True), exact_method)
           for r in range(reference_draws)]
    population = torch.stack([d.exact for d in ref]).mean(0)
    future = torch.stack([d.future for d in ref]).mean(0)
    half = reference_draws // 2
    halves = {field: [torch.stack([getattr(d, field) for d in part]).mean(0) for part in (ref[:half], ref[half:])]
              for field in ("exact", "future")} if half else {}

    def split_half(field: str) -> float | None:
        """Cosine between the two halves' means of a reference gradient: how well its mean is known."""
        return cosine(*halves[field]) if halves else None

    def cross(x: str, y: str) -> float:
        """<E x, E y> estimated without the noise's own square: the mean of the two halves' cross inner products."""
        return float(halves[x][0] @ halves[y][1] + halves[x][1] @ halves[y][0]) / 2

    reference = {"draws": reference_draws, "k": reference_k, "samples_per_prompt": reference_draws * reference_k,
                 "split_half_cosine": split_half("exact"), "future_split_half_cosine": split_half("future"),
                 "population_norm": float(population.norm()),
                 "future_to_per_token_norm": float(future.norm() / population.norm()),
                 "cosine_per_token_to_sequence_level": cosine(population, population + future)}
    if halves:  # the same two numbers with the noise of the (noisy) future-term estimate taken out of the squares
        ee, ef, ff = cross("exact", "exact"), cross("exact", "future"), cross("future", "future")
        reference["future_to_per_token_norm_denoised"] = math.sqrt(max(ff, 0.0) / ee)
        reference["cosine_per_token_to_sequence_level_denoised"] = (ee + ef) / math.sqrt(ee * max(ee + 2 * ef + ff, 1e-300))
    rows = []
    for k in ks:
        per_draw = []
        for r in range(draws):
            d = draw_gradients(trainer, examples, k, draw_seed(seed, k, r), exact_method)
            share, frac = tail_share(d.advantages)
            per_draw.append({
                "cos_same_prefixes": cosine(d.estimate, d.exact),
                "norm_ratio": float(d.estimate.norm() / d.exact.norm()),
                "estimate_norm": float(d.estimate.norm()), "exact_norm": float(d.exact.norm()),
                "cos_estimate_to_population": cosine(d.estimate, population),
                "cos_exact_to_population": cosine(d.exact, population),
                "cos_estimate_to_sequence_level": cosine(d.estimate, population + future),
                "tail_abs_share": share, "tail_token_share": frac, "tokens": int(d.advantages.numel()),
                "difference": d.estimate - d.exact})
        diffs = torch.stack([p.pop("difference") for p in per_draw])
        row = {"k": k, "draws": draws, "per_draw": per_draw}
        for key in per_draw[0]:
            values = [p[key] for p in per_draw]
            row[key] = {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else None}
        # unbiasedness: E[estimate − exact | prefixes] = 0, so ‖mean difference‖² ≈ E‖difference‖²/R when unbiased
        row["bias_ratio"] = float(diffs.mean(0).norm() / (diffs.pow(2).sum(1).mean() / draws).sqrt())
        rows.append(row)
    return {"rows": rows, "reference": reference}


def format_markdown(result: dict, setup: dict) -> str:
    """The result as a markdown table with its reading notes."""
    def cell(row: dict, key: str, digits: int = 2, scale: float = 1.0) -> str:
        stat = row[key]
        sd = "" if stat["sd"] is None else f" ± {scale * stat['sd']:.{digits}f}"
        return f"{scale * stat['mean']:.{digits}f}{sd}"

    ref = result["reference"]
    lines = [
        "# tm_opd's gradient estimator vs the exact per-token reverse-KL gradient", "",
        f"Student `{setup['student']}`, teacher `{setup['teacher']}`; {setup['prompts']} training prompts (the first "
        f"batch of seed {setup['seed']}), {setup['draws']} independent draws per K; mean ± SD over draws.", "",
        "| K (samples/prompt) | tokens/draw | cos(tm_opd, exact), same prefixes | ‖tm_opd‖ / ‖exact‖ | "
        "cos(tm_opd, ḡ) | cos(exact, ḡ) | cos(tm_opd, ḡ_seq) | Σ|A| share of A < −5 (%) | tokens with A < −5 (%) | "
        "bias ratio |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['k']} | {row['tokens']['mean']:.0f} | {cell(row, 'cos_same_prefixes')} | "
                     f"{cell(row, 'norm_ratio')} | {cell(row, 'cos_estimate_to_population')} | "
                     f"{cell(row, 'cos_exact_to_population')} | {cell(row, 'cos_estimate_to_sequence_level')} | "
                     f"{cell(row, 'tail_abs_share', 1, 100)} | {cell(row, 'tail_token_share', 1, 100)} | "
                     f"{row['bias_ratio']:.2f} |")
    lines += [
        "",
        "* exact: the full-vocabulary per-token reverse KL (gkd β = 1) on the same sampled prefixes as the tm_opd "
        "estimate: its expectation given the prefixes (discount 0).",
        f"* ḡ: the population per-token gradient E_prefixes[exact], from {ref['draws']} separate draws of K = "
        f"{ref['k']} ({ref['samples_per_prompt']} samples per prompt); split-half cosine "
        f"{ref['split_half_cosine']:.3f}. cos(exact, ḡ) is the exact arm's own prefix noise at that K.",
        f"* ḡ_seq: the sequence-level reverse-KL gradient, ḡ plus the future-return term; ‖future‖/‖ḡ‖ = "
        f"{ref['future_to_per_token_norm']:.2f}, cos(ḡ, ḡ_seq) = {ref['cosine_per_token_to_sequence_level']:.3f}; the "
        f"future term's split-half cosine {ref['future_split_half_cosine']:.3f} (a score-function estimate: noisy); with "
        f"its noise taken out of the squares (cross-half products) ‖future‖/‖ḡ‖ = "
        f"{ref.get('future_to_per_token_norm_denoised', float('nan')):.2f} and cos(ḡ, ḡ_seq) = "
        f"{ref.get('cosine_per_token_to_sequence_level_denoised', float('nan')):.3f}.",
        "* bias ratio: ‖mean over draws of (tm_opd − exact)‖ / sqrt(E‖tm_opd − exact‖² / R); about 1 (and not growing "
        "with R) for an unbiased estimator, ≫ 1 for a biased one.",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- training arms


def training_arms(k: int, prompts: int = 32) -> dict[str, list[str]]:
    """The toy default (400 steps, lr 1e-3) for: tm_opd with one and with ``k`` samples per prompt at equal prompts per
    step (``prompts``; the second samples ``k`` times the tokens), the exact-distribution arm (gkd β = 1), and tm_opd
    with ``k`` samples of ``prompts // k`` prompts, at equal sampled tokens per step."""
    common = ["name=estimator_variance", "trainer.num_threads=1", "trainer.progress=false",
              f"trainer.batch_size={prompts}"]
    return {"tm_opd_k1": [*common, "method=tm_opd"], f"tm_opd_k{k}": [*common, "method=tm_opd", f"sampler.n={k}"],
            "gkd_beta1": [*common, *EXACT_ARM],
            f"tm_opd_k{k}_equal_tokens": [*common, "method=tm_opd", f"sampler.n={k}",
                                          f"trainer.batch_size={max(prompts // k, 1)}"]}


def summarise_training(runs_dir: Path, k: int) -> tuple[dict, str]:
    """Final accuracies per arm (mean ± SD, 95 % CI), the comparisons and the share of tm_opd's gap K closes."""
    from miniature_v2 import finished_runs

    from opd.report import compare_arms, describe

    arms = list(training_arms(k))
    runs = {arm: finished_runs(runs_dir / arm) for arm in arms}
    acc = {arm: [r.summary["student_accuracy_after"] for r in rs] for arm, rs in runs.items()}
    tokens = {arm: [r.summary["tokens"] for r in rs] for arm, rs in runs.items()}
    wall = {arm: [r.summary["wall_time_s"] for r in rs] for arm, rs in runs.items()}
    n_eval = next((r.summary["eval_examples"] for rs in runs.values() for r in rs), None)
    lines = ["| arm | seeds | accuracy after (%) | 95 % CI | completion tokens trained | wall time (s) |",
             "|---|---|---|---|---|---|"]
    out = {"runs_dir": str(runs_dir), "k": k, "eval_examples": n_eval, "arms": {}}
    for arm in arms:
        stat = describe(acc[arm])
        out["arms"][arm] = {"seeds": [r.summary["seed"] for r in runs[arm]], "accuracy": acc[arm], **stat,
                            "tokens": tokens[arm], "wall_time_s": wall[arm]}
        if not acc[arm]:
            continue
        sd = f" ± {100 * stat['std']:.1f}" if stat["std"] is not None else ""
        ci = "n/a" if stat["ci95"] is None else f"[{100 * stat['ci95'][0]:.1f}, {100 * stat['ci95'][1]:.1f}]"
        lines.append(f"| {arm} | {len(acc[arm])} | {100 * stat['mean']:.1f}{sd} | {ci} | "
                     f"{statistics.fmean(tokens[arm]):,.0f} | {statistics.fmean(wall[arm]):.0f} |")
    lines += ["", "| claim | difference (pp) [95 % CI] | verdict |", "|---|---|---|"]
    k_arm = f"tm_opd_k{k}"
    equal = f"tm_opd_k{k}_equal_tokens"
    claims = [(k_arm, "tm_opd_k1", f"tm_opd with K = {k} beats K = 1 (equal prompts per step)"),
              ("gkd_beta1", "tm_opd_k1", "the exact arm beats tm_opd K = 1"),
              ("gkd_beta1", k_arm, f"the exact arm beats tm_opd K = {k}"),
              (equal, "tm_opd_k1", f"tm_opd with K = {k} beats K = 1 (equal sampled tokens per step)")]
    out["comparisons"] = []
    for a, b, text in claims:
        if len(acc[a]) < 2 or len(acc[b]) < 2:
            continue
        c = compare_arms(acc[a], acc[b], paired=False, eval_examples=n_eval)
        out["comparisons"].append({"claim": text, "a": a, "b": b, **dataclasses.asdict(c)})
        lines.append(f"| {text} | {c.interval_text(100)} | {c.verdict_text(100, ' pp')} |")
    out["gap_closed"] = {}
    if acc["gkd_beta1"] and acc["tm_opd_k1"]:
        gap = statistics.fmean(acc["gkd_beta1"]) - statistics.fmean(acc["tm_opd_k1"])
        for arm, what in ((k_arm, "equal prompts per step"), (equal, "equal sampled tokens per step")):
            if not acc[arm] or not gap:
                continue
            closed = (statistics.fmean(acc[arm]) - statistics.fmean(acc["tm_opd_k1"])) / gap
            out["gap_closed"][arm] = closed
            lines.append(f"\nShare of tm_opd's gap to the exact arm closed by {arm} ({what}; ratio of the means): "
                         f"{100 * closed:.0f} %.")
    return out, "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- command line


def compose(overrides: Sequence[str], output_dir: Path):
    """The run config of ``opd-train`` with ``overrides`` (the shipped toy pair by default)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from opd.train import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="train", overrides=[f"output_dir={output_dir}", *overrides])


def diagnose(args: argparse.Namespace) -> dict:
    from opd.train import build_trainer

    overrides = ["method=tm_opd", "trainer.num_threads=1", "trainer.progress=false",
                 f"trainer.batch_size={args.prompts}", f"seed={args.seed}", *args.override]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose(overrides, Path(tmp) / "run")
        trainer = build_trainer(cfg)
        if trainer.loss_path.teacher_output != "logits":
            raise SystemExit(f"estimator_variance needs the teacher's full logits, got loss path {trainer.loss_path}")
        examples = next(trainer.prompts)
        result = measure(trainer, examples, args.ks, args.draws, args.reference_draws, args.reference_k, args.seed)
        trainer.close()
    setup = {"student": cfg.student.name_or_path, "teacher": cfg.teacher.name_or_path, "prompts": len(examples),
             "seed": args.seed, "draws": args.draws, "ks": list(args.ks), "overrides": overrides,
             "kl_coef": cfg.method.kl_coef, "tail_threshold": TAIL}
    table = format_markdown(result, setup)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "estimator_variance.json").write_text(json.dumps({"setup": setup, **result}, indent=2) + "\n")
    (args.out / "estimator_variance.md").write_text(table)
    return result


def train(args: argparse.Namespace) -> None:
    """Run the missing (arm, seed) runs one at a time (``opd-train``, one thread), then summarise every finished one."""
    from miniature_v2 import run_one

    arms = training_arms(args.k)
    runs_dir = args.runs_dir.resolve()
    if not args.analyse_only:
        for arm in args.arms or arms:
            for seed in args.seeds:
                if (runs_dir / arm / f"seed{seed}" / "summary.json").exists():
                    continue
                _, _, code, seconds = run_one(arm, arms[arm], seed, runs_dir)
                print(f"{arm} seed {seed}: exit {code}, {seconds:.0f} s", flush=True)
    out, table = summarise_training(runs_dir, args.k)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "training.json").write_text(json.dumps(out, indent=2) + "\n")
    (args.out / "training.md").write_text(table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("diagnose", help="the gradient comparison on one batch (no training)")
    d.add_argument("--prompts", type=int, default=32, help="P, prompts in the fixed batch")
    d.add_argument("--ks", type=int, nargs="+", default=list(KS), help="samples per prompt to measure")
    d.add_argument("--draws", type=int, default=8, help="R, independent draws per K")
    d.add_argument("--reference-draws", type=int, default=8, help="draws behind the population gradient")
    d.add_argument("--reference-k", type=int, default=16, help="samples per prompt in each reference draw")
    d.add_argument("--seed", type=int, default=0, help="prompt batch (the run's first) and sampling seeds")
    d.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. student.name_or_path=<checkpoint>")
    d.add_argument("--out", type=Path, default=ROOT / "logs" / "estimator_variance" / "diagnostic")
    t = sub.add_parser("train", help="the toy runs: tm_opd K = 1, tm_opd K = --k (equal prompts, equal tokens), gkd β = 1")
    t.add_argument("--k", type=int, required=True, help="samples per prompt of the second tm_opd arm")
    t.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    t.add_argument("--arms", nargs="+", default=None, help="run only these arms (the summary reads all)")
    t.add_argument("--runs-dir", type=Path, default=ROOT / "logs" / "estimator_variance" / "train")
    t.add_argument("--analyse-only", action="store_true")
    t.add_argument("--out", type=Path, default=ROOT / "logs" / "estimator_variance" / "train")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    diagnose(args) if args.command == "diagnose" else train(args)


if __name__ == "__main__":
    main()
