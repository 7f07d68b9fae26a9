"""The reverse process (METHOD.md section 4) over explicit (t_k, t_{k-1}) pairs: one chain,
:func:`p_sample_progressive`, a generator of its steps, and what its consumers share.

The chain calls a ``denoise(x_t, t)``: x_t ``(B, C, *spatial)``, t ``(B,)`` base levels; it returns the network
output, a tensor or a list of tensors (deep supervision; element 0 is full resolution). Whatever else the network
sees (the image, a mirroring) is bound by the caller. A ``denoise_fn(image, xt, t)`` is a network call with the
image (test-time mirroring: :func:`mirrored`, :class:`MirroredGroups`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch

from nnunet_diffusion.config import _check_choice
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


def _flip(output: NetworkOutput, axes: Tuple[int, ...]) -> NetworkOutput:
    if not axes:
        return output
    if isinstance(output, (list, tuple)):
        return [torch.flip(o, axes) for o in output]
    return torch.flip(output, axes)


def mirrored(denoise_fn: DenoiseFn, axes: Tuple[int, ...]) -> DenoiseFn:
    """``denoise_fn`` seen through a mirroring: inputs flipped along ``axes`` (tensor axes, >= 2), every
    output tensor flipped back, so the result is in the un-mirrored frame."""
    if not axes:
        return denoise_fn

    def call(image: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> NetworkOutput:
        return _flip(denoise_fn(torch.flip(image, axes), torch.flip(xt, axes), t), axes)
    return call


def mean_probability_logits(outputs: Sequence[NetworkOutput]) -> NetworkOutput:
    """log of the mean softmax probability of several outputs (per deep-supervision scale), so that a softmax
    of the result gives that mean. One output is returned unchanged."""
    if len(outputs) == 1:
        return outputs[0]
    if isinstance(outputs[0], (list, tuple)):
        return [mean_probability_logits([o[s] for o in outputs]) for s in range(len(outputs[0]))]
    mean = sum(torch.softmax(o.float(), dim=1) for o in outputs) / len(outputs)
    return torch.log(mean.clamp_min(1e-12))



def _mean_outputs(outputs: Sequence[NetworkOutput]) -> NetworkOutput:
    """Element-wise mean of network outputs (per deep-supervision scale)."""
    if isinstance(outputs[0], (list, tuple)):
        return [sum(o[s].float() for o in outputs) / len(outputs) for s in range(len(outputs[0]))]
    return sum(o.float() for o in outputs) / len(outputs)


def _batch_slice(output: NetworkOutput, start: int, stop: int) -> NetworkOutput:
    if isinstance(output, (list, tuple)):
        return [o[start:stop] for o in output]
    return output[start:stop]


def _cat_outputs(outputs: Sequence[NetworkOutput]) -> NetworkOutput:
    if isinstance(outputs[0], (list, tuple)):
        return [torch.cat([o[s] for o in outputs]) for s in range(len(outputs[0]))]
    return torch.cat(list(outputs))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


class MirroredGroups:
    """Evaluates groups of a batch, each through its own mirroring, with as few network calls as memory allows.

    ``__call__(denoise_fn, image, xt, t, groups)``: image, xt, t hold ``len(groups)`` groups of equal size along
    the batch (group g = elements ``g*B ... (g+1)*B - 1``); group g goes through mirroring ``groups[g]`` (tensor
    axes). Up to ``per_call`` groups share one network call (None: all); when a call runs out of memory, the
    groups per call are halved, for this and every later call, down to one at a time. Returns each group's
    un-mirrored output, in order. Element-wise the result equals one call per group (instance normalisation and
    convolutions do not mix batch elements), up to floating-point rounding."""

    def __init__(self, per_call: Optional[int] = None):
        if per_call is not None and (isinstance(per_call, bool) or not isinstance(per_call, int) or per_call < 1):
            raise ValueError(f"mirrorings per call must be an integer >= 1 or None, got {per_call!r}")
        self.per_call = per_call
        self.calls = 0

    def __call__(self, denoise_fn: DenoiseFn, image: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
                 groups: Sequence[Tuple[int, ...]]) -> List[NetworkOutput]:
        G = len(groups)
        B = image.shape[0] // G
        outputs: List[NetworkOutput] = []
        g = 0
        while g < G:
            n = min(G - g, self.per_call or G)
            sel = range(g, g + n)
            try:
                out = denoise_fn(torch.cat([_flip(image[i * B:(i + 1) * B], groups[i]) for i in sel]),
                                 torch.cat([_flip(xt[i * B:(i + 1) * B], groups[i]) for i in sel]),
                                 t[g * B:(g + n) * B])
            except RuntimeError as e:
                if n == 1 or not _is_out_of_memory(e):
                    raise
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.per_call = max(1, n // 2)
                continue
            self.calls += 1
            outputs += [_flip(_batch_slice(out, j * B, (j + 1) * B), groups[i]) for j, i in enumerate(sel)]
            g += n
        return outputs


def reverse_step(schedule: Schedule, x0_hat: torch.Tensor, xt: torch.Tensor, k: int, sampler: str,
                 draw: Callable[[], torch.Tensor]) -> torch.Tensor:
    """x_{k-1} from x_k and the step's x0_hat (step 2 of :func:`p_sample_progressive`'s recipe), for a level k > 1
    shared by the batch; ``draw()`` gives the DDPM step's noise z (DDIM draws none)."""
    if sampler == "ddpm":
        mean, variance = schedule.q_posterior_mean_variance(x0_hat, xt, k)
        return mean + variance ** 0.5 * draw()
    if sampler == "ddim":
        i = k - 1
        abar, abar_prev = float(schedule.alpha_bar[i]), float(schedule.alpha_bar_prev[i])
        eps_hat = (xt - abar ** 0.5 * x0_hat) / (1.0 - abar) ** 0.5
        return abar_prev ** 0.5 * x0_hat + (1.0 - abar_prev) ** 0.5 * eps_hat
    raise ValueError(f"sampler must be 'ddpm' or 'ddim', got {sampler!r}")


