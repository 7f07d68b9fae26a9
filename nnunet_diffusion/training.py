"""Noisy-mask construction for a training step (METHOD.md section 3), incl. recycling.

Pure functions of tensors: they take the network as a callable and never touch
nnU-Net. Every random draw takes a ``torch.Generator`` so tests are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nnunet_diffusion.sampling import interpret_output
from nnunet_diffusion.schedule import Schedule

# full-resolution network call: (image, xt, t) -> output (tensor)
FullResDenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class NoisyBatch:
    """What a supervised pass needs: xt ``(B, C, *spatial)``, levels k ``(B,)`` (1-based), base levels t ``(B,)``
    and the noise eps used to make xt from its mask (for eps prediction). ``recycled`` is the recycle pass's
    own input and output (``output`` keeps its gradient when the pass is supervised), else None."""
    xt: torch.Tensor
    k: torch.Tensor
    t: torch.Tensor
    eps: torch.Tensor
    recycled: Optional["RecyclePass"] = None


@dataclass
class RecyclePass:
    """The recycle pass: its noisy input (built from the ground truth) and the network output on it."""
    batch: NoisyBatch
    output: object


def full_resolution_pass(network: Callable, decoder) -> FullResDenoiseFn:
    """``network`` (plain, DDP- or compile-wrapped) as a full-resolution-only call: the decoder's
    deep-supervision heads are switched off for the call, so the recycle pass computes no low-resolution
    outputs. ``decoder`` is the U-Net decoder behind the wrappers."""
    def call(image: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        previous = decoder.deep_supervision
        decoder.deep_supervision = False
        try:
            out = network(image, xt, t)
        finally:
            decoder.deep_supervision = previous
        return out[0] if isinstance(out, (list, tuple)) else out
    return call


def sample_levels(batch_size: int, num_steps: int, device: torch.device,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One level k per sample, shape ``(B,)``, uniform on {1 ... K}."""
    return torch.randint(1, num_steps + 1, (batch_size,), device=device, generator=generator)


def recycle_levels(k: torch.Tensor, num_steps: int, source: str) -> torch.Tensor:
    """Level k' of the recycle pass per sample: ``"next"`` min(k + 1, K) (eq. 8), ``"noise"`` K."""
    if source == "next":
        return (k + 1).clamp(max=num_steps)
    if source == "noise":
        return torch.full_like(k, num_steps)
    raise ValueError(f"recycle source must be 'next' or 'noise', got {source!r}")


def make_noisy_mask(denoise_fn: Callable, image: torch.Tensor, x0: torch.Tensor, schedule: Schedule,
                    *, recycle: bool, prediction: str = "x0", k: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, recycle_source: str = "next",
                    supervise_recycle: bool = False) -> NoisyBatch:
    """Build the noisy mask x_t the supervised pass is trained on.

    Recipe (paper eq. 8-9):
      1. k ~ U{1 ... K} per sample (unless given).
      2. without recycling: x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps.
      3. with recycling: k' = min(k + 1, K) (``recycle_source="noise"``: k' = K);
         x_{k'} = sqrt(abar_k') x0 + sqrt(1 - abar_k') eps1;
         x0_hat' = 2 softmax(net(image, x_{k'}, t_{k'})) - 1, without gradient into x_t;
         x_t = sqrt(abar_k) x0_hat' + sqrt(1 - abar_k) eps2, eps2 fresh noise.

    ``denoise_fn(image, xt, t)`` returns a tensor or a list per scale (element 0 used here). With
    ``supervise_recycle`` it is called with gradient enabled and its output is kept in ``recycled`` for a
    loss; x0_hat' is detached either way.
    image ``(B, C_img, *spatial)``, x0 ``(B, C, *spatial)`` on the +-1 scale.
    """
    K = schedule.num_steps
    if k is None:
        k = sample_levels(x0.shape[0], K, x0.device, generator)
    source, recycled = x0, None
    if recycle:
        k_next = recycle_levels(k, K, recycle_source)
        eps1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_next = schedule.q_sample(x0, k_next, eps1)
        t_next = schedule.timesteps_of(k_next)
        with torch.set_grad_enabled(supervise_recycle and torch.is_grad_enabled()):
            out = denoise_fn(image, x_next, t_next)
        source, _ = interpret_output(out, x_next, schedule.extract("alpha_bar", k_next, x0.ndim), prediction)
        source = source.detach().to(x0.dtype)
        if supervise_recycle:
            recycled = RecyclePass(NoisyBatch(xt=x_next, k=k_next, t=t_next, eps=eps1), out)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = schedule.q_sample(source, k, eps)
    return NoisyBatch(xt=xt, k=k, t=schedule.timesteps_of(k), eps=eps, recycled=recycled)
