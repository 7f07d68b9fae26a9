import pytest
import torch

from nnunet_diffusion.config import SamplingSettings
from nnunet_diffusion.sampling import encode_mask, mask_from_logits, mean_of_last, p_sample_progressive
from nnunet_diffusion.schedule import Schedule


def p_sample_loop(fn, image, schedule, num_classes, average_last=1, **kwargs):
    """The chain's output for ``fn(image, x_t, t)`` (the image bound here): mean of the last steps."""
    shape = (image.shape[0], num_classes, *image.shape[2:])
    return mean_of_last(p_sample_progressive(lambda xt, t: fn(image, xt, t), shape, schedule, **kwargs),
                        average_last)


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
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.predict(torch.randn(1, 1, 8, 8) * 100, SamplingSettings(num_steps=K, sampler=sampler))
    assert torch.isfinite(out).all()


def _abar(t):
    """alpha_bar of the linear base chain, computed here independently of schedule.py."""
    import numpy as np
    return float(np.prod(1.0 - np.linspace(1e-4, 0.02, 1001)[:t + 1]))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_one_update_against_hand_computed_values(sampler):
    """K = 2 (t = 1000 -> 0). The network returns logits (0, ln 3): softmax (1/4, 3/4), x0_hat = (-0.5, 0.5).
    The second call's x_t must be the DDPM posterior sample / the DDIM update written out by hand."""
    import math
    a1, a0 = _abar(1000), _abar(0)
    x2 = torch.tensor([0.3, -1.2]).view(1, 2, 1, 1)
    z = torch.tensor([0.7, 0.1]).view(1, 2, 1, 1)
    seen = []

    def fn(image, xt, t):
        seen.append(xt.clone())
        return torch.tensor([0.0, math.log(3.0)]).view(1, 2, 1, 1)

    p_sample_loop(fn, torch.zeros(1, 1, 1, 1), Schedule.resampled(2), 2, sampler=sampler, noise=[x2, z])
    x0_hat = torch.tensor([-0.5, 0.5]).view(1, 2, 1, 1)
    if sampler == "ddpm":
        beta = 1 - a1 / a0
        c0 = beta * math.sqrt(a0) / (1 - a1)
        ct = math.sqrt(1 - beta) * (1 - a0) / (1 - a1)
        var = beta * (1 - a0) / (1 - a1)
        expected = c0 * x0_hat + ct * x2 + math.sqrt(var) * z
    else:
        eps_hat = (x2 - math.sqrt(a1) * x0_hat) / math.sqrt(1 - a1)
        expected = math.sqrt(a0) * x0_hat + math.sqrt(1 - a0) * eps_hat
    torch.testing.assert_close(seen[1], expected.float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_chain_matches_an_independent_loop_on_an_input_dependent_network(sampler):
    """K = 5 with a network whose output depends on image, x_t and t: the returned logits equal a loop written
    here from the closed forms (kept levels 0, 250, ..., 1000; previous level t_{k-1}, never t - 1)."""
    import math
    torch.manual_seed(0)
    image = torch.randn(1, 1, 4, 5)
    noise = [torch.randn(1, 3, 4, 5) for _ in range(5)]
    w = torch.randn(3, 3)

    def fn(image, xt, t):
        return torch.einsum("ij,bjhw->bihw", w, xt) + image * (1 + t.view(-1, 1, 1, 1) / 1000.0)

    out = p_sample_loop(fn, image, Schedule.resampled(5), 3, sampler=sampler, noise=noise)
    levels = [0, 250, 500, 750, 1000]
    xt = noise[0]
    for j, k in enumerate(range(5, 0, -1)):
        t = levels[k - 1]
        logits = fn(image, xt, torch.tensor([t]))
        if k == 1:
            break
        x0_hat = 2 * torch.softmax(logits, 1) - 1
        a, a_prev = _abar(t), _abar(levels[k - 2])
        if sampler == "ddpm":
            beta = 1 - a / a_prev
            xt = beta * math.sqrt(a_prev) / (1 - a) * x0_hat + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * xt \
                + math.sqrt(beta * (1 - a_prev) / (1 - a)) * noise[j + 1]
        else:
            eps_hat = (xt - math.sqrt(a) * x0_hat) / math.sqrt(1 - a)
            xt = math.sqrt(a_prev) * x0_hat + math.sqrt(1 - a_prev) * eps_hat
    torch.testing.assert_close(out, logits, rtol=1e-4, atol=1e-5)


def test_average_last_is_the_mean_of_the_recorded_step_probabilities():
    """average_last = m returns log(mean softmax of the last m steps' logits), checked against the per-step
    logits the generator yields; m = 1 returns the last step's logits unchanged."""
    torch.manual_seed(0)
    w = torch.randn(3, 3)
    fn = lambda image, xt, t: torch.einsum("ij,bjhw->bihw", w, xt) + t.view(-1, 1, 1, 1) / 500.0  # noqa: E731
    noise = [torch.randn(1, 3, 4, 4) for _ in range(5)]
    steps = {step.k: step.logits for step in p_sample_progressive(lambda xt, t: fn(None, xt, t), (1, 3, 4, 4),
                                                                    Schedule.resampled(5), noise=noise)}
    last = p_sample_loop(fn, torch.zeros(1, 1, 4, 4), Schedule.resampled(5), 3, noise=noise)
    assert sorted(steps) == [1, 2, 3, 4, 5] and torch.equal(last, steps[1])
    for m in (2, 3, 5):
        avg = p_sample_loop(fn, torch.zeros(1, 1, 4, 4), Schedule.resampled(5), 3, noise=noise, average_last=m)
        expected = sum(torch.softmax(steps[k], 1) for k in range(1, m + 1)) / m
        torch.testing.assert_close(torch.softmax(avg, 1), expected)
        assert not torch.allclose(torch.softmax(avg, 1), torch.softmax(last, 1))


def test_mirrored_groups_fall_back_when_memory_runs_out():
    """A network that fails on batches larger than 2 with CUDA's out-of-memory message: the groups per call are
    halved (8 -> 4 -> 2) and the outputs equal one call per mirroring; other errors are not swallowed."""
    from nnunet_diffusion.sampling import MirroredGroups
    torch.manual_seed(0)
    w = torch.randn(3, 3, 1, 1, 1)

    def net(image, xt, t):
        if image.shape[0] > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        ramp = torch.arange(xt.shape[-1], dtype=torch.float32)
        return torch.nn.functional.conv3d(xt, w) + image * ramp + t.view(-1, 1, 1, 1, 1)

    groups = [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    image, xt = torch.randn(8, 1, 3, 4, 5), torch.randn(8, 3, 3, 4, 5)
    t = torch.arange(8)
    batched = MirroredGroups()
    out = batched(net, image, xt, t, groups)
    assert batched.per_call == 2 and batched.calls == 4
    one = MirroredGroups(1)
    ref = one(net, image, xt, t, groups)
    assert one.calls == 8
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b)
    # each group's output is un-mirrored: equal to calling the network on that group by hand
    g = 4
    by_hand = torch.flip(net(torch.flip(image[g:g + 1], (2, 3)), torch.flip(xt[g:g + 1], (2, 3)), t[g:g + 1]), (2, 3))
    torch.testing.assert_close(out[g], by_hand)

    def broken(image, xt, t):
        raise RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        MirroredGroups()(broken, image, xt, t, groups)


def test_generator_yields_each_level_once_with_its_input_and_estimate():
    """The chain yields K steps, k = K ... 1 at the schedule's base levels; each step carries the x_t the denoiser
    was called with and x0_hat = 2 softmax(logits) - 1; stopping after the first step makes one call only."""
    calls = []

    def fn(xt, t):
        calls.append((xt.clone(), t.clone()))
        return xt * 2.0 + t.view(-1, 1, 1, 1) / 1000.0

    schedule = Schedule.resampled(5)
    steps = list(p_sample_progressive(fn, (2, 3, 4, 4), schedule, generator=torch.Generator().manual_seed(0)))
    assert [s.k for s in steps] == [5, 4, 3, 2, 1] and [s.t for s in steps] == [1000, 750, 500, 250, 0]
    for step, (xt, t) in zip(steps, calls):
        assert torch.equal(step.xt, xt) and t.tolist() == [step.t] * 2
        torch.testing.assert_close(step.x0_hat, 2 * torch.softmax(step.logits, 1) - 1)
        torch.testing.assert_close(step.probs, torch.softmax(step.logits, 1))
    calls.clear()
    next(iter(p_sample_progressive(fn, (2, 3, 4, 4), schedule)))
    assert len(calls) == 1
    with pytest.raises(ValueError, match="noise of shape"):
        list(p_sample_progressive(fn, (2, 3, 4, 4), schedule, noise=[torch.zeros(1, 3, 4, 4)]))
    with pytest.raises(ValueError, match="steps to average"):
        mean_of_last(steps, 0)
