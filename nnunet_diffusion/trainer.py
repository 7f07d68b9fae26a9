"""DiffusionTrainer: nnU-Net glue for the mask-predicting DDPM (METHOD.md section 3).

nnU-Net methods overridden, each for one reason:

* ``build_network_architecture`` (a classmethod, so nnU-Net's predictor can call it on
  the class): the planned U-Net with C_img + C inputs, wrapped in :class:`DiffusionUNet`.
* ``train_step``: the stock step runs ``network(data)``; a diffusion step needs the
  label to build the noisy mask and a recycle pass first; non-finite losses skip the update
  (under DDP on every rank together: one all-reduce of a finite flag before backward).
* ``initialize``: refuse label set-ups the method does not define (regions, ignore label).
* ``save_checkpoint`` / ``load_checkpoint``: atomic writes, recorded diffusion settings,
  clear refusal of corrupt or mismatched checkpoints (``checkpoint.py``).

``validation_step`` and ``perform_actual_validation`` stay stock: in eval mode ``network(image)`` runs the K-step
sampler, so nnU-Net's pseudo Dice, sliding window, mirroring and export all see the logits the user will get.
"""
from __future__ import annotations

from typing import ClassVar, Union

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn
from torch._dynamo import OptimizedModule

from nnunet_diffusion.checkpoint import atomic_torch_save, check_diffusion_settings, read_checkpoint, verify_and_strip
from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.network import DiffusionUNet, SampledNetwork
from nnunet_diffusion.sampling import encode_mask, full_resolution
from nnunet_diffusion.training import NoisyBatch, full_resolution_pass, make_noisy_mask


