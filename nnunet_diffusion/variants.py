"""The paper's ablations (Table 2), one small subclass each, named ``<Base>_<change>``.

These names become nnU-Net results folder names: never rename a class once it has
produced results. The thin modules in ``trainers/`` re-export them for discovery.
"""
from __future__ import annotations

from dataclasses import replace

from nnunet_diffusion.trainer import DiffusionTrainer

__all__ = ["DiffusionTrainer_noRecycle", "DiffusionTrainer_1000steps"]


class DiffusionTrainer_noRecycle(DiffusionTrainer):
    """Noisy training masks from the ground truth instead of the recycled prediction (Table 2c)."""
    diffusion = replace(DiffusionTrainer.diffusion, recycle=False)


class DiffusionTrainer_1000steps(DiffusionTrainer):
    """Training levels drawn over all 1001 base levels; inference keeps the 5-level chain (Table 2d)."""
    diffusion = replace(DiffusionTrainer.diffusion, train_num_steps=DiffusionTrainer.diffusion.num_base_levels)
