"""Diffusion at stock's cost (issue 38): the planned network once per patch, a light denoising head per step.

The image does not change between the chain's steps, nor between the recycle pass and the supervised pass of a
training step, so only what depends on the noisy mask x_t and the level t runs per step (ARCHITECTURE.md habit 14;
DDP, Ji et al. 2023, runs its backbone once and iterates a light head in the same way):

* the **trunk** is nnU-Net's planned network (the plans' own class, so ResEnc presets work) on the image alone,
  trained with nnU-Net's deep-supervised Dice + CE exactly as stock trains it;
* the **head** (:class:`DenoisingHead`) takes the trunk's last decoder features f (full resolution), the trunk's
  logits and x_t, is told the level t by FiLM after each normalisation, and predicts the logits of x0_hat as the
  trunk's logits plus a correction (the correction's last layer starts at zero, so an untrained head returns the
  trunk's segmentation at every step);
* recycling (the paper's eq. 8-9) runs through the head alone on the same features;
* the chain at prediction runs the trunk once per tile (and per mirroring, when nnU-Net mirrors) and the head K
  times; the output is the chain's, the trunk's, or their mean probability (``HeadSampling.output``).

The head sees the features and logits detached: the trunk's weights get stock's gradient and nothing else, so the
trunk *is* stock nnU-Net trained side by side with the head (what the head adds can be read off against it on the
same run).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.sampling import NetworkOutput, encode_mask, full_resolution, mask_from_logits
from nnunet_diffusion.schedule import BETA_END, BETA_START, NUM_BASE_LEVELS, Schedule

OUTPUTS = ("mean", "chain", "trunk")


def _check_positive_int(name: str, value, high: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or (high is not None and value > high):
        bound = f"in [1, {high}]" if high is not None else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


@dataclass(frozen=True)
class HeadConfig:
    """What defines a trunk + head model beyond nnU-Net's plans (recorded in its checkpoints).

    num_steps: K, the resampled chain (training levels and the chain at prediction), the paper's 5.
    width: channels of the head's two convolutions (1x1(x1), then 3x3(x3)).
    head_weight: weight of the head's Dice + CE against the trunk's deep-supervised Dice + CE (1: the sum).
    """

    num_steps: int = 5
    width: int = 16
    head_weight: float = 1.0
    time_embed_dim: int = 64

    def __post_init__(self) -> None:
        _check_positive_int("num_steps", self.num_steps, NUM_BASE_LEVELS)
        _check_positive_int("width", self.width)
        _check_positive_int("time_embed_dim", self.time_embed_dim)
        if isinstance(self.head_weight, bool) or not isinstance(self.head_weight, (int, float)) \
                or not self.head_weight > 0:
            raise ValueError(f"head_weight must be a number > 0, got {self.head_weight!r}")

    def schedule(self, num_steps: Optional[int] = None) -> Schedule:
        return Schedule.resampled(num_steps or self.num_steps, NUM_BASE_LEVELS, BETA_START, BETA_END)


@dataclass(frozen=True)
class HeadSampling:
    """How one prediction of a trunk + head model is made (the weights do not depend on it).

    output: ``"mean"`` (mean probability of the chain's output and the trunk's), ``"chain"`` or ``"trunk"``
        (the trunk alone: stock nnU-Net's prediction, no head call).
    num_steps: K' levels of the chain (None: the trained K). average_last: the chain's output is the mean
        probability of its last m steps' x0_hat (None: all K' steps). seed: the chain's noise generator is seeded
        with it at every call (so prediction is deterministic); None: torch's global RNG.
    """

    output: str = "mean"
    num_steps: Optional[int] = None
    average_last: Optional[int] = None
    seed: Optional[int] = 0

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {self.output!r}")
        if self.num_steps is not None:
            _check_positive_int("num_steps", self.num_steps, NUM_BASE_LEVELS)
        if self.average_last is not None:
            _check_positive_int("average_last", self.average_last, self.num_steps)


def _timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of base levels t ``(B,)`` -> ``(B, dim)`` float32 (periods up to 10,000 levels)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


def trunk_pass(trunk: nn.Module, image: torch.Tensor) -> Tuple[NetworkOutput, torch.Tensor]:
    """The planned network on ``image``: its output (a list per scale under deep supervision) and the features its
    full-resolution segmentation layer reads, ``(B, F, *spatial)``.

    The features are taken with a forward hook on the decoder's last segmentation layer for this call only
    (nnU-Net's ``UNetDecoder`` applies ``seg_layers[-1]`` to the last stage's output with and without deep
    supervision), so the planned class's own forward runs unchanged.
    """
    captured = []
    handle = trunk.decoder.seg_layers[-1].register_forward_hook(lambda module, args, out: captured.append(args[0]))
    try:
        output = trunk(image)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(f"expected one call of the decoder's full-resolution segmentation layer, got "
                           f"{len(captured)}")
    return output, captured[0]


class DenoisingHead(nn.Module):
    """logits = trunk_logits + out(act(film(norm(conv_3x3(act(film(norm(conv_1x1([f, x_t]))))))))), FiLM told the level t.

    features ``(B, F, *spatial)``, trunk_logits and xt ``(B, C, *spatial)``, t ``(B,)`` base levels; returns
    ``(B, C, *spatial)``. A pure function of its inputs: nothing is stored between calls.
    """

    def __init__(self, conv_op: type, feature_channels: int, num_classes: int, width: int = 16,
                 time_embed_dim: int = 64):
        super().__init__()
        if conv_op not in (nn.Conv2d, nn.Conv3d):
            raise ValueError(f"the head supports 2D and 3D convolutions, got {conv_op!r}")
        self.time_embed_dim = time_embed_dim
        self.width = width
        # 1x1 first: the features already carry the trunk's context; only the second convolution mixes neighbours
        self.conv1 = conv_op(feature_channels + num_classes, width, 1)
        self.conv2 = conv_op(width, width, 3, padding=1)
        self.out = conv_op(width, num_classes, 1)
        self.time = nn.Sequential(nn.Linear(time_embed_dim, 2 * time_embed_dim), nn.SiLU(),
                                  nn.Linear(2 * time_embed_dim, 4 * width))
        # an untrained head is the trunk (zero correction) with an identity time path
        for layer in (self.out, self.time[-1]):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _film(self, h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        view = (h.shape[0], self.width) + (1,) * (h.ndim - 2)
        h = F.instance_norm(h)
        return F.leaky_relu(h * (1 + scale.view(view).to(h.dtype)) + shift.view(view).to(h.dtype), 0.01)

    def forward(self, features: torch.Tensor, trunk_logits: torch.Tensor, xt: torch.Tensor,
                t: torch.Tensor) -> torch.Tensor:
        if t.ndim != 1 or t.shape[0] != xt.shape[0]:
            raise ValueError(f"t must have shape ({xt.shape[0]},), got {tuple(t.shape)}")
        s1, b1, s2, b2 = self.time(_timestep_embedding(t, self.time_embed_dim)).chunk(4, dim=1)
        h = self._film(self.conv1(torch.cat([features, xt.to(features.dtype)], dim=1)), s1, b1)
        h = self._film(self.conv2(h), s2, b2)
        return trunk_logits + self.out(h)


def _mean_probability_logits(*logits: torch.Tensor) -> torch.Tensor:
    """log of the mean softmax probability of several logits tensors (softmax of the result gives that mean)."""
    mean = sum(torch.softmax(x.float(), dim=1) for x in logits) / len(logits)
    return torch.log(mean.clamp_min(1e-12))


class TrunkHeadNetwork(nn.Module):
    """``network(image)``: the prediction nnU-Net validates and exports (``sampling`` decides which output);
    ``network(image, x0)``: one training pass, ``(trunk_output, head_logits)``.

    image ``(B, C_img, *spatial)``; x0 ``(B, C, *spatial)``, the ground truth on the +-1 scale
    (:func:`~nnunet_diffusion.sampling.encode_mask`). The trunk's output keeps nnU-Net's deep-supervision structure;
    at prediction with deep supervision on (nnU-Net's pseudo Dice during training), the full-resolution entry is the
    selected output and the lower scales are the trunk's.
    """

    def __init__(self, trunk: nn.Module, num_classes: int, config: HeadConfig = HeadConfig(),
                 sampling: HeadSampling = HeadSampling()):
        super().__init__()
        conv_op = type(trunk.decoder.seg_layers[-1])
        self.trunk = trunk
        self.head = DenoisingHead(conv_op, trunk.decoder.seg_layers[-1].in_channels, num_classes, config.width,
                                  config.time_embed_dim)
        self.num_classes = num_classes
        self.config = config
        self.sampling = sampling  # the settings nnU-Net's own calls predict with; predict() takes others

    # nnU-Net's set_deep_supervision_enabled reaches network.decoder.deep_supervision
    @property
    def decoder(self) -> nn.Module:
        return self.trunk.decoder

    def forward(self, image: torch.Tensor, x0: Optional[torch.Tensor] = None,
                generator: Optional[torch.Generator] = None):
        if x0 is None:
            return self.predict(image, self.sampling, generator=generator)
        return self.training_pass(image, x0, generator=generator)

    def training_pass(self, image: torch.Tensor, x0: torch.Tensor, k: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None) -> Tuple[NetworkOutput, torch.Tensor]:
        """The trunk once, then recycling through the head alone (paper eq. 8-9):

          1. k ~ U{1 ... K} per sample (unless given), k' = min(k + 1, K);
          2. x_k' = sqrt(abar_k') x0 + sqrt(1 - abar_k') eps1;
          3. x0_hat' = 2 softmax(head(f, x_k', t_k')) - 1, without gradient;
          4. x_k = sqrt(abar_k) x0_hat' + sqrt(1 - abar_k) eps2;
          5. head_logits = head(f, x_k, t_k), supervised by the caller.
        f and the trunk's logits enter the head detached (the trunk trains as stock).
        """
        schedule = self.config.schedule()
        K = schedule.num_steps
        trunk_output, features = trunk_pass(self.trunk, image)
        features, trunk_logits = features.detach(), full_resolution(trunk_output).detach()
        if k is None:
            k = torch.randint(1, K + 1, (x0.shape[0],), device=x0.device, generator=generator)
        k_next = (k + 1).clamp(max=K)
        eps1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        x_next = schedule.q_sample(x0.float(), k_next, eps1)
        with torch.no_grad():
            x0_hat = mask_from_logits(self.head(features, trunk_logits, x_next, schedule.timesteps_of(k_next)))
        eps2 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=torch.float32)
        xt = schedule.q_sample(x0_hat, k, eps2)
        return trunk_output, self.head(features, trunk_logits, xt, schedule.timesteps_of(k))

    def chain_denoiser(self, features: torch.Tensor, trunk_logits: torch.Tensor) -> Callable:
        """``denoise(x_t, t) -> logits`` of the head on one image's (cached) trunk features."""
        return lambda xt, t: self.head(features, trunk_logits, xt, t)

    @torch.no_grad()
    def predict(self, image: torch.Tensor, sampling: HeadSampling,
                generator: Optional[torch.Generator] = None) -> NetworkOutput:
        """The trunk once, the head's chain on its features, and the output ``sampling.output`` selects."""
        from nnunet_diffusion.sampling import mean_of_last, p_sample_progressive
        if not torch.isfinite(image).all():
            raise ValueError(f"the image holds {int((~torch.isfinite(image)).sum())} NaN/Inf value(s); replace "
                             f"them (e.g. with the image minimum) before predicting")
        trunk_output, features = trunk_pass(self.trunk, image)
        trunk_logits = full_resolution(trunk_output)
        if sampling.output == "trunk":
            return trunk_output
        if generator is None and sampling.seed is not None:
            generator = torch.Generator(device=image.device).manual_seed(sampling.seed)
        schedule = self.config.schedule(sampling.num_steps)
        steps = p_sample_progressive(self.chain_denoiser(features, trunk_logits), trunk_logits.shape, schedule,
                                     generator=generator, device=image.device)
        chain = mean_of_last(steps, sampling.average_last or schedule.num_steps)
        result = chain if sampling.output == "chain" else _mean_probability_logits(chain, trunk_logits)
        if isinstance(trunk_output, (list, tuple)):
            return [result, *trunk_output[1:]]
        return result

    def with_sampling(self, **changes) -> HeadSampling:
        """The network's sampling settings with ``changes`` (validated)."""
        return replace(self.sampling, **changes)


def head_targets(target: NetworkOutput, num_classes: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The full-resolution label ``(B, 1, *spatial)`` of an nnU-Net target and its +-1 one-hot x0."""
    label = full_resolution(target)
    return label, encode_mask(label, num_classes)
