import pytest
import torch

from nnunet_diffusion.config import SamplingSettings
from nnunet_diffusion.sampling import encode_mask, mask_from_logits, p_sample_loop
from nnunet_diffusion.schedule import Schedule


def oracle(x0):
    """A network that always returns logits of the true mask, whatever it is given."""
    def fn(image, xt, t):
        assert xt.shape == x0.shape
        return (x0 + 1) * 50.0  # softmax of these logits is the one-hot mask up to e^-100
    return fn


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize("K", [1, 2, 5, 11])
@pytest.mark.parametrize("spatial", [(6, 7), (4, 5, 6)])
def test_oracle_network_returns_mask_exactly(sampler, K, spatial):
    label = torch.randint(0, 3, (2, 1, *spatial))
    x0 = encode_mask(label, 3)
    image = torch.randn(2, 1, *spatial)
    logits = p_sample_loop(oracle(x0), image, Schedule.resampled(K), 3, sampler=sampler,
                           generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits.argmax(1, keepdim=True), label)
    torch.testing.assert_close(mask_from_logits(logits), x0)


def test_chain_visits_levels_in_order_and_returns_last_step():
    seen, outputs = [], []

    def fn(image, xt, t):
        seen.append(t.tolist())
        out = torch.randn(xt.shape)
        outputs.append(out)
        return out

    out = p_sample_loop(fn, torch.zeros(2, 1, 4, 4), Schedule.resampled(5), 2)
    assert seen == [[1000] * 2, [750] * 2, [500] * 2, [250] * 2, [0] * 2]
    assert out is outputs[-1]


def test_ddpm_step_uses_posterior_of_resampled_chain():
    """With given noise, one DDPM step must be c0*x0_hat + ct*x_k + sqrt(beta_tilde)*z on the kept levels."""
    s = Schedule.resampled(5)
    xs = []
    x0 = encode_mask(torch.randint(0, 2, (1, 1, 3, 3)), 2)

    def fn(image, xt, t):
        xs.append(xt.clone())
        return (x0 + 1) * 50.0

    noise = [torch.randn(1, 2, 3, 3) for _ in range(5)]
    p_sample_loop(fn, torch.zeros(1, 1, 3, 3), s, 2, noise=noise)
    assert torch.equal(xs[0], noise[0])
    for step in range(1, 5):
        k = 5 - step + 1
        i = k - 1
        expected = s.posterior_coef_x0[i] * x0 + s.posterior_coef_xt[i] * xs[step - 1] \
            + s.posterior_variance[i] ** 0.5 * noise[step]
        torch.testing.assert_close(xs[step], expected.float())


def test_same_generator_seed_same_result():
    fn = lambda image, xt, t: xt * 3.0  # noqa: E731
    a = p_sample_loop(fn, torch.zeros(1, 1, 5, 5), Schedule.resampled(5), 3, generator=torch.Generator().manual_seed(1))
    b = p_sample_loop(fn, torch.zeros(1, 1, 5, 5), Schedule.resampled(5), 3, generator=torch.Generator().manual_seed(1))
    c = p_sample_loop(fn, torch.zeros(1, 1, 5, 5), Schedule.resampled(5), 3, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_encode_mask_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="label values"):
        encode_mask(torch.tensor([[[0, 3]]]), 3)


@pytest.mark.parametrize("K", [1, 2, 5, 1001])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_chain_stays_finite_under_bfloat16_autocast(K, sampler):
    """Every K in [1, 1001] keeps finite values with a real (tiny) network under low-precision autocast."""
    from conftest import tiny_diffusion_net
    net = tiny_diffusion_net(2).eval()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.sample(torch.randn(1, 1, 8, 8) * 100, SamplingSettings(num_steps=K, sampler=sampler))
    assert torch.isfinite(out).all()
