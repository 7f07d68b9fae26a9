"""Noisy-mask construction for a training step (METHOD.md section 3), incl. recycling.

Pure functions of tensors: they take the network as a callable and never touch
nnU-Net. Every random draw takes a ``torch.Generator`` so tests are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from nnunet_diffusion.sampling import interpret_output, reverse_step
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
    condition: Optional[torch.Tensor] = None  # self-conditioning: the previous estimate of x0 (zeros if none)

    def network_input(self) -> torch.Tensor:
        """The mask channels of the supervised pass: x_t, and the self-conditioning estimate if any."""
        return self.xt if self.condition is None else torch.cat([self.xt, self.condition], dim=1)


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
                  generator: Optional[torch.Generator] = None,
                  noisiest_share: Optional[float] = None) -> torch.Tensor:
    """One level k per sample, shape ``(B,)``: uniform on {1 ... K}, or, with ``noisiest_share`` p, k = K with
    probability p and uniform on {1 ... K - 1} otherwise."""
    if noisiest_share is None or num_steps == 1:
        return torch.randint(1, num_steps + 1, (batch_size,), device=device, generator=generator)
    lower = torch.randint(1, num_steps, (batch_size,), device=device, generator=generator)
    noisiest = torch.rand(batch_size, device=device, generator=generator) < noisiest_share
    return torch.where(noisiest, torch.full_like(lower, num_steps), lower)


def recycle_levels(k: torch.Tensor, num_steps: int, source: str) -> torch.Tensor:
    """Level k' of the recycle pass per sample: ``"next"`` min(k + 1, K) (eq. 8), ``"noise"`` K."""
    if source == "next":
        return (k + 1).clamp(max=num_steps)
    if source == "noise":
        return torch.full_like(k, num_steps)
    raise ValueError(f"recycle source must be 'next' or 'noise', got {source!r}")


