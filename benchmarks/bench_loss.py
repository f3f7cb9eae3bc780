"""Chunked vs full-logits generalized JSD (forward + backward): time and peak memory, side by side.

    python benchmarks/bench_loss.py            # the default sizes (about 5 minutes on 2 CPU cores)
    python benchmarks/bench_loss.py --full     # also 4k / 8k tokens at V = 152k (much longer)
    python benchmarks/bench_loss.py --quick    # tiny sizes, seconds (plumbing check)
    python benchmarks/bench_loss.py --real --trl-venv .venv-trl   # SmolLM2's V = 49,152, H = 576, real lengths (~3 min)

What is measured: GKD's loss, ``masked_reduce(generalized_jsd(h_S @ W_S.T, h_T @ W_T.T, beta=0.5), mask, N)``,
then ``backward()`` to the student hidden states and (untied) head weight; the teacher side has no
gradient. Variants:

* ``plain``: the full ``[N, V]`` logits of both models, as the trainer computes them today;
* ``chunked``: ``opd.losses.chunked.chunked_divergence_loss`` (gradients formed in forward, per chunk);
* ``checkpoint``: the same chunks with ``torch.utils.checkpoint`` (logits recomputed in backward);
* ``trl``: TRL's ``GKDTrainer.generalized_jsd_loss`` on full logits, when ``trl`` is importable;
* ``trl_chunked``: the chunked loss of TRL's ``DistillationTrainer`` (``trl.trainer.distillation_trainer.
  _chunked_divergence_loss``: ``[4096, 32768]`` tiles, gradients in a custom autograd function), when the
  installed trl has it (trl >= 1.16).

``--real`` (issue 12) measures SmolLM2-135M's sizes: vocabulary 49,152 and hidden size 576 for both models,
at N = 256 (the real experiment's step: 8 prompts x 32 new tokens), 2,048 (8 x 256) and 16,384 (32 x 512)
completion tokens; chunk = ``auto_chunk_size(49152)`` (what the trainer picks). A second table compares opd's
chunked loss with both TRL losses directly. ``--trl-venv DIR`` imports trl from another virtual environment
(appended to ``sys.path`` in every worker), so torch and opd are the project venv's.

Each (size, variant) runs in a fresh Python process, which allocates the inputs, reads its resident
memory (the baseline), resets the peak counter, runs one forward + backward, and reports the time and
the peak resident memory above the baseline (``VmHWM - baseline``). The variants of one size run
one after the other in this same invocation (alternating order between sizes), and the ratios are
chunked / plain of those measurements. Before a size is run, the plain path's memory is predicted
from a small calibration run; sizes that would exceed the memory budget are skipped and reported
with the memory they would need.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    GIB,
    add_site_packages,
    markdown_table,
    median,
    mem_available_bytes,
    peak_rss_bytes,
    print_machine,
    rss_bytes,
    run_worker,
)

V32, V152 = 32768, 151936  # Llama-2-ish and Qwen2/3 vocabularies
V49, H576 = 49152, 576  # SmolLM2-135M (--real): vocabulary and hidden size (teacher and pruned student alike)
TRL_TILE_TOKENS, TRL_TILE_VOCAB = 4096, 32768  # trl 1.16 kernels/chunked_divergence.py tile (for the memory prediction)
BETA = 0.5


# ----------------------------------------------------------------------------- the variants
def make_inputs(tokens: int, vocab: int, hidden: int, seed: int = 0):
    """Student hidden [N, H] and head [V, H] (with grad), teacher hidden and head (no grad), all-ones mask."""
    import torch

    g = torch.Generator().manual_seed(seed)
    scale = hidden ** -0.5  # logits of a realistic spread (std ~1-2)
    s_hidden = torch.randn(tokens, hidden, generator=g).requires_grad_(True)
    s_weight = torch.randn(vocab, hidden, generator=g).mul_(scale * 1.5).requires_grad_(True)
    t_hidden = torch.randn(tokens, hidden, generator=g)
    t_weight = torch.randn(vocab, hidden, generator=g).mul_(scale * 2.0)
    mask = torch.ones(tokens)
    return s_hidden, s_weight, t_hidden, t_weight, mask


def plain_loss(s_hidden, s_weight, t_hidden, t_weight, mask, chunk_size):
    import torch

    from opd.losses.divergences import generalized_jsd, masked_reduce

    student_logits = s_hidden @ s_weight.T
    with torch.no_grad():
        teacher_logits = t_hidden @ t_weight.T
    return masked_reduce(generalized_jsd(student_logits, teacher_logits, beta=BETA), mask, mask.numel())


def chunked_loss(s_hidden, s_weight, t_hidden, t_weight, mask, chunk_size):
    from opd.losses.chunked import chunked_divergence_loss
    from opd.losses.divergences import generalized_jsd

    return chunked_divergence_loss(s_hidden, s_weight, t_hidden, t_weight, mask, generalized_jsd, mask.numel(),
                                   chunk_size=chunk_size, beta=BETA)


def _checkpoint_chunk(h, weight, t_h, t_weight, m):
    import torch

    from opd.losses.divergences import generalized_jsd

    with torch.no_grad():
        teacher_logits = t_h @ t_weight.T
    return (generalized_jsd(h @ weight.T, teacher_logits, beta=BETA) * m).sum()


def checkpoint_loss(s_hidden, s_weight, t_hidden, t_weight, mask, chunk_size):
    """The alternative design: each chunk under ``torch.utils.checkpoint`` (its logits recomputed in backward)."""
    from torch.utils.checkpoint import checkpoint

    from opd.losses.chunked import auto_chunk_size

    chunk_size = chunk_size or auto_chunk_size(s_weight.shape[0])
    total = 0.0
    for start in range(0, mask.numel(), chunk_size):
        sl = slice(start, start + chunk_size)
        total = total + checkpoint(_checkpoint_chunk, s_hidden[sl], s_weight, t_hidden[sl], t_weight, mask[sl],
                                   use_reentrant=False)
    return total / max(mask.numel(), 1)


def trl_loss(s_hidden, s_weight, t_hidden, t_weight, mask, chunk_size):
    """TRL's static GKD loss on full logits (summed over tokens, divided by N like the others)."""
    import torch

    try:  # trl >= 1.x keeps GKD under trl.experimental
        from trl.experimental.gkd import GKDTrainer
    except ImportError:
        from trl import GKDTrainer

    student_logits = s_hidden @ s_weight.T
    with torch.no_grad():
        teacher_logits = t_hidden @ t_weight.T
    total = GKDTrainer.generalized_jsd_loss(student_logits[None], teacher_logits[None], beta=BETA, reduction="sum")
    return total / mask.numel()


