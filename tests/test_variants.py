"""Each ablation trainer changes exactly what it claims; checked on real nnU-Net trainers and batches."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from nnunet_diffusion.budget import make_budget_trainer
from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.sampling import encode_mask, full_resolution
from nnunet_diffusion.trainer import check_diffusion_settings
from nnunet_diffusion.variants import (DiffusionTrainer_1000steps, DiffusionTrainer_noDice,
                                       DiffusionTrainer_noRecycle, DiffusionTrainer_predictNoise)


def _batch(tr):
    torch.manual_seed(0)
    batch = next(tr.dataloader_train)
    return batch["data"], batch["target"]


class Recorder:
    """Wraps the network's denoising step and records every call's t."""

    def __init__(self, net):
        self.denoise, self.calls = net.denoise, []
        net.denoise = self

    def __call__(self, image, xt, t):
        self.calls.append(t.tolist())
        return self.denoise(image, xt, t)


@pytest.mark.parametrize("config", ["3d_fullres", "2d"])
def test_no_recycle_builds_noisy_mask_from_ground_truth(make_trainer, config):
    tr = make_trainer("DiffusionTrainer_noRecycle_1ep1it", config)
    data, target = _batch(tr)
    rec = Recorder(tr.network)
    torch.manual_seed(1)
    noisy = tr.make_noisy_batch(data, target)
    assert rec.calls == []  # no recycle pass
    x0 = encode_mask(full_resolution(target), 3)
    torch.testing.assert_close(noisy.xt, tr.diffusion_network.training_schedule.q_sample(x0, noisy.k, noisy.eps))


def test_paper_trainer_recycles_from_next_level(make_trainer):
    tr = make_trainer("DiffusionTrainer_paper_1ep1it")
    data, target = _batch(tr)
    rec = Recorder(tr.network)
    noisy = tr.make_noisy_batch(data, target)
    assert len(rec.calls) == 1
    schedule = tr.diffusion_network.training_schedule
    assert rec.calls[0] == schedule.timesteps_of((noisy.k + 1).clamp(max=5)).tolist()
    x0 = encode_mask(full_resolution(target), 3)
    # the noisy mask is not the ground truth's: it comes from the (untrained) prediction
    assert not torch.allclose(noisy.xt, schedule.q_sample(x0, noisy.k, noisy.eps))


def test_predict_noise_loss_includes_mse(make_trainer):
    tr = make_trainer("DiffusionTrainer_predictNoise_1ep1it")
    data, target = _batch(tr)
    noisy = tr.make_noisy_batch(data, target)
    loss = tr.compute_loss(data, target, noisy)
    out = tr.network(data, noisy.xt, noisy.t)
    mse = torch.nn.functional.mse_loss(out[0], noisy.eps)
    if noisy.recycled is not None:  # the default's supervised recycle pass, summed: its MSE counts too
        assert tr.diffusion.recycle_loss == "sum"
        mse = mse + torch.nn.functional.mse_loss(noisy.recycled.output[0], noisy.recycled.batch.eps)
    # removing the MSE term must change the loss by exactly mse_weight * MSE
    tr.diffusion = replace(tr.diffusion, mse_weight=0.0)  # instance attribute shadows the class setting
    loss_without = tr.compute_loss(data, target, noisy)
    assert float(mse) > 0.1
    torch.testing.assert_close(loss - loss_without, 0.1 * mse, rtol=1e-4, atol=1e-5)
    assert tr.diffusion_network.config.prediction == "eps"


def test_no_dice_is_cross_entropy_only(make_trainer):
    tr = make_trainer("DiffusionTrainer_noDice_1ep1it")
    inner = tr.loss.loss
    assert inner.weight_dice == 0 and inner.weight_ce == 1
    ref = make_trainer("DiffusionTrainer_1ep1it")
    assert ref.loss.loss.weight_dice == 1


def test_1000_steps_trains_on_base_chain_and_infers_with_five():
    cfg = DiffusionTrainer_1000steps.diffusion
    assert cfg.training_schedule().num_steps == 1001
    assert cfg.inference_schedule().timesteps.tolist() == [0, 250, 500, 750, 1000]


def test_variant_settings_differ_and_checkpoints_are_refused_across_them():
    configs = [c.diffusion for c in (DiffusionTrainer_noRecycle, DiffusionTrainer_noDice,
                                     DiffusionTrainer_predictNoise, DiffusionTrainer_1000steps)]
    assert len({tuple(sorted(c.to_dict().items())) for c in configs}) == 4
    ckpt = {"diffusion": DiffusionTrainer_noRecycle.diffusion.to_dict(), "trainer_name": "DiffusionTrainer_noRecycle"}
    check_diffusion_settings(ckpt, DiffusionTrainer_noRecycle.diffusion, "x")
    with pytest.raises(ValueError, match="recycle"):
        check_diffusion_settings(ckpt, make_budget_trainer("DiffusionTrainer_1ep1it").diffusion, "x")


# one ablation end to end in the default run (each ablation's own behaviour has a unit test above); the other
# three are the same commands with another trainer, ~1 min each on 2 cores: behind the slow marker
ABLATIONS = ["DiffusionTrainer_noRecycle"] + [pytest.param(v, marks=pytest.mark.slow) for v in
                                              ("DiffusionTrainer_noDice", "DiffusionTrainer_predictNoise",
                                               "DiffusionTrainer_1000steps")]


@pytest.mark.parametrize("config", ["3d_fullres", pytest.param("2d", marks=pytest.mark.slow)])
@pytest.mark.parametrize("variant", ABLATIONS)
def test_ablation_trains_validates_and_predicts_with_stock_commands(env, variant, config, tmp_path):
    import os
    import shutil

    import SimpleITK as sitk

    from conftest import BIN, _fold, _train, run
    tr = f"{variant}_1ep2it"
    proc = _train(env, tr, config=config)
    assert "Mean Validation Dice" in proc.stdout
    assert os.path.isfile(os.path.join(_fold(env, tr, config), "validation", "summary.json"))
    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copy(os.path.join(env["raw"], "imagesTr", "case_003_0000.nii.gz"), inp)
    run([f"{BIN}/nnUNetv2_predict", "-i", str(inp), "-o", str(tmp_path / "out"), "-d", "990", "-c", config,
         "-f", "0", "-tr", tr, "-device", "cpu", "--disable_tta", "-npp", "0", "-nps", "0"], env=env)  # sequential
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "case_003.nii.gz")))
    assert seg.shape == (20, 24, 20) and set(np.unique(seg)) <= {0, 1, 2}


def test_supervised_recycle_from_noise_trains_the_chains_first_step(make_trainer):
    """recycle_source="noise": the recycle pass runs at t_K on every sample, keeps its gradient (it is
    supervised), and x_t is built from its *detached* prediction."""
    tr = make_trainer("DiffusionTrainer_supervisedRecycleFromNoise_1ep1it")
    data, target = _batch(tr)
    rec = Recorder(tr.network)
    noisy = tr.make_noisy_batch(data, target)
    assert rec.calls[0] == [1000] * data.shape[0]
    assert noisy.recycled is not None and noisy.recycled.batch.k.tolist() == [5] * data.shape[0]
    out = full_resolution(noisy.recycled.output)
    assert out.requires_grad  # supervised: the pass keeps its graph
    assert not noisy.xt.requires_grad  # eq. 9's stop-gradient: x_t carries no graph back into the recycle pass
    schedule = tr.diffusion_network.training_schedule
    x0_hat = 2 * torch.softmax(out.detach(), 1) - 1
    torch.testing.assert_close(noisy.xt, schedule.q_sample(x0_hat, noisy.k, noisy.eps))


@pytest.mark.parametrize("name,supervised,scale", [("DiffusionTrainer_supervisedRecycle_1ep1it", True, 0.5),
                                                   ("DiffusionTrainer_noisePassSum_1ep1it", True, 1.0),
                                                   ("DiffusionTrainer_1ep1it", True, 1.0),
                                                   ("DiffusionTrainer_paper_1ep1it", False, None)])
def test_supervised_recycle_loss_is_mean_or_sum_of_both_passes(make_trainer, name, supervised, scale):
    """recycle_loss "mean" (the earlier behaviour) halves the two passes' summed loss, "sum" keeps it whole."""
    tr = make_trainer(name)
    data, target = _batch(tr)
    torch.manual_seed(3)
    noisy = tr.make_noisy_batch(data, target)
    assert (noisy.recycled is not None) == supervised
    loss = tr.compute_loss(data, target, noisy)
    second = tr.loss(tr.network(data, noisy.xt, noisy.t), target)
    if supervised:
        first = tr.loss(noisy.recycled.output, target)
        torch.testing.assert_close(loss, scale * (first + second))
        loss.backward()  # the recycle pass's parameters get gradient from its own loss
        assert tr.diffusion_network.time_proj.weight.grad is not None
    else:
        torch.testing.assert_close(loss, second)


