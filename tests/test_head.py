"""The trunk + denoising head design (issue 38): what runs how often, what sees what, where gradients go."""
import os

import numpy as np
import pytest
import torch

from conftest import BIN, DATASET, run, tiny_unet
from nnunet_diffusion.head import DenoisingHead, HeadConfig, HeadSampling, TrunkHeadNetwork, trunk_pass
from nnunet_diffusion.sampling import encode_mask
from nnunet_diffusion.schedule import base_alpha_bar

C = 3


def tiny_head_net(dim=3, deep_supervision=False, width=8, seed=0, trained_head=True):
    """A tiny trunk (the planned-style U-Net on the image alone) with a head; ``trained_head`` gives the head's
    zero-initialised layers random weights, so the head's correction and its time path are not the identity."""
    torch.manual_seed(seed)
    net = TrunkHeadNetwork(tiny_unet(dim, 1, C, deep_supervision), C, HeadConfig(width=width, time_embed_dim=16))
    if trained_head:
        with torch.no_grad():
            for layer in (net.head.out, net.head.time[-1]):
                layer.weight.normal_(0, 0.5)
                layer.bias.normal_(0, 0.5)
    return net


def example(dim=3, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 1) + (16,) * dim
    image = torch.randn(shape, generator=g)
    label = torch.randint(0, C, (batch, 1) + (16,) * dim, generator=g)
    return image, label, encode_mask(label, C)


class Counter:
    """Counts forward calls of a module and records their first argument."""

    def __init__(self, module):
        self.calls, self.inputs = 0, []
        module.register_forward_hook(self)

    def __call__(self, module, args, out):
        self.calls += 1
        self.inputs.append(args[0].detach().clone())


@pytest.mark.parametrize("dim", [2, 3])
def test_training_runs_the_trunk_once_and_the_head_twice(dim):
    net = tiny_head_net(dim, deep_supervision=True)
    trunk, head = Counter(net.trunk), Counter(net.head)
    image, _, x0 = example(dim)
    trunk_out, head_logits = net(image, x0)
    assert (trunk.calls, head.calls) == (1, 2)  # the recycle pass and the supervised pass
    assert isinstance(trunk_out, list) and len(trunk_out) == 2  # nnU-Net's deep supervision kept
    assert head_logits.shape == x0.shape


def test_the_trunk_sees_the_image_alone_and_the_head_sees_x_t():
    net = tiny_head_net()
    image, _, x0 = example()
    trunk = Counter(net.trunk)
    assert trunk_pass(net.trunk, image)[0].shape == x0.shape
    # trunk input: the image only (1 channel); another mask changes nothing the trunk computes
    g = torch.Generator().manual_seed(3)
    out_a, head_a = net(image, x0, generator=torch.Generator().manual_seed(5))
    out_b, head_b = net(image, -x0, generator=torch.Generator().manual_seed(5))
    assert all(inp.shape[1] == 1 for inp in trunk.inputs)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    assert not torch.allclose(head_a, head_b)  # the head does see the mask
    del g


def test_recycling_is_stop_gradient_and_the_trunk_gets_no_head_gradient():
    """The head's gradient equals that of the supervised pass alone on a detached recycled estimate, written out
    here from the recipe (eq. 8-9); a recycle pass that kept its graph adds its own contribution and differs."""
    net = tiny_head_net()
    image, _, x0 = example()
    k = torch.tensor([2, 5])
    _, head_logits = net.training_pass(image, x0, k=k, generator=torch.Generator().manual_seed(7))
    head_logits.square().sum().backward()
    got = [p.grad.clone() for p in net.head.parameters()]
    assert all(p.grad is None or not p.grad.any() for p in net.trunk.parameters())

    net.zero_grad(set_to_none=True)
    abar = torch.tensor(base_alpha_bar(), dtype=torch.float64)
    t = torch.tensor([0, 250, 500, 750, 1000])  # the 5 kept base levels
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        out, features = trunk_pass(net.trunk, image)
    k_next = torch.tensor([3, 5])
    eps1 = torch.randn(x0.shape, generator=g)
    a = abar[t[k_next - 1]].float().view(-1, 1, 1, 1, 1)
    x_next = a.sqrt() * x0 + (1 - a).sqrt() * eps1
    x0_hat = (2 * torch.softmax(net.head(features, out, x_next, t[k_next - 1]), 1) - 1).detach()
    eps2 = torch.randn(x0.shape, generator=g)
    a = abar[t[k - 1]].float().view(-1, 1, 1, 1, 1)
    net.head(features, out, a.sqrt() * x0_hat + (1 - a).sqrt() * eps2, t[k - 1]).square().sum().backward()
    for mine, ref in zip(got, [p.grad for p in net.head.parameters()]):
        torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5)


def test_an_untrained_head_returns_the_trunk_at_every_level():
    net = tiny_head_net(trained_head=False)
    image, _, x0 = example()
    out, features = trunk_pass(net.trunk, image)
    for t in (0, 500, 1000):
        logits = net.head(features, out, torch.randn_like(x0), torch.full((2,), t))
        torch.testing.assert_close(logits, out)