Denoiser = Callable[[torch.Tensor, torch.Tensor], NetworkOutput]


@dataclass(frozen=True)
class Step:
    """One step of the reverse chain: level index ``k`` (K ... 1), its base level ``t``, the input ``xt`` the
    denoiser saw, its estimate ``x0_hat`` ``(B, C, *spatial)`` on the +-1 scale and the segmentation ``logits``
    (a tensor, or a list per scale under deep supervision; element 0 full resolution)."""
    k: int
    t: int
    xt: torch.Tensor
    x0_hat: torch.Tensor
    logits: NetworkOutput

    @property
    def probs(self) -> torch.Tensor:
        """Softmax of the full-resolution logits, float32 ``(B, C, *spatial)``."""
        return torch.softmax(full_resolution(self.logits).float(), dim=1)


def p_sample_progressive(denoise: Denoiser, shape: Sequence[int], schedule: Schedule, *, sampler: str = "ddpm",
                         prediction: str = "x0", generator: Optional[torch.Generator] = None,
                         noise: Optional[Iterable[torch.Tensor]] = None, device=None,
                         dtype: torch.dtype = torch.float32) -> Iterator[Step]:
    """The reverse chain (METHOD.md section 4) as a generator of its :class:`Step` s, without gradient.

    ``denoise(x_t, t)``: one network call on x_t ``shape`` = ``(B, C, *spatial)`` at base levels t ``(B,)``
    (long); whatever else the network sees (the image, cached features, a mirroring) is bound by the caller.

      1. x_K ~ N(0, I) of ``shape``;
      2. for k = K ... 1: out = denoise(x_k, t_k), x0_hat and logits from out (``prediction``), yield the step;
         if k > 1: x_{k-1} = c0_k x0_hat + ct_k x_k + sqrt(beta_tilde_k) z   (DDPM)
                   x_{k-1} = sqrt(abar_{k-1}) x0_hat + sqrt(1 - abar_{k-1}) eps_hat   (DDIM, eta = 0).

    ``noise``: the tensors to use, x_K first, then z for k = K ... 2 (DDIM uses only x_K), e.g. noise attached to
    the voxels of a whole case; otherwise they are drawn from ``generator`` on ``device`` in that order.
    Consumers decide what the chain returns: :func:`mean_of_last`, or every step (per-step outputs,
    uncertainty)."""
    _check_choice("sampler", sampler, ("ddpm", "ddim"))
    shape = tuple(shape)
    draws = iter(noise) if noise is not None else None

    def draw() -> torch.Tensor:
        if draws is not None:
            z = next(draws).to(device=device, dtype=torch.float32)
            if tuple(z.shape) != shape:
                raise ValueError(f"noise of shape {tuple(z.shape)} for a chain of shape {shape}")
            return z
        return torch.randn(shape, generator=generator, device=device, dtype=torch.float32)

    with torch.no_grad():
        xt = draw()
        for k in range(schedule.num_steps, 0, -1):
            t_k = int(schedule.timesteps[k - 1])
            t = torch.full((shape[0],), t_k, dtype=torch.long, device=xt.device)
            x0_hat, logits = interpret_output(denoise(xt.to(dtype), t), xt, float(schedule.alpha_bar[k - 1]),
                                              prediction)
            yield Step(k, t_k, xt, x0_hat, logits)
            if k > 1:
                xt = reverse_step(schedule, x0_hat, xt, k, sampler, draw)


def mean_of_last(steps: Iterable[Step], m: int) -> NetworkOutput:
    """The chain's output: the log of the mean softmax probability of the last ``m`` steps' logits (k = m ... 1),
    so that a softmax of it gives that mean; ``m`` = 1: the last step's logits unchanged (the paper)."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"the number of steps to average must be an integer >= 1, got {m!r}")
    kept = [step.logits for step in steps if step.k <= m]
    if not kept:
        raise ValueError("the chain yielded no step")
    return mean_probability_logits(kept)
