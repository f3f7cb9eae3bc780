"""The chunked hidden-state loss path inside the real loop: same steps as the full-logits path."""

from __future__ import annotations

import pytest
import torch

from opd.train import build_trainer


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_chunked_step_equals_plain_step(compose_cfg, lmbda):
    common = (f"method.lmbda={lmbda}", "method.beta=0.3", "method.temperature=0.9", "trainer.max_grad_norm=0",
              "trainer.batch_size=4", "trainer.grad_accum=2")
    plain = build_trainer(compose_cfg(*common, "trainer.loss_chunk_size=0"))
    assert plain.loss_chunk_size == 0  # tiny vocab: auto would be plain anyway
    ma = [plain.train_step() for _ in range(2)]
    chunked = build_trainer(compose_cfg(*common, "trainer.loss_chunk_size=5"))  # reseeds the global RNG
    assert chunked.loss_chunk_size == 5
    mb = [chunked.train_step() for _ in range(2)]
    for a, b in zip(ma, mb):
        assert a["train/tokens"] == b["train/tokens"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
        assert a["loss/jsd"] == pytest.approx(b["loss/jsd"], rel=1e-5)
    for p, q in zip(plain.student.parameters(), chunked.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_chunked_validation_loss_equals_plain(compose_cfg):
    """DistiLLM's validation cross-entropy from chunked hidden states equals the full-logits one."""
    common = ("method=distillm", "trainer.batch_size=4", "trainer.validation_examples=10", "trainer.eval_batch_size=4")
    plain = build_trainer(compose_cfg(*common, "trainer.loss_chunk_size=0"))
    chunked = build_trainer(compose_cfg(*common, "trainer.loss_chunk_size=5"))
    assert chunked.loss_chunk_size == 5 and plain.validation_examples == chunked.validation_examples
    assert plain.validation_loss() == pytest.approx(chunked.validation_loss(), rel=1e-5)

def test_auto_and_unsupported(compose_cfg):
    t = build_trainer(compose_cfg())
    assert t.loss_chunk_size == 0
    with pytest.warns(UserWarning, match="loss_chunk_size=8 ignored"):
        t = build_trainer(compose_cfg("method=kd", "method.ce_weight=0.5", "trainer.loss_chunk_size=8"))
    assert t.loss_chunk_size == 0
    with pytest.warns(UserWarning, match="loss_chunk_size=8 ignored"):
        t = build_trainer(compose_cfg("method=minillm", "trainer.loss_chunk_size=8"))
    assert t.loss_chunk_size == 0


@pytest.mark.parametrize("method", [("method=kd", "method.temperature=2.0"),
                                    ("method=distillm", "method.divergence=skl", "method.alpha=0.2"),
                                    ("method=distillm", "method.divergence=srkl", "method.temperature=0.8")])
def test_chunked_kd_and_distillm_equal_their_plain_steps(compose_cfg, method):
    """KD's forward KL (τ² scaled) and DistiLLM's skew KL / skew reverse KL through the chunked path."""
    common = (*method, "trainer.max_grad_norm=0", "trainer.batch_size=4", "trainer.grad_accum=2")
    plain = build_trainer(compose_cfg(*common, "trainer.loss_chunk_size=0"))
    ma = [plain.train_step() for _ in range(2)]
    chunked = build_trainer(compose_cfg(*common, "trainer.loss_chunk_size=3"))
    assert chunked.loss_chunk_size == 3
    mb = [chunked.train_step() for _ in range(2)]
    for a, b in zip(ma, mb):
        assert a["train/tokens"] == b["train/tokens"] and a.keys() == b.keys()
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4)
    for p, q in zip(plain.student.parameters(), chunked.student.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # two AdamW steps of float32 rounding

def test_negative_rejected(compose_cfg):
    from opd.errors import ConfigError
    with pytest.raises(ConfigError, match="loss_chunk_size"):
        build_trainer(compose_cfg("trainer.loss_chunk_size=-1"))


@pytest.mark.slow
def test_compiled_forwards_train_like_the_plain_ones(compose_cfg):
    """trainer.compile=true (torch.compile of both forwards, ~1 min to compile): the same steps as eager."""
    common = ("method.lmbda=0", "trainer.batch_size=4", "trainer.grad_accum=2")
    eager = build_trainer(compose_cfg(*common))
    ma = [eager.train_step() for _ in range(2)]
    compiled = build_trainer(compose_cfg(*common, "trainer.compile=true"))
    mb = [compiled.train_step() for _ in range(2)]
    for a, b in zip(ma, mb):
        assert a["train/tokens"] == b["train/tokens"]
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-4)
        assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-3)
    assert eager.evaluate(eager.student, "eager").accuracy == compiled.evaluate(compiled.student, "compiled").accuracy
