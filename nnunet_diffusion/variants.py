"""The paper's ablations (Table 2), one small subclass each, named ``<Base>_<change>``.

These names become nnU-Net results folder names: never rename a class once it has
produced results. The thin modules in ``trainers/`` re-export them for discovery.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_diffusion.config import DiffusionConfig
from nnunet_diffusion.sampling import full_resolution, logits_from_eps
from nnunet_diffusion.trainer import DiffusionTrainer
from nnunet_diffusion.training import NoisyBatch

__all__ = ["DiffusionTrainer_noRecycle", "DiffusionTrainer_noDice", "DiffusionTrainer_predictNoise",
           "DiffusionTrainer_1000steps", "DiffusionTrainer_paper", "DiffusionTrainer_supervisedRecycle",
           "DiffusionTrainer_supervisedRecycleFromNoise", "DiffusionTrainer_chainMean",
           "DiffusionTrainer_zeroInitMaskInput", "DiffusionTrainer_ema",
           "DiffusionTrainer_selfCondition", "DiffusionTrainer_zeroInitChainMeanEma",
           "DiffusionTrainer_noisiestHalf", "DiffusionTrainer_defaultSelfCondition", "DiffusionTrainer_zeroStart",
           "DiffusionTrainer_chainRecycle", "DiffusionTrainer_scaledMaskInput", "DiffusionTrainer_imageOnly",
           "DiffusionTrainer_imageOnlyNoEma", "DiffusionTrainer_zeroInitChainMean",
           "DiffusionTrainer_imageOnlyNoTime", "DiffusionTrainer_noTimeConditioning",
           "DiffusionTrainer_stockImageInit", "DiffusionTrainer_imageOnlyNoTimeStockInit",
           "DiffusionTrainer_noisePassSum", "nnUNetTrainer_doubleLoss"]

PAPER = DiffusionConfig()


class DiffusionTrainer_paper(DiffusionTrainer):
    """The paper's exact configuration (K = 5, recycling from the next level, x0 prediction, Dice + CE, output =
    the last step's logits), whatever ``DiffusionTrainer``'s default becomes."""
    diffusion = PAPER


# Candidates of the accuracy study, each defined against the paper's configuration (their names must keep
# their meaning when the default changes).
class DiffusionTrainer_supervisedRecycle(DiffusionTrainer):
    """The recycle pass (one level noisier, from the ground truth) is supervised too: two supervised passes
    per step; x_t is still built from its detached prediction."""
    diffusion = replace(PAPER, supervise_recycle=True)


class DiffusionTrainer_supervisedRecycleFromNoise(DiffusionTrainer):
    """The recycle pass is the sampling chain's first step (level K, pure noise) and is supervised: every
    training step trains the prediction the chain starts from, and x_t at level k is built from exactly that
    prediction, as in the chain's next step (less exposure bias than recycling from the ground truth)."""
    diffusion = replace(PAPER, supervise_recycle=True, recycle_source="noise")


class DiffusionTrainer_chainMean(DiffusionTrainer):
    """The paper's training; the output is the mean probability of all K steps' x0_hat."""
    diffusion = replace(PAPER, average_last=PAPER.num_steps)


class DiffusionTrainer_zeroInitMaskInput(DiffusionTrainer):
    """The paper's method with the input convolution's weights on the x_t channels initialised to zero: the
    untrained network is a stock U-Net on the image, and the mask path grows only where x_t is informative."""
    diffusion = replace(PAPER, zero_init_mask_input=True)


class DiffusionTrainer_ema(DiffusionTrainer):
    """The paper's training; validation, the exported weights and prediction use an exponential moving average of
    the weights whose half-life is 5 % of the run (30 iterations of a 12 x 50 run, 12,500 of nnU-Net's 1000 x
    250)."""
    diffusion = replace(PAPER, ema_halflife=0.05)


class DiffusionTrainer_selfCondition(DiffusionTrainer):
    """The paper's method with self-conditioning: the network also sees its previous estimate of x0 (a first,
    gradient-free pass on the same x_t for half of each batch in training; the previous step in the chain)."""
    diffusion = replace(PAPER, self_condition=True)