def trl_chunked_loss(s_hidden, s_weight, t_hidden, t_weight, mask, chunk_size):
    """TRL DistillationTrainer's chunked generalized JSD (sum over tokens / N, as the others; its own tiles)."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    loss, _, _ = _chunked_divergence_loss(s_hidden[None], t_hidden[None], s_weight, t_weight, mask[None], BETA,
                                          num_items_in_batch=mask.numel())
    return loss


def has_trl_chunked() -> bool:
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
    except ImportError:
        return False
    return True


VARIANTS = {"plain": plain_loss, "chunked": chunked_loss, "checkpoint": checkpoint_loss, "trl": trl_loss,
            "trl_chunked": trl_chunked_loss}


def worker(payload: dict) -> dict:
    """One forward + backward of one variant at one size, in this (fresh) process."""
    import torch

    torch.set_num_threads(payload["threads"])
    if payload.get("trl_venv"):
        add_site_packages(Path(payload["trl_venv"]))
    fn = VARIANTS[payload["variant"]]
    # warm up kernels and thread pools on a tiny problem, so the measured run pays no one-time costs
    small = make_inputs(16, 512, 64, seed=1)
    fn(*small, 8).backward()
    del small
    inputs = make_inputs(payload["tokens"], payload["vocab"], payload["hidden"])
    gc.collect()
    baseline = rss_bytes()
    reset = _reset_peak_rss()
    started = time.perf_counter()
    loss = fn(*inputs, payload["chunk"])
    loss.backward()
    elapsed = time.perf_counter() - started
    peak = peak_rss_bytes()
    s_hidden, s_weight = inputs[0], inputs[1]
    return {"time_s": elapsed, "peak_extra_bytes": peak - baseline, "baseline_bytes": baseline, "peak_reset": reset,
            "loss": loss.item(), "grad_w_norm": s_weight.grad.norm().item(), "grad_h_norm": s_hidden.grad.norm().item()}


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak of input allocation does not count."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ----------------------------------------------------------------------------- the driver
def sanity_check() -> str:
    """Chunked and checkpointed gradients equal the plain ones on a small problem (in this process)."""

    results = {}
    for name in ("plain", "chunked", "checkpoint"):
        inputs = make_inputs(50, 301, 16, seed=3)
        loss = VARIANTS[name](*inputs, 7)
        loss.backward()
        results[name] = (loss.detach(), inputs[0].grad, inputs[1].grad)
    diffs = {name: max((a - b).abs().max().item() for a, b in zip(results[name], results["plain"]))
             for name in ("chunked", "checkpoint")}
    return ", ".join(f"{k} vs plain max |Δ| = {v:.1e}" for k, v in diffs.items())


def calibrate(threads: int) -> tuple[float, dict]:
    """Bytes of plain-path peak per logit element (N·V), from a small run: peak ≈ a·N·V + 4·V·H (the weight gradient)."""
    payload = {"variant": "plain", "tokens": 256, "vocab": V32, "hidden": 256, "chunk": 0, "threads": threads}
    out = run_worker(Path(__file__), payload, threads)
    if "error" in out:
        raise SystemExit(f"calibration failed: {out['error']}")
    per_element = (out["peak_extra_bytes"] - 4 * V32 * 256) / (256 * V32)
    return per_element, out


def predicted_bytes(variant: str, tokens: int, vocab: int, hidden: int, chunk: int, per_element: float) -> float:
    if variant == "trl_chunked":  # its float32 tiles
        return per_element * min(TRL_TILE_TOKENS, tokens) * min(TRL_TILE_VOCAB, vocab) + 4 * vocab * hidden + 8 * tokens * hidden
    rows = tokens if variant in ("plain", "trl") else min(chunk, tokens)
    # grad of W (float32) + grad of h + the rows of logits being worked on
    return per_element * rows * vocab + 4 * vocab * hidden + 8 * tokens * hidden


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help="torch threads in every measurement")
    p.add_argument("--full", action="store_true",
                   help="also 4k and 8k tokens at V = 152k (chunked only where plain does not fit)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (plumbing check, seconds)")
    p.add_argument("--max-gib", type=float, default=12.0,
                   help="memory budget per measurement: sizes predicted to need more are skipped "
                        "(the machine is shared; the effective budget is also capped at 70%% of MemAvailable)")
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M's V = 49,152 and H = 576 at 256, 2,048 and 16,384 tokens, opd vs TRL's losses")
    p.add_argument("--trl-venv", type=Path, help="import trl from this virtual environment (e.g. .venv-trl)")
    p.add_argument("--json", type=Path, help="also write the raw measurements here")
    args = p.parse_args(argv)
    if args.trl_venv is not None and add_site_packages(args.trl_venv) is None:
        raise SystemExit(f"--trl-venv {args.trl_venv}: no lib/python*/site-packages there (make bench-trl creates .venv-trl)")
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return

    from opd.losses.chunked import auto_chunk_size

    print("# bench_loss: chunked vs full-logits generalized JSD (β = 0.5), forward + backward\n")
    print_machine(args.threads)
    available = mem_available_bytes()
    budget = min(args.max_gib * GIB, 0.7 * available) if available else args.max_gib * GIB
    print(f"memory budget per measurement: {budget / GIB:.1f} GiB\n")
    print(f"sanity (N=50, V=301, chunk 7): {sanity_check()}")
    trl_available = importlib.util.find_spec("trl") is not None
    print("trl importable: comparing with TRL's generalized_jsd_loss" if trl_available else "trl not installed; skipped")
    trl_chunked = trl_available and has_trl_chunked()
    if trl_available:
        print("and with TRL DistillationTrainer's chunked loss" if trl_chunked
              else "the installed trl has no DistillationTrainer chunked loss (trl < 1.16): trl_chunked skipped")

    if args.real:
        sizes = [(V49 // 16, 128, H576 // 4, 32)] if args.quick else [(V49, n, H576, None) for n in (256, 2048, 16384)]
    elif args.quick:
        sizes = [(V32 // 8, 256, 128, 64), (V152 // 8, 256, 128, 32)]
    else:
        sizes = [(V32, 1024, 1024, 256), (V32, 2048, 2048, 256), (V152, 1024, 1024, None), (V152, 2048, 1024, None)]
        if args.full:
            sizes += [(V152, 4096, 1024, None), (V152, 8192, 2048, None)]
    per_element, calibration = calibrate(args.threads)
    print(f"calibration (plain, N=256, V={V32}, H=256): {calibration['peak_extra_bytes'] / GIB:.2f} GiB peak above "
          f"baseline -> {per_element:.1f} bytes per logit element (N·V)\n", flush=True)

    rows, raw, by_size = [], [], []
    for i, (vocab, tokens, hidden, chunk) in enumerate(sizes):
        chunk = chunk or auto_chunk_size(vocab)
        variants = ["plain", "chunked"] + (["checkpoint"] if vocab == V152 and tokens == 1024 or args.quick else []) \
            + (["trl"] if trl_available else []) + (["trl_chunked"] if trl_chunked and args.real else [])
        if i % 2:
            variants.reverse()
        result = {}
        for variant in variants:
            need = predicted_bytes(variant, tokens, vocab, hidden, chunk, per_element)
            label = f"V={vocab} N={tokens} H={hidden} {variant}"
            if need > budget:
                result[variant] = {"skipped": f"skipped: would need {need / GIB:.1f} GiB"}
                print(f"{label}: {result[variant]['skipped']} (budget {budget / GIB:.1f} GiB)", flush=True)
                continue
            payload = {"variant": variant, "tokens": tokens, "vocab": vocab, "hidden": hidden, "chunk": chunk,
                       "threads": args.threads, "trl_venv": str(args.trl_venv.resolve()) if args.trl_venv else None}
            out = run_worker(Path(__file__), payload, args.threads)
            out["predicted_bytes"] = need
            result[variant] = out
            raw.append({**payload, **out})
            if "error" in out:
                print(f"{label}: {out['error']}", flush=True)
            else:
                print(f"{label}: {out['time_s']:.2f} s, peak +{out['peak_extra_bytes'] / GIB:.2f} GiB "
                      f"(predicted {need / GIB:.2f}), loss {out['loss']:.6f}, |grad W| {out['grad_w_norm']:.6e}",
                      flush=True)
        base = result.get("plain", {})
        by_size.append((vocab, tokens, hidden, chunk, result))
        for variant in [v for v in ("chunked", "checkpoint", "trl", "trl_chunked") if v in result]:
            out = result[variant]
            row = [vocab, tokens, hidden, variant, chunk if variant in ("chunked", "checkpoint") else "-"]
            if "skipped" in out or "error" in out:
                rows.append(row + [out.get("skipped") or out.get("error"), "", "", "", "", ""])
                continue
            mem, sec = out["peak_extra_bytes"] / GIB, out["time_s"]
            if "time_s" in base:
                rows.append(row + [f"{base['peak_extra_bytes'] / GIB:.2f}", f"{mem:.2f}",
                                   f"{out['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}",
                                   f"{base['time_s']:.1f} / {sec:.1f}", f"{sec / base['time_s']:.2f}",
                                   f"{abs(out['loss'] - base['loss']):.1e}"])
            else:
                rows.append(row + [base.get("skipped") or base.get("error", "not run"), f"{mem:.2f}", "-",
                                   f"- / {sec:.1f}", "-", "-"])

    header = ["V", "N tokens", "H", "variant", "chunk", "plain peak GiB", "variant peak GiB", "memory ratio",
              "time plain / variant (s)", "time ratio", "|Δloss|"]
    print("\n## Results (ratios = variant / plain, measured in this run)\n")
    print(markdown_table(header, rows))
    speed = [r for r in rows if r[3] == "chunked" and r[9] not in ("", "-")]
    if speed:
        print(f"\nmedian chunked time ratio: {median([float(r[9]) for r in speed]):.2f}")
    versus = []  # opd's chunked loss against each TRL loss measured at the same size
    for vocab, tokens, hidden, _, result in by_size:
        ours = result.get("chunked", {})
        for variant in ("trl", "trl_chunked"):
            theirs = result.get(variant, {})
            if "time_s" in ours and "time_s" in theirs:
                mine, other = ours["peak_extra_bytes"], theirs["peak_extra_bytes"]
                versus.append([vocab, tokens, hidden, variant, f"{mine / GIB:.2f} / {other / GIB:.2f}", f"{mine / other:.2f}",
                               f"{ours['time_s']:.2f} / {theirs['time_s']:.2f}", f"{ours['time_s'] / theirs['time_s']:.2f}",
                               f"{abs(ours['loss'] - theirs['loss']):.1e}"])
            elif variant in result:
                versus.append([vocab, tokens, hidden, variant, theirs.get("skipped") or theirs.get("error", "not run"),
                               "-", "-", "-", "-"])
    if versus:
        print("\n## opd's chunked loss vs TRL's losses (ratios = opd chunked / TRL, measured in this run)\n")
        print(markdown_table(["V", "N tokens", "H", "TRL variant", "peak GiB opd / TRL", "memory ratio",
                              "time opd / TRL (s)", "time ratio", "|Δloss|"], versus))
    if args.json:
        args.json.write_text(json.dumps({"calibration": calibration, "measurements": raw}, indent=1))


if __name__ == "__main__":
    main()
