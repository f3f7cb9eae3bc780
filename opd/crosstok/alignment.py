"""Byte-offset alignment of two tokenizations of one text (cross-tokenizer distillation).

A student and a teacher from different families cut the same completion text into different tokens: SmolLM2's
byte-level BPE writes ``😀`` as two tokens that split the character's four bytes, Gemma's SentencePiece writes it as
one; both split ``12345`` into digits; runs of spaces and newlines fall differently. The loss can only compare the
two models where both have finished predicting the *same bytes*. So each side's tokens get exact byte spans in the
UTF-8 text (:func:`token_byte_spans`, from each token's own bytes, not from character offsets), and
:func:`align_spans` groups consecutive tokens into the shortest pieces that end at a byte both sides end a token at.
Every token of both sides is in exactly one group, and a group's student tokens and teacher tokens cover the same
bytes. Tokens without bytes (a special token present on one side only, such as a BOS or an EOS) join the group that
starts at their position, or the last group at the end of the text.

The idea of aligning by byte offsets is GOLD's (Patiño et al. 2025, TRL ``trl.experimental.gold``), which replaced
aligning by token strings after a BOS on one side only broke it (TRL #4393, #5885).
"""

from __future__ import annotations

import dataclasses
import functools
import re

#: GPT-2's printable stand-ins for the 256 byte values, which byte-level BPE vocabularies (SmolLM2, Llama 3, Qwen) are
#: written in: bytes that print as themselves keep their character, the others map to U+0100 upwards
_PRINTABLE = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
_BYTE_OF_CHAR = {chr(b): b for b in _PRINTABLE} | {
    chr(256 + n): b for n, b in enumerate(b for b in range(256) if b not in _PRINTABLE)}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclasses.dataclass(frozen=True)
class AlignedGroup:
    """One piece of text both tokenizations cover exactly.

    ``student`` and ``teacher`` are index ranges into each side's token list; ``start``/``end`` are the byte span.
    """

    student: range
    teacher: range
    start: int
    end: int


