import pytest
import torch

from conftest import tiny_diffusion_net
from nnunet_diffusion.sampling import encode_mask, full_resolution, mask_from_logits
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


def test_no_gradient_reaches_parameters_through_recycle_pass():
    net = tiny_diffusion_net(3).train()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    s = Schedule.resampled(5)
    image = torch.randn(2, 1, 8, 8, 8)
    x0 = encode_mask(torch.randint(0, 3, (2, 1, 8, 8, 8)), 3)
    noisy = make_noisy_mask(net, image, x0, s, recycle=True, generator=torch.Generator().manual_seed(0))
    assert not noisy.xt.requires_grad
    # nothing was recorded for backward during the recycle pass
    assert all(p.grad is None for p in net.parameters())
    out = net(image, noisy.xt, noisy.t)
    out.sum().backward()
    grads = {n: p.grad for n, p in net.named_parameters() if p.grad is not None}
    # the supervised pass reaches the time path and the first convolution (the mask input)
    assert {"time_proj.weight", "time_mlp.0.weight", "unet.encoder.stages.0.0.convs.0.conv.weight"} <= set(grads)

    # gradient of the supervised pass alone: with xt fixed, the same gradient results
    grads_with_recycle = {n: g.clone() for n, g in grads.items()}
    net.zero_grad(set_to_none=True)
    net(image, noisy.xt.clone(), noisy.t).sum().backward()
    for n, g in grads_with_recycle.items():
        torch.testing.assert_close(dict(net.named_parameters())[n].grad, g)