def test_use_dice_drives_the_loss(make_trainer):
    """use_dice=False (the noDice ablation) makes the loss cross-entropy only, through the config alone."""
    tr = make_trainer("DiffusionTrainer_noDice_1ep1it")
    inner = tr.loss.loss if hasattr(tr.loss, "weight_factors") else tr.loss
    assert inner.weight_dice == 0
    tr2 = make_trainer("DiffusionTrainer_paper_1ep1it")
    inner2 = tr2.loss.loss if hasattr(tr2.loss, "weight_factors") else tr2.loss
    assert inner2.weight_dice != 0


def test_zero_init_mask_input_trainer_starts_blind_to_xt(make_trainer):
    """DiffusionTrainer_zeroInitMaskInput: nnU-Net's initialised trainer holds zero input weights on the mask
    channels (nothing re-initialises them after the network is built); the paper's trainer does not."""
    for name, zero in (("DiffusionTrainer_zeroInitMaskInput_1ep1it", True), ("DiffusionTrainer_paper_1ep1it", False),
                       ("DiffusionTrainer_1ep1it", True)):  # the default since the accuracy study
        tr = make_trainer(name)
        net = tr.diffusion_network
        conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        mask_weights = conv.weight[:, net.num_image_channels:]
        assert mask_weights.shape[1] == net.num_classes
        assert (mask_weights.abs().sum().item() == 0) == zero


