"""The entries two vocabularies share: the same bytes (GOLD's hybrid loss compares these directly)."""

from __future__ import annotations

import torch

from opd.crosstok.alignment import _BYTE_FALLBACK, _vocabulary_bytes


def _ids_by_bytes(tokenizer) -> dict[bytes, int]:
    """bytes -> the id the tokenizer writes them with; a byte-fallback token (``<0x41>``) only where no ordinary
    token spells the same byte."""
    table = _vocabulary_bytes(tokenizer)
    names = tokenizer.convert_ids_to_tokens(list(range(len(table))))
    ordinary, fallback = {}, {}
    for index, (piece, name) in enumerate(zip(table, names)):
        if piece:
            target = fallback if name is not None and _BYTE_FALLBACK.fullmatch(name) else ordinary
            target.setdefault(piece, index)
    return {**fallback, **ordinary}


def shared_vocabulary(student_tokenizer, teacher_tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Pairs of ids, one per side, that write the same bytes.

    Matching by bytes rather than by token strings finds the space-prefixed words of a byte-level BPE (``Ġthe``) in a
    SentencePiece vocabulary (``▁the``), which a string match misses.

    Returns:
        ``(student_ids [M], teacher_ids [M])``, ordered by student id.
    """
    student, teacher = _ids_by_bytes(student_tokenizer), _ids_by_bytes(teacher_tokenizer)
    pairs = sorted((index, teacher[piece]) for piece, index in student.items() if piece in teacher)
    if not pairs:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    student_ids, teacher_ids = zip(*pairs)
    return torch.tensor(student_ids), torch.tensor(teacher_ids)
