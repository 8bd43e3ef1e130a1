"""Per-token NLL: the token-weighted mean by hand, per-example sums by hand, padding-proof batching."""

import math
from collections import namedtuple

import pytest

from evaluation.nll import LN2, mean_nll, nll_result, score_examples

Example = namedtuple("Example", "input_ids labels")


def test_mean_nll_is_token_weighted_not_mean_of_means():
    # example A: 1 token, NLL 3.0 ; example B: 3 tokens, NLL sum 3.0 (1.0 each)
    # token-weighted: 6 / 4 = 1.5 ; a mean of per-example means would give (3 + 1) / 2 = 2.0
    assert mean_nll([3.0, 3.0], [1, 3]) == pytest.approx(1.5)


def test_nll_result_bits_and_counts():
    r = nll_result([2 * LN2, 6 * LN2], [2, 2])
    assert r.nats_per_token == pytest.approx(2 * LN2)
    assert r.bits_per_token == pytest.approx(2.0)
    assert (r.tokens, r.examples) == (4, 2)
    assert r.example_nll == (2 * LN2, 6 * LN2) and r.example_tokens == (2, 2)


@pytest.mark.parametrize(
    "sums, counts, match",
    [([1.0], [1, 2], "NLL sums"), ([1.0], [0], "no completion tokens"), ([1.0], [-1], ">= 0")],
)
def test_mean_nll_rejects_bad_input(sums, counts, match):
    with pytest.raises(ValueError, match=match):
        mean_nll(sums, counts)


def test_per_example_sums_by_hand():
    """A one-layer "model" whose logits we choose: position 0 predicts labels[1], position 1 labels[2]."""
    import torch

    class Fixed(torch.nn.Module):
        config = None  # no model type: the full-logits path

        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, use_cache=None):
            # vocab 2: logits (0, 0) give log p = -ln 2 for either token; (ln 3, 0) give p(0) = 3/4.
            row = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [9.0, 9.0]])
            return namedtuple("Out", "logits")(row.expand(input_ids.shape[0], 3, 2))

    examples = [Example([1, 1, 0], [-100, 1, 0]), Example([1, 1, 0], [-100, -100, 0])]
    r = score_examples(Fixed(), examples, batch_size=2)
    assert r.example_tokens == (2, 1)
    assert r.example_nll == pytest.approx((math.log(2) - math.log(0.75), -math.log(0.75)))


def _examples(n=5):
    import random

    rng = random.Random(0)
    out = []
    for _ in range(n):
        length = rng.randint(4, 20)
        ids = [rng.randint(4, 300) for _ in range(length)]
        prompt = rng.randint(1, length - 2)
        out.append(Example(ids, [-100] * prompt + ids[prompt:]))
    return out


@pytest.fixture(scope="module")
def tiny_llama(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models("llama"))


def test_batched_equals_one_by_one_and_manual(tiny_llama):
    import torch

    examples = _examples()
    batched = score_examples(tiny_llama, examples, pad_token_id=0, batch_size=4)
    alone = [score_examples(tiny_llama, [e], pad_token_id=0, batch_size=1) for e in examples]
    expected_tokens = sum(len(e.labels) - e.labels.count(-100) for e in examples)
    assert batched.tokens == expected_tokens == sum(r.tokens for r in alone)
    assert batched.examples == 5
    # token-weighted combination of the one-by-one results
    combined = sum(r.nats_per_token * r.tokens for r in alone) / batched.tokens
    assert batched.nats_per_token == pytest.approx(combined, rel=1e-5)
    # and transformers' own mean loss on one unpadded example agrees
    e = examples[0]
    with torch.no_grad():
        ref = tiny_llama(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss
    assert alone[0].nats_per_token == pytest.approx(ref.item(), rel=1e-5)
    # a random 400-token model sits near ln(400) nats per token
    assert abs(batched.nats_per_token - math.log(400)) < 1.0
    assert batched.bits_per_token == pytest.approx(batched.nats_per_token / LN2)


def test_score_examples_without_completion_tokens_is_user_error(tiny_llama):
    from data.errors import UserError

    with pytest.raises(UserError, match="completion token"):
        score_examples(tiny_llama, [Example([5, 6, 7], [-100, -100, -100])], pad_token_id=0)
