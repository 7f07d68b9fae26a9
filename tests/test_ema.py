"""EMA of the weights (DiffusionConfig.ema_halflife): the average itself, and what the real nnU-Net trainer
validates, exports and resumes."""
import math

import pytest
import torch

from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.ema import WeightAverage, ema_decay
from nnunet_diffusion.trainer import check_diffusion_settings
from nnunet_diffusion.variants import DiffusionTrainer_ema, DiffusionTrainer_paper


def test_decay_halves_an_update_after_the_halflife():
    for fraction, total in ((0.05, 600), (0.05, 250_000), (0.5, 7)):
        d = ema_decay(fraction, total)
        assert d ** (fraction * total) == pytest.approx(0.5)
    assert ema_decay(0.01, 10) == 0.5  # at least one update


def test_update_is_the_exponential_average_with_warm_up():
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 2)
    avg = WeightAverage(lin, decay=0.9)
    expected = lin.weight.detach().clone()
    for n in range(1, 40):
        with torch.no_grad():
            lin.weight.add_(torch.randn_like(lin.weight))
        avg.update(lin)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * lin.weight.detach()
        assert torch.allclose(avg.state["weight"], expected, atol=1e-6)
    assert not torch.allclose(avg.state["weight"], lin.weight)
    # applied: the module holds the average inside the block, its own weights after
    own = lin.weight.detach().clone()
    with avg.applied(lin):
        assert torch.allclose(lin.weight, expected, atol=1e-6)
    assert torch.equal(lin.weight, own)


def test_ema_halflife_is_validated_and_refused_across_checkpoints():
    for bad in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="ema_halflife"):
            DiffusionConfig(ema_halflife=bad)
    ckpt = {"diffusion": DiffusionTrainer_ema.diffusion.to_dict(), "trainer_name": "DiffusionTrainer_ema"}
    with pytest.raises(ValueError, match="ema_halflife"):
        check_diffusion_settings(ckpt, DiffusionTrainer_paper.diffusion, "x")
    # a checkpoint written before the field existed is the paper's (no average)
    old = {k: v for k, v in DiffusionTrainer_paper.diffusion.to_dict().items() if k != "ema_halflife"}
    check_diffusion_settings({"diffusion": old}, DiffusionTrainer_paper.diffusion, "x")


def _weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _differ(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())


def test_trainer_exports_the_average_and_resumes_both(make_trainer, tmp_path):
    """Through nnU-Net's initialised DiffusionTrainer_ema: after training steps the average differs from the
    raw weights; the checkpoint's network_weights (what nnUNetv2_predict and our predictor load) are the
    average, training_network_weights the raw ones; loading it (``--c``) restores both; validation runs on the
    average and hands the raw weights back before nnU-Net writes checkpoints."""
    tr = make_trainer("DiffusionTrainer_ema_2ep3it")
    assert tr.weight_average.decay == pytest.approx(0.5 ** (1 / max(1, 0.05 * 6)))
    tr.on_train_epoch_start()
    for _ in range(3):
        tr.train_step(next(tr.dataloader_train))
    net = tr.diffusion_network
    raw, avg = _weights(net), tr.weight_average.weights_for(net)
    assert tr.weight_average.updates == 3
    assert _differ(raw, avg)

    tr.on_validation_epoch_start()
    assert not _differ(_weights(net), avg)
    tr.on_validation_epoch_end([tr.validation_step(next(tr.dataloader_val))])
    assert not _differ(_weights(net), raw)

    # nnU-Net's final validation (perform_actual_validation) sees the average too
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    seen = {}
    original = nnUNetTrainer.perform_actual_validation
    nnUNetTrainer.perform_actual_validation = lambda self, save_probabilities=False: seen.update(
        w=_weights(self.diffusion_network))
    try:
        tr.perform_actual_validation()
    finally:
        nnUNetTrainer.perform_actual_validation = original
    assert not _differ(seen["w"], avg) and not _differ(_weights(net), raw)

    path = str(tmp_path / "checkpoint_latest.pth")
    tr.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert not _differ(ckpt["network_weights"], avg)
    assert not _differ(ckpt["training_network_weights"], raw)
    assert ckpt["weight_average_updates"] == 3

    tr2 = make_trainer("DiffusionTrainer_ema_2ep3it")
    tr2.load_checkpoint(path)
    assert not _differ(_weights(tr2.diffusion_network), raw)
    assert not _differ(tr2.weight_average.weights_for(tr2.diffusion_network), avg)
    assert tr2.weight_average.updates == 3
    # the resumed average keeps averaging from where it was
    tr2.on_train_epoch_start()
    tr2.train_step(next(tr2.dataloader_train))
    d = tr2.weight_average.current_decay()
    new_raw = _weights(tr2.diffusion_network)
    k = next(k for k, v in avg.items() if v.is_floating_point() and v.ndim > 1)
    assert torch.allclose(tr2.weight_average.state[k], d * avg[k].float() + (1 - d) * new_raw[k].float(), atol=1e-6)
    assert math.isclose(d, min(tr2.weight_average.decay, 5 / 14))


def test_without_ema_the_checkpoint_is_unchanged(make_trainer, tmp_path):
    tr = make_trainer("DiffusionTrainer_paper_1ep1it")  # no EMA (the default has one since the accuracy study)
    assert tr.weight_average is None
    tr.save_checkpoint(str(tmp_path / "c.pth"))
    ckpt = torch.load(tmp_path / "c.pth", map_location="cpu", weights_only=False)
    assert "training_network_weights" not in ckpt
    assert not _differ(ckpt["network_weights"], _weights(tr.diffusion_network))
