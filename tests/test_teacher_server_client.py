"""The vLLM-server teacher client against a fake OpenAI-compatible server, and the methods' sparse-teacher paths.

The fake server (http.server on loopback, in a thread) answers like vLLM 0.32's ``/v1/completions``
with ``prompt_logprobs`` (format recorded in opd/teachers/vllm_server.py) for a bigram "teacher":
the next-token logits at position j are ``W[row[j - 1]]``. No vLLM needed; the real server is in
tests/test_vllm_server_teacher.py.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from vllm_server_harness import free_port

from opd.engine.loss_paths import check_pair
from opd.errors import ConfigError
from opd.losses.divergences import forward_kl, masked_reduce
from opd.losses.topk import topk_forward_kl
from opd.methods.base import sparse_teacher_methods
from opd.methods.gkd import GKD
from opd.methods.kd import KD
from opd.methods.minillm import MiniLLM
from opd.methods.reopold import REOPOLD
from opd.methods.tm_opd import TMOPD
from opd.sampling.base import RolloutBatch
from opd.teachers import SparseTeacherLogprobs, TeacherServerError, VLLMServerTeacher, build_teacher
from opd.teachers.vllm_server import parse_prompt_logprobs

V = 12
PAD = 0
torch.manual_seed(0)
W = torch.randn(V, V) * 2.0  # bigram teacher: logits of the next token given the previous one


class FakeVLLM(BaseHTTPRequestHandler):
    """``/v1/models`` and ``/v1/completions`` (token-id prompts, ``prompt_logprobs``) the way vLLM answers them."""

    model = "toy-teacher"
    max_logprobs = 8
    fail_next = 0  # answer this many completion requests with HTTP 503 first
    logits_not_logprobs = False

    def log_message(self, *args) -> None:  # quiet
        pass

    def _send(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}})

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/v1/models":
            self._send(200, {"object": "list", "data": [{"id": self.model, "object": "model", "max_model_len": 128}]})
        else:
            self._error(404, "not found")

    def do_POST(self) -> None:  # noqa: N802
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        if cls.fail_next > 0:
            cls.fail_next -= 1
            return self._error(503, "engine overloaded")
        if request.get("model", self.model) != self.model:
            return self._error(404, f"The model `{request['model']}` does not exist. Valid aliases: {self.model}.")
        k = request["prompt_logprobs"]
        if k > self.max_logprobs:
            return self._error(400, f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                                    f"{self.max_logprobs} (parameter=prompt_logprobs, value={k})")
        rows = request["prompt"]
        if any(t >= V for row in rows for t in row):
            return self._error(400, f"Token id {max(max(r) for r in rows)} is out of vocabulary")
        choices = [{"index": i, "text": "", "prompt_logprobs": [None] + [self._position(row[j - 1], row[j], k)
                                                                       for j in range(1, len(row))]}
                   for i, row in enumerate(rows)]
        self._send(200, {"object": "text_completion", "model": self.model, "choices": choices})

    def _position(self, prev: int, token: int, k: int) -> dict:
        scores = W[prev] if self.logits_not_logprobs else torch.log_softmax(W[prev], -1)
        order = scores.argsort(descending=True).tolist()
        rank = {t: r + 1 for r, t in enumerate(order)}
        entry = {str(t): {"logprob": scores[t].item(), "rank": rank[t], "decoded_token": None} for t in [token] + order[:k]}
        return entry


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeVLLM)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def reset_fake():
    FakeVLLM.fail_next, FakeVLLM.logits_not_logprobs = 0, False


def make_batch() -> RolloutBatch:
    """3 rows: left-padded prompts, right-padded completions, the last row with no completion token."""
    prompt = torch.tensor([[PAD, 1, 3], [1, 4, 5], [PAD, PAD, 1]])
    prompt_mask = (prompt != PAD).long()
    completion = torch.tensor([[6, 7, 2, PAD], [8, 9, 10, 2], [PAD, PAD, PAD, PAD]])
    completion_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    return RolloutBatch(prompt, prompt_mask, completion, completion_mask, [None] * 3, "student")


def bigram_logits(prompt_ids: torch.Tensor, batch: RolloutBatch) -> torch.Tensor:
    """``[B, T, V]`` the fake teacher's logits at the completion positions (conditioning on ``prompt_ids``)."""
    full = torch.cat([prompt_ids, batch.completion_ids], dim=1)
    p = prompt_ids.shape[1]
    return W[full[:, p - 1: p - 1 + batch.completion_ids.shape[1]]]


