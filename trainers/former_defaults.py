"""Trainers of DiffusionTrainer's former defaults (``checkpoint.FORMER_DEFAULTS``), made on demand from that table so
that nnU-Net predicts with their checkpoints (``-tr DiffusionTrainer_zeroInitChainMean``)."""
from nnunet_diffusion.checkpoint import FORMER_DEFAULTS
from nnunet_diffusion.variants import former_default_trainer


def __getattr__(name: str) -> type:
    if name in FORMER_DEFAULTS:
        return former_default_trainer(name)
    raise AttributeError(name)
