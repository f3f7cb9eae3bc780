"""The chunked divergence loss equals the plain full-logits path in value and gradient, and keeps no [N, V] tensor."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers import LlamaForCausalLM

from opd.losses.chunked import auto_chunk_size, chunked_divergence_loss, resolve_loss_chunk_size
from opd.losses.divergences import (
    clipped_forward_kl,
    forward_kl,
    generalized_jsd,
    masked_reduce,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    total_variation,
)
from opd.methods.gkd import GKD
from opd.models.scoring import completion_hidden_states, completion_logits, linear_head
from opd.models.toy import build_char_tokenizer, tiny_llama_config
from opd.sampling.base import RolloutBatch

B, T, H, H_T, V = 2, 13, 8, 12, 53  # N = 26 positions; chunk sizes 5 and 7 do not divide it


def jsd64(student_logits, teacher_logits, beta=0.5, temperature=1.0):
    """Generalized JSD in float64 throughout (the library's divergences compute in float32)."""
    s = torch.log_softmax(student_logits / temperature, -1)
    t = torch.log_softmax(teacher_logits / temperature, -1)
    m = torch.logsumexp(torch.stack([t + torch.log(torch.tensor(beta, dtype=s.dtype)),
                                     s + torch.log(torch.tensor(1 - beta, dtype=s.dtype))]), 0)
    return beta * (t.exp() * (t - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def make_inputs(dtype=torch.float32, seed=0, bias=False, n=(B, T)):
    g = torch.Generator().manual_seed(seed)
    x = {
        "student_hidden": torch.randn(*n, H, generator=g, dtype=torch.float64),
        "student_weight": torch.randn(V, H, generator=g, dtype=torch.float64) * 0.7,
        "teacher_hidden": torch.randn(*n, H_T, generator=g, dtype=torch.float64),
        "teacher_weight": torch.randn(V, H_T, generator=g, dtype=torch.float64) * 0.7,
    }
    if bias:
        x["student_bias"] = torch.randn(V, generator=g, dtype=torch.float64)
        x["teacher_bias"] = torch.randn(V, generator=g, dtype=torch.float64)
    x = {k: v.to(dtype) for k, v in x.items()}
    mask = (torch.rand(*n, generator=g) > 0.3).long()
    if mask.numel():
        mask.view(-1)[0] = 1
    for key in ("student_hidden", "student_weight", "student_bias"):
        if key in x:
            x[key].requires_grad_(True)
    return x, mask


def plain_loss(x, mask, fn, num_tokens, temperature=1.0, **kw):
    """The reference: full [N, V] logits, then the divergence and masked_reduce (as GKD does)."""
    s = x["student_hidden"] @ x["student_weight"].T
    if "student_bias" in x:
        s = s + x["student_bias"]
    with torch.no_grad():
        t = x["teacher_hidden"] @ x["teacher_weight"].T
        if "teacher_bias" in x:
            t = t + x["teacher_bias"]
    return masked_reduce(fn(s, t, temperature=temperature, **kw), mask, num_tokens)


def student_params(x):
    return [x[k] for k in ("student_hidden", "student_weight", "student_bias") if k in x and x[k].requires_grad]


def assert_same(x, mask, fn, chunk_size, num_tokens=40, temperature=1.0, rtol=1e-5, atol=1e-7, **kw):
    expected = plain_loss(x, mask, fn, num_tokens, temperature, **kw)
    expected_grads = torch.autograd.grad(expected, student_params(x))
    got = chunked_divergence_loss(mask=mask, divergence_fn=fn, num_tokens=num_tokens, chunk_size=chunk_size,
                                  temperature=temperature, **x, **kw)
    got_grads = torch.autograd.grad(got, student_params(x))
    torch.testing.assert_close(got, expected, rtol=rtol, atol=atol)
    for a, b in zip(got_grads, expected_grads):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


DIVERGENCES = [
    pytest.param(functools.partial(generalized_jsd, beta=0.0), id="jsd0"),
    pytest.param(functools.partial(generalized_jsd, beta=0.5), id="jsd0.5"),
    pytest.param(functools.partial(generalized_jsd, beta=1.0), id="jsd1"),
    pytest.param(forward_kl, id="fkl"),
    pytest.param(reverse_kl, id="rkl"),
    pytest.param(functools.partial(skew_forward_kl, alpha=0.1), id="skl"),
    pytest.param(functools.partial(skew_reverse_kl, alpha=0.3), id="srkl"),
    pytest.param(total_variation, id="tv"),
    pytest.param(functools.partial(clipped_forward_kl, clip=0.05), id="clipped_fkl"),
]


@pytest.mark.parametrize("fn", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_library_divergences_match_plain_path(fn, dtype, temperature):
    x, mask = make_inputs(dtype)
    assert_same(x, mask, fn, chunk_size=5, temperature=temperature)


@pytest.mark.parametrize("chunk_size", [1, 7, 26, 1000, None])
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_float64_values_and_gradients_are_exact(chunk_size, beta):
    """With a float64 divergence the only difference left is summation order: agreement to ~1e-12."""
    x, mask = make_inputs(torch.float64, seed=1)
    assert_same(x, mask, jsd64, chunk_size=chunk_size, temperature=1.3, rtol=1e-10, atol=1e-12, beta=beta)


def test_biases_and_batch_shape():
    x, mask = make_inputs(torch.float64, seed=2, bias=True)
    assert_same(x, mask, jsd64, chunk_size=4, rtol=1e-10, atol=1e-12)


def test_fractional_mask_weights_and_default_normaliser():
    x, mask = make_inputs(torch.float64, seed=3)
    weights = mask * torch.linspace(0.1, 2.0, mask.numel(), dtype=torch.float64).view_as(mask)
    weights.view(-1)[3] = -1.0  # non-positive weights are skipped, as masked_reduce does
    assert_same(x, weights, jsd64, chunk_size=6, num_tokens=None, rtol=1e-10, atol=1e-12)
    assert_same(x, weights, jsd64, chunk_size=6, num_tokens=torch.tensor(17), rtol=1e-10, atol=1e-12)


def test_tied_and_untied_heads():
    """Gradients reach a head weight that is also the input embedding (tied), and separate ones (untied)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).long()
    teacher_hidden, teacher_weight = torch.randn(B, T, H_T, generator=g), torch.randn(V, H_T, generator=g)
    for tied in (True, False):
        grads = []
        for chunked in (False, True):
            torch.manual_seed(5)
            embed = torch.nn.Embedding(V, H)
            mix = torch.nn.Linear(H, H)
            head = torch.nn.Linear(H, V, bias=False)
            if tied:
                head.weight = embed.weight
            hidden = torch.tanh(mix(embed(ids)))
            if chunked:
                loss = chunked_divergence_loss(hidden, head.weight, teacher_hidden, teacher_weight, mask,
                                               generalized_jsd, num_tokens=30, chunk_size=4, beta=0.5)
            else:
                loss = masked_reduce(generalized_jsd(head(hidden), teacher_hidden @ teacher_weight.T, beta=0.5), mask, 30)
            loss.backward()
            params = [embed.weight, mix.weight, mix.bias] + ([] if tied else [head.weight])
            grads.append([p.grad.clone() for p in params])
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_frozen_head_and_bfloat16():
    x, mask = make_inputs(torch.float32, seed=6)
    x["student_weight"].requires_grad_(False)  # e.g. LoRA: only the hidden states need a gradient
    assert_same(x, mask, generalized_jsd, chunk_size=5, beta=0.5)
    xb, mask = make_inputs(torch.bfloat16, seed=6)
    assert_same(xb, mask, generalized_jsd, chunk_size=5, rtol=2e-2, atol=2e-3, beta=0.5)


@pytest.mark.parametrize("n", [(0,), (B, 0)])
def test_no_positions(n):
    x, mask = make_inputs(torch.float32, n=n)
    loss = chunked_divergence_loss(mask=mask, divergence_fn=generalized_jsd, num_tokens=0, chunk_size=4, **x)
    loss.backward()
    assert loss.item() == 0.0 and loss.dtype == torch.float32
    assert x["student_hidden"].grad.shape == x["student_hidden"].shape
    assert torch.count_nonzero(x["student_weight"].grad) == 0


def test_all_masked_and_no_grad():
    x, mask = make_inputs(torch.float32, seed=7)
    loss = chunked_divergence_loss(mask=torch.zeros_like(mask), divergence_fn=reverse_kl, num_tokens=9, **x)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x["student_weight"].grad) == 0
    with torch.no_grad():  # validation: no gradient work, no graph
        value = chunked_divergence_loss(mask=mask, divergence_fn=reverse_kl, num_tokens=9, chunk_size=3, **x)
    assert value.grad_fn is None
    torch.testing.assert_close(value, plain_loss(x, mask, reverse_kl, 9).detach())


def test_saves_no_tokens_by_vocabulary_tensor():
    """The memory property: nothing of N x V elements is saved for backward, inside the chunks or by the Function."""
    n_tokens, chunk = 60, 8
    x, mask = make_inputs(torch.float32, seed=8, n=(n_tokens,))
    mask[:] = 1
    packed = []

    def pack(t):
        packed.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_divergence_loss(mask=mask, divergence_fn=generalized_jsd, chunk_size=chunk, beta=0.5, **x)
    assert packed and max(packed) <= 2 * chunk * V < n_tokens * V  # the stacked [2, chunk, V] mixture is the largest
    saved = sorted(t.numel() for t in loss.grad_fn.saved_tensors)
    assert saved == sorted([n_tokens * H, V * H])  # the two gradient buffers, nothing else
    loss.backward()
    with pytest.raises(RuntimeError):  # single-use backward: the buffers are released
        loss.backward()

    packed.clear()  # contrast: the plain path saves several [N, V] tensors
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        plain_loss(x, mask, functools.partial(generalized_jsd, beta=0.5), None)
    assert max(packed) >= n_tokens * V


def test_rejects_bad_shapes():
    x, mask = make_inputs(torch.float32)
    with pytest.raises(ValueError, match="positions differ"):
        chunked_divergence_loss(mask=mask[:, 1:], divergence_fn=forward_kl, **x)
    with pytest.raises(ValueError, match="teacher_weight"):
        chunked_divergence_loss(**{**x, "teacher_weight": x["teacher_weight"][1:]}, mask=mask, divergence_fn=forward_kl)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_divergence_loss(mask=mask, divergence_fn=forward_kl, chunk_size=0, **x)


def test_chunk_size_resolution():
    assert auto_chunk_size(32768) == 512 and auto_chunk_size(151936) == 96 and auto_chunk_size(26) == 4096
    assert auto_chunk_size(10**7) == 32
    assert resolve_loss_chunk_size(None, 151936) == 96
    assert resolve_loss_chunk_size(None, 32000) == 0  # small vocabulary: plain path
    assert resolve_loss_chunk_size(0, 151936) == 0 and resolve_loss_chunk_size(300, 26) == 300
    with pytest.raises(ValueError):
        resolve_loss_chunk_size(-1, 10)


def test_hidden_state_path_on_a_tiny_llama_matches_gkd():
    """completion_hidden_states + the chunked loss == completion_logits + GKD's loss, gradients on every parameter."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    student = LlamaForCausalLM(tiny_llama_config(tokenizer, 16, 1, num_heads=2, max_positions=64))  # tied head
    teacher = LlamaForCausalLM(tiny_llama_config(tokenizer, 24, 1, num_heads=2, max_positions=64))
    g = torch.Generator().manual_seed(1)
    prompt_ids = torch.randint(5, len(tokenizer), (3, 6), generator=g)
    prompt_mask = torch.ones_like(prompt_ids)
    prompt_mask[0, :2] = 0  # left padding
    completion_ids = torch.randint(5, len(tokenizer), (3, 9), generator=g)
    completion_mask = torch.ones_like(completion_ids)
    completion_mask[1, 5:] = 0
    batch = RolloutBatch(prompt_ids, prompt_mask, completion_ids, completion_mask, [], "student")
    assert linear_head(student) is student.lm_head

    method = GKD(beta=0.5, temperature=0.8)
    with torch.no_grad():
        teacher_logits = completion_logits(teacher, batch)
    expected = method.loss(batch, completion_logits(student, batch), teacher_logits, 30).loss
    expected_grads = torch.autograd.grad(expected, list(student.parameters()))

    s = completion_hidden_states(student, batch)
    with torch.no_grad():
        t = completion_hidden_states(teacher, batch)
    torch.testing.assert_close(t.hidden @ t.weight.T, teacher_logits)
    got = chunked_divergence_loss(s.hidden, s.weight, t.hidden, t.weight, batch.completion_mask, generalized_jsd, 30,
                                  chunk_size=4, temperature=0.8, beta=0.5)
    got_grads = torch.autograd.grad(got, list(student.parameters()))
    torch.testing.assert_close(got, expected)
    for a, b in zip(got_grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_linear_head_refuses_logit_transforms():
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(tokenizer, 16, 1, num_heads=2))
    model.config.final_logit_softcapping = 30.0
    assert linear_head(model) is None
    with pytest.raises(ValueError, match="linear output head"):
        completion_hidden_states(model, None)