def test_initialisation_only_settings_do_not_refuse_a_checkpoint():
    """zero_init_mask_input and stock_image_init decide only the initial weights: a model trained with the paper's
    initialisation loads into a trainer that zero-initialises (and back); a setting that changes training or sampling
    does not."""
    from nnunet_diffusion.variants import DiffusionTrainer_paper, DiffusionTrainer_zeroInitMaskInput
    paper, zero = DiffusionTrainer_paper.diffusion, DiffusionTrainer_zeroInitMaskInput.diffusion
    check_diffusion_settings({"diffusion": paper.to_dict()}, zero, "x")
    check_diffusion_settings({"diffusion": zero.to_dict()}, paper, "x")
    with pytest.raises(ValueError, match="recycle_source"):
        check_diffusion_settings({"diffusion": replace(zero, recycle_source="noise").to_dict()}, paper, "x")
    # stock_image_init too; a checkpoint from before the field reads as the paper's initialisation
    from nnunet_diffusion.variants import DiffusionTrainer_stockImageInit, DiffusionTrainer_zeroInitChainMean
    stock_init, default = DiffusionTrainer_stockImageInit.diffusion, DiffusionTrainer_zeroInitChainMean.diffusion
    assert stock_init == replace(default, stock_image_init=True)
    check_diffusion_settings({"diffusion": stock_init.to_dict()}, default, "x")
    check_diffusion_settings({"diffusion": default.to_dict()}, stock_init, "x")
    old = {k: v for k, v in stock_init.to_dict().items() if k != "stock_image_init"}
    assert DiffusionConfig.from_dict(old) == default


def test_output_only_settings_do_not_refuse_a_checkpoint_and_a_refusal_names_the_matching_trainer():
    """average_last decides only what the trained chain returns: a model trained with the last step as output
    (``DiffusionTrainer_zeroInitMaskInput``'s settings, the default until 2026-11-29) loads into
    ``DiffusionTrainer_zeroInitChainMean`` (the default of 2026-11-30), whose chain averages all steps, and one
    trained with the default's settings but the last step as output loads into the default trainer. A model
    trained with the EMA of the weights (the default of 2026-11-29, ``DiffusionTrainer_zeroInitChainMeanEma``'s
    settings) is refused by the default trainer, which keeps none, and the error names the trainer that matches
    its settings."""
    from nnunet_diffusion.trainer import DiffusionTrainer
    from nnunet_diffusion.variants import (DiffusionTrainer_zeroInitChainMean, DiffusionTrainer_zeroInitChainMeanEma,
                                           DiffusionTrainer_zeroInitMaskInput)
    default = DiffusionTrainer.diffusion
    check_diffusion_settings({"diffusion": replace(default, average_last=1).to_dict()}, default, "x")
    check_diffusion_settings({"diffusion": DiffusionTrainer_zeroInitMaskInput.diffusion.to_dict()},
                             DiffusionTrainer_zeroInitChainMean.diffusion, "x")
    with pytest.raises(ValueError, match="ema_halflife") as err:
        check_diffusion_settings({"diffusion": DiffusionTrainer_zeroInitChainMeanEma.diffusion.to_dict(),
                                  "trainer_name": "DiffusionTrainer"}, default, "x")
    assert "-tr DiffusionTrainer_zeroInitChainMeanEma" in str(err.value)
    assert "average_last" not in str(err.value).split("(")[1]  # not listed among the refused differences


