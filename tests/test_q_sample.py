"""The forward process x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps with non-zero noise, against alpha_bar worked
out here from the linear base chain (float64), independently of schedule.py's arrays."""
import math

import numpy as np
import pytest
import torch

from nnunet_diffusion.schedule import Schedule


def alpha_bar_by_hand(t: int, beta_start: float = 1e-4, beta_end: float = 0.02, last: int = 1000) -> float:
    """abar_t = prod_{s=0..t} (1 - beta_s), beta_s = beta_start + (beta_end - beta_start) s / last (METHOD.md 1)."""
    return math.prod(1.0 - (beta_start + (beta_end - beta_start) * s / last) for s in range(t + 1))


# K = 5 keeps base levels 0, 250, 500, 750, 1000 (the paper's resampled chain)
LEVELS_K5 = [0, 250, 500, 750, 1000]


def test_alpha_bar_by_hand_matches_the_reference_table():
    """The hand formula itself against METHOD.md's printed table (6 significant digits), so the reference used
    below is not a copy of the code's mistake."""
    np.testing.assert_allclose([alpha_bar_by_hand(t) for t in LEVELS_K5],
                               [0.99990, 0.521750, 0.0779923, 3.31891e-3, 3.99520e-5], rtol=1e-5)


@pytest.mark.parametrize("beta_start,beta_end", [(1e-4, 0.02), (1e-3, 0.05)])
def test_q_sample_with_noise_matches_closed_form(beta_start, beta_end):
    """Every level of a K = 5 chain in one batch, x0 = +-1 masks and standard normal noise: each sample's x_k equals
    sqrt(abar) x0 + sqrt(1 - abar) eps. At t = 250 and 500 (abar 0.52 and 0.078) a noise coefficient of 1 - abar,
    sqrt(abar) or 1 is off by 0.2 or more, far beyond the tolerance."""
    schedule = Schedule.resampled(5, beta_start=beta_start, beta_end=beta_end)
    g = torch.Generator().manual_seed(0)
    x0 = torch.where(torch.rand(5, 3, 6, 5, 4, generator=g) > 0.5, 1.0, -1.0)
    eps = torch.randn(5, 3, 6, 5, 4, generator=g)
    k = torch.tensor([1, 2, 3, 4, 5])
    xk = schedule.q_sample(x0, k, eps)
    for b, t in enumerate(LEVELS_K5):
        abar = alpha_bar_by_hand(t, beta_start, beta_end)
        expected = math.sqrt(abar) * x0[b].double() + math.sqrt(1.0 - abar) * eps[b].double()
        torch.testing.assert_close(xk[b].double(), expected, rtol=1e-5, atol=1e-6)


def test_q_sample_levels_are_per_sample_and_noise_only_part():
    """x0 = 0: x_k is the noise times sqrt(1 - abar_k) of each sample's own level (levels in shuffled order, so
    indexing the batch instead of the level fails)."""
    schedule = Schedule.resampled(5)
    eps = torch.randn(4, 2, 8, 8, generator=torch.Generator().manual_seed(1))  # 2D masks
    k = torch.tensor([5, 2, 4, 3])
    xk = schedule.q_sample(torch.zeros_like(eps), k, eps)
    for b, level in enumerate(k.tolist()):
        coef = math.sqrt(1.0 - alpha_bar_by_hand(LEVELS_K5[level - 1]))
        torch.testing.assert_close(xk[b].double(), coef * eps[b].double(), rtol=1e-5, atol=1e-7)
    # at the noisiest level x_K is almost pure noise, at t = 250 the noise weighs ~0.69
    assert 0.9999 < float(xk[0].std() / eps[0].std()) < 1.0
    assert abs(float(xk[1].std() / eps[1].std()) - math.sqrt(1 - 0.521750)) < 1e-4
