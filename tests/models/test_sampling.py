"""sample_next_tokens: greedy, filtering, distribution, seeding."""

import pytest
import torch

from tunemake.models.sampling import sample_next_tokens

LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0], [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]])


def draws(n, seed=0, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([sample_next_tokens(LOGITS, generator=generator, **kwargs) for _ in range(n)])


def test_greedy_is_argmax():
    assert sample_next_tokens(LOGITS).tolist() == [5, 5]


def test_top_k_keeps_only_the_k_best():
    samples = draws(400, temperature=1.0, top_k=2)
    assert set(samples[:, 0].tolist()) == {0, 5}
    assert set(samples[:, 1].tolist()) == {4, 5}


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS[0].softmax(-1)  # sorted: 5 (.61), 0 (.22), 1 (.08), ...
    assert probs[5] < 0.7 < probs[5] + probs[0]
    samples = draws(400, temperature=1.0, top_p=0.7)[:, 0]
    assert set(samples.tolist()) == {0, 5}
    # a p below the best token's mass leaves only the best token
    assert set(draws(50, temperature=1.0, top_p=0.1)[:, 0].tolist()) == {5}


def test_frequencies_follow_tempered_softmax():
    n = 4000
    samples = draws(n, temperature=0.7)[:, 1]
    expected = (LOGITS[1] / 0.7).softmax(-1)
    observed = torch.bincount(samples, minlength=6).float() / n
    # binomial standard error is below 0.008 for every entry; 4 sigma
    assert (observed - expected).abs().max() < 0.032


def test_same_seed_same_tokens():
    assert torch.equal(draws(30, seed=4, temperature=1.0), draws(30, seed=4, temperature=1.0))
    assert not torch.equal(draws(30, seed=4, temperature=1.0), draws(30, seed=5, temperature=1.0))


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": 1.0, "top_k": 0}, {"temperature": 1.0, "top_p": 1.5}])
def test_bad_parameters_raise(kwargs):
    from tunemake.models.sampling import check_sampling_params

    with pytest.raises(ValueError):
        check_sampling_params(kwargs.get("temperature", 1.0), kwargs.get("top_k"), kwargs.get("top_p"))
