import os
import subprocess
import sys

import pytest
import torch

from nnunet_diffusion.cli import trainers_path
from nnunet_diffusion.synthetic import make_synthetic_dataset

from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.network import DiffusionUNet, SampledNetwork

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

BIN = os.path.dirname(sys.executable)
DATASET = "Dataset990_Synthetic"
TR = "DiffusionTrainer_2ep3it"  # a real DiffusionTrainer with a 2 x 3 iteration budget


def tiny_unet(dim: int = 3, in_channels: int = 3, num_classes: int = 3, deep_supervision: bool = False,
              arch: str = "plain"):
    """A small planned-style U-Net from dynamic_network_architectures (what nnU-Net builds)."""
    from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
    conv = torch.nn.Conv3d if dim == 3 else torch.nn.Conv2d
    norm = torch.nn.InstanceNorm3d if dim == 3 else torch.nn.InstanceNorm2d
    common = dict(input_channels=in_channels, n_stages=3, features_per_stage=[4, 8, 16], conv_op=conv,
                  kernel_sizes=3, strides=[1, 2, 2], num_classes=num_classes, conv_bias=True, norm_op=norm,
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=torch.nn.LeakyReLU,
                  nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    if arch == "plain":
        return PlainConvUNet(n_conv_per_stage=2, n_conv_per_stage_decoder=1, **common)
    return ResidualEncoderUNet(n_blocks_per_stage=[1, 1, 1], n_conv_per_stage_decoder=1, **common)


def assert_setting_refused_and_defaulted(field: str, changed: DiffusionConfig, base: DiffusionConfig) -> None:
    """A checkpoint trained with ``changed`` (``field`` set) is refused by a trainer with ``base``, naming the field;
    a checkpoint written before ``field`` existed reads as ``base`` (the field's default, the paper's value)."""
    from nnunet_diffusion.checkpoint import check_diffusion_settings
    with pytest.raises(ValueError, match=field):
        check_diffusion_settings({"diffusion": changed.to_dict()}, base, "x")
    old = {k: v for k, v in base.to_dict().items() if k != field}
    assert DiffusionConfig.from_dict(old) == base


def tiny_denoiser(dim: int = 3, image_channels: int = 1, num_classes: int = 3, deep_supervision=False,
                  arch: str = "plain", zero_init_mask_input: bool = False) -> DiffusionUNet:
    torch.manual_seed(0)
    unet = tiny_unet(dim, image_channels + num_classes, num_classes, deep_supervision, arch)
    return DiffusionUNet(unet, image_channels, num_classes, zero_init_mask_input, time_embed_dim=16)


def tiny_diffusion_net(dim: int = 3, image_channels: int = 1, num_classes: int = 3, deep_supervision=False,
                       arch: str = "plain", config: DiffusionConfig = DiffusionConfig()) -> SampledNetwork:
    """What a trainer builds, on a tiny U-Net: the denoiser in nnU-Net's adapter with ``config``, refusing corrupted
    released weights."""
    from nnunet_diffusion.checkpoint import verify_and_strip
    return SampledNetwork(tiny_denoiser(dim, image_channels, num_classes, deep_supervision, arch,
                                        config.zero_init_mask_input), config, check_weights=verify_and_strip)


def run(cmd, env=None, check=True, timeout=900):
    """Run a command, print its output on failure."""
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """A planned and preprocessed tiny synthetic dataset (2d, 3d_fullres) and the nnU-Net variables for it."""
    root = tmp_path_factory.mktemp("nnunet")
    env = dict(os.environ)
    env.update(nnUNet_raw=str(root / "raw"), nnUNet_preprocessed=str(root / "pre"),
               nnUNet_results=str(root / "res"), nnUNet_extTrainer=trainers_path(),
               nnUNet_compile="f", nnUNet_def_n_proc="1", OMP_NUM_THREADS="2")
    raw = make_synthetic_dataset(env["nnUNet_raw"], 990, "Synthetic", num_cases=8)
    run([f"{BIN}/nnUNetv2_plan_and_preprocess", "-d", "990", "-c", "2d", "3d_fullres", "-np", "1"], env=env)
    env["nnUNet_n_proc_DA"] = "0"  # only now: plan_and_preprocess fails with 0 (torch.set_num_threads(0))
    env["root"] = str(root)
    env["raw"] = raw
    return env




def _train(env, tr, config="3d_fullres", extra=()):
    return run([f"{BIN}/nnUNetv2_train", "990", config, "0", "-tr", tr, "-device", "cpu", *extra], env=env)


def _fold(env, tr, config="3d_fullres"):
    return os.path.join(env["nnUNet_results"], DATASET, f"{tr}__nnUNetPlans__{config}", "fold_0")


@pytest.fixture(scope="session")
def trained_3d(env):
    proc = _train(env, TR)
    assert "Mean Validation Dice" in proc.stdout
    return _fold(env, TR)


@pytest.fixture(scope="session")
def trained_stock_3d(env):
    """Stock nnUNetTrainer on the same data, split and budget as ``trained_3d``."""
    _train(env, "nnUNetTrainer_2ep3it")
    return _fold(env, "nnUNetTrainer_2ep3it")


@pytest.fixture
def inproc(env, monkeypatch):
    """The nnU-Net variables of ``env`` in this process (for in-process trainers and predictors)."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile",
              "nnUNet_extTrainer"):
        monkeypatch.setenv(k, env[k])
    return env


@pytest.fixture
def make_trainer(inproc):
    from nnunetv2.run.run_training import get_trainer_from_args
    created = []

    def make(name, config="3d_fullres"):
        tr = get_trainer_from_args("990", config, 0, name, device=torch.device("cpu"))
        tr.initialize()
        tr.dataloader_train, tr.dataloader_val = tr.get_dataloaders()
        created.append(tr)
        return tr

    yield make
