"""The trunk + denoising head trainer (``-tr DiffusionTrainer_head``, issue 38)."""
from nnunet_diffusion.head_trainer import DiffusionTrainer_head

__all__ = ["DiffusionTrainer_head"]
