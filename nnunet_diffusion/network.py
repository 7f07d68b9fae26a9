"""Time-conditioned wrapper around the U-Net that nnU-Net plans (METHOD.md section 2).

The planned U-Net (``PlainConvUNet``, ``ResidualEncoderUNet``, 2D or 3D) is built with
C_img + C input channels. Every normalisation layer inside it is wrapped by a
:class:`FiLMNorm` that applies a per-sample, per-channel scale and shift *after*
normalisation, so the time signal cannot be normalised away (the reference code
adds it before an InstanceNorm, which removes it). The projection producing the
scales and shifts is zero-initialised: an untrained time path is the identity.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.config import DiffusionConfig, SamplingSettings
from nnunet_diffusion.sampling import NetworkOutput, StepHook, p_sample_loop
from nnunet_diffusion.schedule import Schedule, base_alpha_bar

_NORM_TYPES = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of base levels t ``(B,)`` -> ``(B, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FiLMNorm(nn.Module):
    """norm(x) * (1 + scale) + shift, with scale/shift ``(B, C)`` set per forward by :class:`DiffusionUNet`.

    For InstanceNorm (nnU-Net's default) the modulation is folded into the norm's per-channel affine: one
    instance-norm pass with a per-sample gain (1 + scale) * weight and offset (1 + scale) * bias + shift,
    so conditioning costs no extra pass over the activations.
    """

    def __init__(self, norm: nn.Module, num_channels: int):
        super().__init__()
        self.norm = norm
        self.num_channels = num_channels
        self.scale: Optional[torch.Tensor] = None
        self.shift: Optional[torch.Tensor] = None
        self._fusable = isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scale is None:
            return self.norm(x)
        gain = 1.0 + self.scale
        if self._fusable:
            shift = self.shift
            if self.norm.affine:
                shift = torch.addcmul(shift, gain, self.norm.bias)
                gain = gain * self.norm.weight
            param_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
            b, c = x.shape[:2]
            y = F.batch_norm(x.reshape(1, b * c, *x.shape[2:]), None, None, gain.reshape(-1).to(param_dtype),
                             shift.reshape(-1).to(param_dtype), True, 0.0, self.norm.eps)
            return y.view_as(x)
        y = self.norm(x)
        view = (y.shape[0], self.num_channels) + (1,) * (y.ndim - 2)
        return torch.addcmul(self.shift.view(view).to(y.dtype), y, gain.view(view).to(y.dtype))


def _norm_channels(norm: nn.Module) -> int:
    return int(norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.num_features)


def wrap_norms(module: nn.Module) -> List[FiLMNorm]:
    """Replace every normalisation layer below ``module`` by a :class:`FiLMNorm`, one per layer.

    dynamic_network_architectures references a layer from several parents (e.g. ``block.norm``
    and ``block.all_modules[1]``; the decoder holds the encoder), so every reference to the
    same norm gets the same wrapper.
    """
    films: Dict[int, FiLMNorm] = {}
    references = []
    for parent in module.modules():
        for name, child in parent.named_children():
            if isinstance(child, _NORM_TYPES):
                references.append((parent, name, child))
    for parent, name, child in references:
        if id(child) not in films:
            films[id(child)] = FiLMNorm(child, _norm_channels(child))
        setattr(parent, name, films[id(child)])
    return list(films.values())


def first_convolution(module: nn.Module, in_channels: int) -> nn.Module:
    """The first convolution below ``module`` (registration order, i.e. the input stem) taking ``in_channels``."""
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            if m.in_channels != in_channels:
                raise ValueError(f"the first convolution takes {m.in_channels} channels, expected {in_channels}")
            return m
    raise ValueError(f"{type(module).__name__} has no convolution")


def zero_mask_input_weights(unet: nn.Module, num_image_channels: int, num_classes: int) -> None:
    """Zero the input convolution's weights on the mask channels (``DiffusionConfig.zero_init_mask_input``):
    ``num_classes`` is the number of channels after the image's (C, or 2 C with self-conditioning)."""
    conv = first_convolution(unet, num_image_channels + num_classes)
    with torch.no_grad():
        conv.weight[:, num_image_channels:].zero_()


def stock_image_weights(unet: nn.Module, num_image_channels: int, num_mask_channels: int) -> None:
    """Rescale the input convolution's weights on the image channels to the scale stock nnU-Net's network would
    draw them at (``DiffusionConfig.stock_image_init``): the planned initialisation (He, or any with a standard
    deviation proportional to 1 / sqrt(fan-in)) drew them for C_img + ``num_mask_channels`` inputs, so they are
    multiplied by sqrt((C_img + num_mask_channels) / C_img)."""
    conv = first_convolution(unet, num_image_channels + num_mask_channels)
    with torch.no_grad():
        conv.weight[:, :num_image_channels] *= math.sqrt((num_image_channels + num_mask_channels) / num_image_channels)


def scale_mask_input(xt: torch.Tensor, t: torch.Tensor, num_classes: int, scale: torch.Tensor) -> torch.Tensor:
    """x_t's first ``num_classes`` channels times ``scale[t]`` per sample (``DiffusionConfig.scale_mask_input``,
    ``scale`` = sqrt(abar) per base level); channels after them (self-conditioning's estimate) unchanged."""
    s = scale.to(xt.device)[t.long()].to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
    if xt.shape[1] == num_classes:
        return xt * s
    return torch.cat([xt[:, :num_classes] * s, xt[:, num_classes:]], dim=1)


class DiffusionUNet(nn.Module):
    """``network(image, xt, t) -> logits``: one denoising step.
    ``network(image) -> logits``: the whole K-step sampling chain (METHOD.md section 4),
    which is what nnU-Net's predictor, sliding window and mirroring call.

    image ``(B, C_img, *spatial)``, xt ``(B, C, *spatial)``, t ``(B,)`` integer base levels
    in [0, 1000]; logits ``(B, C, *spatial)`` (a list per scale under deep supervision).
    """

    def __init__(self, unet: nn.Module, num_image_channels: int, num_classes: int,
                 config: DiffusionConfig = DiffusionConfig(), time_embed_dim: int = 128):
        super().__init__()
        self.unet = unet
        self.num_image_channels = num_image_channels
        self.num_classes = num_classes
        self.config = config
        self.time_embed_dim = time_embed_dim
        # plain list: the modules are already registered inside self.unet
        self._films: List[FiLMNorm] = []
        self.film_channels: List[int] = []
        if config.time_conditioning:
            hidden = 2 * time_embed_dim
            self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(),
                                          nn.Linear(hidden, hidden), nn.SiLU())
            self._films = wrap_norms(unet)
            if not self._films:
                raise ValueError(f"{type(unet).__name__} has no normalisation layer to condition on time")
            self.film_channels = [f.num_channels for f in self._films]
            self.time_proj = nn.Linear(hidden, 2 * sum(self.film_channels))
            nn.init.zeros_(self.time_proj.weight)
            nn.init.zeros_(self.time_proj.bias)
        # the settings nnU-Net's own calls (validation, nnUNetv2_predict) sample with; other callers pass theirs
        self.default_sampling = SamplingSettings.from_config(config)
        self._schedules: Dict[int, Schedule] = {}
        self.training_schedule = config.training_schedule()
        # channels after the image's: x_t, and with self-conditioning the previous estimate of x0
        self.mask_channels = num_classes * (2 if config.self_condition else 1)
        if config.zero_init_mask_input:
            zero_mask_input_weights(unet, num_image_channels, self.mask_channels)
        if config.stock_image_init:
            stock_image_weights(unet, num_image_channels, self.mask_channels)
        # scale_mask_input: sqrt(abar_t) per base level t (a plain attribute, not a buffer: the weights'
        # state dict stays the same with and without it)
        self._input_scale = torch.tensor(base_alpha_bar(config.num_base_levels, config.beta_start,
                                                        config.beta_end), dtype=torch.float64).sqrt().float()

    # nnU-Net's set_deep_supervision_enabled reaches network.decoder.deep_supervision
    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    def schedule(self, num_steps: Optional[int] = None) -> Schedule:
        """The inference chain with ``num_steps`` levels (default: the trained K), built once per K."""
        num_steps = num_steps or self.config.num_steps
        if num_steps not in self._schedules:
            self._schedules[num_steps] = self.config.inference_schedule(num_steps)
        return self._schedules[num_steps]

    def _condition(self, t: torch.Tensor, batch_size: int) -> None:
        if t.ndim != 1 or t.shape[0] != batch_size:
            raise ValueError(f"t must have shape ({batch_size},), got {tuple(t.shape)}")
        if not self.config.time_conditioning:
            return
        emb = self.time_mlp(timestep_embedding(t, self.time_embed_dim))
        params = self.time_proj(emb)
        start = 0
        for film, c in zip(self._films, self.film_channels):
            film.scale = params[:, start:start + c]
            film.shift = params[:, start + c:start + 2 * c]
            start += 2 * c

    def _clear(self) -> None:
        for film in self._films:
            film.scale = film.shift = None

    def denoise(self, image: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> NetworkOutput:
        """One denoising step, see class docstring. With self-conditioning, ``xt`` may carry the previous
        estimate of x0 as C more channels; with C channels only, that estimate is zeros (none yet)."""
        if self.mask_channels != self.num_classes and xt.shape[1] == self.num_classes:
            xt = torch.cat([xt, torch.zeros_like(xt)], dim=1)
        if xt.shape[1] != self.mask_channels:
            raise ValueError(f"xt must have {self.mask_channels} channels, got {xt.shape[1]}")
        self._condition(t, image.shape[0])
        if self.config.scale_mask_input:
            xt = scale_mask_input(xt, t, self.num_classes, self._input_scale)
        try:
            return self.unet(torch.cat([image, xt.to(image.dtype)], dim=1))
        finally:
            self._clear()

    def sample(self, image: torch.Tensor, settings: Optional[SamplingSettings] = None, *,
               noise: Optional[Sequence[torch.Tensor]] = None, mirrors: Optional[Sequence[Tuple[int, ...]]] = None,
               chains: Optional[Sequence[Tuple[int, ...]]] = None, mirror_batch: Optional[int] = None,
               on_step: Optional[StepHook] = None) -> NetworkOutput:
        """The chain from pure noise (:func:`p_sample_loop`) with ``settings`` (default: the trained ones).
        Without ``noise``, the noise comes from a generator seeded with ``settings.seed`` at every call
        (so stock nnUNetv2_predict is deterministic), or torch's global RNG when the seed is None."""
        settings = settings or self.default_sampling
        generator = None
        if noise is None and settings.seed is not None:
            generator = torch.Generator(device=image.device).manual_seed(settings.seed)
        return p_sample_loop(self.denoise, image, self.schedule(settings.num_steps), self.num_classes,
                             sampler=settings.sampler, prediction=self.config.prediction, generator=generator,
                             noise=noise, mirrors=mirrors, average_last=settings.average_last, chains=chains,
                             mirror_batch=mirror_batch, on_step=on_step, self_condition=self.config.self_condition,
                             start=settings.start)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, after checking and removing a released model's weights digest (``release.py``): every
        path that loads weights (nnUNetv2_predict, nnUNetv2_predict_diffusion, training) refuses a corrupted
        released checkpoint."""
        from nnunet_diffusion.release import verify_and_strip
        return super().load_state_dict(verify_and_strip(state_dict), strict=strict, assign=assign)

    def forward(self, image: torch.Tensor, xt: Optional[torch.Tensor] = None,
                t: Optional[torch.Tensor] = None) -> NetworkOutput:
        if image.shape[1] != self.num_image_channels:
            raise ValueError(f"expected an image with {self.num_image_channels} channel(s), got {image.shape[1]}")
        if xt is None:
            # the chain is what nnUNetv2_predict and validation call: refuse what would silently spread NaN/Inf
            if not torch.isfinite(image).all():
                raise ValueError(f"the image holds {int((~torch.isfinite(image)).sum())} NaN/Inf value(s); replace "
                                 f"them (e.g. with the image minimum) before predicting")
            return self.sample(image)
        if t is None:
            raise ValueError("a denoising step needs both xt and t")
        return self.denoise(image, xt, t)
