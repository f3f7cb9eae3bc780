"""scripts/estimator_variance.py: tm_opd's sampled-token gradient against the exact per-token reverse-KL gradient."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from opd.registry import METHODS
from opd.train import build_trainer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "estimator_variance.py"
DRAWS = 24
#: Student-t 99.5 % quantile at DRAWS − 1 = 23 degrees of freedom (statistical tables): a two-sided 1 % test of a zero mean
T_995_DF23 = 2.807
#: χ²₁'s 99 % quantile: the most R·‖mean difference‖²/E‖difference‖² reaches for an unbiased estimator, whatever the
#: covariance of its noise (all of it on one direction is the worst case; spread over many it concentrates near 1)
CHI2_1_Q99 = 6.635


@pytest.fixture(scope="module")
def ev():
    spec = importlib.util.spec_from_file_location("estimator_variance", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["estimator_variance"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def setup(compose_cfg, ev):
    trainer = build_trainer(compose_cfg("method=tm_opd", "trainer.batch_size=4", "sampler.max_new_tokens=12"))
    exact = METHODS.build({"name": "gkd", "beta": 1.0}, "method")
    return trainer, next(trainer.prompts), exact


def test_estimate_is_unbiased_for_the_exact_per_token_gradient_on_the_same_prefixes(setup, ev):
    """E[tm_opd − exact | prefixes] = 0 (discount 0; the exact per-token reverse KL is gkd β = 1).

    Over R = 24 draws of K = 2 completions per prompt, the difference projected on the population gradient's direction
    (from separate draws, so independent of them) has a mean within Student-t's two-sided 1 % bounds, and the whole
    vector's mean is as small as R zero-mean draws allow (χ²₁ bound). The projection has the power to see a bias: an
    estimate 1.2 times tm_opd's (method.kl_coef=1.2, mean 1.2·exact) is flagged.
    """
    trainer, examples, exact = setup
    draws = [ev.draw_gradients(trainer, examples, 2, seed, exact) for seed in range(DRAWS)]
    direction = torch.stack([ev.draw_gradients(trainer, examples, 8, 1000 + seed, exact).exact for seed in range(4)])
    direction = direction.mean(0)

    def t_statistic(scale: float) -> float:
        z = torch.stack([scale * d.estimate - d.exact for d in draws]) @ direction
        return float(z.mean() / (z.std() / DRAWS ** 0.5))

    assert abs(t_statistic(1.0)) < T_995_DF23
    assert t_statistic(1.2) > T_995_DF23
    diffs = torch.stack([d.estimate - d.exact for d in draws])
    assert DRAWS * diffs.mean(0).pow(2).sum() / diffs.pow(2).sum(1).mean() < CHI2_1_Q99
    again = ev.draw_gradients(trainer, examples, 2, 0, exact)  # deterministic under the seed
    assert torch.equal(again.estimate, draws[0].estimate) and torch.equal(again.exact, draws[0].exact)


def test_cosine_to_the_exact_gradient_rises_with_samples_per_prompt(setup, ev):
    trainer, examples, _ = setup
    result = ev.measure(trainer, examples, ks=(1, 8), draws=4, reference_draws=2, reference_k=4, seed=0)
    k1, k8 = result["rows"]
    assert k8["cos_same_prefixes"]["mean"] > k1["cos_same_prefixes"]["mean"] + 0.1
    assert k8["cos_estimate_to_population"]["mean"] > k1["cos_estimate_to_population"]["mean"]
    assert k8["tokens"]["mean"] > 4 * k1["tokens"]["mean"]  # K completions per prompt are K rows
    assert 0.0 <= k1["tail_abs_share"]["mean"] <= 1.0
    table = ev.format_markdown(result, {"student": "s", "teacher": "t", "prompts": 4, "seed": 0, "draws": 4})
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == ["1", "8"]
