import pytest
import torch

from conftest import assert_setting_refused_and_defaulted, tiny_diffusion_net, tiny_unet
from nnunet_diffusion.config import DiffusionConfig, SamplingSettings
from nnunet_diffusion.network import FiLMNorm


def _inputs(dim, batch=2, classes=3):
    spatial = (8, 8, 8) if dim == 3 else (16, 16)
    return torch.randn(batch, 1, *spatial), torch.randn(batch, classes, *spatial)


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_denoise_step_shapes_and_every_norm_conditioned(dim, arch):
    net = tiny_diffusion_net(dim, arch=arch)
    image, xt = _inputs(dim)
    out = net(image, xt, torch.tensor([0, 1000]))
    assert out.shape == xt.shape
    norms = [m for m in net.unet.modules() if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d))]
    films = [m for m in net.unet.modules() if isinstance(m, FiLMNorm)]
    assert len(films) == len(norms) > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_untrained_time_path_is_identity(dim):
    net = tiny_diffusion_net(dim).eval()
    image, xt = _inputs(dim)
    with torch.no_grad():
        a = net(image, xt, torch.tensor([0, 0]))
        b = net(image, xt, torch.tensor([1000, 1000]))
        plain = net.unet(torch.cat([image, xt], 1))  # FiLM with no scale/shift set = plain norm
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, plain)


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_output_depends_on_t_once_time_path_has_weights(dim, arch):
    net = tiny_diffusion_net(dim, arch=arch).eval()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    image, xt = _inputs(dim)
    with torch.no_grad():
        a = net(image, xt, torch.tensor([0, 0]))
        b = net(image, xt, torch.tensor([1000, 1000]))
        c = net(image, xt, torch.tensor([0, 1000]))
    assert (a - b).abs().max() > 1e-3
    # conditioning is per sample: sample 0 of c matches a, sample 1 matches b
    torch.testing.assert_close(c[0], a[0])
    torch.testing.assert_close(c[1], b[1])


def test_time_signal_survives_instance_norm():
    """Regression for the reference code's bug: a time vector added *before* InstanceNorm vanishes.
    Ours is applied after normalisation, so the output must change with t even right after a norm."""
    net = tiny_diffusion_net(3).eval()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    film = net._films[0]
    x = torch.randn(2, film.num_channels, 4, 4, 4)
    net._condition(torch.tensor([0, 1000]), 2)
    y = film(x)
    net._clear()
    assert not torch.allclose(y[0], film.norm(x)[0])


@pytest.mark.parametrize("dim", [2, 3])
def test_eval_call_without_xt_runs_the_chain(dim):
    net = tiny_diffusion_net(dim, deep_supervision=True).eval()
    image, _ = _inputs(dim, batch=1)
    calls = []
    net.register_forward_hook(lambda *a: None)
    orig = net.denoise

    def counting(image, xt, t):
        calls.append(int(t[0]))
        return orig(image, xt, t)

    net.denoise = counting
    with torch.no_grad():
        out = net(image)
    assert calls == [1000, 750, 500, 250, 0]
    out = out[0] if isinstance(out, (list, tuple)) else out
    assert out.shape == (1, 3, *image.shape[2:])
    assert torch.isfinite(out).all()


