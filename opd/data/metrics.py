"""Evaluation metrics of the paper protocols: ROUGE-L and math answer equivalence from the field's libraries, pass@k.

These are plain functions (no model, no I/O). The tasks in :mod:`opd.data.instruct`, :mod:`opd.data.math`
and :mod:`opd.data.hub` use them in ``is_correct`` / ``score``.

Which library scores what (nothing here re-implements a metric):

* ROUGE-L: Google's ``rouge-score`` package, ``rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)``, its
  ``fmeasure`` (Lin 2004, §3.1, F with β = 1), the maximum over references: what MiniLLM and DistiLLM report
  (×100). Its tokenizer lower-cases, keeps only ``[a-z0-9]`` runs (other characters, non-ASCII letters
  included, separate tokens or vanish) and Porter-stems with NLTK's stemmer (no NLTK data download).
* Math answers: Hugging Face's ``math-verify`` (``parse`` then ``verify``): extraction of the answer from a
  completion (``\\boxed{}`` first, then other LaTeX / plain expressions) and symbolic equivalence with SymPy.
* pass@k: Chen et al., "Evaluating Large Language Models Trained on Code" (arXiv:2107.03374), §2.1,
  Eq. 1: with n samples per problem of which c are correct, pass@k = E[1 − C(n−c, k) / C(n, k)]. A formula,
  not a metric library's job, so it is written here.
"""

from __future__ import annotations

import functools
import string
import threading
from collections.abc import Iterable, Sequence

# ----------------------------------------------------------------------------- ROUGE-L (rouge-score)


@functools.lru_cache(maxsize=1)
def _rouge_l_scorer():
    """The one ``RougeScorer(["rougeL"], use_stemmer=True)`` of the process (built on first use)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure of ``prediction`` against one ``reference`` in [0, 1], from ``rouge-score`` (stemmed)."""
    return float(_rouge_l_scorer().score(reference, prediction)["rougeL"].fmeasure)  # the library gives int 0 for no tokens


def rouge_l_max(prediction: str, references: Iterable[str]) -> float:
    """The best ROUGE-L F-measure of ``prediction`` over several references (0 for none), as MiniLLM's evaluation takes."""
    return max((rouge_l(prediction, ref) for ref in references), default=0.0)


def normalize_text(text: str) -> str:
    """Lower-case, drop ASCII punctuation, collapse whitespace (SQuAD-style, articles kept): for exact match only."""
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


# ----------------------------------------------------------------------------- math answers (math-verify)

#: seconds math-verify may spend parsing one text / comparing one pair (its SIGALRM timeout; main thread only)
MATH_VERIFY_TIMEOUT_S = 5


def _timeout_s() -> int | None:
    """math-verify's timeout uses ``signal.alarm``, which only the main thread may set: None (no timeout) elsewhere."""
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> list:
    """``math_verify.parse`` of ``text`` (a completion or an answer): ``[sympy_object, extracted_string]``, [] if none.

    A ``\\boxed{}`` has priority; without one, other LaTeX or a plain expression is taken. Boxes close to each
    other (e.g. ``\\boxed{1} then \\boxed{2}``) parse as the set of their contents.
    """
    from math_verify import parse

    return parse(text, parsing_timeout=_timeout_s())


def boxed_answer(text: str) -> str | None:
    """The content of the last ``\\boxed{}`` / ``\\fbox{}`` of ``text`` (math-verify's extractor); None without a closed box.

    Used to take gold answers from worked solutions; nearby boxes are joined by commas (``"1,\\frac{1}{2}"``).
    """
    from latex2sympy2_extended.math_normalization import extract_boxed_content

    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    content = extract_boxed_content(text, mode="last")
    return None if content.startswith("{") else content  # an unclosed last box comes back with its brace


def math_answers_equal(predicted: str, gold: str) -> bool:
    """Whether the answer in ``predicted`` (a completion or a bare answer) is mathematically ``gold``, by math-verify.

    ``gold`` is a bare final answer (MATH's ``answer`` field, e.g. ``\\frac{1}{2}``); it is parsed inside
    ``\\boxed{}`` so tuples, intervals and ``\\text{}`` answers parse as LaTeX. Not symmetric (``verify``'s gold
    and target roles differ), and False when either side does not parse.
    """
    from math_verify import verify

    gold_parsed = parse_math("\\boxed{" + gold + "}")
    target_parsed = parse_math(predicted)
    if not gold_parsed or not target_parsed:
        return False
    return bool(verify(gold_parsed, target_parsed, timeout_seconds=_timeout_s()))


def math_answer_score(completion: str, gold: str) -> float:
    """1.0 if math-verify finds the completion's answer equal to ``gold``, else 0.0."""
    return float(math_answers_equal(completion, gold))


__all__ = ["MATH_VERIFY_TIMEOUT_S", "boxed_answer", "math_answer_score", "math_answers_equal", "mean_pass_at_k", "normalize_text",
           "parse_math", "pass_at_k", "rouge_l", "rouge_l_max", "task_pass_at_k"]
