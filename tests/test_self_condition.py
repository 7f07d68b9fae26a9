"""Self-conditioning (DiffusionConfig.self_condition): what the network sees in training and in the chain."""
from dataclasses import replace

import pytest
import torch

from conftest import tiny_diffusion_net
from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.sampling import p_sample_loop
from nnunet_diffusion.schedule import Schedule
from nnunet_diffusion.training import NoisyBatch, self_condition_input

SELF = replace(DiffusionConfig(), self_condition=True)


def test_network_takes_the_estimate_as_more_channels_and_zeros_when_there_is_none():
    net = tiny_diffusion_net(3, config=SELF).eval()
    conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert conv.in_channels == 1 + 2 * 3
    image, xt, t = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3, 8, 8, 8), torch.tensor([1000, 250])
    with torch.no_grad():
        plain = net(image, xt, t)
        torch.testing.assert_close(plain, net(image, torch.cat([xt, torch.zeros_like(xt)], 1), t))
        assert not torch.allclose(plain, net(image, torch.cat([xt, torch.randn_like(xt)], 1), t))
        assert net(image).shape == (2, 3, 8, 8, 8)  # the chain (nnU-Net's eval call) runs
    with pytest.raises(ValueError, match="6 channels"):
        net(image, torch.randn(2, 4, 8, 8, 8), t)


@pytest.mark.parametrize("mirrors", [None, [(), (2,), (2, 3)]])
def test_chain_feeds_every_step_the_previous_steps_x0_hat(mirrors):
    """Step 1 sees zeros; step j sees x0_hat of step j - 1, in the frame of the mirroring it runs under."""
    torch.manual_seed(0)
    weight = torch.randn(3, 7)
    inputs, estimates = [], []

    def fn(image, xt, t):  # input-dependent, not mirror-symmetric: a per-voxel linear map plus position
        inputs.append(xt.clone())
        pos = torch.linspace(0, 1, xt.shape[-1])
        return torch.einsum("oc,bc...->bo...", weight, torch.cat([image, xt], 1)) + pos

    image = torch.randn(1, 1, 5, 6)
    p_sample_loop(fn, image, Schedule.resampled(5), 3, generator=torch.Generator().manual_seed(1),
                  mirrors=mirrors, self_condition=True, on_step=lambda k, t, x0, out: estimates.append(x0.clone()))
    assert len(inputs) == 5
    for j, seen in enumerate(inputs):
        axes = mirrors[j % len(mirrors)] if mirrors else ()
        cond = torch.flip(seen[:, 3:], axes) if axes else seen[:, 3:]
        expected = torch.zeros_like(cond) if j == 0 else estimates[j - 1]
        torch.testing.assert_close(cond, expected)


def test_training_input_is_the_gradient_free_first_pass_estimate_or_zeros():
    torch.manual_seed(0)
    weight = torch.randn(3, 7, requires_grad=True)
    calls = []

    def fn(image, xt, t):
        calls.append(xt.clone())
        return torch.einsum("oc,bc...->bo...", weight, torch.cat([image, xt], 1))

    B = 16
    image, xt = torch.randn(B, 1, 4, 5), torch.randn(B, 3, 4, 5)
    k = torch.randint(1, 6, (B,))
    schedule = Schedule.resampled(5)
    noisy = NoisyBatch(xt=xt, k=k, t=schedule.timesteps_of(k), eps=torch.randn_like(xt))
    cond = self_condition_input(fn, image, noisy, "x0", schedule, generator=torch.Generator().manual_seed(3))
    assert len(calls) == 1 and torch.equal(calls[0][:, 3:], torch.zeros_like(xt))  # first pass: no estimate
    assert not cond.requires_grad
    x0_hat = 2 * torch.softmax(fn(image, torch.cat([xt, torch.zeros_like(xt)], 1), noisy.t), 1) - 1
    kept = [torch.allclose(cond[b], x0_hat[b].detach()) for b in range(B)]
    dropped = [bool((cond[b] == 0).all()) for b in range(B)]
    assert all(a != b for a, b in zip(kept, dropped))  # every sample is one or the other
    assert 0 < sum(kept) < B
    torch.testing.assert_close(noisy.__class__(**{**noisy.__dict__, "condition": cond}).network_input(),
                               torch.cat([xt, cond], 1))


def test_self_conditioning_trainer_trains_on_the_estimate(make_trainer):
    """Through nnU-Net's initialised trainer: the input layer takes C_img + 2C channels, one training step makes
    a recycle pass (C channels, zeros appended), a gradient-free self-conditioning pass and the supervised pass
    with 2C mask channels, and updates the weights."""
    tr = make_trainer("DiffusionTrainer_selfCondition_1ep1it")
    net = tr.diffusion_network
    C = net.num_classes
    conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert conv.in_channels == net.num_image_channels + 2 * C
    seen, denoise = [], net.denoise

    def recording(image, xt, t):
        seen.append((xt.shape[1], torch.is_grad_enabled()))
        return denoise(image, xt, t)
    net.denoise = recording
    before = {k: v.clone() for k, v in net.state_dict().items()}
    tr.on_train_epoch_start()
    tr.train_step(next(tr.dataloader_train))
    assert seen == [(C, False), (2 * C, False), (2 * C, True)]
    assert any(not torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_default_with_self_conditioning_starts_blind_to_all_mask_channels(make_trainer):
    """``DiffusionTrainer_defaultSelfCondition``: the default's settings plus self-conditioning, and the default's
    zero initialisation covers the estimate's C channels as well as x_t's, so the untrained network's output
    depends on the image only (as the default's does)."""
    from nnunet_diffusion.variants import DiffusionTrainer_defaultSelfCondition, DiffusionTrainer_zeroInitChainMeanEma
    assert DiffusionTrainer_defaultSelfCondition.diffusion == replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion,
                                                                      self_condition=True)
    tr = make_trainer("DiffusionTrainer_defaultSelfCondition_1ep1it")
    net = tr.diffusion_network
    C, n_img = net.num_classes, net.num_image_channels
    conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert conv.in_channels == n_img + 2 * C
    assert conv.weight[:, n_img:].abs().sum() == 0 and conv.weight[:, :n_img].abs().sum() > 0
    net.eval()
    image = torch.randn(1, n_img, *tr.configuration_manager.patch_size)
    t = torch.tensor([1000])
    with torch.no_grad():
        a = net(image, torch.randn(1, 2 * C, *image.shape[2:]), t)
        b = net(image, torch.randn(1, 2 * C, *image.shape[2:]), t)
    torch.testing.assert_close(a, b)
