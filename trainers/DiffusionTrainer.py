"""The default diffusion trainer (``-tr DiffusionTrainer``)."""
from nnunet_diffusion.trainer import DiffusionTrainer

__all__ = ["DiffusionTrainer"]
