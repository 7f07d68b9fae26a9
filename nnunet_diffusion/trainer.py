"""DiffusionTrainer: nnU-Net glue for the mask-predicting DDPM (METHOD.md section 3).

Only three nnU-Net methods are overridden:

* ``build_network_architecture`` (a classmethod, so nnU-Net's predictor can call it on
  the class): the planned U-Net with C_img + C inputs, wrapped in :class:`DiffusionUNet`.
* ``train_step``: the stock step runs ``network(data)``; a diffusion step needs the
  label to build the noisy mask and a recycle pass first.
* ``initialize``: refuse label set-ups the method does not define (regions, ignore label).

``validation_step`` and ``perform_actual_validation`` stay stock: in eval mode
``network(image)`` runs the K-step sampler, so nnU-Net's pseudo Dice, sliding window,
mirroring and export all see the logits the user will get.
"""
from __future__ import annotations

from typing import ClassVar

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch._dynamo import OptimizedModule

from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.network import DiffusionUNet
from nnunet_diffusion.sampling import encode_mask, full_resolution
from nnunet_diffusion.training import NoisyBatch, make_noisy_mask


class DiffusionTrainer(nnUNetTrainer):
    """nnU-Net trainer for the paper's diffusion model: K = 5, recycling, x0 prediction, Dice + CE."""

    diffusion: ClassVar[DiffusionConfig] = DiffusionConfig()

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Same architecture class and arguments as the stock trainer; only the input grows by C mask channels."""
        unet = get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels + num_output_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision)
        return DiffusionUNet(unet, num_input_channels, num_output_channels, cls.diffusion)

    def initialize(self) -> None:
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__} does not support region-based labels "
                             f"({self.label_manager.foreground_regions}): the diffusion model denoises a one-hot "
                             f"mask of mutually exclusive classes. Use a label map without 'regions_class_order'.")
        if self.label_manager.has_ignore_label:
            raise ValueError(f"{type(self).__name__} does not support an ignore label "
                             f"(label {self.label_manager.ignore_label}): the noisy mask has no value for unknown "
                             f"voxels. Remove the 'ignore' entry from dataset.json.")
        super().initialize()

    # ------------------------------------------------------------------ helpers
    @property
    def diffusion_network(self) -> DiffusionUNet:
        """The :class:`DiffusionUNet` behind DDP and torch.compile wrappers."""
        mod = self.network.module if self.is_ddp else self.network
        if isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        return mod

    def _recycle_denoise(self, image: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Recycle pass: full-resolution output only (deep-supervision heads off), no gradient."""
        decoder = self.diffusion_network.decoder
        previous = decoder.deep_supervision
        decoder.deep_supervision = False
        try:
            return full_resolution(self.network(image, xt, t))
        finally:
            decoder.deep_supervision = previous

    def make_noisy_batch(self, data: torch.Tensor, target) -> NoisyBatch:
        """x0 from the full-resolution label, then the noisy mask (with recycling if configured)."""
        x0 = encode_mask(full_resolution(target), self.label_manager.num_segmentation_heads)
        return make_noisy_mask(self._recycle_denoise, data, x0, self.diffusion_network.training_schedule,
                               recycle=self.diffusion.recycle, prediction=self.diffusion.prediction)

    def compute_loss(self, data: torch.Tensor, target, noisy: NoisyBatch) -> torch.Tensor:
        """The supervised pass and nnU-Net's (deep-supervised) Dice + CE loss."""
        output = self.network(data, noisy.xt, noisy.t)
        return self.loss(output, target)

    # ------------------------------------------------------------------ nnU-Net hooks
    def train_step(self, batch: dict) -> dict:
        """Overrides nnUNetTrainer.train_step: the forward pass is a diffusion step; the optimiser part is stock."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            noisy = self.make_noisy_batch(data, target)
            loss = self.compute_loss(data, target, noisy)

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {'loss': loss.detach().cpu().numpy()}
