import numpy as np
import pytest
import torch

from nnunet_diffusion.schedule import NUM_BASE_LEVELS, Schedule, base_alpha_bar, kept_levels


@pytest.mark.parametrize("K,expected", [(5, [0, 250, 500, 750, 1000]), (3, [0, 500, 1000]),
                                        (11, list(range(0, 1001, 100)))])
def test_kept_levels_and_alpha_bar_preserved(K, expected):
    s = Schedule.resampled(K)
    assert s.timesteps.tolist() == expected
    assert s.alpha_bar.dtype == np.float64
    np.testing.assert_array_equal(s.alpha_bar, base_alpha_bar()[expected])


def test_uneven_spacing_keeps_both_ends():
    levels = kept_levels(7)
    assert levels[0] == 0 and levels[-1] == 1000 and len(levels) == 7
    assert np.all(np.diff(levels) > 0)
    assert kept_levels(1).tolist() == [1000]


def test_base_chain_closed_form():
    betas = np.linspace(1e-4, 0.02, 1001)
    ab = base_alpha_bar()
    assert ab[0] == pytest.approx(1 - 1e-4, rel=0, abs=1e-15)
    np.testing.assert_allclose(ab, np.cumprod(1 - betas), rtol=1e-14)


def test_posterior_coefficients_closed_forms():
    s = Schedule.resampled(5)
    ab = s.alpha_bar
    ab_prev = np.concatenate([[1.0], ab[:-1]])
    beta = 1 - ab / ab_prev
    np.testing.assert_allclose(s.beta, beta, rtol=1e-15)
    np.testing.assert_allclose(s.posterior_variance, beta * (1 - ab_prev) / (1 - ab), rtol=1e-14)
    np.testing.assert_allclose(s.posterior_coef_x0, beta * np.sqrt(ab_prev) / (1 - ab), rtol=1e-14)
    np.testing.assert_allclose(s.posterior_coef_xt, np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab), rtol=1e-14)
    # the reference table of METHOD.md (6 significant digits)
    np.testing.assert_allclose(ab, [0.99990, 0.521750, 0.0779923, 3.31891e-3, 3.99520e-5], rtol=1e-5)
    np.testing.assert_allclose(s.beta, [1.0e-4, 0.478198, 0.850518, 0.957446, 0.987962], rtol=1e-5)
    np.testing.assert_allclose(s.posterior_variance, [0, 9.99891e-5, 0.441168, 0.885712, 0.984723],
                               rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(s.posterior_coef_x0, [1.0, 0.999841, 0.666316, 0.268277, 0.056919], rtol=1e-5)
    np.testing.assert_allclose(s.posterior_coef_xt, [0, 1.51042e-4, 0.200546, 0.190832, 0.109357],
                               rtol=1e-5, atol=1e-12)


def test_posterior_mean_is_gaussian_posterior():
    """c0 x0 + ct xt must equal the mean of q(x_{k-1} | x_k, x0) from Bayes' rule on the resampled chain."""
    s = Schedule.resampled(5)
    for k in range(2, 6):
        i = k - 1
        a_k = 1 - s.beta[i]                # one-step alpha between t_{k-1} and t_k
        ab_prev = s.alpha_bar_prev[i]
        # prior x_{k-1} ~ N(sqrt(ab_prev) x0, 1-ab_prev); likelihood x_k ~ N(sqrt(a_k) x_{k-1}, 1-a_k)
        precision = 1 / (1 - ab_prev) + a_k / (1 - a_k)
        c0 = np.sqrt(ab_prev) / (1 - ab_prev) / precision
        ct = np.sqrt(a_k) / (1 - a_k) / precision
        assert s.posterior_coef_x0[i] == pytest.approx(c0, rel=1e-10)
        assert s.posterior_coef_xt[i] == pytest.approx(ct, rel=1e-10)
        assert s.posterior_variance[i] == pytest.approx(1 / precision, rel=1e-10)


def test_full_resampling_reproduces_base_chain():
    s = Schedule.resampled(NUM_BASE_LEVELS)
    assert s.timesteps.tolist() == list(range(1001))
    np.testing.assert_allclose(s.beta, np.linspace(1e-4, 0.02, 1001), rtol=1e-9)


def test_q_sample_zero_noise():
    s = Schedule.resampled(5)
    x0 = torch.rand(3, 2, 4, 4) * 2 - 1
    k = torch.tensor([1, 3, 5])
    out = s.q_sample(x0, k, torch.zeros_like(x0))
    expected = x0 * torch.tensor(np.sqrt(s.alpha_bar[[0, 2, 4]]), dtype=torch.float32).view(3, 1, 1, 1)
    torch.testing.assert_close(out, expected)
    assert s.timesteps_of(k).tolist() == [0, 500, 1000]


@pytest.mark.parametrize("bad", [0, -1, 1002, 2.5, "5", True])
def test_invalid_number_of_steps(bad):
    with pytest.raises(ValueError):
        Schedule.resampled(bad)
