"""The reverse process (METHOD.md section 4) over explicit (t_k, t_{k-1}) pairs.

A ``denoise_fn(image, xt, t)`` is one network call: image ``(B, C_img, *spatial)``,
xt ``(B, C, *spatial)``, t ``(B,)`` base levels; it returns the network output, a
tensor or a list of tensors (deep supervision; element 0 is full resolution).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch

from nnunet_diffusion.schedule import Schedule

NetworkOutput = Union[torch.Tensor, Sequence[torch.Tensor]]
DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], NetworkOutput]


def full_resolution(output: NetworkOutput) -> torch.Tensor:
    """The full-resolution tensor of a network output (deep supervision returns a list)."""
    return output[0] if isinstance(output, (list, tuple)) else output


def encode_mask(label: torch.Tensor, num_classes: int) -> torch.Tensor:
    """x0 = 2 one_hot(label) - 1 (values +-1), float32.

    label: ``(B, 1, *spatial)`` or ``(B, *spatial)`` integer-valued; returns ``(B, C, *spatial)``.
    """
    if label.ndim >= 2 and label.shape[1] == 1:
        label = label[:, 0]
    index = label.long().unsqueeze(1)
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= num_classes):
        raise ValueError(f"label values must be in [0, {num_classes - 1}], got range "
                         f"[{int(index.min())}, {int(index.max())}]")
    x0 = torch.full((label.shape[0], num_classes, *label.shape[1:]), -1.0, device=label.device)
    return x0.scatter_(1, index, 1.0)


def mask_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """x0_hat = 2 softmax(logits) - 1, computed in float32 (safe under autocast)."""
    return 2.0 * torch.softmax(logits.float(), dim=1) - 1.0


def x0_from_eps(xt: torch.Tensor, eps_hat: torch.Tensor, alpha_bar: Union[float, torch.Tensor]) -> torch.Tensor:
    """x0_hat = (x_t - sqrt(1 - alpha_bar) eps_hat) / sqrt(alpha_bar), clipped to [-1, 1]."""
    if not torch.is_tensor(alpha_bar):
        alpha_bar = torch.tensor(alpha_bar, dtype=torch.float64)
    alpha_bar = alpha_bar.to(device=xt.device)
    x0 = (xt.float() - (1.0 - alpha_bar).sqrt().float() * eps_hat.float()) / alpha_bar.sqrt().float()
    return x0.clamp(-1.0, 1.0)


def logits_from_mask(x0_hat: torch.Tensor) -> torch.Tensor:
    """Segmentation logits of a +-1-scale mask: log(clip((x0_hat + 1) / 2, 1e-5, 1))."""
    return torch.log(((x0_hat + 1.0) / 2.0).clamp(1e-5, 1.0))


def logits_from_eps(output: NetworkOutput, xt: torch.Tensor,
                    alpha_bar: Union[float, torch.Tensor]) -> NetworkOutput:
    """Segmentation logits of an eps-predicting network, per deep-supervision scale (x_t area-downsampled
    to each scale): log(clip((x0_hat + 1) / 2, 1e-5, 1)) with x0_hat from :func:`x0_from_eps`."""
    import torch.nn.functional as F
    outputs = output if isinstance(output, (list, tuple)) else [output]
    logits = []
    for eps_hat in outputs:
        x = xt if eps_hat.shape[2:] == xt.shape[2:] else F.interpolate(xt.float(), size=eps_hat.shape[2:],
                                                                       mode="area")
        logits.append(logits_from_mask(x0_from_eps(x, eps_hat, alpha_bar)))
    return logits if isinstance(output, (list, tuple)) else logits[0]


def interpret_output(output: NetworkOutput, xt: torch.Tensor, alpha_bar: Union[float, torch.Tensor],
                     prediction: str) -> Tuple[torch.Tensor, NetworkOutput]:
    """Turn a network output into (x0_hat, segmentation logits).

    prediction "x0": the output *is* the logits; "eps": the output is eps_hat and the
    logits are derived from x0_hat (METHOD.md section 3, noise prediction variant).
    The logits keep the output's structure (a list per scale under deep supervision).
    """
    out = full_resolution(output)
    if prediction == "x0":
        return mask_from_logits(out), output
    if prediction == "eps":
        return x0_from_eps(xt, out, alpha_bar), logits_from_eps(output, xt, alpha_bar)
    raise ValueError(f"unknown prediction type {prediction!r}")


def _randn(shape, like: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    return torch.randn(shape, generator=generator, device=like.device, dtype=torch.float32)


@torch.no_grad()
def p_sample_loop(denoise_fn: DenoiseFn, image: torch.Tensor, schedule: Schedule, num_classes: int, *,
                  sampler: str = "ddpm", prediction: str = "x0",
                  generator: Optional[torch.Generator] = None,
                  noise: Optional[List[torch.Tensor]] = None) -> NetworkOutput:
    """Run the K-step chain and return the logits of the last step (the x0_hat at k = 1).

    Recipe (METHOD.md section 4):
      1. x_K ~ N(0, I), shape ``(B, num_classes, *spatial)``.
      2. for k = K ... 1: logits = net(image, x_k, t_k); x0_hat = 2 softmax(logits) - 1;
         if k > 1: x_{k-1} = c0_k x0_hat + ct_k x_k + sqrt(beta_tilde_k) z   (DDPM)
                   x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1}) eps_hat   (DDIM, eta = 0)
      3. return the logits of step k = 1 (not the last noisy sample).

    ``noise`` optionally gives the K tensors to use (x_K first, then z for k = K ... 2),
    so a caller can share noise across tiles; otherwise noise is drawn from ``generator``.
    """
    if sampler not in ("ddpm", "ddim"):
        raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")
    K = schedule.num_steps
    shape = (image.shape[0], num_classes, *image.shape[2:])
    draws = iter(noise) if noise is not None else None

    def draw() -> torch.Tensor:
        return next(draws).to(image.device, torch.float32) if draws is not None else _randn(shape, image, generator)

    xt = draw()
    output: NetworkOutput = None  # type: ignore[assignment]
    for k in range(K, 0, -1):
        i = k - 1
        t = torch.full((image.shape[0],), int(schedule.timesteps[i]), dtype=torch.long, device=image.device)
        net_out = denoise_fn(image, xt, t)
        x0_hat, output = interpret_output(net_out, xt, float(schedule.alpha_bar[i]), prediction)
        if k == 1:
            break
        if sampler == "ddpm":
            mean, variance = schedule.q_posterior_mean_variance(x0_hat, xt, k)
            xt = mean + variance ** 0.5 * draw()
        else:
            abar, abar_prev = float(schedule.alpha_bar[i]), float(schedule.alpha_bar_prev[i])
            eps_hat = (xt - abar ** 0.5 * x0_hat) / (1.0 - abar) ** 0.5
            xt = abar_prev ** 0.5 * x0_hat + (1.0 - abar_prev) ** 0.5 * eps_hat
    return output
