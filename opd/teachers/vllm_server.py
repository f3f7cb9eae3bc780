"""``teacher.kind: vllm_server``: a teacher behind vLLM's OpenAI-compatible server (``vllm serve``), sparse log-probs.

For teachers that do not fit beside the student. Each micro-batch's sequences (prompt + completion
token ids) go to ``POST /v1/completions`` with ``max_tokens=1`` and ``prompt_logprobs=k``, the
teacher-server pattern of verl, slime and NeMo-RL (research notes, frameworks.md §1.1 and §6). vLLM
answers, per choice, ``prompt_logprobs``: a list with one entry per prompt token, ``null`` for the
first and otherwise ``{"<token id>": {"logprob": float, "rank": int, "decoded_token": str | null}}``
holding the k most likely next tokens (ranks 1..k) plus the actual token (its true rank, a
(k+1)-th entry when it is not among the top k). Log-probs are the log-softmax of the raw logits
(temperature 1; the request's temperature does not apply to prompt log-probs), ``-inf`` is sent as
``-9999.0`` (vLLM's ``clamp_prompt_logprobs``). Read from vllm 0.32.0
(``entrypoints/openai/completion/{protocol,serving}.py``, ``v1/worker/gpu_model_runner.py::
_get_prompt_logprobs_dict``).

``k`` may not exceed the server's ``max_logprobs``, an engine setting fixed at boot (vLLM's default
20): start the server with ``--max-logprobs >= k``. Only the standard library is used for HTTP.
"""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import math
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Optional

import torch

from opd.errors import ConfigError, TrainingError
from opd.registry import TEACHERS
from opd.teachers.base import Teacher
from opd.types import RolloutBatch, SparseTeacherLogprobs, padding_like

#: HTTP statuses worth retrying (overload, restarts, gateways)
TRANSIENT_STATUSES = (408, 429, 500, 502, 503, 504)
#: vLLM sends -inf log-probs as this value (JSON has no infinity)
VLLM_NEG_INF = -9999.0
_MAX_BACKOFF_S = 30.0


class TeacherServerError(TrainingError):
    """The teacher server failed (unreachable, HTTP error, malformed answer) or could not be started."""


@dataclasses.dataclass
class _HTTPFailure(Exception):
    """One failed HTTP attempt (internal): status None = no HTTP answer at all."""

    status: int | None
    message: str

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in TRANSIENT_STATUSES


