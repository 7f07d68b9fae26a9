"""The shipped trainers: each ablation is one change from the paper's configuration and changes exactly what it
claims (checked on real nnU-Net trainers and batches); every setting is one a shipped trainer or the predictor uses."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from nnunet_diffusion.budget import make_budget_trainer
from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.sampling import encode_mask, full_resolution
from nnunet_diffusion.checkpoint import check_diffusion_settings
from nnunet_diffusion.variants import (PAPER, TRAINERS, DiffusionTrainer_1000steps, DiffusionTrainer_noDice,
                                       DiffusionTrainer_noRecycle, DiffusionTrainer_paper,
                                       DiffusionTrainer_predictNoise)


def _batch(tr):
    torch.manual_seed(0)
    batch = next(tr.dataloader_train)
    return batch["data"], batch["target"]


class Recorder:
    """Records the t of every call of the trainer's denoiser."""

    def __init__(self, tr):
        self.calls = []
        tr.diffusion_network.denoiser.register_forward_pre_hook(lambda module, args: self.calls.append(args[2].tolist()))


ABLATION_CHANGES = {"DiffusionTrainer_noRecycle": ("recycle", False), "DiffusionTrainer_noDice": ("use_dice", False),
                    "DiffusionTrainer_predictNoise": ("prediction", "eps"),
                    "DiffusionTrainer_1000steps": ("train_num_steps", 1001)}


@pytest.mark.parametrize("name", sorted(ABLATION_CHANGES))
def test_each_ablation_is_one_change_from_the_paper(name):
    """Table 2 of the paper: each ablation differs from the paper's configuration in exactly one field, the named
    one, whatever DiffusionTrainer's default is."""
    field, value = ABLATION_CHANGES[name]
    have, paper = TRAINERS[name].diffusion.to_dict(), PAPER.to_dict()
    assert {k for k in paper if have[k] != paper[k]} == {field}
    assert have[field] == value
    assert DiffusionTrainer_paper.diffusion == DiffusionConfig() == PAPER


def test_shipped_trainers_are_few_and_named_as_before():
    assert set(TRAINERS) == {"DiffusionTrainer", "DiffusionTrainer_paper", *ABLATION_CHANGES, "DiffusionTrainer_head"}
    assert len(TRAINERS) <= 8


def test_every_setting_is_read_by_the_package():
    """Every DiffusionConfig field is read (``.field``) somewhere in the package outside config.py's validation and
    serialisation: a field that no trainer, network or predictor reads is dead weight."""
    import ast
    import os
    from dataclasses import fields

    import nnunet_diffusion
    folder = os.path.dirname(nnunet_diffusion.__file__)
    read = set()
    for name in os.listdir(folder):
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(os.path.join(folder, name)).read())
        if name == "config.py":  # only what its methods use, not its checks of every field
            tree = ast.Module([f for c in tree.body if isinstance(c, ast.ClassDef) and c.name == "DiffusionConfig"
                               for f in c.body if isinstance(f, ast.FunctionDef)
                               and f.name not in ("__post_init__", "to_dict", "from_dict")], [])
        read |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    unread = [f.name for f in fields(DiffusionConfig) if f.name not in read]
    assert not unread, f"settings nothing reads: {unread}"


@pytest.mark.parametrize("config", ["3d_fullres", "2d"])
def test_no_recycle_builds_noisy_mask_from_ground_truth(make_trainer, config):
    tr = make_trainer("DiffusionTrainer_noRecycle_1ep1it", config)
    data, target = _batch(tr)
    rec = Recorder(tr)
    torch.manual_seed(1)
    noisy = tr.make_noisy_batch(data, target)
    assert rec.calls == []  # no recycle pass
    x0 = encode_mask(full_resolution(target), 3)
    torch.testing.assert_close(noisy.xt, tr.diffusion_network.training_schedule.q_sample(x0, noisy.k, noisy.eps))


def test_paper_trainer_recycles_from_next_level(make_trainer):
    tr = make_trainer("DiffusionTrainer_paper_1ep1it")
    data, target = _batch(tr)
    rec = Recorder(tr)
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


def test_default_recycle_pass_is_the_chains_first_step_and_supervised(make_trainer):
    """The default's recycle_source="noise": the recycle pass runs at t_K on every sample, keeps its gradient (it is
    supervised), and x_t is built from its *detached* prediction."""
    tr = make_trainer("DiffusionTrainer_1ep1it")
    data, target = _batch(tr)
    rec = Recorder(tr)
    noisy = tr.make_noisy_batch(data, target)
    assert rec.calls[0] == [1000] * data.shape[0]
    assert noisy.recycled is not None and noisy.recycled.batch.k.tolist() == [5] * data.shape[0]
    out = full_resolution(noisy.recycled.output)
    assert out.requires_grad  # supervised: the pass keeps its graph
    assert not noisy.xt.requires_grad  # eq. 9's stop-gradient: x_t carries no graph back into the recycle pass
    schedule = tr.diffusion_network.training_schedule
    x0_hat = 2 * torch.softmax(out.detach(), 1) - 1
    torch.testing.assert_close(noisy.xt, schedule.q_sample(x0_hat, noisy.k, noisy.eps))


@pytest.mark.parametrize("name,recycle_loss,scale", [("DiffusionTrainer_1ep1it", None, 1.0),
                                                     ("DiffusionTrainer_1ep1it", "mean", 0.5),
                                                     ("DiffusionTrainer_paper_1ep1it", None, None)])