def _decoder_kind(tokenizer) -> str:
    """"byte_level" (GPT-2 style), "sentencepiece" (▁ for spaces, <0xNN> byte fallback) or "plain" (tokens are text)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    description = repr(backend.decoder) if backend is not None and backend.decoder is not None else ""
    if "ByteLevel" in description:
        return "byte_level"
    if "ByteFallback" in description or "Metaspace" in description or '"▁"' in description:
        return "sentencepiece"
    return "plain"


@functools.lru_cache(maxsize=8)
def _vocabulary_bytes(tokenizer) -> tuple[bytes, ...]:
    """The UTF-8 bytes each id of ``tokenizer`` writes into decoded text (special tokens: none). ``[V]`` entries."""
    kind = _decoder_kind(tokenizer)
    special = set(tokenizer.all_special_ids)
    size = max(len(tokenizer), max(tokenizer.get_vocab().values(), default=-1) + 1)
    out = []
    for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if token is None or index in special:
            out.append(b"")
        elif kind == "byte_level":
            out.append(bytes(_BYTE_OF_CHAR[c] for c in token) if all(c in _BYTE_OF_CHAR for c in token)
                       else token.encode())  # an added token written as plain text
        elif kind == "sentencepiece":
            match = _BYTE_FALLBACK.fullmatch(token)
            out.append(bytes([int(match.group(1), 16)]) if match else token.replace("▁", " ").encode())
        else:
            out.append(tokenizer.decode([index]).encode())
    return tuple(out)


def token_bytes(tokenizer, ids: list[int]) -> list[bytes]:
    """The bytes each of ``ids`` contributes to ``tokenizer.decode(ids)`` (``b""`` for special tokens)."""
    table = _vocabulary_bytes(tokenizer)
    return [table[i] if 0 <= i < len(table) else b"" for i in ids]


def _spans(pieces: list[bytes]) -> list[tuple[int, int]]:
    """Consecutive ``(start, end)`` byte spans of ``pieces`` laid end to end from 0."""
    spans, position = [], 0
    for piece in pieces:
        spans.append((position, position + len(piece)))
        position += len(piece)
    return spans


def token_byte_spans(tokenizer, ids: list[int], text: str | None = None) -> list[tuple[int, int]]:
    """Each token's ``(start, end)`` byte span in the UTF-8 text the ids decode to.

    Args:
        ids: token ids (a sampled completion, or a re-tokenization), special tokens included.
        text: the text the spans must cover; checked when given.
    Raises:
        ValueError: the tokens' bytes do not spell ``text`` (a tokenizer whose decoder rewrites text, say by stripping
            a leading space, cannot be aligned by bytes).
    """
    pieces = token_bytes(tokenizer, ids)
    spans = _spans(pieces)
    if text is not None and b"".join(pieces) != text.encode():
        raise ValueError(f"{type(tokenizer).__name__}: the tokens' bytes spell {b''.join(pieces)[:60]!r}, not the text "
                         f"{text.encode()[:60]!r}; its decoder rewrites text, so byte alignment cannot use it")
    return spans


def align_spans(student: list[tuple[int, int]], teacher: list[tuple[int, int]]) -> list[AlignedGroup]:
    """Group two tokenizations of one text into the shortest pieces that both cover exactly.

    Walks both sides in text order, taking the next token of the side that is behind; a group closes when both sides
    end a token at the same byte. So byte-less tokens on both sides at one position (two EOS) form their own group, a
    byte-less token on one side only (a one-sided BOS) opens the next group, and tokens left over on one side at the
    end (a one-sided EOS) join the last group.

    Args:
        student, teacher: ``(start, end)`` byte spans, consecutive from 0 (:func:`token_byte_spans`).
    Returns:
        The groups in text order; together they hold every token of both sides once, and each group holds at least
        one token of each side.
    Raises:
        ValueError: the two sides cover texts of different lengths.
    """
    length_s = max((end for _, end in student), default=0)
    length_t = max((end for _, end in teacher), default=0)
    if length_s != length_t:
        raise ValueError(f"the student's tokens cover {length_s} bytes and the teacher's {length_t}: not one text")
    groups: list[AlignedGroup] = []
    i = j = open_i = open_j = 0
    while i < len(student) and j < len(teacher):
        if student[i][1] < teacher[j][1]:
            i += 1
        elif teacher[j][1] < student[i][1]:
            j += 1
        else:  # both sides end a token here: close the group
            i, j = i + 1, j + 1
            start = groups[-1].end if groups else 0
            groups.append(AlignedGroup(range(open_i, i), range(open_j, j), start, student[i - 1][1]))
            open_i, open_j = i, j
    if i < len(student) or j < len(teacher):  # the rest of one side (byte-less tokens): into the last group
        if groups:
            last = groups[-1]
            groups[-1] = AlignedGroup(range(last.student.start, len(student)), range(last.teacher.start, len(teacher)),
                                      last.start, last.end)
        else:
            groups.append(AlignedGroup(range(len(student)), range(len(teacher)), 0, length_s))
    return groups


_REPLACEMENT = "\ufffd".encode()


def _decoded_spans(pieces: list[bytes]) -> tuple[bytes, list[tuple[int, int]]]:
    """The UTF-8 text ``pieces`` decode to, each maximal invalid byte run written as one U+FFFD (Python's
    ``errors="replace"``, as the tokenizers' decoders write it), and each piece's ``(start, end)`` span in that text.

    A piece that ends inside an invalid run ends after its U+FFFD; a piece inside the run after the first then has no
    bytes (it joins the next group, as a one-sided BOS does).
    """
    raw = b"".join(pieces)
    runs, position, shift = [], 0, 0  # runs: (raw start, raw end, decoded start) of each invalid run
    while position < len(raw):
        try:
            raw[position:].decode("utf-8")
            break
        except UnicodeDecodeError as err:
            start, end = position + err.start, position + err.end
            runs.append((start, end, start + shift))
            shift += len(_REPLACEMENT) - (end - start)
            position = end

    def decoded(offset: int) -> int:
        moved = 0
        for start, end, out in runs:
            if offset <= start:
                break
            if offset < end:
                return out + len(_REPLACEMENT)
            moved = out + len(_REPLACEMENT) - end
        return offset + moved

    return raw.decode("utf-8", "replace").encode(), [(decoded(a), decoded(b)) for a, b in _spans(pieces)]


def align_texts(student_tokenizer, student_ids: list[int], teacher_tokenizer, teacher_ids: list[int]) -> list[AlignedGroup]:
    """:func:`align_spans` of two id lists that decode to one text (checked).

    A sampled completion can stop a character half-way (a byte-level token holds part of a multi-byte character, and
    the next token does not finish it): its decoded text, which the other side re-tokenizes, has U+FFFD there. Then
    both sides are aligned on the decoded texts (:func:`_decoded_spans`), the bytes of the broken character grouped
    with the other side's U+FFFD.
    """
    student_pieces, teacher_pieces = token_bytes(student_tokenizer, student_ids), token_bytes(teacher_tokenizer, teacher_ids)
    student_text, teacher_text = b"".join(student_pieces), b"".join(teacher_pieces)
    if student_text == teacher_text:
        return align_spans(_spans(student_pieces), _spans(teacher_pieces))
    (student_text, student_spans), (teacher_text, teacher_spans) = map(_decoded_spans, (student_pieces, teacher_pieces))
    if student_text != teacher_text:
        raise ValueError(f"the student's tokens spell {student_text[:60]!r} and the teacher's {teacher_text[:60]!r}")
    return align_spans(student_spans, teacher_spans)