class VLLMServerTeacher:
    """Scores completions with a teacher served by ``vllm serve``; returns :class:`SparseTeacherLogprobs`.

    Start-up: :meth:`check` (resolves and verifies the served model, its vocabulary and ``k``, and
    reads ``max_model_len``). Per micro-batch: :meth:`score`.

    Args:
        base_url: the server, e.g. ``http://127.0.0.1:8000`` (a trailing ``/v1`` is accepted).
        model: the served model name (``--served-model-name``, by default the path given to
            ``vllm serve``); None = the server's only model.
        top_k: k, top log-probs returned per position (0 = only the actual token's), <= the server's
            ``--max-logprobs``.
        timeout_s: seconds to wait on the socket for one request (connect and each read).
        max_retries: retries of a request after a transient failure (no connection, timeout, HTTP
            408/429/5xx), with exponential backoff; other HTTP errors fail at once.
        backoff_s: first backoff; doubled after each retry (capped at 30 s).
        api_key: sent as ``Authorization: Bearer`` (servers started with ``--api-key``); None = none.
    """

    def __init__(self, base_url: str, model: str | None = None, top_k: int = 20, timeout_s: float = 300.0,
                 max_retries: int = 3, backoff_s: float = 1.0, api_key: str | None = None) -> None:
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k}")
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {backoff_s}")
        url = base_url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {base_url!r}")
        self.base_url = url.removesuffix("/v1")
        self.model, self.top_k, self.timeout_s = model, top_k, timeout_s
        self.max_retries, self.backoff_s, self.api_key = max_retries, backoff_s, api_key
        self.max_model_len: int | None = None  # the server's context length, known after check()
        self.vocab_size: int | None = None  # the student's vocabulary size given to check()
        self.checked = False
        self.requests = 0  # HTTP requests that succeeded
        self.retries = 0  # transient failures retried

    # ------------------------------------------------------------------ start-up
    def check(self, vocab_size: int | None = None) -> dict[str, Any]:
        """Verify the server before training: reachable, serves ``model``, accepts ``top_k``, fits the vocabulary.

        Lists ``/v1/models`` (resolving ``model`` when None), then scores a two-token probe
        ``[vocab_size − 1, 0]``: the server must accept the largest student token id, return ids
        below ``vocab_size``, and return log-probabilities (not logits: ``--logprobs-mode`` must be a
        ``*_logprobs`` mode).

        Args:
            vocab_size: the student's vocabulary size V (top-k ids index its logits), or None to skip.
        Returns:
            ``{"model", "max_model_len", "models"}`` as served.
        Raises:
            ConfigError: one line naming the URL and the fix.
        """
        try:
            listing = self._request("GET", "/v1/models")
        except _HTTPFailure as err:
            raise self._config_error(err, "/v1/models") from None
        cards = listing.get("data") or []
        served = [card.get("id") for card in cards]
        if self.model is None:
            if len(served) != 1:
                raise ConfigError(f"teacher.server_model: the server at {self.base_url} serves {served}; "
                                  "name the teacher model to use")
            self.model = served[0]
        elif self.model not in served:
            raise ConfigError(f"teacher.server_model={self.model!r}: the server at {self.base_url} serves {served}, "
                              f"not {self.model!r} (vllm serve --served-model-name sets the name)")
        card = cards[served.index(self.model)]
        self.max_model_len = card.get("max_model_len")

        probe = [max(vocab_size - 1, 0) if vocab_size else 0, 0]
        try:
            choice = self._complete([probe])[0]
        except _HTTPFailure as err:
            raise self._config_error(err, "/v1/completions", vocab_size) from None
        except TeacherServerError as err:
            raise ConfigError(str(err)) from None
        try:
            ids, lps, token = parse_prompt_logprobs(choice, probe, 1, self.top_k, self.base_url)
        except TeacherServerError as err:
            raise ConfigError(str(err)) from None
        if vocab_size is not None and any(i >= vocab_size for i in ids[0]):
            raise ConfigError(f"the teacher at {self.base_url} returned token id {max(ids[0])} >= the student's "
                              f"vocabulary size {vocab_size}: teacher and student must share one vocabulary")
        values = lps[0] + [token[0]]
        if any(v > 1e-4 for v in values) or (lps[0] and torch.tensor(lps[0]).logsumexp(0).item() > 1e-3):
            raise ConfigError(f"the teacher at {self.base_url} returns logits, not log-probabilities "
                              "(--logprobs-mode raw_logits or processed_logits); restart it with the default raw_logprobs")
        self.vocab_size, self.checked = vocab_size, True
        return {"model": self.model, "max_model_len": self.max_model_len, "models": served}

    # ------------------------------------------------------------------ per micro-batch
    @torch.no_grad()
    def score(self, batch: RolloutBatch, prompt: tuple[torch.Tensor, torch.Tensor] | None = None
              ) -> SparseTeacherLogprobs:
        """The teacher's top-k and actual-token log-probs at the batch's completion positions.

        Each row is sent as its real prompt tokens (left padding stripped) followed by its completion
        up to the last position with ``completion_mask`` 1 (right padding stripped); rows without
        such a position are not sent.

        Args:
            batch: the rollouts.
            prompt: ``([B, P'], [B, P'])`` left-padded ids and mask of the prompt the teacher is
                conditioned on (``Method.teacher_prompt``); None = the batch's own.
        Returns:
            Tensors on the batch's device; padding as documented in :class:`SparseTeacherLogprobs`.
        Raises:
            TeacherServerError: the server failed after the retries, or answered something unexpected.
        """
        if not self.checked:
            try:
                self.check()
            except ConfigError as err:
                raise TeacherServerError(str(err)) from None
        prompt_ids, prompt_mask = prompt if prompt is not None else (batch.prompt_ids, batch.prompt_mask)
        prompt_ids, prompt_mask = prompt_ids.cpu(), prompt_mask.cpu()
        completion_ids, completion_mask = batch.completion_ids.cpu(), batch.completion_mask.cpu()
        out = padding_like(completion_ids, self.top_k)
        rows, starts, which = [], [], []
        for i in range(completion_ids.shape[0]):
            real = completion_mask[i].nonzero()
            if real.numel() == 0:
                continue
            head = prompt_ids[i][prompt_mask[i].bool()].tolist()
            if not head:
                raise TeacherServerError(f"row {i} has an empty prompt: the teacher server cannot score the first "
                                         "completion token without a preceding token (e.g. BOS)")
            rows.append(head + completion_ids[i, : int(real.max()) + 1].tolist())
            starts.append(len(head))
            which.append(i)
        if not rows:
            return out.to(batch.completion_ids.device)
        try:
            choices = self._complete(rows)
        except _HTTPFailure as err:
            raise TeacherServerError(self._describe(err, "/v1/completions")) from None
        for i, row, start, choice in zip(which, rows, starts, choices):
            ids, lps, token = parse_prompt_logprobs(choice, row, start, self.top_k, self.base_url)
            n = len(token)
            out.topk_ids[i, :n] = torch.tensor(ids, dtype=torch.long).reshape(n, self.top_k)
            out.topk_logprobs[i, :n] = torch.tensor(lps, dtype=torch.float32).reshape(n, self.top_k)
            out.token_logprobs[i, :n] = torch.tensor(token, dtype=torch.float32)
        if self.vocab_size is not None and self.top_k and int(out.topk_ids.max()) >= self.vocab_size:
            raise TeacherServerError(f"the teacher at {self.base_url} returned token id {int(out.topk_ids.max())} >= the "
                                     f"student's vocabulary size {self.vocab_size}")
        return out.to(batch.completion_ids.device)

    # ------------------------------------------------------------------ HTTP
    def _complete(self, rows: list[list[int]]) -> list[dict[str, Any]]:
        """``choices`` of one ``/v1/completions`` request scoring ``rows``, in row order."""
        payload: dict[str, Any] = {"prompt": rows, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": self.top_k,
                                   "stream": False}
        if self.model is not None:
            payload["model"] = self.model
        answer = self._request("POST", "/v1/completions", payload)
        choices = answer.get("choices")
        if not isinstance(choices, list) or len(choices) != len(rows):
            raise TeacherServerError(f"the teacher at {self.base_url} answered {len(choices or [])} choices for "
                                     f"{len(rows)} sequences")
        return sorted(choices, key=lambda c: c.get("index", 0))

    def _request(self, method: str, path: str, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        """JSON answer of one request, retrying transient failures with backoff; raises the last _HTTPFailure."""
        data = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        delay = self.backoff_s
        for attempt in range(self.max_retries + 1):
            try:
                request = urllib.request.Request(self.base_url + path, data=data, headers=headers, method=method)
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    answer = json.loads(response.read())
                self.requests += 1
                return answer
            except urllib.error.HTTPError as err:
                failure = _HTTPFailure(err.code, _error_message(err))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
                reason = getattr(err, "reason", None) or err
                failure = _HTTPFailure(None, f"{type(reason).__name__}: {reason}" if str(reason) else type(reason).__name__)
            except json.JSONDecodeError as err:
                raise TeacherServerError(f"the teacher at {self.base_url}{path} answered invalid JSON ({err})") from None
            if not failure.transient or attempt == self.max_retries:
                raise failure
            self.retries += 1
            time.sleep(delay)
            delay = min(max(delay * 2, 0.1), _MAX_BACKOFF_S)
        raise AssertionError("unreachable")

    def _describe(self, err: _HTTPFailure, path: str) -> str:
        """One line for a failed request."""
        if err.status is None:
            return (f"the teacher server at {self.base_url} is unreachable ({err.message}) after {self.max_retries + 1} "
                    f"attempts; start it, e.g. `vllm serve <teacher dir> --port <port> --max-logprobs "
                    f"{max(self.top_k, 1)}` (tests/vllm_server_harness.py: launch_server), or fix teacher.server_url")
        if "greater than max allowed" in err.message:
            return (f"teacher.server_top_k={self.top_k} exceeds the server's max_logprobs ({err.message}); restart "
                    f"vllm serve with --max-logprobs >= {self.top_k} or lower teacher.server_top_k")
        if err.status == 404 and "model" in err.message.lower():
            return (f"teacher.server_model={self.model!r}: the server at {self.base_url} does not serve it "
                    f"(HTTP 404: {err.message})")
        return f"the teacher server at {self.base_url}{path} answered HTTP {err.status}: {err.message}"

    def _config_error(self, err: _HTTPFailure, path: str, vocab_size: int | None = None) -> ConfigError:
        if vocab_size is not None and "out of vocabulary" in err.message:
            return ConfigError(f"the teacher at {self.base_url} rejects token id {vocab_size - 1} ({err.message}): its "
                               f"vocabulary is smaller than the student's ({vocab_size}); they must share one")
        return ConfigError(self._describe(err, path))


def _error_message(err: urllib.error.HTTPError) -> str:
    """The server's message of an HTTP error, one line (vLLM: ``{"error": {"message": ...}}``)."""
    try:
        body = err.read().decode(errors="replace")
    except OSError:
        body = ""
    message = body
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        parsed = json.loads(body)
        inner = parsed.get("error", parsed)
        message = inner.get("message", body) if isinstance(inner, dict) else str(inner)
    message = " ".join(str(message).split()) or str(err.reason)
    return message[:300]


def _logprob(value: Any) -> float:
    lp = float(value["logprob"] if isinstance(value, dict) else value)
    return -math.inf if lp <= VLLM_NEG_INF else lp


def parse_prompt_logprobs(choice: dict[str, Any], row: Sequence[int], start: int, k: int, where: str = "the server"
                          ) -> tuple[list[list[int]], list[list[float]], list[float]]:
    """Top-k ids, top-k log-probs and actual-token log-probs at positions ``start, ..., len(row) − 1`` of one choice.

    Args:
        choice: one element of the answer's ``choices`` (its ``prompt_logprobs``, see the module docstring).
        row: the token ids sent; position j of ``prompt_logprobs`` is the distribution of ``row[j]``.
        start: the first scored position (the prompt length, >= 1).
        k: the requested ``prompt_logprobs``.
        where: the server, for messages.
    Returns:
        ``(ids, logprobs, token_logprobs)``: n lists of k ints, n lists of k floats (most likely first),
        and n floats, with n = ``len(row) − start``.
    Raises:
        TeacherServerError: the answer does not have that shape.
    """
    positions = choice.get("prompt_logprobs")
    if not isinstance(positions, list) or len(positions) != len(row):
        got = len(positions) if isinstance(positions, list) else positions
        raise TeacherServerError(f"{where} returned prompt_logprobs for {got} positions of a {len(row)}-token "
                                 "sequence (is it a vLLM server that supports prompt_logprobs?)")
    ids, lps, token_lps = [], [], []
    for j in range(start, len(row)):
        entry, token = positions[j], int(row[j])
        if not isinstance(entry, dict):
            raise TeacherServerError(f"{where} returned no prompt log-probs at position {j}")
        items = [(int(tid), _logprob(v), v.get("rank") if isinstance(v, dict) else None) for tid, v in entry.items()]
        actual = [lp for tid, lp, _ in items if tid == token]
        if not actual:
            raise TeacherServerError(f"{where} returned no log-prob for the actual token {token} at position {j}")
        if len(items) == k + 1:  # the actual token is not among the top k: drop its extra entry
            items = [it for it in items if it[0] != token]
        if len(items) != k:
            raise TeacherServerError(f"{where} returned {len(items)} log-probs at position {j}, expected top-{k}")
        items.sort(key=lambda it: (it[2] if it[2] is not None else math.inf, -it[1]))
        ids.append([it[0] for it in items])
        lps.append([it[1] for it in items])
        token_lps.append(actual[0])
    return ids, lps, token_lps


@dataclasses.dataclass
class VLLMServerConfig:
    """The keys of ``teacher.kind: vllm_server`` (conf/teacher/vllm_server.yaml)."""

    name_or_path: Optional[str] = None  # what the server runs (documentation only: nothing is loaded locally)
    server_url: str = "http://127.0.0.1:8000"  # base URL of the OpenAI-compatible server (a trailing /v1 is fine)
    server_model: Optional[str] = None  # served model name (--served-model-name); null = the server's only model
    server_top_k: int = 20  # top-k log-probs per position; <= the server's --max-logprobs
    server_timeout_s: float = 300.0  # socket timeout per request
    server_max_retries: int = 3  # retries with backoff on connection errors, timeouts, HTTP 408/429/5xx
    server_api_key: Optional[str] = None  # Bearer token for servers started with --api-key

    def __post_init__(self) -> None:
        if self.server_top_k < 0 or self.server_timeout_s <= 0 or self.server_max_retries < 0:
            raise ConfigError("teacher.server_top_k and teacher.server_max_retries must be >= 0, "
                              "teacher.server_timeout_s > 0")


@TEACHERS.register("vllm_server")
class ServedTeacher(Teacher):
    """A ``vllm serve`` teacher: top-k and sampled-token log-probs (temperature 1), nothing loaded locally."""

    Config = VLLMServerConfig
    local = False
    scores_in_any_process = True  # the worker asks the server itself
    provides = frozenset({"sparse"})

    def __init__(self, cfg: VLLMServerConfig) -> None:
        super().__init__(cfg)
        self.top_k = cfg.server_top_k
        self.client: VLLMServerTeacher | None = None

    def setup(self, student: torch.nn.Module, tokenizer, device: torch.device) -> int:
        """Check the server now (reachable, model, k, the student's vocabulary); the student's token ids are sent."""
        cfg = self.cfg
        self.vocab_size = student.get_output_embeddings().weight.shape[0]
        self.client = VLLMServerTeacher(cfg.server_url, cfg.server_model, cfg.server_top_k, cfg.server_timeout_s,
                                        cfg.server_max_retries, api_key=cfg.server_api_key)
        self.client.check(vocab_size=self.vocab_size)
        return self.vocab_size

    def context_length(self) -> int | None:
        return self.client.max_model_len if self.client is not None else None

    def _sparse(self, batch: RolloutBatch, prompt) -> SparseTeacherLogprobs:
        return self.client.score(batch, prompt)
