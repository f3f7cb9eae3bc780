"""Rollouts with Hugging Face ``generate``: batched, left-padded prompts, KV cache, per-row EOS stop."""

from __future__ import annotations

import torch

from opd import distributed as dist
from opd.registry import SAMPLERS
from opd.sampling.base import check_sampling_params, eos_token_ids, repeat_per_example, truncate_after_eos
from opd.sampling.tokenize import encode_prompts
from opd.types import Example, RolloutBatch


@SAMPLERS.register("hf")
class HFSampler:
    """Batched ``model.generate`` with KV cache; sampling temperature, top-p and top-k from config.

    Args:
        temperature: sampling temperature of the rollouts (separate from any loss temperature).
        top_p: nucleus sampling threshold; 1.0 disables it.
        top_k: keep the k most likely tokens; 0 disables it.
        max_new_tokens: completion length cap.
        n: completions sampled per prompt (``num_return_sequences``); each is its own row of the batch.
    """

    #: ``generate`` applies the model's ``generation_config.suppress_tokens`` (the trainer relies on it to keep a
    #: model with a padded head from sampling ids past the vocabulary it shares with the other model)
    honours_suppress_tokens = True

    def __init__(self, temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, max_new_tokens: int = 64,
                 n: int = 1) -> None:
        check_sampling_params(temperature, top_p, top_k, max_new_tokens, n)
        self.temperature, self.top_p, self.top_k, self.max_new_tokens, self.n = temperature, top_p, top_k, max_new_tokens, n

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Nothing to do: ``generate`` runs ``model`` itself, with its current weights."""

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, tokenizer, examples: list[Example], greedy: bool = False,
                 n: int | None = None, prompts: tuple[torch.Tensor, torch.Tensor] | None = None) -> RolloutBatch:
        """``n`` completions per example from ``model`` (eval mode during generation, restored after); rows grouped
        by example. ``n``: the sampler's when None; always one when ``greedy``. Each row stops at, and is masked
        after, the first of any EOS id ``model`` declares (:func:`~opd.sampling.base.eos_token_ids`). ``prompts``:
        left-padded prompt ids and mask ``[B, P]`` to use instead of ``tokenizer``'s encoding of each example's prompt
        (a teacher with its own tokenizer renders its own)."""
        device = next(model.parameters()).device
        prompt_ids, prompt_mask = encode_prompts(tokenizer, [ex.prompt for ex in examples], device) \
            if prompts is None else (prompts[0].to(device), prompts[1].to(device))
        n = 1 if greedy else (self.n if n is None else n)
        sampling = {} if greedy else {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k or None,
                                      "num_return_sequences": n}
        eos = eos_token_ids(tokenizer, model)
        was_training = model.training
        model.eval()
        try:
            sequences = model.generate(
                input_ids=prompt_ids, attention_mask=prompt_mask, do_sample=not greedy, max_new_tokens=self.max_new_tokens,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=eos or None, use_cache=True,
                synced_gpus=dist.needs_synced_decoding(model), **sampling)  # ZeRO-3: ranks step together
        finally:
            model.train(was_training)
        completion_ids, completion_mask = truncate_after_eos(sequences[:, prompt_ids.shape[1]:], eos, tokenizer.pad_token_id)
        # generate returns the n samples of each prompt next to each other
        prompt_ids, prompt_mask, examples = repeat_per_example(prompt_ids, prompt_mask, examples, n)
        return RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, list(examples), "student",
                            temperature=1.0 if greedy else self.temperature)
