"""Time-conditioned wrapper around the U-Net that nnU-Net plans (METHOD.md section 2), and the adapter that gives
nnU-Net its ``network(image)`` call.

:class:`DiffusionUNet` is the denoiser, a pure function of its weights: ``(image, x_t, t) -> logits``. The planned
U-Net (``PlainConvUNet``, ``ResidualEncoderUNet``, 2D or 3D) is built with C_img + C input channels. Every
normalisation layer inside it is wrapped by a :class:`FiLMNorm` that applies a per-sample, per-channel scale and
shift *after* normalisation, so the time signal cannot be normalised away (the reference code adds it before an
InstanceNorm, which removes it). The projection producing the scales and shifts is zero-initialised: an untrained
time path is the identity.

The scales and shifts of a call reach the FiLMNorms through a context variable that :meth:`DiffusionUNet.forward`
sets for the duration of the call (and restores after it): nothing is written into the modules, so calls can
interleave or nest, and a FiLMNorm called outside a call of its network is the plain norm.

:class:`SampledNetwork` is the adapter nnU-Net builds, trains, validates and predicts with: ``network(image, x_t,
t)`` is one denoising step (training), ``network(image)`` the K-step chain with the adapter's own sampling settings
(validation, ``nnUNetv2_predict``). Its state dict is the denoiser's, keys unchanged.
"""
from __future__ import annotations

import contextvars
import math
from functools import lru_cache
from typing import Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from nnunet_diffusion.config import DiffusionConfig, SamplingSettings
from nnunet_diffusion.sampling import NetworkOutput, Step, mean_of_last, p_sample_progressive
from nnunet_diffusion.schedule import Schedule

