import pytest
import torch

from conftest import tiny_denoiser, tiny_diffusion_net
from nnunet_diffusion.config import DiffusionConfig, SamplingSettings
from nnunet_diffusion.network import _FILM, FiLMNorm


def _inputs(dim, batch=2, classes=3):
    spatial = (8, 8, 8) if dim == 3 else (16, 16)
    return torch.randn(batch, 1, *spatial), torch.randn(batch, classes, *spatial)


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_denoise_step_shapes_and_every_norm_conditioned(dim, arch):
    net = tiny_denoiser(dim, arch=arch)
    image, xt = _inputs(dim)
    out = net(image, xt, torch.tensor([0, 1000]))
    assert out.shape == xt.shape
    norms = [m for m in net.unet.modules() if isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d))]
    films = [m for m in net.unet.modules() if isinstance(m, FiLMNorm)]
    assert len(films) == len(norms) > 0


@pytest.mark.parametrize("dim", [2, 3])
def test_untrained_time_path_is_identity(dim):
    net = tiny_denoiser(dim).eval()
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
    net = tiny_denoiser(dim, arch=arch).eval()
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
    net = tiny_denoiser(3).eval()
    torch.nn.init.normal_(net.time_proj.weight, std=0.1)
    film = net._films[0]
    x = torch.randn(2, film.num_channels, 4, 4, 4)
    token = _FILM.set(net.conditioning(torch.tensor([0, 1000])))
    try:
        y = film(x)
    finally:
        _FILM.reset(token)
    assert not torch.allclose(y[0], film.norm(x)[0])


@pytest.mark.parametrize("dim", [2, 3])
def test_eval_call_without_xt_runs_the_chain(dim):
    """``network(image)`` (what nnU-Net calls) is the adapter's chain: K denoiser calls at the schedule's levels, and
    its output is the mean probability of the last m steps of that chain."""
    net = tiny_diffusion_net(dim, deep_supervision=True, config=DiffusionConfig(average_last=3)).eval()
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.1)
    image, _ = _inputs(dim, batch=1)
    calls = []
    net.denoiser.register_forward_pre_hook(lambda module, args: calls.append(int(args[2][0])))
    with torch.no_grad():
        out = net(image)
        steps = list(net.steps(image, net.sampling))
    assert calls == [1000, 750, 500, 250, 0] * 2
    assert isinstance(out, list) and out[0].shape == (1, 3, *image.shape[2:])
    expected = sum(step.probs for step in steps[2:]) / 3
    torch.testing.assert_close(torch.softmax(out[0], 1), expected)
    assert not torch.allclose(expected, steps[-1].probs, atol=1e-4)  # the mean is not the last step


def test_default_seed_makes_chain_deterministic_and_seed_changes_it():
    net = tiny_diffusion_net(3).eval()
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.1)
    image, _ = _inputs(3, batch=1)
    with torch.no_grad():
        a, b = net(image), net(image)
        c = net.predict(image, SamplingSettings(num_steps=5, seed=1))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_interleaved_predictions_with_different_settings_equal_separate_ones():
    """The network holds no per-call state: two chains with different settings (K, sampler, m, seed) through the
    same network object, advanced step by step in turn, give the steps and outputs each gives alone."""
    net = tiny_diffusion_net(3).eval()
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.3)
    torch.nn.init.normal_(net.denoiser.time_mlp[0].weight, std=0.3)
    image, _ = _inputs(3, batch=1)
    a = SamplingSettings(num_steps=5, sampler="ddpm", average_last=2, seed=0)
    b = SamplingSettings(num_steps=3, sampler="ddim", average_last=1, seed=7)
    with torch.no_grad():
        alone = {s: [step.logits.clone() for step in net.steps(image, s)] for s in (a, b)}
        chains = {s: net.steps(image, s) for s in (a, b)}
        together = {a: [], b: []}
        while chains:
            for s in list(chains):
                try:
                    together[s].append(next(chains[s]).logits.clone())
                except StopIteration:
                    del chains[s]
        for s in (a, b):
            assert len(together[s]) == s.num_steps
            for x, y in zip(together[s], alone[s]):
                assert torch.equal(x, y)
        assert not torch.allclose(alone[a][-1], alone[b][-1])
        assert torch.equal(net.predict(image, a), net.predict(image, a))
    assert _FILM.get() is None  # nothing of a call is left behind
    assert not any(k for k in vars(net.denoiser._films[0]) if k in ("scale", "shift"))


def test_wrong_channel_count_is_refused():
    net = tiny_diffusion_net(3)
    with pytest.raises(ValueError, match="channel"):
        net(torch.randn(1, 2, 8, 8, 8))
    with pytest.raises(ValueError, match="NaN/Inf"):
        net(torch.full((1, 1, 8, 8, 8), float("nan")))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dim", [2, 3])
def test_fused_instance_norm_film_equals_reference_formula(dim, affine):
    norm = (torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d)(5, affine=affine)
    if affine:
        torch.nn.init.normal_(norm.weight)
        torch.nn.init.normal_(norm.bias)
    film = FiLMNorm(norm, 5, 0)
    assert film._fusable
    x = torch.randn(3, 5, *([6] * dim))
    scale, shift = torch.randn(3, 5, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    view = (3, 5) + (1,) * dim
    expected = norm(x) * (1 + scale.view(view)) + shift.view(view)
    token = _FILM.set(((scale, shift),))
    try:
        out = film(x)
    finally:
        _FILM.reset(token)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # gradients reach scale, shift and the norm's affine parameters as the formula's do
    out.square().sum().backward()
    grads = [scale.grad.clone(), shift.grad.clone()]
    scale.grad = shift.grad = None
    expected.square().sum().backward()
    torch.testing.assert_close(grads[0], scale.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grads[1], shift.grad, rtol=1e-4, atol=1e-4)
    assert not affine or norm.weight.grad is not None
    torch.testing.assert_close(film(x), norm(x))  # outside a call: the plain norm


def test_generic_norm_path_for_group_norm():
    norm = torch.nn.GroupNorm(2, 4)
    film = FiLMNorm(norm, 4, 0)
    assert not film._fusable
    x = torch.randn(2, 4, 5, 5)
    scale, shift = torch.randn(2, 4), torch.randn(2, 4)
    expected = norm(x) * (1 + scale.view(2, 4, 1, 1)) + shift.view(2, 4, 1, 1)
    token = _FILM.set(((scale, shift),))
    try:
        torch.testing.assert_close(film(x), expected)
    finally:
        _FILM.reset(token)


@pytest.mark.parametrize("arch", ["plain", "residual"])
@pytest.mark.parametrize("dim", [2, 3])
def test_zero_init_mask_input_makes_the_untrained_network_blind_to_xt(dim, arch):
    """zero_init_mask_input: the input convolution ignores x_t at initialisation (and only then: its mask
    weights are ordinary parameters); the paper's initialisation does not."""
    image, xt = _inputs(dim)
    t = torch.tensor([1000, 250])
    quiet = tiny_denoiser(dim, arch=arch, zero_init_mask_input=True).eval()
    paper = tiny_denoiser(dim, arch=arch).eval()
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
