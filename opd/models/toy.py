"""Tiny offline models: a character-level tokenizer and Llama-style configs built from scratch.

These are what the default run uses on a CPU with no hub access. The checkpoints shipped in
``opd/assets/toy/`` were made by ``scripts/make_toy_models.py`` with exactly these builders, and are
loaded with the same ``from_pretrained`` code as real models.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import LlamaConfig, PreTrainedTokenizerFast

#: characters the arithmetic task needs (digits, operators, separators) and a little headroom.
TOY_ALPHABET = "0123456789+-*/=;#.()? "
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build_char_tokenizer(alphabet: str = TOY_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one id per character, BOS prepended, ``decode`` joins without spaces."""
    specials = list(SPECIAL_TOKENS.values())
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(alphabet)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    bos = SPECIAL_TOKENS["bos_token"]
    core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                        special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    tokenizer.padding_side = "left"  # prompts are left-padded for batched generation
    return tokenizer


def tiny_llama_config(tokenizer: PreTrainedTokenizerFast, hidden_size: int, num_layers: int, num_heads: int,
                      intermediate_size: int | None = None, max_positions: int = 128) -> LlamaConfig:
    """A small Llama config whose special-token ids match ``tokenizer``."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
