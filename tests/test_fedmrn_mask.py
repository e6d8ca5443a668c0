"""FedMRN's mask sampling (``training.fedmrn.Masker``) against the paper's definition:
with probability p an entry takes a Bernoulli sample of clip(u/n, 0, 1) (signed:
2 Bernoulli((clip(u/n, -1, 1) + 1) / 2) - 1), else the continuous value itself."""
import numpy as np
import pytest
import torch

from device_runtime.training.fedmrn import Masker, uniform16

N = 200_000


def _masker(signed: bool, seed: int = 0) -> tuple[Masker, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # |n| kept away from 0 so that (weight - base) / n recovers the mask to 1e-5
    sign = torch.randint(0, 2, (N,), generator=g).mul(2).sub(1)
    n = (0.02 + 0.03 * torch.rand(N, generator=g)) * sign
    base = torch.randn(N, generator=g)
    return Masker(base, n, signed, np.random.default_rng(seed)), base, n


def _mask(m: Masker, base: torch.Tensor, n: torch.Tensor, r: torch.Tensor, p: float):
    out = torch.empty(N)
    m.weight(r, p, out)
    return ((out - base) / n).numpy()


@pytest.mark.parametrize("signed", [False, True])
def test_without_sampling_the_mask_is_the_clipped_ratio(signed):
    m, base, n = _masker(signed)
    r = torch.linspace(-2, 2, N)
    lo = -1.0 if signed else 0.0
    np.testing.assert_allclose(_mask(m, base, n, r, 0.0), r.clamp(lo, 1).numpy(), atol=1e-4)


@pytest.mark.parametrize("signed,r,mean", [(False, 0.3, 0.3), (True, 0.4, 0.4),
                                           (False, 1.7, 1.0), (True, -1.2, -1.0)])
def test_a_full_sample_is_bernoulli_with_the_clipped_ratio(signed, r, mean):
    m, base, n = _masker(signed)
    mask = _mask(m, base, n, torch.full((N,), r), 1.0)
    values = {-1.0, 1.0} if signed else {0.0, 1.0}
    assert set(np.round(mask, 3)) <= values
    assert abs(mask.mean() - mean) < 0.01  # 5 standard errors at N = 200k


@pytest.mark.parametrize("signed", [False, True])
def test_progressive_masking_samples_a_fraction_p_of_the_entries(signed):
    m, base, n = _masker(signed)
    mask = _mask(m, base, n, torch.full((N,), 0.25), 0.3)
    continuous = np.isclose(mask, 0.25, atol=1e-3)
    assert abs(continuous.mean() - 0.7) < 0.01
    sampled = mask[~continuous]
    if signed:  # P(+1) = (0.25 + 1) / 2
        assert abs((sampled > 0).mean() - 0.625) < 0.015
    else:
        assert abs((sampled > 0.5).mean() - 0.25) < 0.015


def test_two_draws_differ_and_a_seed_repeats():
    a, b = np.empty(1000, np.float32), np.empty(1000, np.float32)
    uniform16(np.random.default_rng(1), a)
    uniform16(np.random.default_rng(1), b)
    assert (a == b).all() and 0 <= a.min() and a.max() < 1
    uniform16(np.random.default_rng(2), b)
    assert (a != b).mean() > 0.99


def test_a_weight_the_loss_does_not_use_keeps_its_value():
    """A masked weight with no gradient (a layer the forward skips) takes no step and
    keeps its reference value, as a parameter SGD never touched."""
    from device_runtime.training.fedmrn import train_fedmrn
    from device_runtime.training.local import LocalTrainOptions

    class Partly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

        def forward(self, x):
            return self.used(x)

    torch.manual_seed(0)
    model = Partly()
    before = model.unused.weight.detach().clone()
    used_before = model.used.weight.detach().clone()
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    y = np.arange(64) % 3
    res = train_fedmrn(model, x, y, LocalTrainOptions(epochs=1, batch_size=16), seed=3,
                       device="d")
    assert np.array_equal(res.weights["unused.weight"], before.numpy())
    assert not np.array_equal(res.weights["used.weight"], used_before.numpy())  # trained