def test_default_seed_makes_chain_deterministic_and_seed_changes_it():
    net = tiny_diffusion_net(3).eval()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    image, _ = _inputs(3, batch=1)
    with torch.no_grad():
        a, b = net(image), net(image)
        c = net.sample(image, SamplingSettings(num_steps=5, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_wrong_channel_count_is_refused():
    net = tiny_diffusion_net(3)
    with pytest.raises(ValueError, match="channel"):
        net(torch.randn(1, 2, 8, 8, 8))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dim", [2, 3])
def test_fused_instance_norm_film_equals_reference_formula(dim, affine):
    norm = (torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d)(5, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    film = FiLMNorm(norm, 5)
    assert film._fusable
    x = torch.randn(3, 5, *([6] * dim))
    film.scale, film.shift = torch.randn(3, 5), torch.randn(3, 5)
    view = (3, 5) + (1,) * dim
    expected = norm(x) * (1 + film.scale.view(view)) + film.shift.view(view)
    torch.testing.assert_close(film(x), expected, rtol=1e-5, atol=1e-5)
    # gradients reach scale, shift and the norm's affine parameters
    film.scale.requires_grad_(True)
    film.shift.requires_grad_(True)
    film(x).square().sum().backward()
    assert film.scale.grad is not None and film.shift.grad is not None
    assert not affine or norm.weight.grad is not None


def test_generic_norm_path_for_group_norm():
    norm = torch.nn.GroupNorm(2, 4)
    film = FiLMNorm(norm, 4)
    assert not film._fusable
    x = torch.randn(2, 4, 5, 5)
    film.scale, film.shift = torch.randn(2, 4), torch.randn(2, 4)
    expected = norm(x) * (1 + film.scale.view(2, 4, 1, 1)) + film.shift.view(2, 4, 1, 1)
    torch.testing.assert_close(film(x), expected)


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_zero_init_mask_input_makes_the_untrained_network_blind_to_xt(dim, arch):
    """zero_init_mask_input: the input convolution ignores x_t at initialisation (and only then: its mask
    weights are ordinary parameters); the paper's initialisation does not."""
    from dataclasses import replace
    from nnunet_diffusion.config import DiffusionConfig
    image, xt = _inputs(dim)
    t = torch.tensor([1000, 250])
    quiet = tiny_diffusion_net(dim, arch=arch, config=replace(DiffusionConfig(), zero_init_mask_input=True)).eval()
    paper = tiny_diffusion_net(dim, arch=arch).eval()
    with torch.no_grad():
        torch.testing.assert_close(quiet(image, xt, t), quiet(image, torch.randn_like(xt), t))
        assert not torch.allclose(paper(image, xt, t), paper(image, torch.randn_like(xt), t))
    conv = next(m for m in quiet.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
    assert conv.weight.requires_grad and conv.weight[:, 1:].abs().sum() == 0 and conv.weight[:, :1].abs().sum() > 0


def test_network_without_normalisation_layers_is_refused_by_name():
    """A network the time signal cannot be attached to (no norm layer, e.g. a LayerNorm-free conv stack) is
    refused with an error naming its class and what is missing."""
    from nnunet_diffusion.network import DiffusionUNet

    class ConvOnly(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(4, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x)

    with pytest.raises(ValueError, match="ConvOnly has no normalisation layer"):
        DiffusionUNet(ConvOnly(), 1, 3)


def test_scale_mask_input_feeds_sqrt_alpha_bar_times_xt():
    """``scale_mask_input``: one step of the network equals the unscaled network (same weights) on
    sqrt(abar_t) x_t, per sample's own t; level K's input is almost gone, level 1's kept; self-conditioning's
    estimate channels are not scaled."""
    from dataclasses import replace
    from nnunet_diffusion.config import DiffusionConfig
    from nnunet_diffusion.schedule import base_alpha_bar
    image, xt = _inputs(3)
    t = torch.tensor([1000, 250])
    abar = torch.tensor(base_alpha_bar())[t].float().view(2, 1, 1, 1, 1)
    for config in (DiffusionConfig(), DiffusionConfig(self_condition=True)):
        plain = tiny_diffusion_net(3, config=config).eval()
        scaled = tiny_diffusion_net(3, config=replace(config, scale_mask_input=True)).eval()
        scaled.load_state_dict(plain.state_dict())
        estimate = torch.randn_like(xt)
        inp = torch.cat([xt, estimate], 1) if config.self_condition else xt
        ref = torch.cat([xt * abar.sqrt(), estimate], 1) if config.self_condition else xt * abar.sqrt()
        with torch.no_grad():
            torch.testing.assert_close(scaled(image, inp, t), plain(image, ref, t))
            assert not torch.allclose(scaled(image, inp, t), plain(image, inp, t))
    assert abar.sqrt()[0].item() < 0.01 and 0.7 < abar.sqrt()[1].item() < 0.75
    assert set(scaled.state_dict()) == set(plain.state_dict())  # the weights' keys do not change


def test_scaled_mask_input_trainer_settings_and_refusal():
    """``DiffusionTrainer_scaledMaskInput`` is the default's settings with the scaling; checkpoints trained with and
    without it refuse each other; a checkpoint from before the field reads as unscaled."""
    from dataclasses import replace
    from nnunet_diffusion.trainer import DiffusionTrainer
    from nnunet_diffusion.variants import DiffusionTrainer_scaledMaskInput, DiffusionTrainer_zeroInitChainMeanEma
    scaled = DiffusionTrainer_scaledMaskInput.diffusion
    assert scaled == replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, scale_mask_input=True)
    assert_setting_refused_and_defaulted("scale_mask_input", scaled, DiffusionTrainer.diffusion)


def test_without_time_conditioning_the_network_is_the_planned_unet():
    """``time_conditioning = False``: no time path (no FiLM wrappers, no time MLP or projection); a denoising step is
    the planned U-Net on (image, x_t) with the same weights, whatever t; with the time path the same weights give
    t-dependent outputs once the projection is trained."""
    from dataclasses import replace
    cfg = replace(DiffusionConfig(), time_conditioning=False)
    net = tiny_diffusion_net(3, config=cfg).eval()
    assert not any(isinstance(m, FiLMNorm) for m in net.modules())
    assert not any(k.startswith(("time_mlp", "time_proj")) for k in net.state_dict())
    torch.manual_seed(0)
    plain = tiny_unet(3, 4, 3).eval()
    plain.load_state_dict({k[len("unet."):]: v for k, v in net.state_dict().items()})
    image, xt = torch.randn(2, 1, 16, 16, 16), torch.randn(2, 3, 16, 16, 16)
    with torch.no_grad():
        out = net(image, xt, torch.tensor([0, 1000]))
        assert torch.allclose(out, plain(torch.cat([image, xt], 1)), atol=1e-6)
        assert torch.equal(out, net(image, xt, torch.tensor([500, 3])))
    with pytest.raises(ValueError, match="t must have shape"):
        net(image, xt, torch.tensor([1]))
    timed = tiny_diffusion_net(3).eval()
    torch.nn.init.normal_(timed.time_proj.weight, std=0.1)
    with torch.no_grad():
        assert not torch.allclose(timed(image, xt, torch.tensor([0, 0])), timed(image, xt, torch.tensor([1000, 1000])))


def test_time_conditioning_trainers_settings_and_refusal():
    """The two trainers without the time path are one change from theirs; checkpoints with and without it refuse each
    other; a checkpoint from before the field reads as conditioned (the paper)."""
    from dataclasses import replace
    from nnunet_diffusion.variants import (DiffusionTrainer_imageOnly, DiffusionTrainer_imageOnlyNoTime,
                                           DiffusionTrainer_noTimeConditioning, DiffusionTrainer_zeroInitChainMean)
    assert DiffusionTrainer_imageOnlyNoTime.diffusion == replace(DiffusionTrainer_imageOnly.diffusion,
                                                                 time_conditioning=False)
    untimed = DiffusionTrainer_noTimeConditioning.diffusion
    assert untimed == replace(DiffusionTrainer_zeroInitChainMean.diffusion, time_conditioning=False)
    assert_setting_refused_and_defaulted("time_conditioning", untimed, DiffusionTrainer_zeroInitChainMean.diffusion)


@pytest.mark.parametrize("arch", ["plain", "residual"])
def test_stock_image_init_keeps_the_untrained_output_and_quarters_the_relative_step(arch):
    """stock_image_init (with zero_init_mask_input): the image weights are sqrt(1 + C) = 2 times those of the same
    draw without it; the normalisation after the input convolution makes the untrained output the same, while the
    relative gradient |dL/dw| / |w| on those weights, SGD's relative step, is a quarter (the default's is 4x stock's)."""
    from dataclasses import replace
    from nnunet_diffusion.config import DiffusionConfig
    zero = replace(DiffusionConfig(), zero_init_mask_input=True)
    image, xt = _inputs(3)
    t = torch.tensor([1000, 250])
    relative, outputs = [], []
    for config in (zero, replace(zero, stock_image_init=True)):
        net = tiny_diffusion_net(3, arch=arch, config=config)
        out = net(image, xt, t)
        out.square().mean().backward()
        conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        relative.append((conv.weight.grad[:, :1].norm() / conv.weight[:, :1].norm()).item())
        outputs.append(out.detach())
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-3, atol=1e-4)
    assert relative[1] == pytest.approx(relative[0] / 4, rel=1e-2)
