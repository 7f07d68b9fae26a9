"""Ablation trainers of the paper's Table 2 (``-tr DiffusionTrainer_<change>``)."""
from nnunet_diffusion.variants import (DiffusionTrainer_1000steps, DiffusionTrainer_noDice,  # noqa: F401
                                       DiffusionTrainer_noRecycle, DiffusionTrainer_predictNoise)
