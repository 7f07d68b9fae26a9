"""Thin modules that nnU-Net discovers through ``nnUNet_extTrainer``.

Point ``nnUNet_extTrainer`` at this folder (``nnunet-diffusion trainers-path``).
The classes live in the ``nnunet_diffusion`` library; these modules only re-export
them, so pickling and ``--c`` work whatever module nnU-Net imported them through.
"""
