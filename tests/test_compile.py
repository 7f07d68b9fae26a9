"""torch.compile (nnU-Net's nnUNet_compile=t path) on the denoising step and the sampling chain.
Slow (inductor compiles C++ on the CPU): run with `bash run_tests.sh -m slow`."""
import pytest
import torch

from conftest import tiny_diffusion_net


@pytest.mark.slow
def test_compiled_network_matches_eager():
    net = tiny_diffusion_net(3, deep_supervision=True)
    torch.nn.init.normal_(net.denoiser.time_proj.weight, std=0.1)
    compiled = torch.compile(net)
    image, xt = torch.randn(2, 1, 8, 8, 8), torch.randn(2, 3, 8, 8, 8)
    t = torch.tensor([0, 750])
    eager = net(image, xt, t)
    out = compiled(image, xt, t)
    for a, b in zip(out, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out[0].sum().backward()
    assert net.denoiser.time_proj.weight.grad.abs().sum() > 0
    net.eval()
    net.decoder.deep_supervision = False
    with torch.no_grad():
        torch.testing.assert_close(compiled(image[:1]), net(image[:1]), rtol=1e-4, atol=1e-4)
