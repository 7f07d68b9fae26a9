"""Ablation trainers of the paper's Table 2, the paper's exact configuration and the accuracy study's
candidates (``-tr DiffusionTrainer_<change>``)."""
from nnunet_diffusion.variants import *  # noqa: F401,F403
from nnunet_diffusion.variants import __all__  # noqa: F401
