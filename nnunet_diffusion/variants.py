"""The trainers the package ships besides ``DiffusionTrainer``: the paper's exact configuration and its Table-2
ablations, each ONE change from the paper's configuration (as in the paper), named ``<Base>_<change>``; and the
trainers that read checkpoints of former defaults (``checkpoint.FORMER_DEFAULTS``).

These names become nnU-Net results folder names: never rename a class once it has produced results. The thin
modules in ``trainers/`` re-export them for discovery. :data:`TRAINERS` lists every shipped trainer class by name
(budget twins ``<Trainer>_<E>ep<I>it`` and former defaults are made on demand from it and from the table).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict

import torch.nn.functional as F

from nnunet_diffusion.checkpoint import FORMER_DEFAULTS, former_default_config
from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.head_trainer import DiffusionTrainer_head
from nnunet_diffusion.sampling import full_resolution, logits_from_eps
from nnunet_diffusion.trainer import DiffusionTrainer
from nnunet_diffusion.training import NoisyBatch

__all__ = ["DiffusionTrainer_paper", "DiffusionTrainer_noRecycle", "DiffusionTrainer_noDice",
           "DiffusionTrainer_predictNoise", "DiffusionTrainer_1000steps"]

PAPER = DiffusionConfig()


class DiffusionTrainer_paper(DiffusionTrainer):
    """The paper's exact configuration (K = 5, recycling from the next level, x0 prediction, Dice + CE, output =
    the last step's logits), whatever ``DiffusionTrainer``'s default becomes."""
    diffusion = PAPER


class DiffusionTrainer_noRecycle(DiffusionTrainer):
    """The paper's configuration with noisy training masks from the ground truth instead of the recycled
    prediction (Table 2c)."""
    diffusion = replace(PAPER, recycle=False)


class DiffusionTrainer_noDice(DiffusionTrainer):
    """The paper's configuration with cross-entropy only (Table 2b)."""
    diffusion = replace(PAPER, use_dice=False)


class DiffusionTrainer_1000steps(DiffusionTrainer):
    """The paper's configuration with training levels drawn over all 1001 base levels; inference keeps the
    5-level chain (Table 2d)."""
    diffusion = replace(PAPER, train_num_steps=PAPER.num_base_levels)


class DiffusionTrainer_predictNoise(DiffusionTrainer):
    """The paper's configuration with the network predicting the noise eps (Table 2a).

    x0_hat = clip((x_t - sqrt(1 - abar) eps_hat) / sqrt(abar), -1, 1);
    logits = log(clip((x0_hat + 1) / 2, 1e-5, 1));
    loss = mse_weight * MSE(eps_hat, eps) + nnU-Net's Dice + CE on those logits
    (at every deep-supervision scale, x_t area-downsampled to that scale).
    """
    diffusion = replace(PAPER, prediction="eps")

    def loss_of(self, output, target, noisy: NoisyBatch) -> torch.Tensor:
        alpha_bar = self.diffusion_network.training_schedule.extract("alpha_bar", noisy.k, noisy.xt.ndim)
        seg_loss = self.loss(logits_from_eps(output, noisy.xt, alpha_bar), target)
        mse = F.mse_loss(full_resolution(output).float(), noisy.eps.float())
        return seg_loss + self.diffusion.mse_weight * mse


# every shipped trainer class by name: the discovery test, budget twins and the docs read this one list
TRAINERS: Dict[str, type] = {cls.__name__: cls for cls in (DiffusionTrainer, DiffusionTrainer_paper,
                                                           DiffusionTrainer_noRecycle, DiffusionTrainer_noDice,
                                                           DiffusionTrainer_predictNoise, DiffusionTrainer_1000steps,
                                                           DiffusionTrainer_head)}
_FORMER: Dict[str, type] = {}


class FormerDefaultTrainer(DiffusionTrainer):
    """Base of the trainers made from ``checkpoint.FORMER_DEFAULTS``: they build the network and check the
    checkpoints of a former default, so nnU-Net predicts and validates with them; training a new model with one
    is refused (its training-only settings, e.g. a moving average of the weights, left the package)."""

    def on_train_start(self):
        raise RuntimeError(f"{type(self).__name__} is a former default, kept so its checkpoints predict; train "
                           f"DiffusionTrainer (or one of {', '.join(TRAINERS)}) instead.")


def former_default_trainer(name: str) -> type:
    """The trainer of former default ``name`` (cached, so pickling by name works)."""
    if name not in _FORMER:
        _FORMER[name] = type(name, (FormerDefaultTrainer,), {
            "diffusion": former_default_config(name), "__module__": "nnunet_diffusion.trainers.former_defaults",
            "__qualname__": name, "__doc__": f"Former default {name}: {FORMER_DEFAULTS[name]} on the paper's settings."})
    return _FORMER[name]


def find_trainer(name: str) -> type:
    """A shipped trainer or former default by name (AttributeError if neither)."""
    if name in TRAINERS:
        return TRAINERS[name]
    if name in FORMER_DEFAULTS:
        return former_default_trainer(name)
    raise AttributeError(name)
