"""DiffusionTrainer_head: nnU-Net glue for the trunk + denoising head design (``head.py``, issue 38).

nnU-Net methods overridden, each for one reason:

* ``build_network_architecture``: stock's planned network (built by ``nnUNetTrainer``'s own method, so every plans
  class and preset works) wrapped with a :class:`~nnunet_diffusion.head.DenoisingHead`.
* ``train_step``: the forward pass needs the label (the head's noisy mask); the loss is stock's deep-supervised
  Dice + CE of the trunk plus the head's full-resolution Dice + CE; the optimiser part is stock's.
* ``perform_actual_validation``: stock's final validation of the trainer's output (``validation/``), and the same
  validation of each output in ``validation_outputs`` (``validation_trunk/``, ``validation_chain/``), so the three
  outputs are measured on the same training run.

``validation_step`` stays stock: in eval mode ``network(image)`` is the prediction (trunk once, head chain).
"""
from __future__ import annotations

import os
import shutil
from dataclasses import replace
from typing import ClassVar, Tuple

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch._dynamo import OptimizedModule

from nnunet_diffusion.head import HeadConfig, HeadSampling, TrunkHeadNetwork, head_targets


class DiffusionTrainer_head(nnUNetTrainer):
    """Stock nnU-Net's network and training step, plus a light time-conditioned denoising head on its last decoder
    features that runs the paper's K = 5 chain (recycling through the head alone). Output: the mean probability of
    the chain and the trunk (``HeadSampling.output``)."""

    head: ClassVar[HeadConfig] = HeadConfig()
    sampling: ClassVar[HeadSampling] = HeadSampling()
    # the outputs validated besides the trainer's own (each into validation_<output>/)
    validation_outputs: ClassVar[Tuple[str, ...]] = ("trunk", "chain")

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        trunk = nnUNetTrainer.build_network_architecture(plans_manager, configuration_manager, num_input_channels,
                                                         num_output_channels, enable_deep_supervision)
        return TrunkHeadNetwork(trunk, num_output_channels, cls.head, cls.sampling)

    def initialize(self) -> None:
        if self.label_manager.has_regions or self.label_manager.has_ignore_label:
            raise ValueError(f"{type(self).__name__} needs mutually exclusive classes without an ignore label: the "
                             f"head denoises a one-hot mask (regions: {self.label_manager.has_regions}, ignore "
                             f"label: {self.label_manager.ignore_label})")
        super().initialize()

    @property
    def head_network(self) -> TrunkHeadNetwork:
        """The :class:`TrunkHeadNetwork` behind DDP and torch.compile wrappers."""
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def head_loss(self, head_logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """nnU-Net's Dice + CE (without its deep-supervision wrapper) of the head's full-resolution logits."""
        loss = self.loss.loss if hasattr(self.loss, "weight_factors") else self.loss
        return loss(head_logits, label)

    def train_step(self, batch: dict) -> dict:
        """Overrides nnUNetTrainer.train_step: ``network(data, x0)`` returns the trunk's output and the head's."""
        data = batch['data'].to(self.device, non_blocking=True)
        target = batch['target']
        target = [i.to(self.device, non_blocking=True) for i in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == 'cuda' else dummy_context():
            label, x0 = head_targets(target, self.label_manager.num_segmentation_heads)
            trunk_output, head_logits = self.network(data, x0)
            loss = self.loss(trunk_output, target) + self.head.head_weight * self.head_loss(head_logits, label)
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

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Overrides nnU-Net's final validation: each of ``validation_outputs`` first (moved to
        ``validation_<output>/``), then the trainer's own output into ``validation/`` as stock writes it."""
        network = self.head_network
        own = network.sampling
        folder = os.path.join(self.output_folder, "validation")
        try:
            for output in self.validation_outputs:
                if output == own.output:
                    continue
                network.sampling = replace(own, output=output)
                super().perform_actual_validation(save_probabilities)
                target = f"{folder}_{output}"
                if os.path.isdir(target):  # an earlier --val of this same model
                    shutil.rmtree(target)
                os.replace(folder, target)
        finally:
            network.sampling = own
        return super().perform_actual_validation(save_probabilities)