def test_supervised_recycle_loss_is_mean_or_sum_of_both_passes(make_trainer, name, recycle_loss, scale):
    """recycle_loss "sum" (the default) keeps the two passes' summed loss whole, "mean" halves it; the paper's
    recycle pass is not supervised."""
    tr = make_trainer(name)
    if recycle_loss is not None:
        tr.diffusion = replace(tr.diffusion, recycle_loss=recycle_loss)  # instance attribute shadows the class's
    data, target = _batch(tr)
    torch.manual_seed(3)
    noisy = tr.make_noisy_batch(data, target)
    assert (noisy.recycled is not None) == (scale is not None)
    loss = tr.compute_loss(data, target, noisy)
    second = tr.loss(tr.network(data, noisy.xt, noisy.t), target)
    if scale is not None:
        first = tr.loss(noisy.recycled.output, target)
        torch.testing.assert_close(loss, scale * (first + second))
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
    """The default trainer: nnU-Net's initialised trainer holds zero input weights on the mask channels (nothing
    re-initialises them after the network is built); the paper's trainer does not."""
    for name, zero in (("DiffusionTrainer_paper_1ep1it", False), ("DiffusionTrainer_1ep1it", True)):
        tr = make_trainer(name)
        net = tr.diffusion_network.denoiser
        conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.modules.conv._ConvNd))
        mask_weights = conv.weight[:, net.num_image_channels:]
        assert mask_weights.shape[1] == net.num_classes
        assert (mask_weights.abs().sum().item() == 0) == zero


def test_initialisation_and_output_settings_do_not_refuse_a_checkpoint():
    """zero_init_mask_input decides only the initial weights and average_last only what the trained chain returns:
    a checkpoint that differs from its trainer in them loads; one that differs in a setting of training does not,
    and the refusal names the setting and not the ones that may differ."""
    zero = replace(PAPER, zero_init_mask_input=True, average_last=5)
    check_diffusion_settings({"diffusion": PAPER.to_dict()}, zero, "x")
    check_diffusion_settings({"diffusion": zero.to_dict()}, PAPER, "x")
    with pytest.raises(ValueError, match="recycle_source") as err:
        check_diffusion_settings({"diffusion": replace(zero, recycle_source="noise").to_dict()}, PAPER, "x")
    assert "average_last" not in str(err.value) and "zero_init" not in str(err.value)


def test_removed_settings_load_only_where_they_do_not_change_the_prediction():
    """A checkpoint recorded with a setting that left the package loads when its value predicts as the shipped
    network does (training-only settings: any value) and is refused, naming the setting, otherwise; a setting the
    checkpoint lacks (written before it existed) reads as the paper's."""
    from nnunet_diffusion.checkpoint import recorded_config
    base = PAPER.to_dict()
    harmless = dict(ema_halflife=0.05, noisiest_share=0.5, zero_noisiest_input=True, stock_image_init=True,
                    self_condition=False, scale_mask_input=False, time_conditioning=True, start="noise")
    assert recorded_config({**base, **harmless}) == PAPER
    assert recorded_config({**base, "recycle_source": "chain"}) == PAPER
    for name, value in dict(self_condition=True, scale_mask_input=True, time_conditioning=False,
                            start="zeros").items():
        with pytest.raises(ValueError, match=f"{name}={value!r}"):
            recorded_config({**base, name: value}, "old.pth")
    with pytest.raises(ValueError, match="unknown diffusion settings"):
        recorded_config({**base, "warp_drive": 1})
    assert recorded_config({k: v for k, v in base.items() if k != "recycle_loss"}) == PAPER


def test_default_settings_are_the_last_adopted_candidates():
    """DiffusionTrainer's settings are those of the candidate adopted on 2026-12-01 (``FORMER_DEFAULTS``
    records it), and that default's three changes to the recycle pass."""
    from nnunet_diffusion.checkpoint import former_default_config
    from nnunet_diffusion.trainer import DiffusionTrainer
    assert DiffusionTrainer.diffusion == former_default_config("DiffusionTrainer_noisePassSum")
    assert (DiffusionTrainer.diffusion.supervise_recycle, DiffusionTrainer.diffusion.recycle_source,
            DiffusionTrainer.diffusion.recycle_loss) == (True, "noise", "sum")


def test_default_trainer_returns_the_mean_of_all_steps(make_trainer):
    """DiffusionTrainer's network, called as nnU-Net's validation and nnUNetv2_predict call it (image only),
    returns log(mean probability of all K steps' x0_hat): equal to the chain with average_last = K and different
    from the last step's output."""
    tr = make_trainer("DiffusionTrainer_1ep1it")
    net = tr.diffusion_network
    net.eval()
    torch.manual_seed(0)
    for p in net.parameters():  # weights that make the steps differ (the fresh network ignores x_t)
        p.data.add_(0.05 * torch.randn_like(p))
    image = torch.randn(1, net.denoiser.num_image_channels, *tr.configuration_manager.patch_size)
    with torch.no_grad():
        out = full_resolution(net(image))
        K = net.config.num_steps
        mean = full_resolution(net.predict(image, replace(net.sampling, average_last=K)))
        last = full_resolution(net.predict(image, replace(net.sampling, average_last=1)))
    assert K == 5 and net.sampling.average_last == 5
    assert torch.allclose(out, mean, atol=1e-5)
    assert (out - last).abs().max() > 1e-3


def test_recycle_loss_validation_and_refusal():
    """recycle_loss is checked, needs a supervised recycle pass, changes training (refused across checkpoints), and
    a checkpoint from before the field reads as "mean"."""
    from conftest import assert_setting_refused_and_defaulted
    from nnunet_diffusion.trainer import DiffusionTrainer
    cfg = DiffusionTrainer.diffusion
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