class DiffusionTrainer(nnUNetTrainer):
    """nnU-Net trainer for the paper's diffusion model (K = 5, recycling, x0 prediction, Dice + CE) with the
    accuracy study's adopted changes (docs: results): the input convolution's weights on the noisy-mask channels
    start at zero (``zero_init_mask_input``), the output is the mean probability of all K steps' x0_hat
    (``average_last`` = K, also inside nnU-Net's validation and nnUNetv2_predict), and the recycle pass starts from
    pure noise at level K and is supervised, its loss added to the level-k pass's (``supervise_recycle``,
    ``recycle_source = "noise"``, ``recycle_loss = "sum"``): each iteration is stock nnU-Net's training step on the
    batch plus a denoising step. The paper's exact configuration is ``DiffusionTrainer_paper``; checkpoints of
    earlier defaults predict through ``checkpoint.FORMER_DEFAULTS``."""

    diffusion: ClassVar[DiffusionConfig] = DiffusionConfig(zero_init_mask_input=True, average_last=5,
                                                           supervise_recycle=True, recycle_source="noise",
                                                           recycle_loss="sum")
    skipped_updates: int = 0  # training steps whose loss was not finite

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """Same architecture class and arguments as the stock trainer; only the input grows by C mask channels. The
        denoiser in nnU-Net's adapter (``network(image)`` = the chain with the trainer's settings), which refuses
        corrupted released weights whenever weights are loaded."""
        unet = get_network_from_plans(
            configuration_manager.network_arch_class_name,
            configuration_manager.network_arch_init_kwargs,
            configuration_manager.network_arch_init_kwargs_req_import,
            num_input_channels + num_output_channels,
            num_output_channels,
            allow_init=True,
            deep_supervision=enable_deep_supervision)
        denoiser = DiffusionUNet(unet, num_input_channels, num_output_channels, cls.diffusion.zero_init_mask_input)
        return SampledNetwork(denoiser, cls.diffusion, check_weights=verify_and_strip)

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
    def diffusion_network(self) -> SampledNetwork:
        """The network behind DDP and torch.compile wrappers."""
        mod = self.network.module if self.is_ddp else self.network
        if isinstance(mod, OptimizedModule):
            mod = mod._orig_mod
        return mod

    def make_noisy_batch(self, data: torch.Tensor, target) -> NoisyBatch:
        """x0 from the full-resolution label, then the noisy mask (with recycling if configured). An unsupervised
        recycle pass computes full resolution only; a supervised one keeps nnU-Net's deep supervision."""
        cfg = self.diffusion
        x0 = encode_mask(full_resolution(target), self.label_manager.num_segmentation_heads)
        full_res = full_resolution_pass(self.network, self.diffusion_network.decoder)
        recycle_fn = self.network if cfg.supervise_recycle else full_res
        return make_noisy_mask(recycle_fn, data, x0, self.diffusion_network.training_schedule,
                               recycle=cfg.recycle, prediction=cfg.prediction, recycle_source=cfg.recycle_source,
                               supervise_recycle=cfg.supervise_recycle)

    def loss_of(self, output, target, noisy: NoisyBatch) -> torch.Tensor:
        """nnU-Net's (deep-supervised) Dice + CE of one pass's output."""
        return self.loss(output, target)

    def compute_loss(self, data: torch.Tensor, target, noisy: NoisyBatch) -> torch.Tensor:
        """The supervised pass's loss; with ``supervise_recycle`` the mean or the sum (``recycle_loss``) of it and
        the recycle pass's."""
        loss = self.loss_of(self.network(data, noisy.xt, noisy.t), target, noisy)
        if noisy.recycled is not None:
            loss = loss + self.loss_of(noisy.recycled.output, target, noisy.recycled.batch)
            if self.diffusion.recycle_loss == "mean":
                loss = 0.5 * loss
        return loss

    def _build_loss(self):
        """Overrides nnUNetTrainer._build_loss only when ``use_dice`` is off: nnU-Net's DC_and_CE_loss with the
        Dice weight set to 0 (cross-entropy only)."""
        loss = super()._build_loss()
        if not self.diffusion.use_dice:
            inner = loss.loss if hasattr(loss, "weight_factors") else loss
            inner.weight_dice = 0
        return loss

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        """Overrides nnUNetTrainer.save_checkpoint to (1) record the diffusion settings, which decide how the
        weights must be used, and (2) write atomically: a temporary file in the same folder, flushed to disk,
        then renamed, so a kill at any moment leaves the previous or the new checkpoint, never a torn one."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file('No checkpoint written, checkpointing is disabled')
            return
        checkpoint = {
            'network_weights': self.diffusion_network.state_dict(),
            'optimizer_state': self.optimizer.state_dict(),
            'grad_scaler_state': self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            'logging': self.logger.get_checkpoint(),
            '_best_ema': self._best_ema,
            'current_epoch': self.current_epoch + 1,
            'init_args': self.my_init_kwargs,
            'trainer_name': self.__class__.__name__,
            'inference_allowed_mirroring_axes': self.inference_allowed_mirroring_axes,
            'diffusion': self.diffusion.to_dict(),
        }
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """Overrides nnUNetTrainer.load_checkpoint to refuse corrupt checkpoints and checkpoints trained with
        other diffusion settings (another K, another variant) with a clear message."""
        checkpoint = read_checkpoint(filename_or_checkpoint) if isinstance(filename_or_checkpoint, str) \
            else filename_or_checkpoint
        check_diffusion_settings(checkpoint, self.diffusion, str(filename_or_checkpoint)
                                 if isinstance(filename_or_checkpoint, str) else 'checkpoint')
        super().load_checkpoint(filename_or_checkpoint)

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

        if not self._all_finite(loss):
            # e.g. an fp16 overflow: skip this update (as nnU-Net's grad scaler skips inf gradients) rather
            # than write NaN into the weights; the optimiser state is untouched. Under DDP the decision is
            # collective: every rank skips when any rank's loss is not finite
            self.skipped_updates += 1
            self.print_to_log_file(f"non-finite loss (this rank: {loss.item()}) in epoch {self.current_epoch}: "
                                   f"update skipped ({self.skipped_updates} so far)")
            self.optimizer.zero_grad(set_to_none=True)
            return {'loss': loss.detach().cpu().numpy()}

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

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on this rank and, under DDP, on every rank (one all-reduce)."""
        finite = torch.isfinite(loss.detach()).all().to(torch.int32).reshape(1)
        if self.is_ddp:
            import torch.distributed as dist
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())