class DiffusionTrainer_zeroInitChainMeanEma(DiffusionTrainer):
    """A combination of three candidates: zero-initialised mask input weights, the output as the mean probability
    of all K steps' x0_hat (also in nnU-Net's own validation and nnUNetv2_predict), and the EMA of the weights
    (half-life 5 % of the run)."""
    diffusion = replace(PAPER, zero_init_mask_input=True, average_last=PAPER.num_steps, ema_halflife=0.05)


class DiffusionTrainer_noisiestHalf(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMeanEma`` (the default of 2026-11-29), with half of the
    training samples at the noisiest level K (pure noise: the chain's first step, which sets the segmentation;
    the refinement steps add little) and the other half uniform over levels 1 ... K-1 (1/8 each instead of 1/5)."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, noisiest_share=0.5)


class DiffusionTrainer_defaultSelfCondition(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMeanEma`` (the default of 2026-11-29) with
    self-conditioning (``DiffusionTrainer_selfCondition`` adds it to the paper's settings instead); the zero
    initialisation covers the estimate's C input channels too, so the untrained network sees only the image."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, self_condition=True)


class DiffusionTrainer_zeroStart(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMeanEma`` (the default of 2026-11-29), with the chain
    starting from x_K = 0 (the mean of the noise it would draw: at level K it says nothing about the mask) and
    the noisiest training level seeing that same zero input (in the supervised and the recycle pass), so the
    chain's first step, which sets the segmentation, is a deterministic prediction from the image."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, start="zeros", zero_noisiest_input=True)


class DiffusionTrainer_chainRecycle(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMeanEma`` (the default of 2026-11-29), with every level
    trained on the sampling chain's own input: x_t is reached by running the chain without gradient from pure
    noise down to the sample's level (``recycle_source = "chain"``) instead of noising one recycled estimate, so
    the refinement steps learn to correct the mistakes the chain's earlier steps actually make."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, recycle_source="chain")


class DiffusionTrainer_scaledMaskInput(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMeanEma`` (the default of 2026-11-29), with the noisy
    mask fed to the network as sqrt(abar_t) x_t (``scale_mask_input``): the noisiest levels' inputs shrink to
    almost nothing, so their noise stops reaching the features the image shares, while the levels where x_t
    carries the mask keep it."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, scale_mask_input=True)


class DiffusionTrainer_imageOnly(DiffusionTrainer):
    """A control, not a diffusion model: the default's settings with one level (K = 1, t = 1000) whose x_t is
    always zeros, no recycling, the chain one call from zeros. The mask weights start at zero and, with a zero input,
    stay there, so this is stock nnU-Net's U-Net trained and predicted through this trainer (EMA of the weights,
    time-conditioned norms at a fixed t): what the trainer costs or gains apart from the diffusion itself."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, num_steps=1, average_last=1, recycle=False,
                        start="zeros", zero_noisiest_input=True)


class DiffusionTrainer_imageOnlyNoEma(DiffusionTrainer):
    """The control ``DiffusionTrainer_imageOnly`` without the EMA of the weights: validation, export and prediction
    use the trained weights, as stock nnU-Net does."""
    diffusion = replace(DiffusionTrainer_imageOnly.diffusion, ema_halflife=0.0)


class DiffusionTrainer_imageOnlyNoTime(DiffusionTrainer):
    """The control ``DiffusionTrainer_imageOnly`` without the time path (``time_conditioning = False``): with its
    EMA, but no FiLM parameters, so apart from the EMA and the zero mask channels it trains stock nnU-Net's U-Net
    exactly as stock does. Against ``DiffusionTrainer_imageOnly`` it measures what the time path's extra
    parameters cost at a fixed t."""
    diffusion = replace(DiffusionTrainer_imageOnly.diffusion, time_conditioning=False)


class DiffusionTrainer_zeroInitChainMean(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMeanEma`` without the EMA of the weights (validation, export
    and prediction use the trained weights), which on the same training runs predicted better than their average
    (README, Results)."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMeanEma.diffusion, ema_halflife=0.0)


class DiffusionTrainer_noTimeConditioning(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMean`` (no EMA) without the time path:
    the network is not told the level and reads it from x_t (which at the five levels differ plainly in how much
    noise they carry); no FiLM parameters, so the network is the planned U-Net with C more input channels."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMean.diffusion, time_conditioning=False)


class DiffusionTrainer_stockImageInit(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMean`` (the default of 2026-11-30) with the input
    convolution's image weights initialised at stock nnU-Net's scale (``stock_image_init``), not at the half scale
    the planned initialisation gives a convolution with 1 + 3 inputs: the untrained network is then stock's U-Net on
    the image, and SGD moves those weights at stock's relative rate instead of 4x it."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMean.diffusion, stock_image_init=True)


class DiffusionTrainer_imageOnlyNoTimeStockInit(DiffusionTrainer):
    """The control ``DiffusionTrainer_imageOnlyNoTime`` with ``stock_image_init``: the mask weights are zero and stay
    zero, there is no time path, and the image weights start as stock's do, so it trains stock nnU-Net's U-Net from
    stock's initialisation; only the EMA of the weights (validation and export) remains different."""
    diffusion = replace(DiffusionTrainer_imageOnlyNoTime.diffusion, stock_image_init=True)


class DiffusionTrainer_noisePassSum(DiffusionTrainer):
    """The settings of ``DiffusionTrainer_zeroInitChainMean`` (the default of 2026-11-30) with a supervised recycle
    pass at level K whose loss is added, not averaged (``recycle_loss = "sum"``): every iteration is stock
    nnU-Net's training step on the batch (the chain's first call: the image alone, x_t pure noise on zero-initialised
    weights), plus the level-k denoising pass on x_t built from that call's detached prediction. Aimed at the
    diagnosis that the chain's first call segments worse than stock (it is trained on a fifth of the samples)."""
    diffusion = replace(DiffusionTrainer_zeroInitChainMean.diffusion, supervise_recycle=True, recycle_source="noise",
                        recycle_loss="sum")


class _ScaledLoss(torch.nn.Module):
    """``scale`` times a loss module's value (a module, so nnU-Net can compile it like its own)."""

    def __init__(self, loss: torch.nn.Module, scale: float):
        super().__init__()
        self.loss, self.scale = loss, scale

    def forward(self, *args, **kwargs):
        return self.scale * self.loss(*args, **kwargs)


class nnUNetTrainer_doubleLoss(nnUNetTrainer):
    """A control, not a candidate: stock nnU-Net with its loss (Dice + CE, deep supervision) doubled, so that every
    gradient is twice stock's before nnU-Net's gradient-norm clipping at 12. ``DiffusionTrainer_noisePassSum`` adds
    two stock-sized losses; this tells whether stock gains as much from the larger step alone. Logged training and
    validation losses are doubled too."""

    def _build_loss(self):
        return _ScaledLoss(super()._build_loss(), 2.0)


class DiffusionTrainer_noRecycle(DiffusionTrainer):
    """Noisy training masks from the ground truth instead of the recycled prediction (Table 2c). With the default
    of 2026-12-01 this also drops its supervised level-K pass, which is the recycle pass: one pass per step."""
    diffusion = replace(DiffusionTrainer.diffusion, recycle=False)


class DiffusionTrainer_noDice(DiffusionTrainer):
    """Cross-entropy only (Table 2b)."""
    diffusion = replace(DiffusionTrainer.diffusion, use_dice=False)


class DiffusionTrainer_1000steps(DiffusionTrainer):
    """Training levels drawn over all 1001 base levels; inference keeps the 5-level chain (Table 2d)."""
    diffusion = replace(DiffusionTrainer.diffusion, train_num_steps=DiffusionTrainer.diffusion.num_base_levels)


class DiffusionTrainer_predictNoise(DiffusionTrainer):
    """The network predicts the noise eps (Table 2a).

    x0_hat = clip((x_t - sqrt(1 - abar) eps_hat) / sqrt(abar), -1, 1);
    logits = log(clip((x0_hat + 1) / 2, 1e-5, 1));
    loss = mse_weight * MSE(eps_hat, eps) + nnU-Net's Dice + CE on those logits
    (at every deep-supervision scale, x_t area-downsampled to that scale).
    """
    diffusion = replace(DiffusionTrainer.diffusion, prediction="eps")

    def loss_of(self, output, target, noisy: NoisyBatch) -> torch.Tensor:
        alpha_bar = self.diffusion_network.training_schedule.extract("alpha_bar", noisy.k, noisy.xt.ndim)
        seg_loss = self.loss(logits_from_eps(output, noisy.xt, alpha_bar), target)
        mse = F.mse_loss(full_resolution(output).float(), noisy.eps.float())
        return seg_loss + self.diffusion.mse_weight * mse
