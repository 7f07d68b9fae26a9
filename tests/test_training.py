import torch

from conftest import tiny_denoiser
from nnunet_diffusion.sampling import encode_mask, mask_from_logits
from nnunet_diffusion.schedule import Schedule
from nnunet_diffusion.training import make_noisy_mask, sample_levels


def test_levels_are_uniform_over_the_chain():
    k = sample_levels(50000, 5, torch.device("cpu"), torch.Generator().manual_seed(0))
    counts = torch.bincount(k, minlength=6)
    assert counts[0] == 0 and k.min() == 1 and k.max() == 5
    assert torch.allclose(counts[1:].float() / 50000, torch.full((5,), 0.2), atol=0.01)


def test_without_recycling_xt_is_q_sample_of_ground_truth():
    s = Schedule.resampled(5)
    x0 = encode_mask(torch.randint(0, 3, (4, 1, 5, 5)), 3)
    k = torch.tensor([1, 2, 4, 5])
    called = []
    noisy = make_noisy_mask(lambda *a: called.append(1), torch.zeros(4, 1, 5, 5), x0, s, recycle=False, k=k,
                            generator=torch.Generator().manual_seed(3))
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(noisy.xt, s.q_sample(x0, k, eps))
    torch.testing.assert_close(noisy.eps, eps)
    assert noisy.t.tolist() == [0, 250, 750, 1000] and not called


def test_recycling_uses_prediction_at_next_level_with_fresh_noise():
    s = Schedule.resampled(5)
    x0 = encode_mask(torch.randint(0, 3, (3, 1, 4, 4)), 3)
    k = torch.tensor([1, 3, 5])
    fake_pred = torch.randn(3, 3, 4, 4)
    seen = {}

    def net(image, xt, t):
        seen["t"], seen["xt"] = t.tolist(), xt
        return fake_pred

    g = torch.Generator().manual_seed(5)
    noisy = make_noisy_mask(net, torch.zeros(3, 1, 4, 4), x0, s, recycle=True, k=k, generator=g)
    g = torch.Generator().manual_seed(5)
    eps1 = torch.randn(x0.shape, generator=g)
    eps2 = torch.randn(x0.shape, generator=g)
    assert seen["t"] == [250, 750, 1000]          # k' = min(k + 1, K)
    torch.testing.assert_close(seen["xt"], s.q_sample(x0, torch.tensor([2, 4, 5]), eps1))
    torch.testing.assert_close(noisy.xt, s.q_sample(mask_from_logits(fake_pred), k, eps2))
    assert not torch.allclose(eps1, eps2)


def test_unsupervised_recycle_pass_records_no_graph():
    """The paper's recycle pass runs without gradient: the network is called with grad mode off."""
    net = tiny_denoiser(3).train()
    s = Schedule.resampled(5)
    image = torch.randn(2, 1, 8, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (2, 1, 8, 8, 8)), 3)
    grad_modes = []

    def recording(image, xt, t):
        grad_modes.append(torch.is_grad_enabled())
        return net(image, xt, t)

    noisy = make_noisy_mask(recording, image, x0, s, recycle=True, generator=torch.Generator().manual_seed(0))
    assert grad_modes == [False]
    assert not noisy.xt.requires_grad


def test_no_gradient_flows_from_xt_into_the_recycle_pass():
    """Eq. 9's stop-gradient, where it matters: the recycle pass keeps its graph (supervised), yet the supervised
    pass's gradient is exactly that of a detached copy of x_t (nothing flows back through x0_hat')."""
    net = tiny_denoiser(3).train()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    s = Schedule.resampled(5)
    image = torch.randn(2, 1, 8, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (2, 1, 8, 8, 8)), 3)
    noisy = make_noisy_mask(net, image, x0, s, recycle=True, supervise_recycle=True,
                            k=torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert noisy.recycled.output.requires_grad
    net(image, noisy.xt, noisy.t).square().sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}
    # the supervised pass reaches the time path and the first convolution (the mask input)
    assert {"time_proj.weight", "time_mlp.0.weight", "unet.encoder.stages.0.0.convs.0.conv.weight"} <= set(grads)
    net.zero_grad(set_to_none=True)
    net(image, noisy.xt.detach().clone(), noisy.t).square().sum().backward()
    for n, p in net.named_parameters():
        if p.grad is None:
            assert n not in grads
        else:
            torch.testing.assert_close(p.grad, grads[n], rtol=0, atol=0)
