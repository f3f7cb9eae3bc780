"""Policy-gradient methods refuse top-p/top-k truncated sampling at start-up (issue 11, defect 6).

Which methods are policy-gradient methods is found from the registry by behaviour, not from a list:
a method whose loss changes when the sampler's recorded log-probs q_old(y_t) change (an importance
ratio, a reward log p_T − log q_old) trains on the sampled tokens' untruncated log-probs, which a
truncated sampler does not sample from. Each such method must declare ``uses_sampled_token_logprobs``
and refuse ``sampler.top_p < 1`` and ``sampler.top_k > 0`` with one line before any model loads;
every other method accepts them.
"""

from __future__ import annotations

import pytest
import torch

import opd.methods  # noqa: F401  (registers every method)
from opd.errors import ConfigError
from opd.models.scoring import token_logprobs
from opd.registry import METHODS
from opd.sampling.base import RolloutBatch
from opd.train import build_trainer
from opd.types import Example

VOCAB = 32  # above every method's default top-K


class FailingTask:
    """A task that judges every completion wrong (a method reading rewards, SDPO, then reprompts with feedback)."""

    def score(self, completion: str, example: Example) -> float:
        return 0.0

    def feedback(self, completion: str, example: Example) -> str:
        return "wrong"


class DigitTokenizer:
    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(map(str, ids))


def reads_sampler_record(name: str) -> bool:
    """Whether method ``name``'s default loss on a student batch depends on the sampler's recorded log-probs (the
    method bound to a task and a tokenizer, as the trainer binds it: SDPO's loss reads the task's rewards)."""
    method = METHODS.build({"name": name}, "method")
    method.bind(FailingTask(), DigitTokenizer())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, VOCAB, (3, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    prompt = torch.ones(3, 2, dtype=torch.long)
    student, teacher = 2 * torch.randn(3, 5, VOCAB, generator=g), 2 * torch.randn(3, 5, VOCAB, generator=g)
    exact = token_logprobs(student, ids, 1.0)  # what an untruncated sampler at temperature 1 records
    losses = []
    examples = [Example("1+1=", "2", "2")] * 3
    for record in (exact, exact + torch.randn(3, 5, generator=g)):
        batch = RolloutBatch(prompt, prompt, ids, mask, examples, "student")
        batch.sampler_logprobs = record
        losses.append(method.loss(batch, student, teacher, int(mask.sum())).loss.item())
    return losses[0] != losses[1]


def test_the_policy_gradient_methods_are_found():
    """Guards the discovery itself: the known PG methods are among those it finds (not the definition of the set)."""
    found = {name for name in METHODS if reads_sampler_record(name)}
    assert {"minillm", "tm_opd", "eopd", "reopold", "aopd"} <= found
    assert not found & {"gkd", "kd", "sft"}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_that_reads_sampled_token_logprobs_declares_it(name):
    assert METHODS.get(name).uses_sampled_token_logprobs == reads_sampler_record(name)


@pytest.mark.parametrize("name", sorted(METHODS))
@pytest.mark.parametrize("truncation", [("sampler.top_p=0.9",), ("sampler.top_k=5",)])
def test_truncated_sampling_is_refused_exactly_for_policy_gradient_methods(compose_cfg, name, truncation):
    if not reads_sampler_record(name):  # any other method accepts truncated sampling
        METHODS.build({"name": name}, "method").check_sampler(0.8, 0.9, 5)
        return
    with pytest.raises(ConfigError, match=r"sampler\.top_p=1\.0 and sampler\.top_k=0") as err:
        build_trainer(compose_cfg(f"method={name}", *truncation))
    assert "\n" not in str(err.value) and f"method {name!r}" in str(err.value)


@pytest.mark.parametrize("name", [name for name in sorted(METHODS) if METHODS.get(name).uses_sampled_token_logprobs])
def test_plain_temperature_sampling_is_accepted(name):
    METHODS.build({"name": name}, "method").check_sampler(0.7, 1.0, 0)
