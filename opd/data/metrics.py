"""Evaluation metrics of the paper protocols: ROUGE-L, the unbiased pass@k estimator, math answer matching.

These are plain functions (no model, no I/O). The tasks in :mod:`opd.data.instruct` and
:mod:`opd.data.math` use them in ``is_correct`` / ``score``. The trainer's evaluation
(``opd/engine/evaluate.py``) is greedy decoding scored by ``task.is_correct`` (exact match); ROUGE-L
and pass@k over n samples are not wired into it yet.

Sources (definitions only; no code was copied):

* ROUGE-L: Lin, "ROUGE: A Package for Automatic Evaluation of Summaries" (ACL Workshop 2004), §3.1:
  with X the reference (m tokens), Y the candidate (n tokens) and LCS(X, Y) the length of their longest
  common subsequence, R = LCS/m, P = LCS/n, F = (1 + β²)·R·P / (R + β²·P); we use β = 1, the F1 that
  Google's ``rouge_score`` package reports as ``fmeasure`` and that MiniLLM / DistiLLM report (×100),
  taking the maximum over references as the Natural-Instructions evaluation does.
* pass@k: Chen et al., "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374), §2.1,
  Eq. 1: with n samples per problem of which c are correct, pass@k = E[1 − C(n−c, k) / C(n, k)].
* Math answers: the ``\\boxed{...}`` convention of the MATH dataset (Hendrycks et al., NeurIPS 2021
  Datasets track), whose final answers are the content of the last ``\\boxed{}`` of a solution.
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable, Sequence
from fractions import Fraction

# ----------------------------------------------------------------------------- ROUGE-L

_WORD = re.compile(r"[^\W_]+")  # runs of letters or digits (any script); everything else separates tokens


def rouge_tokenize(text: str) -> list[str]:
    """Lower-cased runs of letters and digits; whitespace and punctuation separate tokens.

    ``"Hello, World!"`` -> ``["hello", "world"]``; ``"3.5-inch"`` -> ``["3", "5", "inch"]``.
    Like ``rouge_score``'s default tokenizer, but without its Porter stemming (MiniLLM and DistiLLM
    score with ``use_stemmer=True``, so numbers can differ slightly from theirs) and keeping
    non-ASCII letters instead of dropping them.
    """
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)·len(b)) time, O(len(b)) memory)."""
    if len(a) < len(b):
        a, b = b, a  # the shorter sequence indexes the row
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (β = 1) of ``prediction`` against one ``reference``, in [0, 1].

    0 when either text has no token or they share none. Symmetric in its two arguments.
    """
    pred, ref = rouge_tokenize(prediction), rouge_tokenize(reference)
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(pred, ref)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l_max(prediction: str, references: Iterable[str]) -> float:
    """The best ROUGE-L F-measure of ``prediction`` over several references (0 for none)."""
    return max((rouge_l(prediction, ref) for ref in references), default=0.0)


def normalize_text(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (SQuAD-style, articles kept)."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    return " ".join(text.split())


# ----------------------------------------------------------------------------- pass@k

def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from ``n`` samples of which ``c`` are correct (Chen et al. 2021, Eq. 1).

    1 − C(n−c, k) / C(n, k), computed as 1 − Π_{i=n−c+1..n} (1 − k/i) so it neither overflows nor
    loses precision for large n. Exactly 1.0 when n − c < k (every size-k subset holds a correct sample).

    Raises:
        ValueError: unless 0 <= c <= n and 1 <= k <= n.
    """
    if n < 1 or not 0 <= c <= n:
        raise ValueError(f"need n >= 1 and 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(samples: Iterable[tuple[int, int]], k: int) -> float:
    """Mean of :func:`pass_at_k` over problems given as ``(n, c)`` pairs (the benchmark-level number).

    Raises:
        ValueError: for an empty input or an invalid pair.
    """
    values = [pass_at_k(n, c, k) for n, c in samples]
    if not values:
        raise ValueError("mean_pass_at_k needs at least one (n, c) pair")
    return sum(values) / len(values)


def task_pass_at_k(task, examples: Sequence, completions: Sequence[Sequence[str]], k: int) -> float:
    """Benchmark pass@k of a task from n sampled completions per example, judged by ``task.is_correct``.

    Args:
        task: any :class:`opd.data.base.Task` (its ``is_correct`` decides each sample).
        examples: the evaluated examples.
        completions: ``completions[i]`` are the n_i >= k sampled completions of ``examples[i]``.
        k: the k of pass@k (``k = 1`` with n samples is the mean accuracy, OPSD's average@n).

    Raises:
        ValueError: if the lengths differ or an example has fewer than k completions.
    """
    if len(examples) != len(completions):
        raise ValueError(f"{len(examples)} examples but {len(completions)} lists of completions")
    counts = [(len(samples), sum(bool(task.is_correct(text, example)) for text in samples))
              for example, samples in zip(examples, completions)]
    return mean_pass_at_k(counts, k)


# ----------------------------------------------------------------------------- math answers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced; None if none.

    ``"so \\boxed{\\frac{1}{2}}."`` -> ``"\\frac{1}{2}"``. An unclosed last box is ignored in favour
    of the last closed one before it.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None


def _strip_wrapper(text: str, command: str) -> str:
    """``\\text{abc}`` -> ``abc`` for every occurrence of ``\\<command>{...}`` (balanced braces)."""
    pattern = "\\" + command + "{"
    while (start := text.find(pattern)) != -1:
        depth, i = 1, start + len(pattern)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:  # unbalanced: leave the rest alone
            break
        text = text[:start] + text[start + len(pattern) : i - 1] + text[i:]
    return text


_SPACING = re.compile(r"\\[,:;! ]|\\q?quad|\\left|\\right|\\displaystyle")
_DEGREES = re.compile(r"\^\s*\{?\s*\\circ\s*\}?")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")
_FRAC_INT = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SQRT_SHORT = re.compile(r"\\sqrt(\d+)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_LEADING_VARIABLE = re.compile(r"^[a-zA-Z]\s*=\s*(?=\S)")


def normalize_math_answer(answer: str) -> str:
    """A canonical string for simple exact matching of final answers (not a symbolic equivalence check).

    Steps: strip ``$`` and surrounding whitespace; unwrap ``\\text{}``, ``\\textbf{}``, ``\\mathrm{}``,
    ``\\mbox{}``; drop ``\\left``/``\\right``, spacing commands, degree signs, ``\\%``/``%`` and a trailing
    period; ``\\dfrac``/``\\tfrac`` -> ``\\frac``, ``\\frac12`` -> ``\\frac{1}{2}``, ``\\sqrt2`` -> ``\\sqrt{2}``;
    drop a leading ``x =``; drop thousands separators of plain numbers; remove all whitespace;
    ``\\frac{a}{b}`` of integers -> ``a/b``; numbers in canonical form (``0.50`` -> ``0.5``, ``5.0`` -> ``5``).
    """
    text = answer.strip().strip("$").strip()
    for command in ("text", "textbf", "mathrm", "mbox"):
        text = _strip_wrapper(text, command)
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = _SPACING.sub("", text)
    text = _DEGREES.sub("", text)
    text = text.replace("\\%", "").replace("%", "").replace("\\$", "")
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = text.strip().rstrip(".").strip()
    text = _LEADING_VARIABLE.sub("", text)
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    text = "".join(text.split())
    if match := _FRAC_INT.match(text):
        sign, numerator, denominator = match.groups()
        text = f"{sign}{numerator}/{denominator}"
    number = _as_rational(text)
    if number is not None:
        return str(number.numerator) if number.denominator == 1 else _canonical_number(text, number)
    return text


def _as_rational(text: str) -> Fraction | None:
    """An integer, decimal or ``a/b`` as an exact fraction; None for anything else."""
    if not re.fullmatch(r"-?(\d+(\.\d*)?|\.\d+)(/-?\d+)?", text):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None


def _canonical_number(text: str, number: Fraction) -> str:
    """Non-integers keep their written kind: ``a/b`` stays a reduced fraction, decimals lose trailing zeros."""
    if "/" in text:
        return f"{number.numerator}/{number.denominator}"
    text = text.rstrip("0").rstrip(".") if "." in text else text
    return text.replace("-.", "-0.", 1) if text.startswith("-.") else "0" + text if text.startswith(".") else text


def math_answers_equal(predicted: str, gold: str) -> bool:
    """Whether two final answers match after :func:`normalize_math_answer`.

    Numbers also match by value (``1/2`` = ``0.5`` = ``\\frac{1}{2}``); anything else by string.
    """
    a, b = normalize_math_answer(predicted), normalize_math_answer(gold)
    if a == b:
        return True
    x, y = _as_rational(a), _as_rational(b)
    return x is not None and y is not None and x == y


def math_answer_score(completion: str, gold: str) -> float:
    """1.0 if the last ``\\boxed{}`` answer of ``completion`` matches ``gold``, else 0.0."""
    predicted = extract_boxed(completion)
    return float(predicted is not None and math_answers_equal(predicted, gold))


__all__ = ["extract_boxed", "lcs_length", "math_answer_score", "math_answers_equal", "mean_pass_at_k",
           "normalize_math_answer", "normalize_text", "pass_at_k", "rouge_l", "rouge_l_max", "rouge_tokenize",
           "task_pass_at_k"]