def test_default_is_the_noise_pass_sum_candidate():
    """Since 2026-12-01 the default is ``DiffusionTrainer_noisePassSum``'s settings; the default before it, the
    EMA default of 2026-11-29 without its average, is ``DiffusionTrainer_zeroInitChainMean``."""
    from nnunet_diffusion.trainer import DiffusionTrainer
    from nnunet_diffusion.variants import (DiffusionTrainer_noisePassSum, DiffusionTrainer_zeroInitChainMean,
                                           DiffusionTrainer_zeroInitChainMeanEma)
    assert DiffusionTrainer_zeroInitChainMeanEma.diffusion.ema_halflife > 0
    assert DiffusionTrainer_zeroInitChainMean.diffusion == replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion,
                                                                   ema_halflife=0.0)
    assert DiffusionTrainer.diffusion == DiffusionTrainer_noisePassSum.diffusion
    assert (DiffusionTrainer.diffusion.supervise_recycle, DiffusionTrainer.diffusion.recycle_source,
            DiffusionTrainer.diffusion.recycle_loss) == (True, "noise", "sum")


def test_default_trainer_returns_the_mean_of_all_steps(make_trainer):
    """DiffusionTrainer's network, called as nnU-Net's validation and nnUNetv2_predict call it (image only),
    returns log(mean probability of all K steps' x0_hat): equal to the chain with average_last = K and different
    from the last step's output. The default trainer keeps no EMA of the weights (since 2026-11-30)."""
    from nnunet_diffusion.config import SamplingSettings
    tr = make_trainer("DiffusionTrainer_1ep1it")
    assert tr.weight_average is None
    net = tr.diffusion_network
    net.eval()
    torch.manual_seed(0)
    for p in net.parameters():  # weights that make the steps differ (the fresh network ignores x_t)
        p.data.add_(0.05 * torch.randn_like(p))
    image = torch.randn(1, net.num_image_channels, *tr.configuration_manager.patch_size)
    with torch.no_grad():
        out = full_resolution(net(image))
        K = net.config.num_steps
        mean = full_resolution(net.sample(image, replace(net.default_sampling, average_last=K)))
        last = full_resolution(net.sample(image, replace(net.default_sampling, average_last=1)))
    assert K == 5 and isinstance(net.default_sampling, SamplingSettings)
    assert torch.allclose(out, mean, atol=1e-5)
    assert (out - last).abs().max() > 1e-3


def test_noise_pass_sum_settings_validation_and_refusal():
    """DiffusionTrainer_noisePassSum is the default of 2026-11-30 with a supervised level-K pass whose loss is
    added; recycle_loss is checked, needs a supervised recycle pass, changes training (refused across
    checkpoints), and a checkpoint from before the field reads as "mean"."""
    from conftest import assert_setting_refused_and_defaulted
    from nnunet_diffusion.variants import DiffusionTrainer_noisePassSum, DiffusionTrainer_zeroInitChainMean
    cfg = DiffusionTrainer_noisePassSum.diffusion
    assert cfg == replace(DiffusionTrainer_zeroInitChainMean.diffusion, supervise_recycle=True,
                          recycle_source="noise", recycle_loss="sum")
    with pytest.raises(ValueError, match="recycle_loss must be one of"):
        replace(cfg, recycle_loss="max")
    with pytest.raises(ValueError, match="needs supervise_recycle"):
        DiffusionConfig(recycle_loss="sum")
    mean = replace(cfg, recycle_loss="mean")
    assert_setting_refused_and_defaulted("recycle_loss", cfg, mean)
    with pytest.raises(ValueError, match="recycle_loss: checkpoint 'sum' vs trainer 'mean'"):
        check_diffusion_settings({"diffusion": cfg.to_dict()}, mean, "x")
    old = {k: v for k, v in mean.to_dict().items() if k != "recycle_loss"}
    with pytest.raises(ValueError, match="recycle_loss"):
        check_diffusion_settings({"diffusion": old}, cfg, "x")


def test_double_loss_control_is_stock_with_twice_the_loss_and_gradient(make_trainer):
    """nnUNetTrainer_doubleLoss (the loss-scale control of DiffusionTrainer_noisePassSum) computes stock nnU-Net's
    deep-supervised Dice + CE on the same network and batch, times two, so its gradient is twice stock's."""
    stock, double = make_trainer("nnUNetTrainer_1ep1it"), make_trainer("nnUNetTrainer_doubleLoss_1ep1it")
    assert type(double).__mro__[2].__name__ == "nnUNetTrainer" and double.enable_deep_supervision
    double.network.load_state_dict(stock.network.state_dict())
    data, target = _batch(stock)
    grads = []
    for tr in (stock, double):
        tr.network.zero_grad()
        loss = tr.loss(tr.network(data), target)
        loss.backward()
        grads.append((loss.detach(), next(tr.network.parameters()).grad.clone()))
    torch.testing.assert_close(grads[1][0], 2 * grads[0][0])
    torch.testing.assert_close(grads[1][1], 2 * grads[0][1])
