"""teacher.backend=vllm_server against a real ``vllm serve`` of the toy teacher (run with ``pytest -m vllm``).

vLLM's CPU attention has no kernel for the toy teacher's 24-dimensional heads, so the server runs the
shipped teacher widened to 96-dimensional heads (:func:`opd.sampling.vllm.pad_attention_heads`: the
same function, zero-padded heads); the reference is the original teacher under Hugging Face. One
server (a free loopback port, float32, eager; ``vllm_teacher_server`` in conftest.py) serves the whole
session, this module and tests/test_pitfalls.py; it starts in about 30 s.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from conftest import VLLM_SERVER_MAX_LOGPROBS  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from vllm_server_harness import free_port  # noqa: E402

from opd.config import ASSETS  # noqa: E402
from opd.data.arithmetic import ChainArithmetic  # noqa: E402
from opd.errors import ConfigError  # noqa: E402
from opd.losses.divergences import masked_reduce  # noqa: E402
from opd.losses.topk import topk_forward_kl  # noqa: E402
from opd.methods.gkd import GKD  # noqa: E402
from opd.methods.tm_opd import TMOPD  # noqa: E402
from opd.models.scoring import completion_logits  # noqa: E402
from opd.sampling.hf import HFSampler  # noqa: E402
from opd.sampling.tokenize import encode_targets  # noqa: E402
from opd.teachers import VLLMServerTeacher  # noqa: E402

pytestmark = pytest.mark.vllm

TEACHER, STUDENT = ASSETS / "toy" / "teacher", ASSETS / "toy" / "student"
MAX_LOGPROBS = VLLM_SERVER_MAX_LOGPROBS  # the server's --max-logprobs


@pytest.fixture(scope="module")
def server(vllm_teacher_server):
    """The session's toy-teacher server (tests/conftest.py), shared with tests/test_pitfalls.py."""
    return vllm_teacher_server


@pytest.fixture(scope="module")
def models():
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(STUDENT, dtype=torch.float32).eval()
    return teacher, student, AutoTokenizer.from_pretrained(STUDENT)


@pytest.fixture(scope="module")
def batch(models):
    """Student samples for 5 toy prompts (right-padded, different lengths), plus a reference answer and an empty row."""
    _, student, tok = models
    examples = ChainArithmetic(num_train=8, num_eval=2).train[:6]
    torch.manual_seed(0)
    sampled = HFSampler(temperature=1.0, max_new_tokens=24).generate(student, tok, examples[:5])
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(sampled.completion_ids, sampled.completion_mask)]
    answer = tok(examples[5].target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out = encode_targets(tok, examples + examples[:1], source="student", completion_tokens=rows + [answer, [1]])
    out.completion_mask[-1] = 0  # nothing to score in the last row
    assert out.prompt_mask.min() == 0 and out.completion_mask.sum(1).unique().numel() > 2  # padding on both sides
    return out


def test_check_reports_the_served_model(server):
    teacher = VLLMServerTeacher(server.base_url, top_k=MAX_LOGPROBS)
    info = teacher.check(vocab_size=26)
    assert info["model"] == "toy-teacher" and info["max_model_len"] == 128


@pytest.mark.parametrize("k", [0, MAX_LOGPROBS])
def test_log_probs_equal_the_hf_teacher(server, models, batch, k):
    teacher_model, _, _ = models
    out = VLLMServerTeacher(server.base_url, "toy-teacher", top_k=k).score(batch)
    logp = torch.log_softmax(completion_logits(teacher_model, batch).float(), dim=-1)
    real = batch.completion_mask.bool()
    want_token = logp.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.token_logprobs[real], want_token[real], rtol=0, atol=1e-3)
    assert (out.token_logprobs[~real] == 0).all()
    if k:
        top = logp.topk(k, dim=-1)
        torch.testing.assert_close(out.topk_logprobs[real], top.values[real], rtol=0, atol=1e-3)
        # ids: the server's ids carry the HF teacher's log-probs (robust to the order of near-ties)
        torch.testing.assert_close(logp.gather(-1, out.topk_ids)[real], out.topk_logprobs[real], rtol=0, atol=1e-3)
        assert (out.topk_ids[real] == top.indices[real]).float().mean() > 0.99
        assert (out.topk_ids[-1] == torch.arange(k)).all()  # the empty row: placeholders


def test_teacher_prompt_with_other_left_padding_gives_the_same_result(server, batch):
    teacher = VLLMServerTeacher(server.base_url, top_k=4)
    wider = torch.nn.functional.pad(batch.prompt_ids, (3, 0)), torch.nn.functional.pad(batch.prompt_mask, (3, 0))
    a, b = teacher.score(batch), teacher.score(batch, wider)
    assert torch.equal(a.topk_ids, b.topk_ids) and torch.equal(a.topk_logprobs, b.topk_logprobs)


def test_losses_from_the_server_equal_the_hf_teacher_losses(server, models, batch):
    teacher_model, student, _ = models
    k, n = MAX_LOGPROBS, batch.num_tokens
    sparse = VLLMServerTeacher(server.base_url, top_k=k).score(batch)
    with torch.no_grad():
        teacher_logits = completion_logits(teacher_model, batch)
    student_logits = completion_logits(student, batch).detach().requires_grad_(True)

    gkd = GKD(beta=0.0).loss(batch, student_logits, sparse, n).loss
    want = masked_reduce(topk_forward_kl(student_logits, teacher_logits, k, "tail"), batch.completion_mask, n)
    torch.testing.assert_close(gkd, want, rtol=1e-3, atol=1e-4)

    batch.sampler_logprobs = None
    from_server, dense = TMOPD().loss(batch, student_logits, sparse, n), TMOPD().loss(batch, student_logits, teacher_logits, n)
    torch.testing.assert_close(from_server.loss, dense.loss, rtol=1e-3, atol=1e-4)
    (g1,) = torch.autograd.grad(from_server.loss, student_logits)
    (g2,) = torch.autograd.grad(dense.loss, student_logits)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)


def test_clear_errors(server):
    with pytest.raises(ConfigError, match=r"server_top_k=9 exceeds the server's max_logprobs .*--max-logprobs >= 9"):
        VLLMServerTeacher(server.base_url, top_k=MAX_LOGPROBS + 1).check()
    with pytest.raises(ConfigError, match=r"server_model='qwen'.*serves \['toy-teacher'\]"):
        VLLMServerTeacher(server.base_url, model="qwen", top_k=2).check()
    with pytest.raises(ConfigError, match="rejects token id 26.*smaller than the student's"):
        VLLMServerTeacher(server.base_url, top_k=2).check(vocab_size=27)
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=rf"{url} is unreachable"):
        VLLMServerTeacher(url, top_k=2, max_retries=0).check()


def test_training_with_the_server_teacher(server, compose_cfg, tmp_path):
    """opd-train teacher=vllm_server: GKD (β=0, forward KL from the top-k) trains the toy student from the server."""
    import json

    from opd.train import run

    cfg = compose_cfg("teacher=vllm_server", f"teacher.server_url={server.base_url}", "teacher.server_model=toy-teacher",
                      f"teacher.server_top_k={MAX_LOGPROBS}", f"student.name_or_path={STUDENT}", "method.beta=0",
                      "trainer.max_steps=3", "sampler.max_new_tokens=24", tiny_models=False)
    summary = run(cfg)
    assert summary["steps"] == 3 and summary["tokens"] > 0 and summary["teacher_accuracy"] is None
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(0 < loss < 10 for loss in losses)