def test_prediction_runs_the_trunk_once_and_the_head_k_times():
    net = tiny_head_net().eval()
    trunk, head = Counter(net.trunk), Counter(net.head)
    image, _, _ = example()
    net(image)
    assert (trunk.calls, head.calls) == (1, 5)
    net.predict(image, HeadSampling(output="trunk"))
    assert (trunk.calls, head.calls) == (2, 5)  # the trunk's output needs no head call


def test_the_mean_output_is_the_mean_of_the_two_probabilities():
    net = tiny_head_net().eval()
    image, _, _ = example()
    p = {o: torch.softmax(net.predict(image, HeadSampling(output=o, seed=4)), 1) for o in ("mean", "chain", "trunk")}
    torch.testing.assert_close(p["mean"], (p["chain"] + p["trunk"]) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(p["chain"], p["trunk"], atol=1e-3)  # a mean of equal things would prove nothing


def test_prediction_is_seeded_and_refuses_non_finite_images():
    net = tiny_head_net().eval()
    image, _, _ = example()
    torch.testing.assert_close(net(image), net(image), rtol=0, atol=0)
    assert not torch.allclose(net.predict(image, HeadSampling(output="chain", seed=0)),
                              net.predict(image, HeadSampling(output="chain", seed=1)))
    image[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        net(image)


@pytest.mark.parametrize("bad", [dict(output="ensemble"), dict(num_steps=0), dict(average_last=6, num_steps=5)])
def test_bad_sampling_settings_are_refused(bad):
    with pytest.raises(ValueError):
        HeadSampling(**bad)


def test_deep_supervision_keeps_the_trunks_lower_scales_at_prediction():
    net = tiny_head_net(deep_supervision=True).eval()
    image, _, _ = example()
    out = net(image)
    trunk_out, _ = trunk_pass(net.trunk, image)
    assert len(out) == 2 and not torch.allclose(out[0], trunk_out[0])
    torch.testing.assert_close(out[1], trunk_out[1])


def test_head_refuses_other_convolutions():
    with pytest.raises(ValueError, match="2D and 3D"):
        DenoisingHead(torch.nn.Conv1d, 4, C)


def test_train_validate_and_predict_with_nnunet(env, tmp_path):
    """nnU-Net trains DiffusionTrainer_head, validates its three outputs and predicts with stock nnUNetv2_predict;
    with mirroring, the trunk runs once per tile and mirroring."""
    tr = "DiffusionTrainer_head_2ep3it"
    run([f"{BIN}/nnUNetv2_train", "990", "3d_fullres", "0", "-tr", tr, "-device", "cpu"], env=env)
    fold = os.path.join(env["nnUNet_results"], DATASET, f"{tr}__nnUNetPlans__3d_fullres", "fold_0")
    for folder in ("validation", "validation_trunk", "validation_chain"):
        assert os.path.isfile(os.path.join(fold, folder, "summary.json")), folder
    out = tmp_path / "pred"
    run([f"{BIN}/nnUNetv2_predict", "-i", os.path.join(env["raw"], "imagesTr"), "-o", str(out), "-d", "990",
         "-c", "3d_fullres", "-f", "0", "-tr", tr, "-device", "cpu", "-npp", "1", "-nps", "1"], env=env)
    assert len([f for f in os.listdir(out) if f.endswith(".nii.gz")]) == 8


def test_trunk_runs_once_per_tile_and_mirroring_in_nnunets_predictor():
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    net = tiny_head_net().eval()
    trunk, head = Counter(net.trunk), Counter(net.head)
    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                                perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.network = net
    predictor.allowed_mirroring_axes = (0, 1, 2)
    predictor.configuration_manager = type("CM", (), {"patch_size": [16, 16, 16]})()
    predictor.label_manager = type("LM", (), {"num_segmentation_heads": C})()
    image = torch.randn(1, 24, 16, 16)
    logits = predictor.predict_sliding_window_return_logits(image)
    tiles = 2  # 24 voxels along the first axis, patch 16, step 8
    assert trunk.calls == tiles * 8 and head.calls == tiles * 8 * 5
    assert logits.shape == (C, 24, 16, 16) and np.isfinite(logits.numpy()).all()


@pytest.mark.slow  # ~1 min on 2 cores
def test_quick_benchmark_times_the_head_against_stock(env, tmp_path):
    import json
    out = tmp_path / "bench"
    run([f"{BIN}/nnunet-diffusion", "benchmark", "-d", "990", "-c", "3d_fullres", "-tr", "DiffusionTrainer_head",
         "--quick", "--repeats", "2", "-device", "cpu", "-o", str(out)], env=env)
    r = json.load(open(out / "benchmark.json"))
    assert r["diffusion_trainer"] == "DiffusionTrainer_head" and r["predict_modes"] == ["mirror", "off"]
    m = r["medians"]["predict_case_s"]
    assert abs(r["predict_ratio"]["mirror"] - m["mirror"] / m["stock"]) < 1e-9
    assert abs(r["predict_ratio_notta"]["off"] - m["off"] / m["stock_notta"]) < 1e-9
    assert "| mirror |" in open(out / "benchmark.md").read()