@torch.no_grad()
def chain_inputs(denoise_fn: Callable, image: torch.Tensor, k: torch.Tensor, shape, schedule: Schedule, *,
                 prediction: str = "x0", sampler: str = "ddpm", start: str = "noise",
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """x_k of the sampling chain itself for each sample's level k (``recycle_source = "chain"``), without gradient.

    x_K is drawn as the chain draws it (zeros for ``start = "zeros"``, the draw still made); then for
    level L = K ... min(k) + 1 the samples with k < L take one reverse step (:func:`reverse_step`, the chain's own
    step): x0_hat = net(image, x_L, t_L), x_{L-1} from (x_L, x0_hat). A sample stops at its own level, so its x_t
    is distributed as the chain's input at that level given the current network: the inputs the chain's later
    steps see, mistakes of its earlier steps included. Only the samples still descending are evaluated, so a
    step costs sum over samples of (K - k) single-sample network calls. When every sample shares one level, the
    draws are those of :func:`p_sample_loop` with the same generator (x_K, then z for L = K ... k + 1).
    """
    K = schedule.num_steps
    x = torch.randn(shape, generator=generator, device=image.device, dtype=torch.float32)
    if start == "zeros":
        x = torch.zeros_like(x)
    for level in range(K, int(k.min()), -1):
        active = (k < level).nonzero().flatten()
        xa = x[active]
        t = torch.full((active.numel(),), int(schedule.timesteps[level - 1]), dtype=torch.long, device=x.device)
        out = denoise_fn(image[active], xa, t)
        x0_hat, _ = interpret_output(out, xa, float(schedule.alpha_bar[level - 1]), prediction)
        x[active] = reverse_step(schedule, x0_hat.float(), xa, level, sampler,
                                 lambda: torch.randn(xa.shape, generator=generator, device=x.device,
                                                     dtype=torch.float32))
    return x


def zero_at_noisiest(x: torch.Tensor, k: torch.Tensor, num_steps: int) -> torch.Tensor:
    """``x`` with the samples at level k = K set to zeros (the chain's start with ``start = "zeros"``)."""
    at_k = (k == num_steps).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(at_k, torch.zeros_like(x), x)


def make_noisy_mask(denoise_fn: Callable, image: torch.Tensor, x0: torch.Tensor, schedule: Schedule,
                    *, recycle: bool, prediction: str = "x0", k: Optional[torch.Tensor] = None,
                    generator: Optional[torch.Generator] = None, recycle_source: str = "next",
                    supervise_recycle: bool = False, noisiest_share: Optional[float] = None,
                    zero_noisiest_input: bool = False, sampler: str = "ddpm") -> NoisyBatch:
    """Build the noisy mask x_t the supervised pass is trained on.

    Recipe (paper eq. 8-9):
      1. k ~ U{1 ... K} per sample (unless given; ``noisiest_share``: see ``sample_levels``).
      2. without recycling: x_t = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps.
      3. with recycling: k' = min(k + 1, K) (``recycle_source="noise"``: k' = K);
         x_{k'} = sqrt(abar_k') x0 + sqrt(1 - abar_k') eps1;
         x0_hat' = 2 softmax(net(image, x_{k'}, t_{k'})) - 1, without gradient into x_t;
         x_t = sqrt(abar_k) x0_hat' + sqrt(1 - abar_k) eps2, eps2 fresh noise.

    ``recycle_source="chain"``: x_t is the sampling chain's own x_k (:func:`chain_inputs`, ``sampler`` as in the
    chain), run without gradient from x_K down to each sample's level; eps is then the noise that makes x_t from
    the ground truth, (x_t - sqrt(abar_k) x0) / sqrt(1 - abar_k). ``supervise_recycle`` does not apply to it.
    ``zero_noisiest_input``: x_k' and x_t of the samples at level K are zeros instead (the chain's zero start).
    ``denoise_fn(image, xt, t)`` returns a tensor or a list per scale (element 0 used here). With
    ``supervise_recycle`` it is called with gradient enabled and its output is kept in ``recycled`` for a
    loss; x0_hat' is detached either way.
    image ``(B, C_img, *spatial)``, x0 ``(B, C, *spatial)`` on the +-1 scale.
    """
    K = schedule.num_steps
    if k is None:
        k = sample_levels(x0.shape[0], K, x0.device, generator, noisiest_share)
    if recycle and recycle_source == "chain":
        if supervise_recycle:
            raise ValueError("supervise_recycle does not apply to recycle_source='chain' (no single recycle pass)")
        xt = chain_inputs(denoise_fn, image, k, x0.shape, schedule, prediction=prediction, sampler=sampler,
                          start="zeros" if zero_noisiest_input else "noise", generator=generator).to(x0.dtype)
        alpha_bar = schedule.extract("alpha_bar", k, x0.ndim)
        eps = ((xt - alpha_bar.sqrt() * x0) / (1.0 - alpha_bar).sqrt()).to(x0.dtype)
        return NoisyBatch(xt=xt, k=k, t=schedule.timesteps_of(k), eps=eps)
    source, recycled = x0, None
    if recycle:
        k_next = recycle_levels(k, K, recycle_source)
        eps1 = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_next = schedule.q_sample(x0, k_next, eps1)
        if zero_noisiest_input:
            x_next = zero_at_noisiest(x_next, k_next, K)
        t_next = schedule.timesteps_of(k_next)
        with torch.set_grad_enabled(supervise_recycle and torch.is_grad_enabled()):
            out = denoise_fn(image, x_next, t_next)
        source, _ = interpret_output(out, x_next, schedule.extract("alpha_bar", k_next, x0.ndim), prediction)
        source = source.detach().to(x0.dtype)
        if supervise_recycle:
            recycled = RecyclePass(NoisyBatch(xt=x_next, k=k_next, t=t_next, eps=eps1), out)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    xt = schedule.q_sample(source, k, eps)
    if zero_noisiest_input:
        xt = zero_at_noisiest(xt, k, K)
    return NoisyBatch(xt=xt, k=k, t=schedule.timesteps_of(k), eps=eps, recycled=recycled)


def self_condition_input(denoise_fn: FullResDenoiseFn, image: torch.Tensor, noisy: NoisyBatch, prediction: str,
                         schedule: Schedule, p_keep: float = 0.5,
                         generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Self-conditioning input of a training step (Chen et al. 2022): x0_hat of a first, gradient-free pass on
    the same x_t with no estimate (zeros), kept for each sample with probability ``p_keep`` and zeros otherwise
    (so the network learns both the chain's first step and the steps after it). ``(B, C, *spatial)``."""
    zeros = torch.zeros_like(noisy.xt)
    keep = torch.rand(noisy.xt.shape[0], generator=generator, device=noisy.xt.device) < p_keep
    if not keep.any():
        return zeros
    with torch.no_grad():
        out = denoise_fn(image, torch.cat([noisy.xt, zeros], dim=1), noisy.t)
        x0_hat, _ = interpret_output(out, noisy.xt, schedule.extract("alpha_bar", noisy.k, noisy.xt.ndim), prediction)
    shape = (-1, *([1] * (noisy.xt.ndim - 1)))
    return torch.where(keep.view(shape), x0_hat.detach().to(noisy.xt.dtype), zeros)
