"""Checkpoints of the former defaults and the released model predict what they predicted before the product/study
split (issue 37): the outputs recorded by tests/fixtures/make_former_defaults.py with the code of main 3f9a62c."""
import os
import tempfile
import zipfile

import numpy as np
import pytest
import torch

from conftest import tiny_unet

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "fixtures", "former_defaults")
RELEASED = os.path.join(os.path.dirname(HERE), "models", "Dataset004_Hippocampus_DiffusionTrainer.zip")
TRAINERS = ("DiffusionTrainer_paper", "DiffusionTrainer_zeroInitMaskInput", "DiffusionTrainer_zeroInitChainMeanEma",
            "DiffusionTrainer_zeroInitChainMean", "DiffusionTrainer_noisePassSum")


@pytest.fixture(scope="module")
def recorded():
    return dict(np.load(os.path.join(FIXTURES, "outputs.npz")))


def network_of(checkpoint: dict):
    """The network a predictor builds for ``checkpoint``: the architecture and sampling settings its recorded
    diffusion settings give (``checkpoint.recorded_config``), with its weights."""
    from nnunet_diffusion.checkpoint import recorded_config, verify_and_strip
    from nnunet_diffusion.network import DiffusionUNet, SampledNetwork
    config = recorded_config(checkpoint, checkpoint["trainer_name"])
    torch.manual_seed(0)
    denoiser = DiffusionUNet(tiny_unet(3, 1 + 3, 3), 1, 3, config.zero_init_mask_input, time_embed_dim=16)
    net = SampledNetwork(denoiser, config, check_weights=verify_and_strip)
    net.load_state_dict(checkpoint["network_weights"])
    return net.eval()


@pytest.mark.parametrize("name", TRAINERS)
def test_former_default_checkpoint_predicts_as_before(name, recorded):
    from nnunet_diffusion.checkpoint import read_checkpoint
    checkpoint = read_checkpoint(os.path.join(FIXTURES, f"{name}.pth"))
    with torch.no_grad():
        out = network_of(checkpoint)(torch.from_numpy(recorded["image"])).numpy()
    np.testing.assert_allclose(out, recorded[name], rtol=1e-5, atol=1e-5)


def test_released_model_predicts_as_before(recorded, monkeypatch):
    """The released zip, installed as nnU-Net installs it, through nnU-Net's own predictor (stock
    ``nnUNetv2_predict -tr DiffusionTrainer``) and through ``DiffusionPredictor``: one tile, no mirroring."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunet_diffusion.cli import trainers_path
    from nnunet_diffusion.predictor import DiffusionPredictor
    monkeypatch.setenv("nnUNet_extTrainer", trainers_path())
    image = torch.from_numpy(recorded["released_image"])
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(RELEASED) as z:
            z.extractall(tmp)
        folder = os.path.join(tmp, "Dataset004_Hippocampus", "DiffusionTrainer__nnUNetPlans__3d_fullres")
        for key, cls, kwargs in (("released_stock", nnUNetPredictor, {}),
                                 ("released_diffusion", DiffusionPredictor, {"tta": "off"})):
            predictor = cls(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"), verbose=False,
                            verbose_preprocessing=False, allow_tqdm=False, **kwargs)
            predictor.initialize_from_trained_model_folder(folder, ("all",))
            with torch.no_grad():
                out = predictor.predict_sliding_window_return_logits(image).float().numpy()
            np.testing.assert_allclose(out, recorded[key], rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", TRAINERS[1:])
def test_former_default_trainer_has_the_recorded_settings(name):
    """The trainer nnU-Net finds for a former default's folder (made from ``FORMER_DEFAULTS``) builds its network
    with the settings the checkpoint recorded, and loads that checkpoint (trainer check included)."""
    from nnunet_diffusion.checkpoint import check_diffusion_settings, read_checkpoint, recorded_config
    from nnunet_diffusion.variants import find_trainer
    checkpoint = read_checkpoint(os.path.join(FIXTURES, f"{name}.pth"))
    cls = find_trainer(name)
    assert cls.__name__ == name and cls.diffusion == recorded_config(checkpoint)
    check_diffusion_settings(checkpoint, cls.diffusion, name)