def assert_sparse_equal(a: SparseTeacherLogprobs, b: SparseTeacherLogprobs) -> None:
    assert torch.equal(a.topk_ids, b.topk_ids)
    torch.testing.assert_close(a.topk_logprobs, b.topk_logprobs, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.token_logprobs, b.token_logprobs, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- client
@pytest.mark.parametrize("k", [0, 1, 5])
def test_score_matches_the_teacher_incl_padding(server, k):
    teacher = VLLMServerTeacher(server, top_k=k)
    assert teacher.check(vocab_size=V) == {"model": "toy-teacher", "max_model_len": 128, "models": ["toy-teacher"]}
    batch = make_batch()
    out = teacher.score(batch)
    assert out.topk_ids.shape == (3, 4, k) and out.topk_ids.dtype == torch.long
    assert out.topk_logprobs.dtype == torch.float32 and out.token_logprobs.shape == (3, 4)
    assert_sparse_equal(out, SparseTeacherLogprobs.from_logits(bigram_logits(batch.prompt_ids, batch), batch, k))
    if k:  # padding: a uniform placeholder distribution on ids 0..k-1, token log-prob 0
        assert out.topk_ids[2].tolist() == [list(range(k))] * 4
        torch.testing.assert_close(out.topk_logprobs[0, 3].exp().sum(), torch.tensor(1.0))
    assert out.token_logprobs[0, 3] == 0 and (out.token_logprobs[2] == 0).all()
    assert teacher.requests == 3  # check(): /v1/models and a probe; score(): one request (the empty row is not sent)


def test_teacher_prompt_replaces_the_batch_prompt(server):
    batch = make_batch()
    other = torch.tensor([[PAD, 1, 11], [PAD, PAD, 1], [1, 2, 3]])
    out = VLLMServerTeacher(server, top_k=3).score(batch, (other, (other != PAD).long()))
    assert_sparse_equal(out, SparseTeacherLogprobs.from_logits(bigram_logits(other, batch), batch, 3))


def test_parse_maps_vllm_minus_9999_to_minus_inf_and_orders_by_rank():
    entry = {"4": {"logprob": -9999.0, "rank": 3}, "1": {"logprob": -0.1, "rank": 1}, "7": {"logprob": -2.0, "rank": 2},
             "9": {"logprob": -5.0, "rank": 6}}
    ids, lps, token = parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [3, 9], 1, 3)
    assert ids == [[1, 7, 4]] and lps[0][:2] == [-0.1, -2.0] and lps[0][2] == float("-inf") and token == [-5.0]
    with pytest.raises(TeacherServerError, match="expected top-2"):
        parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [3, 9], 1, 2)
    with pytest.raises(TeacherServerError, match="actual token 5"):
        parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [3, 5], 1, 3)
    with pytest.raises(TeacherServerError, match="for 2 positions of a 3-token"):
        parse_prompt_logprobs({"prompt_logprobs": [None, entry]}, [3, 9, 1], 1, 3)


def test_transient_errors_are_retried(server):
    teacher = VLLMServerTeacher(server, top_k=2, backoff_s=0.01, max_retries=3)
    teacher.check(V)
    FakeVLLM.fail_next = 2
    teacher.score(make_batch())
    assert teacher.retries == 2
    FakeVLLM.fail_next = 5
    with pytest.raises(TeacherServerError, match=r"answered HTTP 503: engine overloaded"):
        VLLMServerTeacher(server, top_k=2, backoff_s=0.01, max_retries=1).score(make_batch())


def test_unreachable_server_names_the_url_and_how_to_start_one():
    url = f"http://127.0.0.1:{free_port()}"
    teacher = VLLMServerTeacher(url + "/v1/", top_k=4, max_retries=1, backoff_s=0.01)
    with pytest.raises(ConfigError, match=rf"{url} is unreachable .*after 2 attempts.*vllm serve .*--max-logprobs 4"):
        teacher.check()
    with pytest.raises(TeacherServerError, match="unreachable"):
        teacher.score(make_batch())


def test_configuration_errors(server):
    with pytest.raises(ConfigError, match=r"server_top_k=9 exceeds the server's max_logprobs .*allowed: 8.*--max-logprobs >= 9"):
        VLLMServerTeacher(server, top_k=9).check(V)
    with pytest.raises(ConfigError, match=r"server_model='other'.*serves \['toy-teacher'\]"):
        VLLMServerTeacher(server, model="other", top_k=2).check(V)
    with pytest.raises(ConfigError, match="rejects token id 12.*smaller than the student's"):
        VLLMServerTeacher(server, top_k=2).check(vocab_size=V + 1)
    with pytest.raises(ConfigError, match=r"token id \d+ >= the student's vocabulary size 6"):
        VLLMServerTeacher(server, top_k=8).check(vocab_size=6)
    FakeVLLM.logits_not_logprobs = True
    with pytest.raises(ConfigError, match="returns logits, not log-probabilities"):
        VLLMServerTeacher(server, top_k=8).check(V)
    with pytest.raises(ValueError, match="http://"):
        VLLMServerTeacher("localhost:8000")
    with pytest.raises(ValueError, match="top_k"):
        VLLMServerTeacher(server, top_k=-1)


