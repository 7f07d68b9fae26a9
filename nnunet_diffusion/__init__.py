"""nnunet-diffusion: the mask-predicting 3D diffusion model of Fu et al. (2023) inside nnU-Net v2."""
__version__ = "0.1.0"