_NORM_TYPES = (nn.modules.instancenorm._InstanceNorm, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
# the (scale, shift) pairs of the DiffusionUNet call in progress, one per FiLMNorm (by its index); None outside
_FILM = contextvars.ContextVar("nnunet_diffusion_film", default=None)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of base levels t ``(B,)`` -> ``(B, dim)`` float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class FiLMNorm(nn.Module):
    """norm(x) * (1 + scale) + shift, with scale/shift ``(B, C)`` of the :class:`DiffusionUNet` call in progress
    (entry ``index`` of its conditioning); outside such a call, the plain norm.

    For InstanceNorm (nnU-Net's default) the modulation is folded into the norm's per-channel affine: one
    instance-norm pass with a per-sample gain (1 + scale) * weight and offset (1 + scale) * bias + shift,
    so conditioning costs no extra pass over the activations.
    """

    def __init__(self, norm: nn.Module, num_channels: int, index: int):
        super().__init__()
        self.norm = norm
        self.num_channels = num_channels
        self.index = index
        self._fusable = isinstance(norm, nn.modules.instancenorm._InstanceNorm) and not norm.track_running_stats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        condition = _FILM.get()
        if condition is None:
            return self.norm(x)
        scale, shift = condition[self.index]
        gain = 1.0 + scale
        if self._fusable:
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
        return torch.addcmul(shift.view(view).to(y.dtype), y, gain.view(view).to(y.dtype))


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
            films[id(child)] = FiLMNorm(child, _norm_channels(child), len(films))
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
    """Zero the input convolution's weights on the ``num_classes`` mask channels after the image's
    (``DiffusionConfig.zero_init_mask_input``)."""
    conv = first_convolution(unet, num_image_channels + num_classes)
    with torch.no_grad():
        conv.weight[:, num_image_channels:].zero_()


class DiffusionUNet(nn.Module):
    """``denoiser(image, xt, t) -> logits``: one denoising step, and nothing else.

    image ``(B, C_img, *spatial)``, xt ``(B, C, *spatial)``, t ``(B,)`` integer base levels in [0, 1000]; logits
    ``(B, C, *spatial)`` (a list per scale under deep supervision). ``zero_init_mask_input``: start the input
    convolution's weights on the C mask channels at zero (initialisation only).
    """

    def __init__(self, unet: nn.Module, num_image_channels: int, num_classes: int,
                 zero_init_mask_input: bool = False, time_embed_dim: int = 128):
        super().__init__()
        self.unet = unet
        self.num_image_channels = num_image_channels
        self.num_classes = num_classes
        self.time_embed_dim = time_embed_dim
        hidden = 2 * time_embed_dim
        self.time_mlp = nn.Sequential(nn.Linear(time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        # a plain list: the modules are already registered inside self.unet
        self._films: List[FiLMNorm] = wrap_norms(unet)
        if not self._films:
            raise ValueError(f"{type(unet).__name__} has no normalisation layer to condition on time")
        self.film_channels = [f.num_channels for f in self._films]
        self.time_proj = nn.Linear(hidden, 2 * sum(self.film_channels))
        nn.init.zeros_(self.time_proj.weight)
        nn.init.zeros_(self.time_proj.bias)
        if zero_init_mask_input:
            zero_mask_input_weights(unet, num_image_channels, num_classes)

    # nnU-Net's set_deep_supervision_enabled reaches network.decoder.deep_supervision
    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    def conditioning(self, t: torch.Tensor) -> Tuple[Tuple[torch.Tensor, torch.Tensor], ...]:
        """The (scale, shift) ``(B, C_i)`` of every FiLMNorm for base levels t ``(B,)``."""
        params = self.time_proj(self.time_mlp(timestep_embedding(t, self.time_embed_dim)))
        pairs, start = [], 0
        for c in self.film_channels:
            pairs.append((params[:, start:start + c], params[:, start + c:start + 2 * c]))
            start += 2 * c
        return tuple(pairs)

    def forward(self, image: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> NetworkOutput:
        if image.shape[1] != self.num_image_channels:
            raise ValueError(f"expected an image with {self.num_image_channels} channel(s), got {image.shape[1]}")
        if xt.shape[1] != self.num_classes:
            raise ValueError(f"xt must have {self.num_classes} channels, got {xt.shape[1]}")
        if t.ndim != 1 or t.shape[0] != image.shape[0]:
            raise ValueError(f"t must have shape ({image.shape[0]},), got {tuple(t.shape)}")
        token = _FILM.set(self.conditioning(t))
        try:
            return self.unet(torch.cat([image, xt.to(image.dtype)], dim=1))
        finally:
            _FILM.reset(token)


@torch.compiler.disable  # numpy, once per K: outside any compiled graph (nnUNet_compile compiles network(image))
@lru_cache(maxsize=None)
def _inference_schedule(config: DiffusionConfig, num_steps: int) -> Schedule:
    return config.inference_schedule(num_steps)


def _prefixed(state_dict, prefix: str, old: str, new: str) -> None:
    """Rename, in place and in order, the keys ``prefix + old + rest`` of ``state_dict`` to ``prefix + new + rest``."""
    items = list(state_dict.items())
    state_dict.clear()
    for k, v in items:
        if k.startswith(prefix + old) and not (new and k.startswith(prefix + new)):
            k = prefix + new + k[len(prefix + old):]
        state_dict[k] = v


class SampledNetwork(nn.Module):
    """The network nnU-Net holds: ``network(image, xt, t)`` is one step of the denoiser (training);
    ``network(image)`` runs the chain from pure noise with :attr:`sampling` (nnU-Net's validation, sliding window
    and mirroring, ``nnUNetv2_predict``) and refuses a NaN/Inf image. ``config`` gives the chain's prediction type
    and levels. The state dict is the denoiser's (no prefix), as checkpoints have always recorded it.
    ``check_weights``: applied to every state dict before it is loaded (e.g. ``checkpoint.verify_and_strip``, which
    refuses a corrupted released model); it returns the weights to load."""

    def __init__(self, denoiser: DiffusionUNet, config: DiffusionConfig, sampling: Optional[SamplingSettings] = None,
                 check_weights: Optional[Callable[[Mapping], Mapping]] = None):
        super().__init__()
        self.denoiser = denoiser
        self.check_weights = check_weights
        self.config = config
        self.sampling = sampling or SamplingSettings.from_config(config)
        self.training_schedule = config.training_schedule()
        self._register_state_dict_hook(lambda module, sd, prefix, meta: _prefixed(sd, prefix, "denoiser.", ""))
        self._register_load_state_dict_pre_hook(
            lambda sd, prefix, *args: _prefixed(sd, prefix, "", "denoiser."))

    @property
    def decoder(self) -> nn.Module:
        return self.denoiser.decoder

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """nn.Module's, after ``check_weights``."""
        if self.check_weights is not None:
            state_dict = self.check_weights(state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    @property
    def num_classes(self) -> int:
        return self.denoiser.num_classes

    def schedule(self, num_steps: int) -> Schedule:
        return _inference_schedule(self.config, num_steps)

    def steps(self, image: torch.Tensor, sampling: SamplingSettings, *, noise: Optional[Sequence[torch.Tensor]] = None,
              generator: Optional[torch.Generator] = None, denoise=None) -> Iterator[Step]:
        """The chain on ``image`` (:func:`p_sample_progressive`) with ``sampling``'s levels and sampler. Without
        ``noise`` and ``generator``, the noise comes from a generator seeded with ``sampling.seed`` (torch's
        global RNG when None). ``denoise(x_t, t)``: the network call (default: the denoiser on ``image``)."""
        if noise is None and generator is None and sampling.seed is not None:
            generator = torch.Generator(device=image.device).manual_seed(sampling.seed)
        denoise = denoise or (lambda xt, t: self.denoiser(image, xt, t))
        return p_sample_progressive(denoise, (image.shape[0], self.num_classes, *image.shape[2:]),
                                    self.schedule(sampling.num_steps), sampler=sampling.sampler,
                                    prediction=self.config.prediction, generator=generator, noise=noise,
                                    device=image.device)

    def predict(self, image: torch.Tensor, sampling: Optional[SamplingSettings] = None) -> NetworkOutput:
        """The chain's output with ``sampling`` (default: :attr:`sampling`): the mean of its last m steps."""
        sampling = sampling or self.sampling
        if not torch.isfinite(image).all():
            raise ValueError(f"the image holds {int((~torch.isfinite(image)).sum())} NaN/Inf value(s); replace "
                             f"them (e.g. with the image minimum) before predicting")
        return mean_of_last(self.steps(image, sampling), sampling.average_last)

    def forward(self, image: torch.Tensor, xt: Optional[torch.Tensor] = None,
                t: Optional[torch.Tensor] = None) -> NetworkOutput:
        if xt is None and t is None:
            return self.predict(image)
        if xt is None or t is None:
            raise ValueError("a denoising step needs both xt and t")
        return self.denoiser(image, xt, t)