# ---------------------------------------------------------------------- methods
def served(top_k: int = 4):
    """A ``teacher.kind: vllm_server`` teacher, built (not connected): what the engine checks pairs against."""
    return build_teacher({"kind": "vllm_server", "server_top_k": top_k})


def test_pair_check_per_method():
    assert set(sparse_teacher_methods()) >= {"gkd", "kd", "tm_opd", "reopold"}
    local = build_teacher({"name_or_path": "unused"})
    for method in (GKD(beta=0.0), KD(), KD(temperature=2.0, sparse_mode="renorm"), TMOPD(), REOPOLD()):
        check_pair(method, served())
        check_pair(method, local)
    check_pair(TMOPD(), served(top_k=0))
    cases = [(GKD(), "beta=0.5: the JSD needs the teacher's full distribution"),
             (GKD(beta=0.0, off_policy_source="teacher", lmbda=0.5), "samples completions from the teacher"),
             (KD(temperature=2.0), "needs method.sparse_mode=renorm"),
             (TMOPD(temperature=0.5), "temperature=0.5"),
             (REOPOLD(entropy_source="teacher"), "entropy_source=teacher"),
             (MiniLLM(), "samples completions from the teacher")]
    for method, message in cases:
        with pytest.raises(ConfigError, match=message):
            check_pair(method, served())
    from opd.methods.eopd import EOPD

    with pytest.raises(ConfigError, match=r"needs the teacher's full logits; .* works with methods: gkd, kd, reopold, tm_opd"):
        check_pair(EOPD(), served())
    with pytest.raises(ConfigError, match="server_top_k >= 1"):
        check_pair(GKD(beta=0.0), served(top_k=0))
    with pytest.raises(ConfigError, match=r"teacher: unknown name 'sglang'"):
        build_teacher({"kind": "sglang"})


def method_inputs(k: int):
    torch.manual_seed(1)
    batch = make_batch()
    batch.completion_ids[batch.completion_mask == 0] = PAD
    student = torch.randn(3, 4, V, requires_grad=True)
    teacher = bigram_logits(batch.prompt_ids, batch)
    return batch, student, teacher, SparseTeacherLogprobs.from_logits(teacher, batch, k)


@pytest.mark.parametrize("method", [TMOPD(), TMOPD(kl_discount_factor=0.9), REOPOLD(keep_fraction=0.5)])
def test_sampled_token_methods_equal_their_dense_loss(method):
    batch, student, teacher, sparse = method_inputs(k=0)
    dense = method.loss(batch, student, teacher, 7)
    from_server = method.loss(batch, student, sparse, 7)
    torch.testing.assert_close(from_server.loss, dense.loss)
    assert from_server.metrics == pytest.approx(dense.metrics)


@pytest.mark.parametrize("method,mode,temperature", [
    (GKD(beta=0.0), "tail", 1.0), (GKD(beta=0.0, sparse_mode="renorm"), "renorm", 1.0),
    (KD(), "tail", 1.0), (KD(temperature=2.0, sparse_mode="renorm"), "renorm", 2.0)])
def test_forward_kl_methods_equal_the_dense_top_k_kl(method, mode, temperature):
    batch, student, teacher, sparse = method_inputs(k=4)
    got = method.loss(batch, student, sparse, 7).loss
    scale = temperature ** 2 if isinstance(method, KD) else 1.0
    want = masked_reduce(topk_forward_kl(student, teacher, 4, mode, temperature), batch.completion_mask, 7) * scale
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    (grad,) = torch.autograd.grad(got, student)
    (want_grad,) = torch.autograd.grad(want, student)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_tail_mode_with_the_whole_vocabulary_is_the_full_forward_kl():
    batch, student, teacher, sparse = method_inputs(k=V)
    want = masked_reduce(forward_kl(student, teacher), batch.completion_mask, 7)
    torch.testing.assert_close(GKD(beta=0.0).loss(batch, student, sparse, 7).loss, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="beta=0.5"):
        GKD().loss(batch, student, sparse, 7)


@pytest.mark.parametrize("overrides, message", [
    (("method=gkd", "method.beta=0.5"), "beta=0.5: the JSD needs the teacher's full distribution"),
    (("method=opsd",), None),  # the frozen-student teacher: the teacher section is not used at all
    (("method=minillm",), "samples completions from the teacher"),
    (("method=gkd", "method.beta=0"), "the teacher server at http://127.0.0.1:9 is unreachable"),
])
def test_the_trainer_checks_the_server_teacher_before_loading(compose_cfg, overrides, message):
    """teacher=vllm_server: unsuitable methods and an unreachable server fail at start-up with one line."""
    from opd.train import build_trainer

    cfg = compose_cfg("teacher=vllm_server", "teacher.server_url=http://127.0.0.1:9", "teacher.server_max_retries=0",
                      "teacher.server_timeout_s=2", *overrides)
    if message is None:
        assert type(build_trainer(cfg).teacher_component).registry_name == "initial_student"
        return
    with pytest.raises(ConfigError) as err:
        build_trainer(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
