"""Exponential moving average (EMA) of a network's weights (``DiffusionConfig.ema_halflife``).

The trainer keeps the average beside the weights it trains; validation, the exported checkpoint
(``network_weights``, what every nnU-Net predictor loads) and therefore prediction use the average, while
training continues from the raw weights (``training_network_weights`` in the checkpoint).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Dict, Iterator

import torch
from torch import nn


def ema_decay(halflife_fraction: float, total_iterations: int) -> float:
    """Per-update decay d such that d ** (halflife_fraction * total_iterations) = 1/2 (at least one update)."""
    if total_iterations < 1:
        raise ValueError(f"total_iterations must be >= 1, got {total_iterations}")
    return 0.5 ** (1.0 / max(1.0, halflife_fraction * total_iterations))


def _float32_copy(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached copies; floating-point entries in float32."""
    return {k: (v.detach().float().clone() if v.is_floating_point() else v.detach().clone()) for k, v in state.items()}


class WeightAverage:
    """EMA of ``module.state_dict()``: after update n, avg = d_n avg + (1 - d_n) w with
    d_n = min(decay, (1 + n) / (10 + n)) (the warm-up keeps the random initialisation from lingering in a short
    run). Floating-point entries are averaged in float32; other entries (counters) follow the module."""

    def __init__(self, module: nn.Module, decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.updates = 0
        self.state: Dict[str, torch.Tensor] = _float32_copy(module.state_dict())

    def current_decay(self) -> float:
        return min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        self.updates += 1
        d = self.current_decay()
        for k, v in module.state_dict().items():
            avg = self.state[k]
            if v.is_floating_point():
                avg.mul_(d).add_(v.detach().float().to(avg.device), alpha=1.0 - d)
            else:
                avg.copy_(v)

    def weights_for(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """The average as a state dict with ``module``'s dtypes and devices."""
        return {k: self.state[k].to(device=v.device, dtype=v.dtype) for k, v in module.state_dict().items()}

    def load(self, weights: Dict[str, torch.Tensor], updates: int) -> None:
        """Resume from a checkpoint's average (``weights``) after ``updates`` updates."""
        missing = set(self.state) ^ set(weights)
        if missing:
            raise ValueError(f"the checkpoint's weight average does not match the network (keys {sorted(missing)[:5]})")
        self.state = _float32_copy(weights)
        self.updates = int(updates)

    def swap_into(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """Load the average into ``module``; returns a copy of the weights it held (to load back later)."""
        raw = {k: v.detach().clone() for k, v in module.state_dict().items()}
        module.load_state_dict(self.weights_for(module))
        return raw

    @contextmanager
    def applied(self, module: nn.Module) -> Iterator[None]:
        """``module`` holds the average inside the block and its own weights again after it."""
        raw = self.swap_into(module)
        try:
            yield
        finally:
            module.load_state_dict(raw)
